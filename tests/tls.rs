//! DICOM TLS (PS3.15 Annex B) against DCMTK: echoscu, storescu and findscu over TLS with
//! client certificates; clients without one, with one from another CA, plain DICOM on the
//! TLS port and a pinned AE title with the wrong certificate are refused, logged and
//! audited; the plain port still works; SIGHUP swaps the server certificate while an open
//! association (the node's own SCU, `net::ClientAssociation`) completes. Certificates are
//! made by the test with openssl.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anatomy_node::forward::scu::{Association, Payload, Peer, Timeouts};
use anatomy_node::net::ClientTlsConfig;
use common::node::{Node, NodeOptions, AE};
use common::pki::{Ca, KeyPair};
use common::{data, dcmtk, free_port, text, wait_until};

/// `[dicom.tls]` on `port` with `server`, optionally asking for client certificates.
fn tls_section(port: u16, server: &KeyPair, client_ca: Option<&Path>) -> String {
    let mut out = format!(
        "[dicom.tls]\nport = {port}\ncert = \"{}\"\nkey = \"{}\"\n",
        server.cert.display(),
        server.key.display()
    );
    if let Some(ca) = client_ca {
        out.push_str(&format!(
            "client_ca = \"{}\"\nrequire_client_cert = true\n",
            ca.display()
        ));
    }
    out
}

/// A DCMTK tool against the node's TLS `port`, with `tls` (`+tls KEY CERT` or `+tla`)
/// and trusting `ca`: its log, starting with FAILED when it failed.
fn over_tls(
    tool: &str,
    calling: &str,
    tls: &[String],
    ca: &Path,
    port: u16,
    rest: &[&str],
) -> String {
    let port = port.to_string();
    let ca = ca.display().to_string();
    let mut args: Vec<&str> = vec!["-v", "-aet", calling, "-aec", AE];
    args.extend(tls.iter().map(String::as_str));
    args.extend(["+cf", &ca]);
    // Options first; storescu's files come after the address (`rest` from its first path).
    let files = rest
        .iter()
        .position(|a| a.starts_with('/'))
        .unwrap_or(rest.len());
    args.extend(rest[..files].iter().copied());
    args.extend(["127.0.0.1", &port]);
    args.extend(rest[files..].iter().copied());
    let out = dcmtk(tool, &args);
    let log = text(&out);
    if out.status.success() {
        log
    } else {
        format!("FAILED ({}): {log}", out.status)
    }
}

fn ok(log: &str) -> bool {
    !log.starts_with("FAILED")
}

fn refusals(node: &Node, like: &str) -> i64 {
    node.index().count(&format!(
        "SELECT COUNT(*) FROM audit_events WHERE event_type = 'association_refused' AND detail LIKE '%{like}%'"
    ))
}

