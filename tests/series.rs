//! Series completion through the durable work queue, and what an operator reads on the
//! HTTP port.

mod common;

use std::sync::Arc;

use common::data::{self, dataset_bytes};
use common::db::TestDb;
use common::node::{Node, NodeOptions};
use common::scu::{Scu, CT, EXPLICIT};

fn quick() -> NodeOptions {
    NodeOptions {
        stable_after_secs: 1,
        ..NodeOptions::default()
    }
}

#[test]
fn a_series_completes_once_and_a_late_instance_reopens_it() {
    let work = tempfile::tempdir().unwrap();
    let (spec, files) = data::synthetic_series(work.path(), 20, 6, 32);
    let node = Node::start_with(quick());
    let out = node.storescu(&[], &files[..5]);
    assert!(out.status.success(), "{}", common::text(&out));
    let index = node.index();
    let state = |i: &common::db::IndexReader| {
        i.rows("SELECT state, generation FROM series")
            .first()
            .cloned()
            .unwrap_or_default()
    };
    assert!(
        common::wait_until(15, || state(&index) == ["complete", "1"]),
        "{:?}",
        state(&index)
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(
        index.rows("SELECT kind, generation, state FROM work_queue"),
        [["series-complete", "1", "pending"]],
        "marked complete exactly once"
    );

    let mut scu = Scu::ct(node.dicom_port);
    assert_eq!(
        scu.store(EXPLICIT, CT, &spec.sop_uid(5), &dataset_bytes(&files[5]))
            .status,
        0
    );
    scu.release();
    assert_eq!(state(&index)[1], "2", "a late instance opens generation 2");
    assert!(common::wait_until(15, || state(&index) == ["complete", "2"]));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(index.count("SELECT COUNT(*) FROM work_queue"), 2);
    let metrics = node.http_get("/metrics").1;
    assert!(
        metrics.contains("anatomy_series_completed_total 2"),
        "{metrics}"
    );
}

#[test]
fn completion_survives_a_restart() {
    let work = tempfile::tempdir().unwrap();
    let (_, files) = data::synthetic_series(work.path(), 21, 5, 32);
    let mut node = Node::start_with(NodeOptions {
        stable_after_secs: 3,
        ..NodeOptions::default()
    });
    let out = node.storescu(&[], &files);
    assert!(out.status.success(), "{}", common::text(&out));
    node.kill9(); // before the series became stable
    node.spawn();
    let index = node.index();
    let done = common::wait_until(20, || {
        index.count("SELECT COUNT(*) FROM series WHERE state = 'complete'") == 1
    });
    assert!(done, "the series completes after the restart");
    assert_eq!(index.count("SELECT COUNT(*) FROM work_queue"), 1);
}

#[test]
fn several_nodes_on_one_postgresql_complete_each_series_once() {
    if common::db::postgres_admin_url().is_none() {
        eprintln!("several_nodes_on_one_postgresql_complete_each_series_once: PostgreSQL only (set ANATOMY_TEST_DATABASE_URL); SQLite is one node's file");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let db = Arc::new(TestDb::create());
    let nodes: Vec<Node> = (0..3)
        .map(|_| Node::start_sharing(quick(), db.clone()))
        .collect();
    // ten series, each split across the three nodes
    for s in 0..10u32 {
        let (_, files) = data::synthetic_series(&work.path().join(s.to_string()), 30 + s, 6, 16);
        for (i, node) in nodes.iter().enumerate() {
            let part: Vec<_> = files.iter().skip(i).step_by(3).cloned().collect();
            let out = node.storescu(&[], &part);
            assert!(out.status.success(), "{}", common::text(&out));
        }
    }
    let index = nodes[0].index();
    assert_eq!(index.count("SELECT COUNT(*) FROM instances"), 60);
    let done = common::wait_until(30, || {
        index.count("SELECT COUNT(*) FROM series WHERE state = 'complete'") == 10
    });
    assert!(done, "all series complete");
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(
        index.count("SELECT COUNT(*) FROM work_queue"),
        10,
        "one job per series"
    );
    let logged: usize = nodes
        .iter()
        .map(|n| n.log().matches("series complete").count())
        .sum();
    assert_eq!(logged, 10, "each completion is done by exactly one node");
}

#[test]
fn healthz_and_metrics_tell_what_happened() {
    let work = tempfile::tempdir().unwrap();
    let (_, files) = data::synthetic_series(work.path(), 22, 4, 64);
    let node = Node::start();
    let (status, body) = node.http_get("/healthz");
    assert_eq!(status, 200);
    assert_eq!(
        body.lines().collect::<Vec<_>>(),
        ["ok", "classifier: disabled"]
    );

    let out = node.storescu(&[], &files);
    assert!(out.status.success());
    let (status, metrics) = node.http_get("/metrics");
    assert_eq!(status, 200);
    for expected in [
        "anatomy_instances_stored_total 4",
        r#"anatomy_dimse_responses_total{command="C-STORE",status="0000"} 4"#,
        r#"anatomy_associations_total{outcome="accepted"} 1"#,
        "anatomy_store_duration_seconds_count 4",
        "anatomy_associations_active 0",
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected:?} in\n{metrics}"
        );
    }
    let bytes: u64 = files.iter().map(|f| dataset_bytes(f).len() as u64).sum();
    assert!(
        metrics.contains(&format!("anatomy_received_bytes_total {bytes}")),
        "{metrics}"
    );
}
