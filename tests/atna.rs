//! IHE ATNA export (`[audit.syslog]`): a real node sends DICOM audit messages (PS3.15 A.5)
//! in RFC 5424 syslog messages to a collector the test runs on loopback: over UDP (one
//! datagram each, configured from the environment), over mutual TLS (RFC 5425 octet-counted
//! frames, a rustls server with certificates made by openssl), and to a dead collector, which must not hold back a
//! C-STORE (the messages it misses are counted).

mod common;

use std::io::Read;
use std::net::{TcpListener, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::node::{Node, NodeOptions, AE};

/// One received syslog message: its header and its XML, checked for RFC 5424 form.
fn split_message(raw: &[u8]) -> (String, String) {
    let text = String::from_utf8(raw.to_vec()).expect("UTF-8 syslog message");
    // <PRI>1 TIMESTAMP HOST APP PROCID MSGID SD MSG
    let parts: Vec<&str> = text.splitn(8, ' ').collect();
    assert_eq!(parts.len(), 8, "{text}");
    assert_eq!(
        parts[0], "<85>1",
        "facility authpriv, notice, version 1: {text}"
    );
    assert!(parts[1].ends_with('Z') && parts[1].contains('T'), "{text}");
    assert_eq!(parts[3], "anatomy-node");
    assert_eq!(parts[5], "IHE+RFC-3881");
    assert_eq!(parts[6], "-");
    let xml = parts[7]
        .strip_prefix('\u{feff}')
        .expect("BOM before the XML");
    (parts[..7].join(" "), xml.to_string())
}

/// The EventID code, the outcome and the UserIDs of a DICOM audit message (the XML must
/// parse).
fn event_of(xml: &str) -> Event {
    let doc = roxmltree::Document::parse(xml).unwrap_or_else(|e| panic!("{e}: {xml}"));
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "AuditMessage");
    let ident = root
        .children()
        .find(|n| n.has_tag_name("EventIdentification"))
        .expect("EventIdentification");
    let id = ident
        .children()
        .find(|n| n.has_tag_name("EventID"))
        .expect("EventID");
    assert_eq!(id.attribute("codeSystemName"), Some("DCM"));
    assert!(root
        .children()
        .any(|n| n.has_tag_name("AuditSourceIdentification")
            && n.attribute("AuditSourceID") == Some(AE)));
    let users = root
        .children()
        .filter(|n| n.has_tag_name("ActiveParticipant"))
        .filter_map(|n| n.attribute("UserID").map(str::to_string))
        .collect();
    (
        id.attribute("csd-code").unwrap_or_default().to_string(),
        ident
            .attribute("EventOutcomeIndicator")
            .unwrap_or_default()
            .to_string(),
        users,
    )
}

/// EventID code, EventOutcomeIndicator, the UserIDs of the ActiveParticipants.
type Event = (String, String, Vec<String>);

/// Collect messages from `rx` until `done` holds for them (or 20 s pass).
fn collect(rx: &mpsc::Receiver<Vec<u8>>, done: impl Fn(&[Event]) -> bool) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut events = Vec::new();
    while Instant::now() < deadline && !done(&events) {
        if let Ok(raw) = rx.recv_timeout(Duration::from_millis(200)) {
            let (_, xml) = split_message(&raw);
            events.push(event_of(&xml));
        }
    }
    events
}

fn has(events: &[Event], code: &str, outcome: &str) -> bool {
    events.iter().any(|(c, o, _)| c == code && o == outcome)
}

/// An event of `code` and `outcome` with `user` among its participants.
fn has_user(events: &[Event], code: &str, outcome: &str, user: &str) -> bool {
    events
        .iter()
        .any(|(c, o, users)| c == code && o == outcome && users.iter().any(|u| u == user))
}

fn node_with_syslog(section: &str) -> Node {
    Node::start_with(NodeOptions {
        http_tables: format!("[audit.syslog]\nenabled = true\n{section}\n"),
        ..NodeOptions::default()
    })
}