#[test]
fn dcmtk_stores_and_queries_over_mutual_tls_and_strangers_are_refused() {
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new(pki.path(), "ca");
    let other_ca = Ca::new(pki.path(), "other-ca");
    let server = ca.server("server");
    let client = ca.client("storescu");
    let pinned = ca.client("pinned");
    let stranger = other_ca.client("storescu");
    let expired = ca.expired_client("storescu");
    let tls_port = free_port();
    let node = Node::start_with(NodeOptions {
        extra_dicom: tls_section(tls_port, &server, Some(&ca.cert)),
        allowed_peers: Some(format!(
            r#"[
  {{ ae_title = "STORESCU", host = "127.0.0.1" }},
  {{ ae_title = "ECHOSCU", host = "127.0.0.1" }},
  {{ ae_title = "FINDSCU" }},
  {{ ae_title = "PINNED", cert_subject = "CN=pinned, O=Test" }},
  {{ ae_title = "PINNED_FP", cert_sha256 = "{}" }},
]"#,
            pinned.sha256()
        )),
        ..NodeOptions::default()
    });

    // Echo, store and find with a client certificate of the CA.
    let log = over_tls(
        "echoscu",
        "ECHOSCU",
        &client.dcmtk_args(),
        &ca.cert,
        tls_port,
        &[],
    );
    assert!(ok(&log), "echoscu over TLS: {log}");
    let work = tempfile::tempdir().unwrap();
    let (_, files) = data::synthetic_series(&work.path().join("s"), 7, 2, 32);
    let file_args: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let file_refs: Vec<&str> = file_args.iter().map(String::as_str).collect();
    let log = over_tls(
        "storescu",
        "STORESCU",
        &client.dcmtk_args(),
        &ca.cert,
        tls_port,
        &file_refs,
    );
    assert!(ok(&log), "storescu over TLS: {log}");
    assert!(
        wait_until(20, || node.index().count("SELECT COUNT(*) FROM instances")
            == 2),
        "two instances indexed:\n{}",
        node.log()
    );
    let log = over_tls(
        "findscu",
        "FINDSCU",
        &client.dcmtk_args(),
        &ca.cert,
        tls_port,
        &[
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID",
        ],
    );
    assert!(
        ok(&log)
            && log.contains("Pending")
            && log.contains("Received Final Find Response (Success)"),
        "findscu over TLS: {log}"
    );
    assert!(
        wait_until(10, || node.index().count(
            "SELECT COUNT(*) FROM audit_events WHERE event_type = 'association_accepted' \
             AND cert_subject = 'CN=storescu,O=Test' AND detail LIKE '%sha256 %'"
        ) >= 3),
        "accepted associations are audited with the certificate subject"
    );

    // No client certificate, one from another CA, plain DICOM on the TLS port.
    let anonymous = vec!["+tla".to_string()];
    let log = over_tls("echoscu", "ECHOSCU", &anonymous, &ca.cert, tls_port, &[]);
    assert!(
        !ok(&log),
        "a client without a certificate is refused: {log}"
    );
    let log = over_tls(
        "echoscu",
        "ECHOSCU",
        &stranger.dcmtk_args(),
        &ca.cert,
        tls_port,
        &[],
    );
    assert!(!ok(&log), "a certificate from another CA is refused: {log}");
    let out = dcmtk(
        "echoscu",
        &[
            "-aet",
            "ECHOSCU",
            "-aec",
            AE,
            "127.0.0.1",
            &tls_port.to_string(),
        ],
    );
    assert!(
        !out.status.success(),
        "plain DICOM on the TLS port is refused"
    );
    let log = over_tls(
        "echoscu",
        "ECHOSCU",
        &expired.dcmtk_args(),
        &ca.cert,
        tls_port,
        &[],
    );
    assert!(!ok(&log), "an expired certificate is refused: {log}");
    // TLS 1.1 (openssl allowed to offer it): no handshake.
    let out = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-tls1_1",
            "-cipher",
            "DEFAULT@SECLEVEL=0",
            "-connect",
        ])
        .arg(format!("127.0.0.1:{tls_port}"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "TLS 1.1 is refused: {}", text(&out));
    assert!(
        wait_until(10, || refusals(&node, "TLS handshake failed") >= 5),
        "five TLS refusals audited:\n{}",
        node.log()
    );
    assert!(node
        .log()
        .contains("TLS handshake failed; association refused"));

    // Pinned AE titles: only with their own certificate (subject or fingerprint).
    let log = over_tls(
        "echoscu",
        "PINNED",
        &client.dcmtk_args(),
        &ca.cert,
        tls_port,
        &[],
    );
    assert!(
        !ok(&log),
        "a pinned title with another valid certificate is refused: {log}"
    );
    let log = over_tls(
        "echoscu",
        "PINNED_FP",
        &client.dcmtk_args(),
        &ca.cert,
        tls_port,
        &[],
    );
    assert!(
        !ok(&log),
        "a fingerprint-pinned title with another certificate: {log}"
    );
    for title in ["PINNED", "PINNED_FP"] {
        let log = over_tls(
            "echoscu",
            title,
            &pinned.dcmtk_args(),
            &ca.cert,
            tls_port,
            &[],
        );
        assert!(ok(&log), "{title} with its certificate: {log}");
    }
    assert!(
        wait_until(10, || refusals(&node, "pinned to a client certificate")
            >= 2),
        "pin refusals audited:\n{}",
        node.log()
    );
    // Pinned titles never pass on the plain port, where there is no certificate.
    let out = node.echoscu("PINNED", AE);
    assert!(
        !out.status.success(),
        "a pinned title on plain TCP is refused"
    );

    // The plain port works as before.
    let out = node.echoscu("ECHOSCU", AE);
    assert!(out.status.success(), "plain echoscu: {}", text(&out));
}

