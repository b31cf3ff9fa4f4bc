//! The audit trail: a real node, DCMTK echoscu/storescu/findscu and HTTP requests with and
//! without a token; afterwards `anatomy-node audit` and a direct query of `audit_events`
//! show each event with its actor, peer and outcome. `ANATOMY_TEST_DATABASE_URL` runs it on
//! PostgreSQL (tests/common/db.rs).

mod common;

use std::net::TcpStream;
use std::process::{Command, Output};

use serde_json::Value;

use common::node::{Node, NodeOptions, AE};

/// A GET with an optional bearer token: the status.
fn http_get(node: &Node, path: &str, token: Option<&str>) -> u16 {
    node.http_status(path, token)
}

fn audit(node: &Node, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_anatomy-node"))
        .arg("audit")
        .arg("--config")
        .arg(node.dir.path().join("config.toml"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("anatomy-node audit")
}

/// `anatomy-node audit --json ARGS`: the events, newest first.
fn audit_json(node: &Node, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = audit(node, &all);
    assert!(
        out.status.success(),
        "audit {args:?}: {}",
        common::text(&out)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn of_type<'a>(events: &'a [Value], t: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event_type"] == t).collect()
}

fn findscu_study(node: &Node) -> Output {
    let port = node.dicom_port.to_string();
    common::dcmtk(
        "findscu",
        &[
            "-S",
            "-aet",
            "TESTSCU",
            "-aec",
            AE,
            "127.0.0.1",
            &port,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID",
        ],
    )
}

fn is_loopback_peer(e: &Value) -> bool {
    e["peer"]
        .as_str()
        .is_some_and(|p| p.starts_with("127.0.0.1:"))
}

#[test]
fn actions_are_recorded_with_actor_peer_and_outcome() {
    let work = tempfile::tempdir().expect("work");
    let (token, hash, _) = common::make_token("auditor", "read");
    let mut node = Node::start_with(NodeOptions {
        extra_http: "anonymous = false".into(),
        http_tables: format!(
            "[[http.tokens]]\nname = \"auditor\"\nsha256 = \"{hash}\"\nroles = [\"read\"]\n"
        ),
        ..NodeOptions::default()
    });

    // DICOM: an echo, a refused association, a series, a C-FIND.
    let out = node.echoscu("ECHOSCU", AE);
    assert!(out.status.success(), "{}", common::text(&out));
    let out = node.echoscu("STRANGER", AE);
    assert!(!out.status.success(), "an unknown AE must be refused");
    let (spec, files) = common::data::synthetic_series(&work.path().join("s"), 1, 4, 64);
    let out = node.storescu(&[], &files);
    assert!(out.status.success(), "{}", common::text(&out));
    let out = findscu_study(&node);
    assert!(out.status.success(), "{}", common::text(&out));

    // HTTP: with the token, without, with a wrong one; a QIDO-RS query naming the patient.
    let qido = format!("/dicom-web/studies?PatientID={}", spec.patient_id);
    assert_eq!(http_get(&node, &qido, Some(&token)), 200);
    assert_eq!(http_get(&node, "/dicom-web/studies", None), 401);
    assert_eq!(
        http_get(&node, "/dicom-web/studies", Some("anp_not-a-token")),
        401
    );

    // The writer commits in batches, without waiting for shutdown: a direct query sees them.
    let index = node.index();
    let seen = common::wait_until(20, || {
        index.count("SELECT COUNT(*) FROM audit_events WHERE event_type = 'auth_failure'") >= 2
            && index
                .count("SELECT COUNT(*) FROM audit_events WHERE event_type = 'instances_received'")
                >= 1
    });
    assert!(
        seen,
        "audit events not written: {:?}",
        index.rows("SELECT event_type, outcome, actor FROM audit_events")
    );
    let refused = index.rows(
        "SELECT actor, outcome, peer, detail FROM audit_events \
         WHERE event_type = 'association_refused'",
    );
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0][0], "STRANGER");
    assert_eq!(refused[0][1], "refused");
    assert!(refused[0][2].starts_with("127.0.0.1:"), "{refused:?}");
    assert!(refused[0][3].contains("allowed_peers"), "{refused:?}");
    drop(index);

    // A clean stop records node_stop (and flushes the queue).
    node.sigterm();
    assert!(node.wait_exit(30).success());

    let events = audit_json(&node, &["--limit", "1000"]);
    let times: Vec<i64> = events
        .iter()
        .map(|e| e["occurred_at"].as_i64().expect("occurred_at"))
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );
    assert_eq!(events[0]["event_type"], "node_stop", "{events:#?}");

    let start = of_type(&events, "node_start");
    assert_eq!(start.len(), 1, "{events:#?}");
    assert_eq!(start[0]["actor"], "node");
    let config = node.dir.path().join("config.toml");
    assert!(
        start[0]["object"]
            .as_str()
            .is_some_and(|o| o.contains(&config.display().to_string())),
        "the config file: {:?}",
        start[0]
    );
    assert!(
        start[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("classifier disabled")),
        "{:?}",
        start[0]
    );

    let accepted = of_type(&events, "association_accepted");
    for actor in ["ECHOSCU", "STORESCU", "TESTSCU"] {
        let a: Vec<_> = accepted.iter().filter(|e| e["actor"] == actor).collect();
        assert_eq!(a.len(), 1, "{actor}: {accepted:#?}");
        assert_eq!(a[0]["outcome"], "success");
        assert!(is_loopback_peer(a[0]), "{:?}", a[0]);
    }
    assert!(
        !accepted.iter().any(|e| e["actor"] == "STRANGER"),
        "{accepted:#?}"
    );

    let received = of_type(&events, "instances_received");
    assert_eq!(
        received.len(),
        1,
        "one event per association: {received:#?}"
    );
    let r = received[0];
    assert_eq!(r["actor"], "STORESCU");
    assert_eq!(r["outcome"], "success");
    assert!(is_loopback_peer(r), "{r:?}");
    assert_eq!(r["studies"], spec.study_uid().as_str());
    assert_eq!(r["series"], spec.series_uid().as_str());
    assert_eq!(r["detail"], "4 stored, 0 failed");

    let finds = of_type(&events, "c_find");
    assert_eq!(finds.len(), 1, "{finds:#?}");
    assert_eq!(finds[0]["actor"], "TESTSCU");
    assert_eq!(finds[0]["object"], "STUDY");
    assert!(is_loopback_peer(finds[0]), "{:?}", finds[0]);
    assert!(
        finds[0]["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("1 matches")),
        "{:?}",
        finds[0]
    );

    let requests = of_type(&events, "http_request");
    assert_eq!(requests.len(), 1, "{requests:#?}");
    assert_eq!(requests[0]["actor"], "token auditor");
    assert_eq!(requests[0]["outcome"], "success");
    assert_eq!(requests[0]["object"], "GET /dicom-web/studies");
    assert_eq!(requests[0]["detail"], "status 200");
    assert!(is_loopback_peer(requests[0]), "{:?}", requests[0]);

    let failures = of_type(&events, "auth_failure");
    assert_eq!(failures.len(), 2, "{failures:#?}");
    for f in &failures {
        assert_eq!(f["outcome"], "failure");
        assert_eq!(f["actor"], "unauthenticated");
        assert!(is_loopback_peer(f), "{f:?}");
        assert!(
            f["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("status 401")),
            "{f:?}"
        );
    }

    // No PHI: the patient ID the query named is nowhere in the trail.
    let all = serde_json::to_string(&events).expect("json");
    assert!(!all.contains(&spec.patient_id), "PHI in the audit trail");

    // Filters.
    let only = audit_json(&node, &["--type", "association_refused"]);
    assert_eq!(only.len(), 1, "{only:#?}");
    assert_eq!(only[0]["actor"], "STRANGER");
    let failed = audit_json(&node, &["--outcome", "failure"]);
    assert_eq!(failed.len(), 2, "{failed:#?}");
    assert!(failed.iter().all(|e| e["event_type"] == "auth_failure"));
    let by_actor = audit_json(&node, &["--actor", "STORESCU"]);
    assert_eq!(by_actor.len(), 2, "accepted + received: {by_actor:#?}");
    assert_eq!(audit_json(&node, &["--limit", "1"]).len(), 1);
    assert_eq!(
        audit_json(&node, &["--since", "1h", "--type", "node-start"]).len(),
        1
    );
    assert!(audit_json(&node, &["--until", "2000-01-01"]).is_empty());

    // The table.
    let out = audit(&node, &["--type", "c_find"]);
    assert!(out.status.success(), "{}", common::text(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("TIME (UTC)"), "{table}");
    assert!(
        table.contains("c_find") && table.contains("TESTSCU"),
        "{table}"
    );

    // Bad arguments: a clear error, no listing.
    for (args, says) in [
        (&["--type", "login"][..], "unknown event type"),
        (&["--outcome", "ok"][..], "success, failure, refused"),
        (&["--since", "yesterday"][..], "not a time"),
        (&["--limit", "0"][..], "--limit"),
        (
            &["--since", "2026-01-02", "--until", "2026-01-01"][..],
            "--since is after --until",
        ),
    ] {
        let out = audit(&node, args);
        assert!(!out.status.success(), "{args:?} must fail");
        let text = common::text(&out);
        assert!(text.contains(says), "{args:?}: {text}");
        assert!(out.stdout.is_empty(), "{args:?}: {text}");
    }
}

#[test]
fn retention_prunes_old_events() {
    // An event from long ago, written straight into the index, is deleted by a node that
    // keeps 30 days (ANATOMY_AUDIT__RETENTION_DAYS); a recent one stays.
    let node = Node::start_with(NodeOptions {
        env: vec![("ANATOMY_AUDIT__RETENTION_DAYS".into(), "30".into())],
        ..NodeOptions::default()
    });
    // The reader's URL without SQLite's read-only mode.
    let url = node.index_url().replace("?mode=ro", "");
    let rt = common::runtime();
    rt.block_on(async {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&url).await.expect("index");
        sqlx::query(
            "INSERT INTO audit_events (occurred_at, event_type, outcome, actor) \
             VALUES (1000, 'c_find', 'success', 'OLDSCU')",
        )
        .execute(&pool)
        .await
        .expect("insert");
        pool.close().await;
    });
    let mut node = node;
    // The node prunes at start and hourly: restart it to prune now.
    node.sigterm();
    assert!(node.wait_exit(30).success());
    node.spawn();
    let index = node.index();
    let pruned = common::wait_until(20, || {
        index.count("SELECT COUNT(*) FROM audit_events WHERE actor = 'OLDSCU'") == 0
    });
    assert!(pruned, "the old event was not pruned:\n{}", node.log());
    assert!(
        index.count("SELECT COUNT(*) FROM audit_events WHERE event_type = 'node_start'") >= 1,
        "recent events stay"
    );
}

#[test]
fn forwards_and_the_model_are_recorded() {
    // A series labelled by a one-class test model goes to a storescp that is up and to a
    // destination that is down: one forward event each, success and failure; node_start
    // names the model and its version.
    let work = tempfile::tempdir().expect("work");
    let Some(model) = common::models::make(
        work.path(),
        "lungs",
        &["--size", "64", "--kind", "stats", "--classes", "lungs"],
    ) else {
        return;
    };
    let up = common::free_port();
    let down = common::free_port();
    let scp_dir = tempfile::tempdir().expect("storescp dir");
    let mut scp = Command::new("storescp")
        .env("TCP_NODELAY", "1")
        .args(["+B", "+uf", "-aet", "LUNG_CAD", "-od"])
        .arg(scp_dir.path())
        .arg(up.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start storescp (apt package dcmtk)");
    assert!(common::wait_until(10, || TcpStream::connect((
        "127.0.0.1",
        up
    ))
    .is_ok()));
    let destination = |name: &str, port: u16| {
        format!(
            "[[destinations]]\nname = \"{name}\"\nae_title = \"{name}\"\nhost = \"127.0.0.1\"\nport = {port}\n"
        )
    };
    let mut node = Node::start_with(NodeOptions {
        stable_after_secs: 1,
        classifier: format!(
            "enabled = true\nmodel = \"{}\"\ndevice = \"cpu\"\nkey_images = 8\n\n\
             [forward]\nmax_attempts = 1\nbatch_size = 64\n\n{}{}\
             [[routes]]\nclasses = [\"lungs\"]\ndestinations = [\"LUNG_CAD\", \"DOWN_CAD\"]\n",
            model.display(),
            destination("LUNG_CAD", up),
            destination("DOWN_CAD", down),
        ),
        ..NodeOptions::default()
    });
    let (spec, files) = common::data::synthetic_series(&work.path().join("s"), 7, 6, 64);
    let out = node.storescu(&[], &files);
    assert!(out.status.success(), "{}", common::text(&out));
    let index = node.index();
    let both = common::wait_until(60, || {
        index.count("SELECT COUNT(*) FROM audit_events WHERE event_type = 'forward'") >= 2
    });
    assert!(
        both,
        "forward events: {:?}\n{}",
        index.rows("SELECT event_type, outcome, actor, object, detail FROM audit_events"),
        node.log()
    );
    drop(index);
    node.sigterm();
    assert!(node.wait_exit(30).success());
    let _ = scp.kill();
    let _ = scp.wait();

    let forwards = audit_json(&node, &["--type", "forward"]);
    let of = |name: &str| -> Vec<&Value> {
        forwards
            .iter()
            .filter(|e| {
                e["object"]
                    .as_str()
                    .is_some_and(|o| o.starts_with(&format!("destination {name} ")))
            })
            .collect()
    };
    let ok = of("LUNG_CAD");
    assert_eq!(ok.len(), 1, "{forwards:#?}");
    assert_eq!(ok[0]["outcome"], "success");
    assert_eq!(ok[0]["actor"], AE, "the node's calling AE title");
    assert_eq!(ok[0]["peer"], format!("127.0.0.1:{up}").as_str());
    assert_eq!(ok[0]["series"], spec.series_uid().as_str());
    assert_eq!(ok[0]["studies"], spec.study_uid().as_str());
    // The 6 instances (and the Key Object Selection document, when configured).
    assert!(
        ok[0]["detail"]
            .as_str()
            .is_some_and(|d| d.ends_with(" sent, 0 failed") && !d.starts_with("0 ")),
        "{:?}",
        ok[0]
    );
    let failed = of("DOWN_CAD");
    assert!(!failed.is_empty(), "{forwards:#?}");
    assert!(failed.iter().all(|e| e["outcome"] == "failure"));
    assert!(
        failed[0]["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("no association")),
        "{:?}",
        failed[0]
    );

    let start = audit_json(&node, &["--type", "node_start"]);
    let detail = start[0]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&model.display().to_string()) && detail.contains("version"),
        "the model and its version: {detail}"
    );
}
