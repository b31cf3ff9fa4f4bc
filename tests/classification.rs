//! Labelling in the node: a series arrives with storescu, completes, and within seconds
//! the index holds its key-image probabilities and coverage — from a small test model.
//! Then the failure paths: nothing axial, broken pixels, an unusable model, a missing
//! ONNX Runtime, a crash in the middle of a classification, several nodes.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anatomy_node::anatomy::coverage::{self, CoverageRules, Decoding, Labelled};
use common::data;
use common::db::IndexReader;
use common::node::{Node, NodeOptions};

const CLASSES: usize = 6;

/// A fast test model (quadrant means → softmax) at 64×64.
fn test_model(dir: &Path, extra: &[&str]) -> PathBuf {
    let mut args = vec!["--size", "64", "--kind", "stats"];
    args.extend_from_slice(extra);
    common::models::make(dir, "model", &args)
        .expect("a Python with onnx (tests/run-all.sh makes .venv-tests)")
}

fn classifier_options(model: &Path, key_images: usize) -> NodeOptions {
    NodeOptions {
        stable_after_secs: 1,
        classifier: format!(
            "enabled = true\nmodel = \"{}\"\ndevice = \"cpu\"\nkey_images = {key_images}\nclaim_timeout_secs = 5\n",
            model.display()
        ),
        ..NodeOptions::default()
    }
}

/// The series to send: a real chest series when ../shared/data/ct is there, else synthetic.
fn a_series(work: &Path) -> (Vec<PathBuf>, usize) {
    if let Some(dir) = data::ct_data() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("elastix-chest/thorax_2mm"))
            .expect("elastix-chest")
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        let n = files.len();
        return (files, n);
    }
    let (_, files) = data::synthetic_series(&work.join("synthetic"), 40, 40, 64);
    let n = files.len();
    (files, n)
}

fn label_rows(index: &IndexReader) -> Vec<Vec<String>> {
    index.rows(
        "SELECT l.status, l.reason, l.body_part_examined, l.dominant_class, l.key_images, \
             l.candidate_images, l.model_version, l.coverage, l.generation, l.notes \
         FROM series_labels l ORDER BY l.generation",
    )
}

fn wait_for_labels(index: &IndexReader, n: usize) -> Vec<Vec<String>> {
    let ok = common::wait_until(30, || label_rows(index).len() >= n);
    assert!(
        ok,
        "no classification result within 30 s: {:?}",
        label_rows(index)
    );
    label_rows(index)
}