/// The node's own SCU (forwarder) with TLS to `port`, trusting `ca`.
fn scu_peer(port: u16, ca: &Path) -> Peer {
    Peer {
        ae_title: AE.into(),
        host: "127.0.0.1".into(),
        port,
        calling_ae_title: "TESTSCU".into(),
        tls: std::sync::Arc::new(ClientTlsConfig {
            enabled: true,
            ca_file: Some(ca.to_path_buf()),
            server_name: Some("localhost".into()),
            ..ClientTlsConfig::default()
        }),
    }
}

fn copy(pair: &KeyPair, to: &KeyPair) {
    std::fs::copy(&pair.cert, &to.cert).unwrap();
    std::fs::copy(&pair.key, &to.key).unwrap();
}

#[test]
fn sighup_swaps_the_certificate_and_an_open_association_completes() {
    let pki = tempfile::tempdir().unwrap();
    let old_ca = Ca::new(pki.path(), "old-ca");
    let new_ca = Ca::new(pki.path(), "new-ca");
    let old = old_ca.server("old-server");
    let new = new_ca.server("new-server");
    // The node reads these paths; the test replaces what is in them.
    let live = KeyPair {
        cert: pki.path().join("live.crt"),
        key: pki.path().join("live.key"),
    };
    copy(&old, &live);
    let tls_port = free_port();
    let mut node = Node::start_with(NodeOptions {
        extra_dicom: tls_section(tls_port, &live, None),
        ..NodeOptions::default()
    });
    let work = tempfile::tempdir().unwrap();
    let (_, files) = data::synthetic_series(&work.path().join("s"), 9, 1, 32);
    let file: PathBuf = files[0].clone();
    let sop_class = data::sop_class(&file);
    let ts = data::transfer_syntax(&file);
    let timeouts = Timeouts {
        connect: Duration::from_secs(5),
        dimse: Duration::from_secs(20),
    };

    let rt = common::runtime();
    let mut association = rt
        .block_on(Association::open(
            &scu_peer(tls_port, &old_ca.cert),
            &anatomy_node::forward::scu::proposals(&[(sop_class.clone(), ts.clone())]),
            262_144,
            timeouts,
        ))
        .expect("TLS association with the old certificate");

    copy(&new, &live);
    let status = std::process::Command::new("kill")
        .args(["-HUP", &node.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        wait_until(10, || node.log().contains("DICOM TLS certificate reloaded")),
        "reload logged:\n{}",
        node.log()
    );

    // The association opened before the reload still stores.
    let context = association.choose(&sop_class, &ts).expect("a context").id;
    let response = rt
        .block_on(association.store(
            context,
            &sop_class,
            &data::media_storage_sop_instance_uid(&file),
            Payload {
                head: data::dataset_bytes(&file),
                tail: None,
            },
        ))
        .expect("C-STORE on the open association");
    assert_eq!(response.status, 0, "{response:?}");
    rt.block_on(association.release());

    // New handshakes get the new certificate: trusted by the new CA only.
    let anonymous = vec!["+tla".to_string()];
    let log = over_tls(
        "echoscu",
        "ECHOSCU",
        &anonymous,
        &new_ca.cert,
        tls_port,
        &[],
    );
    assert!(ok(&log), "the new certificate after SIGHUP: {log}");
    let log = over_tls(
        "echoscu",
        "ECHOSCU",
        &anonymous,
        &old_ca.cert,
        tls_port,
        &[],
    );
    assert!(!ok(&log), "the old certificate is gone: {log}");
    let reloads = node
        .index()
        .count("SELECT COUNT(*) FROM audit_events WHERE event_type = 'config_reload' AND outcome = 'success'");
    assert_eq!(reloads, 1, "the reload is audited");

    // A broken file on the next SIGHUP keeps the current certificate.
    std::fs::write(&live.cert, "not a certificate").unwrap();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &node.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(wait_until(10, || node
        .log()
        .contains("DICOM TLS reload failed")));
    let log = over_tls(
        "echoscu",
        "ECHOSCU",
        &anonymous,
        &new_ca.cert,
        tls_port,
        &[],
    );
    assert!(ok(&log), "still the new certificate: {log}");
    node.sigterm();
    assert!(node.wait_exit(30).success());
}

#[test]
fn a_full_node_answers_a_tls_client_with_a_transient_rejection() {
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new(pki.path(), "ca");
    let server = ca.server("server");
    let tls_port = free_port();
    let node = Node::start_with(NodeOptions {
        max_associations: 1,
        extra_dicom: tls_section(tls_port, &server, None),
        ..NodeOptions::default()
    });
    let rt = common::runtime();
    let ct = (
        "1.2.840.10008.5.1.4.1.1.2".to_string(),
        "1.2.840.10008.1.2.1".to_string(),
    );
    // The one association the node serves, held open over TLS. The start-up probe of the
    // test harness may still hold the slot for a moment on a loaded machine: retry briefly.
    let open = || {
        rt.block_on(Association::open(
            &scu_peer(tls_port, &ca.cert),
            &anatomy_node::forward::scu::proposals(std::slice::from_ref(&ct)),
            262_144,
            Timeouts {
                connect: Duration::from_secs(5),
                dimse: Duration::from_secs(20),
            },
        ))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let held = loop {
        match open() {
            Ok(held) => break held,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("first association not yet accepted ({e:?}); retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("the first TLS association: {e:?}"),
        }
    };
    let anonymous = vec!["+tla".to_string()];
    let log = over_tls("echoscu", "ECHOSCU", &anonymous, &ca.cert, tls_port, &[]);
    assert!(
        !ok(&log) && log.contains("Rejected Transient") && log.contains("Local Limit Exceeded"),
        "A-ASSOCIATE-RJ over TLS: {log}"
    );
    assert!(node.log().contains("association limit reached"));
    rt.block_on(held.release());
    assert!(
        wait_until(10, || ok(&over_tls(
            "echoscu",
            "ECHOSCU",
            &anonymous,
            &ca.cert,
            tls_port,
            &[]
        ))),
        "echoscu once the slot is free:\n{}",
        node.log()
    );
}

#[test]
fn a_tls_file_that_does_not_load_stops_the_node_before_it_listens() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[dicom]\nport = {}\n\n[dicom.tls]\nport = {}\ncert = \"missing.crt\"\nkey = \"missing.key\"\n\n\
             [http]\nenabled = false\n\n[storage]\npath = \"{}\"\n\n[classifier]\nenabled = false\n",
            free_port(),
            free_port(),
            dir.path().join("storage").display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_anatomy-node"))
        .args(["serve", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ended = wait_until(20, || child.try_wait().ok().flatten().is_some());
    if !ended {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(ended && !out.status.success(), "the node started");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dicom.tls") && err.contains("missing.crt"),
        "the error names the key and the file: {err}"
    );
}

#[test]
fn with_plain_port_false_only_the_tls_port_listens() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let server = ca.server("server");
    let (plain_port, tls_port) = (free_port(), free_port());
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[dicom]\nbind = \"127.0.0.1\"\nport = {plain_port}\nallowed_peers = \"ECHOSCU@127.0.0.1\"\n\n\
             {}plain_port = false\n\n[http]\nenabled = false\n\n[storage]\npath = \"{}\"\n\n\
             [classifier]\nenabled = false\n",
            tls_section(tls_port, &server, None),
            dir.path().join("storage").display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_anatomy-node"))
        .args(["serve", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let up = wait_until(30, || {
        std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_ok()
    });
    let anonymous = vec!["+tla".to_string()];
    let log = over_tls("echoscu", "ECHOSCU", &anonymous, &ca.cert, tls_port, &[]);
    let plain_open = std::net::TcpStream::connect(("127.0.0.1", plain_port)).is_ok();
    let _ = child.kill();
    let _ = child.wait();
    assert!(up, "the TLS port listens");
    assert!(ok(&log), "echoscu over TLS: {log}");
    assert!(!plain_open, "no plain port");
}