#[test]
fn udp_collector_receives_dicom_audit_messages() {
    let work = tempfile::tempdir().expect("work");
    let socket = UdpSocket::bind("127.0.0.1:0").expect("UDP collector");
    let addr = socket.local_addr().expect("address");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = socket.recv(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    // Configured from the environment, as every key can be.
    let node = Node::start_with(NodeOptions {
        env: vec![
            ("ANATOMY_AUDIT__SYSLOG__ENABLED".into(), "true".into()),
            ("ANATOMY_AUDIT__SYSLOG__TRANSPORT".into(), "udp".into()),
            ("ANATOMY_AUDIT__SYSLOG__ADDRESS".into(), addr.to_string()),
        ],
        ..NodeOptions::default()
    });

    let out = node.echoscu("ECHOSCU", AE);
    assert!(out.status.success(), "{}", common::text(&out));
    let out = node.echoscu("STRANGER", AE);
    assert!(!out.status.success(), "an unknown AE must be refused");
    let (_, files) = common::data::synthetic_series(&work.path().join("s"), 1, 3, 64);
    let out = node.storescu(&[], &files);
    assert!(out.status.success(), "{}", common::text(&out));

    assert_eq!(
        node.http_status("/dicom-web/studies", Some("anp_nobody")),
        401
    );

    let events = collect(&rx, |e| {
        has(e, "110114", "0")
            && has_user(e, "110114", "4", "STRANGER")
            && has_user(e, "110114", "4", "unauthenticated")
            && has(e, "110104", "0")
    });
    assert!(has(&events, "110100", "0"), "application start: {events:?}");
    assert!(
        has(&events, "110114", "0"),
        "accepted association: {events:?}"
    );
    assert!(
        has_user(&events, "110114", "4", "STRANGER"),
        "refused association: {events:?}"
    );
    assert!(
        has_user(&events, "110114", "4", "unauthenticated"),
        "refused HTTP credentials: {events:?}"
    );
    assert!(
        has(&events, "110104", "0"),
        "instances received: {events:?}"
    );
}

/// A TLS syslog collector that requires a client certificate from `ca`: each RFC 5425
/// frame, as it arrives.
fn tls_collector(ca: &common::pki::Ca) -> (u16, mpsc::Receiver<Vec<u8>>) {
    let server = ca.server("arr");
    let tls = anatomy_node::net::ServerTls::load(anatomy_node::net::ServerFiles {
        cert: server.cert,
        key: server.key,
        client_ca: Some(ca.cert.clone()),
        require_client_cert: true,
    })
    .expect("collector TLS configuration");
    let listener = TcpListener::bind("127.0.0.1:0").expect("TLS collector");
    let port = listener.local_addr().expect("address").port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { return };
            let Ok((config, _)) = tls.for_connection() else {
                return;
            };
            let Ok(conn) = rustls::ServerConnection::new(config) else {
                return;
            };
            let mut stream = rustls::StreamOwned::new(conn, tcp);
            while let Some(frame) = read_frame(&mut stream) {
                if tx.send(frame).is_err() {
                    return;
                }
            }
        }
    });
    (port, rx)
}

/// `LENGTH SP MESSAGE` (RFC 5425 octet counting); `None` at the end of the stream.
fn read_frame(stream: &mut impl Read) -> Option<Vec<u8>> {
    let mut len = 0usize;
    let mut byte = [0u8; 1];
    loop {
        stream.read_exact(&mut byte).ok()?;
        match byte[0] {
            b' ' => break,
            d @ b'0'..=b'9' => len = len * 10 + usize::from(d - b'0'),
            other => panic!("not an octet count: byte {other}"),
        }
        assert!(len < 1 << 20, "frame length runs away");
    }
    let mut message = vec![0u8; len];
    stream.read_exact(&mut message).ok()?;
    Some(message)
}

#[test]
fn tls_collector_receives_octet_counted_frames() {
    let pki = tempfile::tempdir().expect("pki");
    let ca = common::pki::Ca::new(pki.path(), "arr-ca");
    let (port, rx) = tls_collector(&ca);
    // Mutual TLS: the collector only takes the node's client certificate.
    let client = ca.client("anatomy-node");
    let node = node_with_syslog(&format!(
        "transport = \"tls\"\naddress = \"127.0.0.1:{port}\"\nca_file = \"{}\"\n\
         server_name = \"localhost\"\ncert = \"{}\"\nkey = \"{}\"",
        ca.cert.display(),
        client.cert.display(),
        client.key.display()
    ));
    let out = node.echoscu("ECHOSCU", AE);
    assert!(out.status.success(), "{}", common::text(&out));
    let events = collect(&rx, |e| has(e, "110114", "0"));
    assert!(has(&events, "110100", "0"), "application start: {events:?}");
    assert!(
        has(&events, "110114", "0"),
        "accepted association: {events:?}"
    );
}

#[test]
fn a_dead_collector_never_holds_back_a_c_store() {
    let work = tempfile::tempdir().expect("work");
    let pki = tempfile::tempdir().expect("pki");
    let ca = common::pki::Ca::new(pki.path(), "dead-ca");
    // Nothing listens there: every connection attempt is refused, the queue (2) fills.
    let port = common::free_port();
    let node = node_with_syslog(&format!(
        "transport = \"tls\"\naddress = \"127.0.0.1:{port}\"\nca_file = \"{}\"\nmax_queue = 2",
        ca.cert.display()
    ));
    let (_, files) = common::data::synthetic_series(&work.path().join("s"), 1, 4, 64);
    for _ in 0..3 {
        let started = Instant::now();
        let out = node.echoscu("ECHOSCU", AE);
        assert!(out.status.success(), "{}", common::text(&out));
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    let out = node.storescu(&[], &files);
    assert!(out.status.success(), "{}", common::text(&out));
    let dropped = |metrics: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("anatomy_audit_syslog_messages_dropped_total"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(
        common::wait_until(10, || dropped(&node.http_get("/metrics").1) > 0.0),
        "drops are counted:\n{}",
        node.http_get("/metrics").1
    );
    assert!(node.log().contains("audit messages dropped"), "and logged");
    assert_eq!(node.stored_files().len(), 4, "every instance stored");
}