#[test]
fn a_series_sent_with_storescu_is_labelled_in_the_index() {
    let work = tempfile::tempdir().unwrap();
    let model = test_model(work.path(), &[]);
    let node = Node::start_with(classifier_options(&model, 8));
    let (files, slices) = a_series(work.path());
    let out = node.storescu(&[], &files);
    assert!(out.status.success(), "{}", common::text(&out));
    let index = node.index();
    let rows = wait_for_labels(&index, 1);
    let r = &rows[0];
    assert_eq!(r[0], "labelled", "{r:?}");
    assert_eq!(r[4], "8", "eight key-images");
    assert_eq!(r[5], slices.to_string(), "every slice was a candidate");
    assert!(!r[6].is_empty(), "model version recorded");
    let coverage: serde_json::Value = serde_json::from_str(&r[7]).expect("coverage JSON");
    let images_in_ranges: u64 = coverage
        .as_array()
        .expect("ranges")
        .iter()
        .map(|range| range["images"].as_u64().unwrap())
        .sum();
    assert_eq!(images_in_ranges, 8);

    let keys = index.rows(
        "SELECT sop_instance_uid, z_mm, label, probabilities FROM key_images ORDER BY z_mm DESC",
    );
    assert_eq!(keys.len(), 8);
    for k in &keys {
        let p: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&k[3]).expect("probabilities JSON");
        assert_eq!(p.len(), CLASSES);
        let sum: f64 = p.values().map(|v| v.as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-4, "probabilities sum to 1: {sum}");
        let best = p
            .iter()
            .max_by(|a, b| a.1.as_f64().unwrap().total_cmp(&b.1.as_f64().unwrap()))
            .unwrap()
            .0;
        assert_eq!(&k[2], best, "label is the most probable class");
    }
    // smoothed_label holds the labels decoded along z, exactly as anatomy::coverage decodes
    // the stored probabilities (the model's classes are the ones the decoder knows).
    let stored = index.rows(
        "SELECT CAST(z_mm AS TEXT), probabilities, smoothed_label FROM key_images ORDER BY z_mm DESC",
    );
    let classes: Vec<String> = ["neck", "lungs", "liver", "pelvis", "legs", "other"]
        .map(String::from)
        .to_vec();
    let along_z: Vec<Labelled> = stored
        .iter()
        .map(|k| {
            let p: serde_json::Value = serde_json::from_str(&k[1]).expect("probabilities");
            Labelled {
                z_mm: k[0].parse().expect("z"),
                probabilities: classes
                    .iter()
                    .map(|c| p[c].as_f64().expect("p") as f32)
                    .collect(),
            }
        })
        .collect();
    let decoded = coverage::coverage(&along_z, &classes, &CoverageRules::default());
    assert_eq!(decoded.decoding, Decoding::Order);
    let stored_decoded: Vec<String> = stored.iter().map(|k| k[2].clone()).collect();
    assert_eq!(stored_decoded, decoded.labels);
    assert!(r[9].is_empty(), "no note: {:?}", r[9]);
    let series =
        index.rows("SELECT label_status, predicted_body_part, predicted_class FROM series");
    assert_eq!(series[0][0], "labelled");
    assert_eq!(series[0][1], r[2], "the series row carries the result");
    assert_eq!(series[0][2], r[3]);
    assert_eq!(index.rows("SELECT state FROM work_queue"), [["done"]]);
    let (_, health) = node.http_get("/healthz");
    assert!(health.contains("classifier: ready"), "{health}");
    let metrics = node.http_get("/metrics").1;
    assert!(
        metrics.contains(r#"anatomy_series_labels_total{outcome="labelled"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("anatomy_classifier_ready 1"), "{metrics}");
}

#[test]
fn a_series_with_nothing_axial_is_skipped_with_the_reason() {
    let work = tempfile::tempdir().unwrap();
    let model = test_model(work.path(), &[]);
    let node = Node::start_with(classifier_options(&model, 8));
    let (_, files) = data::synthetic_series(&work.path().join("s"), 41, 4, 32);
    for f in &files {
        let out = common::dcmtk(
            "dcmodify",
            &[
                "-nb",
                "-m",
                "(0020,0037)=1\\0\\0\\0\\0\\-1",
                f.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "{}", common::text(&out));
    }
    assert!(node.storescu(&[], &files).status.success());
    let rows = wait_for_labels(&node.index(), 1);
    assert_eq!(rows[0][0], "skipped");
    assert!(rows[0][1].contains("4 not axial"), "{:?}", rows[0]);
    assert_eq!(
        node.index().count("SELECT COUNT(*) FROM key_images"),
        0,
        "never a label"
    );
}

#[test]
fn undecodable_images_are_noted_and_a_series_of_only_those_fails_with_the_reason() {
    let work = tempfile::tempdir().unwrap();
    let model = test_model(work.path(), &[]);
    let node = Node::start_with(classifier_options(&model, 8));
    let (_, files) = data::synthetic_series(&work.path().join("s"), 42, 6, 64);
    // RLE copies whose RLE header (segment count and offsets) is damaged: well formed for
    // the store, undecodable for the classifier.
    let mut broken = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let dst = work.path().join(format!("rle{i}.dcm"));
        data::dcmtk_convert("dcmcrle", &[], f, &dst);
        let mut bytes = std::fs::read(&dst).unwrap();
        let pixel_data = bytes
            .windows(4)
            .rposition(|w| w == [0xE0, 0x7F, 0x10, 0x00])
            .unwrap();
        let offset_table_len =
            u32::from_le_bytes(bytes[pixel_data + 16..pixel_data + 20].try_into().unwrap())
                as usize;
        let rle_header = pixel_data + 12 + 8 + offset_table_len + 8;
        bytes[rle_header..rle_header + 4].copy_from_slice(&15u32.to_le_bytes());
        for s in 1..16 {
            let at = rle_header + 4 * s;
            bytes[at..at + 4].copy_from_slice(&0x7FFF_FFF0u32.to_le_bytes());
        }
        std::fs::write(&dst, bytes).unwrap();
        broken.push(dst);
    }

    assert!(node.storescu(&["-R", "-xr"], &broken).status.success());
    let rows = wait_for_labels(&node.index(), 1);
    assert_eq!(rows[0][0], "failed", "{:?}", rows[0]);
    assert!(
        rows[0][1].starts_with("none of the 6 key-images could be decoded"),
        "{:?}",
        rows[0]
    );
    assert!(rows[0][1].contains("corrupt pixel data"), "{:?}", rows[0]);

    assert_eq!(
        node.index().count("SELECT COUNT(*) FROM key_images"),
        0,
        "never a label"
    );
}

#[test]
fn an_unusable_model_leaves_series_queued_and_a_fixed_node_labels_them() {
    let work = tempfile::tempdir().unwrap();
    let bad = common::models::make(
        work.path(),
        "bad",
        &["--size", "64", "--kind", "stats", "--drop-key", "hu_window"],
    )
    .expect("a Python with onnx (tests/run-all.sh makes .venv-tests)");
    let mut node = Node::start_with(classifier_options(&bad, 8));
    let (health_status, health) = node.http_get("/healthz");
    assert_eq!(health_status, 200, "the node still takes images");
    assert!(
        health.contains("unavailable") && health.contains("hu_window"),
        "{health}"
    );
    let (_, files) = data::synthetic_series(&work.path().join("s"), 43, 5, 32);
    assert!(node.storescu(&[], &files).status.success());
    let index = node.index();
    assert!(common::wait_until(15, || index
        .count("SELECT COUNT(*) FROM series WHERE state = 'complete'")
        == 1));
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(
        index.rows("SELECT state FROM work_queue"),
        [["pending"]],
        "the job waits"
    );
    assert_eq!(
        index.count("SELECT COUNT(*) FROM series_labels"),
        0,
        "never a label"
    );
    assert!(node.log().contains("hu_window"), "the log names the key");

    // Same storage and database, a good model: the waiting series is labelled.
    node.kill9();
    let good = test_model(work.path(), &[]);
    let fixed = Node::start_sharing(
        NodeOptions {
            storage: Some(node.storage()),
            ..classifier_options(&good, 8)
        },
        node.db.clone(),
    );
    let rows = wait_for_labels(&fixed.index(), 1);
    assert_eq!(rows[0][0], "labelled");
}

#[test]
fn a_missing_onnx_runtime_library_is_reported_not_fatal() {
    let work = tempfile::tempdir().unwrap();
    let model = test_model(work.path(), &[]);
    let mut options = classifier_options(&model, 8);
    options
        .classifier
        .push_str("onnxruntime_library = \"/nonexistent/libonnxruntime.so\"\n");
    let node = Node::start_with(options);
    let health = node.http_get("/healthz").1;
    assert!(
        health.contains("unavailable") && health.contains("/nonexistent/libonnxruntime.so"),
        "{health}"
    );
    assert!(node.echoscu("ECHOSCU", "ANATOMY").status.success());
}

#[test]
fn a_classification_interrupted_by_a_crash_is_done_again() {
    let work = tempfile::tempdir().unwrap();
    let mut first = Node::start_with(NodeOptions {
        stable_after_secs: 1,
        ..NodeOptions::default()
    });
    let (_, files) = data::synthetic_series(&work.path().join("s"), 44, 5, 32);
    assert!(first.storescu(&[], &files).status.success());
    let index = first.index();
    assert!(common::wait_until(15, || index
        .count("SELECT COUNT(*) FROM work_queue")
        == 1));
    // A node claimed the job and died in the middle of it.
    let ten_minutes_ago = anatomy_node::store::now_millis() - 600_000;
    let url = first.index_url().replace("?mode=ro", "");
    common::runtime().block_on(async {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        sqlx::query("UPDATE work_queue SET state = 'running', claimed_by = 'dead-node:1', claimed_at = $1, attempts = 1")
            .bind(ten_minutes_ago)
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    });
    first.kill9();
    drop(index);
    let model = test_model(work.path(), &[]);
    let second = Node::start_sharing(
        NodeOptions {
            storage: Some(first.storage()),
            ..classifier_options(&model, 8)
        },
        first.db.clone(),
    );
    let index = second.index();
    let rows = wait_for_labels(&index, 1);
    assert_eq!(rows[0][0], "labelled");
    let job = index.rows("SELECT state, attempts, claimed_by FROM work_queue");
    assert_eq!(job[0][0], "done");
    assert_eq!(job[0][1], "2", "taken over: a second attempt");
    assert_ne!(job[0][2], "dead-node:1");
}

#[test]
fn a_late_instance_gets_the_series_labelled_again() {
    let work = tempfile::tempdir().unwrap();
    let model = test_model(work.path(), &[]);
    let node = Node::start_with(classifier_options(&model, 8));
    let (_, files) = data::synthetic_series(&work.path().join("s"), 45, 6, 32);
    assert!(node.storescu(&[], &files[..5]).status.success());
    let index = node.index();
    wait_for_labels(&index, 1);
    assert!(node.storescu(&[], &files[5..]).status.success());
    let rows = wait_for_labels(&index, 2);
    assert_eq!((rows[0][8].as_str(), rows[1][8].as_str()), ("1", "2"));
    assert_eq!(rows[1][5], "6", "the new generation sees all six slices");
    assert_eq!(index.rows("SELECT label_generation FROM series"), [["2"]]);
}

#[test]
fn several_nodes_on_one_postgresql_never_classify_a_series_twice() {
    if common::db::postgres_admin_url().is_none() {
        eprintln!("several_nodes_on_one_postgresql_never_classify_a_series_twice: PostgreSQL only (set ANATOMY_TEST_DATABASE_URL)");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let model = test_model(work.path(), &[]);
    let db = Arc::new(common::db::TestDb::create());
    let storage = work.path().join("shared-storage");
    let nodes: Vec<Node> = (0..3)
        .map(|_| {
            Node::start_sharing(
                NodeOptions {
                    storage: Some(storage.clone()),
                    ..classifier_options(&model, 4)
                },
                db.clone(),
            )
        })
        .collect();
    for s in 0..6u32 {
        let (_, files) = data::synthetic_series(&work.path().join(s.to_string()), 50 + s, 4, 32);
        let node = &nodes[s as usize % 3];
        assert!(node.storescu(&[], &files).status.success());
    }
    let index = nodes[0].index();
    let rows = wait_for_labels(&index, 6);
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(
        label_rows(&index).len(),
        6,
        "one result per series: {rows:?}"
    );
    let logged: usize = nodes
        .iter()
        .map(|n| n.log().matches("series labelled").count())
        .sum();
    assert_eq!(logged, 6, "each series classified by exactly one node");
}
