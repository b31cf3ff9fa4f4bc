//! `anatomy-node eval` end to end: a tiny dataset written here, scored by a `stats` test
//! model (tests/tools/make_test_model.py: logits from the four quadrant means, so the
//! probabilities of a crafted image are known), against figures worked out by hand; the
//! files it writes; its errors; and the shipped model against its model card.
//!
//! Needs the Python of tests/tools/requirements.txt to write the models (see tests/model.rs;
//! `ANATOMY_ALLOW_SKIP_PYTHON=1` skips instead of failing without it) and the ONNX Runtime
//! library (deploy/install-onnxruntime.sh).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anatomy_node::dataset::write::{write_manifest, write_png};
use anatomy_node::dataset::ManifestRow;
use serde_json::Value;

/// The test model's classes: `pelvis` gets no positives in the dataset, `legs` (a dataset
/// label) is not among them.
const CLASSES: &str = "neck,lungs,liver,pelvis";
const SIZE: usize = 16;
const TEMPERATURE: f64 = 0.5;

/// (image, patient, split, label, HU of the quadrants [top-left, top-right, bottom-left,
/// bottom-right]). The model sees each quadrant's mean windowed value
/// v = (clamp(HU, −100, 200) + 100) / 300 and computes softmax((v·W + b) / 0.5).
///
/// The probabilities this gives (checked by `designed_images_give_the_planned_predictions`):
///
/// | image | label     | neck   | lungs  | liver  | pelvis | predicted | conf. bin      |
/// |-------|-----------|--------|--------|--------|--------|-----------|----------------|
/// | a1    | neck      | 0.9555 | ~0     | 0.0035 | 0.0410 | neck  ✓   | 14 (.933, 1]   |
/// | a2    | neck      | 0.7023 | 0.0005 | 0.0116 | 0.2855 | neck  ✓   | 10 (.667, .733]|
/// | a3    | lungs     | ~0     | 0.9427 | 0.0573 | ~0     | lungs ✓   | 14             |
/// | a4    | ambiguous | never scored                                                   |
/// | a5    | neck      | 0.1922 | 0.0524 | 0.0143 | 0.7412 | pelvis ✗  | 11 (.733, .8]  |
/// | b1    | lungs     | 0.0141 | 0.7320 | 0.1995 | 0.0544 | lungs ✓   | 10             |
/// | b2    | lungs     | 0.3998 | ~1e-5  | 0.5964 | 0.0038 | liver ✗   | 8 (.533, .6]   |
/// | b3    | liver     | 0.0323 | ~0     | 0.9676 | 0.0002 | liver ✓   | 14             |
/// | b4    | legs      | not a class of the model: never scored                         |
/// | c1    | liver     | 0.0002 | 0.1544 | 0.8453 | 0.0001 | liver ✓   | 12 (.8, .867]  |
/// | c2    | neck      | = b2 (same image: a tie in every class's ranking) | liver ✗ | 8  |
/// | c3    | liver     | 0.0001 | 0.7855 | 0.2141 | 0.0003 | lungs ✗   | 11             |
const IMAGES: [(&str, &str, &str, &str, [i32; 4]); 12] = [
    ("a1", "patient-a", "test", "neck", [-100, -100, 200, 125]),
    ("a2", "patient-a", "test", "neck", [-100, -100, 50, 50]),
    ("a3", "patient-a", "test", "lungs", [200, 125, -100, -100]),
    ("a4", "patient-a", "test", "ambiguous", [50, 50, 50, 50]),
    ("a5", "patient-a", "test", "neck", [-100, -100, -100, -25]),
    ("b1", "patient-b", "test", "lungs", [-25, -25, -100, -100]),
    ("b2", "patient-b", "test", "lungs", [-100, -100, 200, -25]),
    ("b3", "patient-b", "test", "liver", [-100, -100, 200, -100]),
    ("b4", "patient-b", "test", "legs", [200, 200, 200, 200]),
    ("c1", "patient-c", "val", "liver", [125, -25, -100, -100]),
    ("c2", "patient-c", "val", "neck", [-100, -100, 200, -25]),
    ("c3", "patient-c", "val", "liver", [125, 50, -100, -100]),
];

// ---------------------------------------------------------------------------------------
// Helpers

/// Writes `dir/<name>.onnx` (and its `.json` parameters) with make_test_model.py.
fn make_model(dir: &Path, name: &str, args: &[&str]) -> Option<PathBuf> {
    common::models::make(dir, name, args)
}

/// The `stats` model of the tests, at [`SIZE`] with [`CLASSES`] and [`TEMPERATURE`].
fn stats_model(dir: &Path) -> Option<PathBuf> {
    let t = TEMPERATURE.to_string();
    make_model(
        dir,
        "stats",
        &["--size", "16", "--classes", CLASSES, "--temperature", &t],
    )
}

/// An image whose four quadrants hold the given HU.
fn quadrant_image(hu: [i32; 4], size: usize) -> Vec<f32> {
    let half = size / 2;
    (0..size * size)
        .map(|i| {
            let (row, col) = (i / size, i % size);
            hu[(row / half) * 2 + col / half] as f32
        })
        .collect()
}

/// Writes [`IMAGES`] as a dataset folder of the contract (PNGs, manifest.csv, dataset.json).
fn write_dataset(dir: &Path) {
    write_dataset_keyed(dir, &|patient| patient.to_string());
}

/// [`write_dataset`] with each patient's `patient_key` made by `key` from its name (e.g. as
/// `dataset build` does from a case id).
fn write_dataset_keyed(dir: &Path, key: &dyn Fn(&str) -> String) {
    std::fs::create_dir_all(dir.join("images")).expect("mkdir");
    let mut rows = Vec::new();
    for (k, (name, patient, split, label, hu)) in IMAGES.iter().enumerate() {
        let image = format!("images/{name}.png");
        write_png(&dir.join(&image), SIZE, &quadrant_image(*hu, SIZE)).expect("png");
        rows.push(ManifestRow {
            image,
            patient_key: key(patient),
            study_uid: format!("1.2.3.{}", &patient[8..]),
            series_uid: format!("1.2.3.{}.1", &patient[8..]),
            sop_instance_uid: format!("1.2.3.{}.1.{k}", &patient[8..]),
            z_mm: format!("{}", -5.0 * k as f64),
            label: label.to_string(),
            label_source: "mask".into(),
            split: split.to_string(),
        });
    }
    write_manifest(&dir.join("manifest.csv"), &rows).expect("manifest");
    let json = serde_json::json!({
        "format": "anatomy-node-dataset/1",
        "input_size": SIZE,
        "hu_offset": 32768,
        "images": IMAGES.len(),
        "patients": 3,
        "seed": 7,
        "split_ratios": [0.5, 0.25, 0.25],
        "labels_file": "labels.csv",
    });
    std::fs::write(dir.join("dataset.json"), json.to_string()).expect("dataset.json");
}

fn anatomy_node(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_anatomy-node"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run anatomy-node")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `eval` and returns its metrics.json and stdout.
fn eval(model: &Path, dataset: &Path, out: &Path, extra: &[&str]) -> (Value, String) {
    let mut args = vec![
        "eval",
        "--model",
        model.to_str().expect("utf-8"),
        "--dataset",
        dataset.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    let output = anatomy_node(&args);
    assert!(output.status.success(), "eval {extra:?}: {}", text(&output));
    let json = std::fs::read(out.join("metrics.json")).expect("metrics.json");
    let metrics = serde_json::from_slice(&json).expect("metrics.json is JSON");
    (
        metrics,
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// `eval` that must fail; returns its stderr.
fn eval_error(args: &[&str]) -> String {
    let mut all = vec!["eval", "--device", "cpu"];
    all.extend_from_slice(args);
    let output = anatomy_node(&all);
    assert!(!output.status.success(), "eval {args:?} must fail");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// What the `stats` model computes for an image of quadrant HU `hu` (f64; the ONNX model
/// computes in f32, so figures agree to ~1e-7), from the W and b it wrote next to itself.
fn stats_probabilities(params: &Value, hu: [i32; 4]) -> Vec<f64> {
    let w = params["W"].as_array().expect("W");
    let b = params["b"].as_array().expect("b");
    let t = params["temperature"].as_f64().expect("temperature");
    let v: Vec<f64> = hu
        .iter()
        .map(|&h| (f64::from(h).clamp(-100.0, 200.0) + 100.0) / 300.0)
        .collect();
    let logits: Vec<f64> = (0..b.len())
        .map(|c| {
            let dot: f64 = (0..4).map(|f| v[f] * w[f][c].as_f64().expect("w")).sum();
            (dot + b[c].as_f64().expect("b")) / t
        })
        .collect();
    let max = logits.iter().copied().fold(f64::MIN, f64::max);
    let exp: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}

fn read_params(model: &Path) -> Value {
    let text = std::fs::read_to_string(model.with_extension("json")).expect("model params");
    serde_json::from_str(&text).expect("params JSON")
}

/// Confidence (largest probability) of a designed image.
fn confidence(params: &Value, name: &str) -> f64 {
    let hu = IMAGES
        .iter()
        .find(|i| i.0 == name)
        .map(|i| i.4)
        .expect("image");
    stats_probabilities(params, hu)
        .into_iter()
        .fold(0.0, f64::max)
}

fn f(value: &Value) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{value} is not a number"))
}

fn close(actual: &Value, expected: f64, tolerance: f64, what: &str) {
    let a = f(actual);
    assert!(
        (a - expected).abs() <= tolerance,
        "{what}: {a} vs expected {expected}"
    );
}

fn keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("{value} is not an object"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

struct Setup {
    dir: tempfile::TempDir,
    model: PathBuf,
    params: Value,
}

impl Setup {
    fn new() -> Option<Setup> {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = stats_model(dir.path())?;
        write_dataset(&dir.path().join("dataset"));
        let params = read_params(&model);
        Some(Setup { dir, model, params })
    }

    fn dataset(&self) -> PathBuf {
        self.dir.path().join("dataset")
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

// ---------------------------------------------------------------------------------------
// 1. The figures, by hand

#[test]
fn designed_images_give_the_planned_predictions() {
    let Some(setup) = Setup::new() else { return };
    let classes: Vec<&str> = CLASSES.split(',').collect();
    // (image, predicted class, confidence bin (i/15, (i+1)/15])
    let planned = [
        ("a1", "neck", 14),
        ("a2", "neck", 10),
        ("a3", "lungs", 14),
        ("a5", "pelvis", 11),
        ("b1", "lungs", 10),
        ("b2", "liver", 8),
        ("b3", "liver", 14),
        ("c1", "liver", 12),
        ("c2", "liver", 8),
        ("c3", "lungs", 11),
    ];
    for (name, predicted, bin) in planned {
        let hu = IMAGES.iter().find(|i| i.0 == name).expect("image").4;
        let p = stats_probabilities(&setup.params, hu);
        let best = (0..p.len())
            .max_by(|&a, &b| p[a].total_cmp(&p[b]))
            .expect("classes");
        assert_eq!(classes[best], predicted, "{name}: {p:?}");
        let conf = p[best];
        let (low, high) = (bin as f64 / 15.0, (bin + 1) as f64 / 15.0);
        // a margin keeps f32 rounding in the model from moving an image across an edge
        assert!(
            conf > low + 1e-4 && conf <= high - 1e-4,
            "{name}: {conf} not in bin {bin}"
        );
    }
}

#[test]
fn figures_match_the_hand_computed_ones() {
    let Some(setup) = Setup::new() else { return };
    let (m, stdout) = eval(
        &setup.model,
        &setup.dataset(),
        &setup.out("all"),
        &["--split", "all"],
    );

    // counts: 12 images, 1 ambiguous, 1 `legs` (not a class of the model), 10 scored
    let counts = &m["counts"];
    assert_eq!(counts["images"], 12);
    assert_eq!(counts["patients"], 3);
    assert_eq!(counts["scored"], 10);
    assert_eq!(counts["ambiguous"], 1);
    assert_eq!(counts["not_in_model"], 1);
    assert_eq!(
        counts["not_in_model_labels"],
        serde_json::json!({"legs": 1})
    );
    assert_eq!(
        counts["per_class"],
        serde_json::json!({"neck": 4, "lungs": 3, "liver": 3, "ambiguous": 1, "legs": 1})
    );
    assert_eq!(
        counts["per_split"],
        serde_json::json!({
            "val": {"neck": 1, "liver": 2},
            "test": {"neck": 3, "lungs": 3, "liver": 1, "ambiguous": 1, "legs": 1}
        })
    );
    assert_eq!(
        counts["patients_per_split"],
        serde_json::json!({"val": 1, "test": 2})
    );
    assert_eq!(m["splits"], serde_json::json!(["train", "val", "test"]));

    // slices: a5, b2, c2, c3 are wrong
    let slice = &m["slice"];
    assert_eq!(slice["images"], 10);
    assert_eq!(slice["errors"], 4);
    close(&slice["error"], 0.4, 1e-12, "error");
    close(&slice["accuracy"], 0.6, 1e-12, "accuracy");
    // rows true, columns predicted: neck a1 a2 → neck, c2 → liver, a5 → pelvis; lungs a3 b1
    // → lungs, b2 → liver; liver b3 c1 → liver, c3 → lungs; pelvis: none
    assert_eq!(
        slice["confusion"]["matrix"],
        serde_json::json!([[2, 0, 1, 1], [0, 2, 1, 0], [0, 1, 2, 0], [0, 0, 0, 0]])
    );
    assert_eq!(
        slice["confusion"]["classes"],
        serde_json::json!(["neck", "lungs", "liver", "pelvis"])
    );
    // AUC neck: positives a1 a2 a5 c2 vs 6 negatives (24 pairs): a1 and a2 beat all 6, a5
    // (0.19) loses only to b2 (0.40): 5, c2 ties b2 and beats 5: 5.5 → 22.5/24.
    let neck = 22.5 / 24.0;
    // lungs: positives a3 b1 b2 vs 7 negatives (21 pairs): a3 beats all 7, b1 (0.73) loses
    // only to c3 (0.79): 6, b2 (~1e-5) beats a1 and b3 (~0), ties c2: 2.5 → 15.5/21.
    let lungs = 15.5 / 21.0;
    // liver: positives b3 c1 c3 vs 7 negatives: b3 and c1 beat all 7, c3 (0.21) loses to b2
    // and c2 (0.60): 5 → 19/21.
    let liver = 19.0 / 21.0;
    close(&slice["auc"]["neck"], neck, 1e-12, "AUC neck");
    close(&slice["auc"]["lungs"], lungs, 1e-12, "AUC lungs");
    close(&slice["auc"]["liver"], liver, 1e-12, "AUC liver");
    assert!(
        slice["auc"]["pelvis"].is_null(),
        "pelvis has no positives: {}",
        slice["auc"]
    );
    assert_eq!(
        slice["auc_undefined"],
        serde_json::json!({"pelvis": "no positives"})
    );
    assert_eq!(
        slice["mean_auc_classes"],
        serde_json::json!(["neck", "lungs", "liver"])
    );
    close(
        &slice["mean_auc"],
        (neck + lungs + liver) / 3.0,
        1e-12,
        "mean AUC",
    );
    close(&slice["per_class_error"]["neck"], 0.5, 1e-12, "neck error");
    assert!(slice["per_class_error"]["pelvis"].is_null());

    // calibration: bins 8 {b2, c2: wrong}, 10 {a2, b1: right}, 11 {a5, c3: wrong},
    // 12 {c1: right}, 14 {a1, a3, b3: right}; ECE = Σ |Σ correct − Σ confidence| / 10
    let c = |name| confidence(&setup.params, name);
    let ece = (2.0 * c("b2")
        + (2.0 - c("a2") - c("b1"))
        + (c("a5") + c("c3"))
        + (1.0 - c("c1"))
        + (3.0 - c("a1") - c("a3") - c("b3")))
        / 10.0;
    close(&m["calibration"]["ece"], ece, 1e-6, "ECE");
    assert_eq!(m["calibration"]["bins"], 15);
    let per_bin: Vec<u64> = m["calibration"]["reliability"]
        .as_array()
        .expect("reliability")
        .iter()
        .map(|b| b["images"].as_u64().expect("images"))
        .collect();
    assert_eq!(per_bin, [0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 2, 2, 1, 0, 3]);
    let bin8 = &m["calibration"]["reliability"][8];
    close(&bin8["accuracy"], 0.0, 0.0, "bin 8 accuracy");
    close(&bin8["confidence"], c("b2"), 1e-6, "bin 8 confidence");
    close(&bin8["lower"], 8.0 / 15.0, 1e-12, "bin 8 lower edge");
    assert!(m["calibration"]["reliability"][0]["accuracy"].is_null());

    // patients by majority vote: A truth neck (3 of 4), predicted neck (2 of 4) ✓;
    // B truth lungs (2 of 3), predicted liver (2 of 3) ✗; C truth liver (2 of 3), predicted
    // liver (c1, c2) ✓ → 1 of 3 wrong
    let patient = &m["patient"];
    assert_eq!(patient["method"], "majority-vote");
    assert_eq!(patient["patients"], 3);
    assert_eq!(patient["errors"], 1);
    close(&patient["error"], 1.0 / 3.0, 1e-12, "patient error");
    // every patient has a wrong slice; their slice errors are 1/4, 1/3 and 2/3
    assert_eq!(patient["with_slice_errors"], 3);
    close(
        &patient["any_slice_error"],
        1.0,
        1e-12,
        "patients with a wrong slice",
    );
    close(
        &patient["mean_slice_error"],
        (0.25 + 1.0 / 3.0 + 2.0 / 3.0) / 3.0,
        1e-12,
        "mean slice error per patient",
    );
    let rows = patient["per_patient"].as_array().expect("per_patient");
    let summary: Vec<(String, String, u64, u64, String, String, bool)> = rows
        .iter()
        .map(|r| {
            (
                r["patient_key"].as_str().expect("key").to_string(),
                r["split"].as_str().expect("split").to_string(),
                r["images"].as_u64().expect("images"),
                r["errors"].as_u64().expect("errors"),
                r["true_class"].as_str().expect("true").to_string(),
                r["predicted_class"]
                    .as_str()
                    .expect("predicted")
                    .to_string(),
                r["correct"].as_bool().expect("correct"),
            )
        })
        .collect();
    let row = |k: &str, s: &str, n, e, t: &str, p: &str, ok| {
        (
            k.to_string(),
            s.to_string(),
            n,
            e,
            t.to_string(),
            p.to_string(),
            ok,
        )
    };
    assert_eq!(
        summary,
        [
            row("patient-c", "val", 3, 2, "liver", "liver", true),
            row("patient-a", "test", 4, 1, "neck", "neck", true),
            row("patient-b", "test", 3, 1, "lungs", "liver", false),
        ]
    );
    assert_eq!(
        rows[2]["predicted_counts"],
        serde_json::json!({"lungs": 1, "liver": 2})
    );

    // the model's metadata
    assert_eq!(
        m["model"]["classes"],
        serde_json::json!(["neck", "lungs", "liver", "pelvis"])
    );
    assert_eq!(m["model"]["version"], "test-stats-16");
    assert_eq!(m["model"]["hu_window"], serde_json::json!([-100.0, 200.0]));
    close(
        &m["model"]["temperature"],
        TEMPERATURE,
        1e-12,
        "temperature",
    );
    assert_eq!(m["model"]["provider"], "CPUExecutionProvider");
    assert_eq!(m["timing"]["images"], 10);
    assert!(f(&m["timing"]["images_per_s"]) > 0.0);

    // the summary says the same
    for needle in [
        "error 40.00 % (4 wrong)",
        "mean 0.8601 over 3 classes; left out: pelvis: no positives",
        "patients: 3 scored: error 33.33 % (1 wrong), by majority vote of the slices; 3 with a \
         wrong slice (100.00 %), mean slice error per patient 41.67 %",
        "1 ambiguous, 1 not among the model's classes (legs 1)",
        "images/s",
    ] {
        assert!(
            stdout.contains(needle),
            "{needle:?} missing from:\n{stdout}"
        );
    }
}

#[test]
fn the_default_split_is_test() {
    let Some(setup) = Setup::new() else { return };
    let (m, _) = eval(&setup.model, &setup.dataset(), &setup.out("test"), &[]);
    assert_eq!(m["splits"], serde_json::json!(["test"]));
    assert_eq!(m["counts"]["images"], 9);
    assert_eq!(m["counts"]["scored"], 7);
    let slice = &m["slice"];
    assert_eq!(slice["errors"], 2); // a5, b2
    close(&slice["error"], 2.0 / 7.0, 1e-12, "error");
    // neck: a1 a2 a5 vs a3 b1 b2 b3: a5 loses to b2 → 11/12; lungs: a3 b1 b2 vs a1 a2 a5 b3:
    // b2 beats a1 and b3 only → 10/12; liver: b3 beats all 6
    close(&slice["auc"]["neck"], 11.0 / 12.0, 1e-12, "AUC neck");
    close(&slice["auc"]["lungs"], 10.0 / 12.0, 1e-12, "AUC lungs");
    close(&slice["auc"]["liver"], 1.0, 1e-12, "AUC liver");
    close(
        &slice["mean_auc"],
        (11.0 / 12.0 + 10.0 / 12.0 + 1.0) / 3.0,
        1e-12,
        "mean AUC",
    );
    let c = |name| confidence(&setup.params, name);
    let ece =
        (c("b2") + (2.0 - c("a2") - c("b1")) + c("a5") + (3.0 - c("a1") - c("a3") - c("b3"))) / 7.0;
    close(&m["calibration"]["ece"], ece, 1e-6, "ECE");
    assert_eq!(m["patient"]["patients"], 2);
    close(&m["patient"]["error"], 0.5, 1e-12, "patient error");
    close(
        &m["patient"]["mean_slice_error"],
        (0.25 + 1.0 / 3.0) / 2.0,
        1e-12,
        "mean slice error per patient",
    );
}

/// The Python side (training/metrics.py) computes the same figures from the same
/// probabilities (predictions.csv).
#[test]
fn figures_agree_with_training_metrics_py() {
    let Some(setup) = Setup::new() else { return };
    let out = setup.out("all");
    let (m, _) = eval(&setup.model, &setup.dataset(), &out, &["--split", "all"]);
    let Some(python) = common::models::python() else {
        return;
    };
    let script = r#"
import csv, json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from training.metrics import classification_report
classes = sys.argv[3].split(",")
rows = list(csv.DictReader(open(sys.argv[2])))
p = np.array([[float(r["p_" + c]) for c in classes] for r in rows], dtype=np.float32)
t = np.array([classes.index(r["label"]) for r in rows])
r = classification_report(p, t, classes)
auc = {c: (None if np.isnan(v) else v) for c, v in r["auc"].items()}
keys = ["images", "error", "nll", "ece", "mean_auc", "confusion"]
print(json.dumps(dict({k: r[k] for k in keys}, auc=auc)))
"#;
    let output = Command::new(python)
        .args(["-c", script, env!("CARGO_MANIFEST_DIR")])
        .arg(out.join("predictions.csv"))
        .arg(CLASSES)
        .output()
        .expect("python");
    assert!(output.status.success(), "{}", text(&output));
    let py: Value = serde_json::from_slice(&output.stdout).expect("python JSON");
    assert_eq!(py["images"], m["slice"]["images"]);
    assert_eq!(py["confusion"], m["slice"]["confusion"]["matrix"]);
    for (key, ours) in [
        ("error", &m["slice"]["error"]),
        ("nll", &m["slice"]["nll"]),
        ("ece", &m["calibration"]["ece"]),
        ("mean_auc", &m["slice"]["mean_auc"]),
    ] {
        close(ours, f(&py[key]), 1e-6, key);
    }
    for class in CLASSES.split(',') {
        match py["auc"][class].as_f64() {
            Some(v) => close(&m["slice"]["auc"][class], v, 1e-9, class),
            None => assert!(m["slice"]["auc"][class].is_null(), "{class}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// 2. The files, their stability, and errors

#[test]
fn metrics_json_is_complete_and_stable_and_plots_are_images() {
    let Some(setup) = Setup::new() else { return };
    let out = setup.out("files");
    let (m, _) = eval(
        &setup.model,
        &setup.dataset(),
        &out,
        &["--split", "val,test"],
    );

    assert_eq!(m["format"], "anatomy-node-eval/1");
    let sections = [
        (
            "",
            &m,
            &[
                "format",
                "created_by",
                "model",
                "dataset",
                "splits",
                "counts",
                "slice",
                "calibration",
                "patient",
                "timing",
            ][..],
        ),
        (
            "model",
            &m["model"],
            &[
                "file",
                "sha256",
                "version",
                "classes",
                "input_size",
                "hu_window",
                "normalization",
                "temperature",
                "trained_on",
                "provider",
            ],
        ),
        (
            "dataset",
            &m["dataset"],
            &[
                "path",
                "format",
                "size",
                "seed",
                "split_ratios",
                "labels",
                "images",
                "patients",
                "manifest_sha256",
            ],
        ),
        (
            "counts",
            &m["counts"],
            &[
                "images",
                "patients",
                "scored",
                "ambiguous",
                "not_in_model",
                "not_in_model_labels",
                "per_class",
                "per_split",
                "patients_per_split",
            ],
        ),
        (
            "slice",
            &m["slice"],
            &[
                "images",
                "errors",
                "error",
                "accuracy",
                "nll",
                "auc_definition",
                "auc",
                "mean_auc",
                "mean_auc_classes",
                "auc_undefined",
                "per_class_error",
                "per_class_images",
                "confusion",
            ],
        ),
        (
            "slice.confusion",
            &m["slice"]["confusion"],
            &["rows", "columns", "classes", "matrix"],
        ),
        (
            "calibration",
            &m["calibration"],
            &["ece", "bins", "binning", "reliability"],
        ),
        (
            "calibration.reliability[]",
            &m["calibration"]["reliability"][0],
            &["lower", "upper", "images", "accuracy", "confidence", "gap"],
        ),
        (
            "patient",
            &m["patient"],
            &[
                "method",
                "rule",
                "patients",
                "errors",
                "error",
                "accuracy",
                "with_slice_errors",
                "any_slice_error",
                "mean_slice_error",
                "per_patient",
            ],
        ),
        (
            "patient.per_patient[]",
            &m["patient"]["per_patient"][0],
            &[
                "patient_key",
                "split",
                "images",
                "errors",
                "error",
                "true_class",
                "predicted_class",
                "correct",
                "true_counts",
                "predicted_counts",
            ],
        ),
        (
            "timing",
            &m["timing"],
            &[
                "images",
                "seconds",
                "images_per_s",
                "inference_seconds",
                "inference_images_per_s",
                "batch",
                "provider",
            ],
        ),
    ];
    for (name, value, expected) in sections {
        assert_eq!(keys(value), set(expected), "keys of `{name}`");
    }
    // what rebuilds the dataset, and which model file the figures belong to
    assert_eq!(m["dataset"]["size"], 16);
    assert_eq!(m["dataset"]["seed"], 7);
    assert_eq!(
        m["dataset"]["split_ratios"],
        serde_json::json!([0.5, 0.25, 0.25])
    );
    assert_eq!(m["dataset"]["labels"], "labels.csv");
    assert_eq!(m["dataset"]["images"], 12);
    let bytes = std::fs::read(&setup.model).expect("model");
    assert_eq!(m["model"]["sha256"], sha256_hex(&bytes));
    let manifest = std::fs::read(setup.dataset().join("manifest.csv")).expect("manifest");
    assert_eq!(m["dataset"]["manifest_sha256"], sha256_hex(&manifest));

    // a second run gives the same file, timing aside
    let (again, _) = eval(
        &setup.model,
        &setup.dataset(),
        &out,
        &["--split", "test,val"],
    );
    let strip = |mut v: Value| {
        v.as_object_mut().expect("object").remove("timing");
        v
    };
    assert_eq!(strip(m.clone()), strip(again));

    // predictions.csv: one row per scored image, probabilities per class
    let predictions = std::fs::read_to_string(out.join("predictions.csv")).expect("csv");
    let mut lines = predictions.lines();
    assert_eq!(
        lines.next(),
        Some("image,patient_key,split,label,predicted,confidence,p_neck,p_lungs,p_liver,p_pelvis")
    );
    assert_eq!(lines.count(), 10);

    for (name, min_width) in [
        ("confusion.png", 500),
        ("roc.png", 700),
        ("reliability.png", 700),
    ] {
        let (width, height, colours) = png_facts(&out.join(name));
        assert!(
            width >= min_width && height >= 400,
            "{name}: {width}×{height}"
        );
        // text and lines drawn, not a blank canvas
        assert!(colours > 20, "{name}: only {colours} colours");
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// Width, height and number of distinct colours of a PNG (decoding it proves it is valid).
fn png_facts(path: &Path) -> (u32, u32, usize) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let mut reader = decoder.read_info().expect("PNG header");
    let mut buffer = vec![0; reader.output_buffer_size().expect("size")];
    let frame = reader.next_frame(&mut buffer).expect("PNG data");
    let pixels = &buffer[..frame.buffer_size()];
    let step = frame.color_type.samples();
    let colours: BTreeSet<&[u8]> = pixels.chunks(step).collect();
    (frame.width, frame.height, colours.len())
}

#[test]
fn wrong_inputs_give_clear_errors() {
    let Some(setup) = Setup::new() else { return };
    let model = setup.model.to_str().expect("utf-8").to_string();
    let dataset = setup.dataset();
    let data = dataset.to_str().expect("utf-8").to_string();
    let out = setup.out("errors");
    let out = out.to_str().expect("utf-8");

    // unknown split
    let err = eval_error(&["--model", &model, "--dataset", &data, "--split", "holdout"]);
    assert!(err.contains("unknown split \"holdout\""), "{err}");

    // no such model
    let missing = setup.out("missing.onnx");
    let err = eval_error(&[
        "--model",
        missing.to_str().expect("utf-8"),
        "--dataset",
        &data,
    ]);
    assert!(
        err.contains("missing.onnx") && err.contains("no such file"),
        "{err}"
    );

    // a model that takes another input size than the dataset holds
    let Some(big) = make_model(
        setup.dir.path(),
        "stats32",
        &["--size", "32", "--classes", CLASSES],
    ) else {
        return;
    };
    let err = eval_error(&[
        "--model",
        big.to_str().expect("utf-8"),
        "--dataset",
        &data,
        "--out",
        out,
    ]);
    assert!(
        err.contains("takes 32×32 images") && err.contains("holds 16×16 images"),
        "{err}"
    );

    // a model that sees a fixed field of view, and a dataset fitted whole
    let Some(framed) = make_model(
        setup.dir.path(),
        "stats16-fov",
        &[
            "--size",
            "16",
            "--classes",
            CLASSES,
            "--set-key",
            "field_of_view_mm=500",
        ],
    ) else {
        return;
    };
    let err = eval_error(&[
        "--model",
        framed.to_str().expect("utf-8"),
        "--dataset",
        &data,
        "--out",
        out,
    ]);
    assert!(
        err.contains("field of view of 500 mm") && err.contains("none (whole image)"),
        "{err}"
    );

    // a model that frames the body, and a dataset without `framing` (whole images)
    let Some(body) = make_model(
        setup.dir.path(),
        "stats16-body",
        &[
            "--size",
            "16",
            "--classes",
            CLASSES,
            "--set-key",
            "framing=body",
        ],
    ) else {
        return;
    };
    let err = eval_error(&[
        "--model",
        body.to_str().expect("utf-8"),
        "--dataset",
        &data,
        "--out",
        out,
    ]);
    assert!(
        err.contains("frames images \"body\" (metadata framing)")
            && err.contains("framed \"whole\" (dataset.json framing)")
            && err.contains("--framing body"),
        "{err}"
    );
    // and the other way round: body-framed images for the whole-image model
    let json_path = dataset.join("dataset.json");
    let original = std::fs::read_to_string(&json_path).expect("dataset.json");
    let mut framed_json: Value = serde_json::from_str(&original).expect("json");
    framed_json["framing"] = "body".into();
    std::fs::write(&json_path, framed_json.to_string()).expect("dataset.json");
    let err = eval_error(&["--model", &model, "--dataset", &data, "--out", out]);
    assert!(
        err.contains("frames images \"whole\"") && err.contains("framed \"body\""),
        "{err}"
    );
    // body-framed images for the body-framing model are evaluated
    let (metrics, _) = eval(&body, &dataset, &setup.out("body-framed"), &[]);
    assert!(metrics.is_object(), "{metrics}");
    std::fs::write(&json_path, original).expect("dataset.json");

    // a PNG of the wrong size
    let image = dataset.join("images/b1.png");
    write_png(&image, 8, &[0.0; 64]).expect("png");
    let err = eval_error(&["--model", &model, "--dataset", &data, "--out", out]);
    assert!(
        err.contains("images/b1.png") && err.contains("is 8×8") && err.contains("input_size 16"),
        "{err}"
    );

    // no split with images
    let err = eval_error(&[
        "--model",
        &model,
        "--dataset",
        &data,
        "--split",
        "train",
        "--out",
        out,
    ]);
    assert!(err.contains("no image in split train"), "{err}");

    // a manifest with a missing column
    let manifest = dataset.join("manifest.csv");
    std::fs::write(
        &manifest,
        "image,patient_key,label,split\nimages/a1.png,p,neck,test\n",
    )
    .expect("manifest");
    let err = eval_error(&["--model", &model, "--dataset", &data, "--out", out]);
    assert!(
        err.contains("manifest.csv: line 2: missing field `study_uid`"),
        "{err}"
    );

    // no manifest at all
    std::fs::remove_file(&manifest).expect("rm");
    let err = eval_error(&["--model", &model, "--dataset", &data, "--out", out]);
    assert!(err.contains("manifest.csv: cannot be read"), "{err}");

    // no dataset.json
    std::fs::remove_file(dataset.join("dataset.json")).expect("rm");
    let err = eval_error(&["--model", &model, "--dataset", &data, "--out", out]);
    assert!(err.contains("dataset.json: cannot be read"), "{err}");
}

// ---------------------------------------------------------------------------------------
// 3. The shipped model and its card

/// The model card: `models/anatomy.metrics.json` is the metrics.json that `anatomy-node
/// eval` wrote for `models/anatomy.onnx`; rebuilding the dataset it names (`dataset`: size,
/// seed, split_ratios, labels) from ../shared/data/ct and scoring the model again on the
/// same `splits` must give the same headline figures.
///
/// `ANATOMY_SHIPPED_MODEL=<dir>/<name>.onnx` checks another model against its card
/// `<dir>/<name>.metrics.json` (a candidate, before it is committed).
#[test]
fn the_shipped_model_matches_its_model_card() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = std::env::var_os("ANATOMY_SHIPPED_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("models/anatomy.onnx"));
    let card_path = model.with_extension("metrics.json");
    if !model.is_file() {
        assert!(
            std::env::var_os("ANATOMY_SHIPPED_MODEL").is_none(),
            "ANATOMY_SHIPPED_MODEL: {} is not a file",
            model.display()
        );
        assert!(
            !tracked_by_git(root, "models/anatomy.onnx"),
            "models/anatomy.onnx is committed (git ls-files) but absent from the work tree"
        );
        eprintln!("NOTE: no model is shipped yet (models/anatomy.onnx is absent, also from git)");
        return;
    }
    assert!(
        card_path.is_file(),
        "{} has no model card {}: write it with `anatomy-node eval --model <model> --dataset \
         <dataset> --out <dir>` and copy <dir>/metrics.json",
        model.display(),
        card_path.display()
    );
    let card: Value = serde_json::from_slice(&std::fs::read(&card_path).expect("card"))
        .unwrap_or_else(|e| panic!("{}: {e}", card_path.display()));
    assert_eq!(
        card["format"],
        "anatomy-node-eval/1",
        "{}: a model card is the metrics.json that `anatomy-node eval` writes (format \
         anatomy-node-eval/1), so that this test can recompute it",
        card_path.display()
    );
    let bytes = std::fs::read(&model).expect("model");
    assert_eq!(
        card["model"]["sha256"],
        sha256_hex(&bytes),
        "{} was computed for another model file than {}",
        card_path.display(),
        model.display()
    );
    let Some(ct) = common::data::ct_data() else {
        eprintln!("NOTE: no CT data: the shipped model cannot be checked against its card");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = rebuild_dataset(&card, &ct, &dir.path().join("dataset"));
    let splits = card["splits"]
        .as_array()
        .expect("card: splits")
        .iter()
        .map(|s| s.as_str().expect("split name"))
        .collect::<Vec<_>>()
        .join(",");
    let (m, stdout) = eval(
        &model,
        &dataset,
        &dir.path().join("eval"),
        &["--split", &splits],
    );
    println!("{stdout}");
    compare_headlines(&card, &m);
}

fn tracked_by_git(root: &Path, path: &str) -> bool {
    let output = Command::new("git")
        .args(["ls-files", "--", path])
        .current_dir(root)
        .output();
    match output {
        Ok(o) if o.status.success() => !String::from_utf8_lossy(&o.stdout).trim().is_empty(),
        _ => {
            eprintln!("NOTE: not a git work tree: cannot tell whether a model is committed");
            false
        }
    }
}

/// `anatomy-node dataset build` with the card's recorded size, seed, split and labels.
fn rebuild_dataset(card: &Value, ct: &Path, out: &Path) -> PathBuf {
    let d = &card["dataset"];
    let size = d["size"].as_u64().expect("card: dataset.size").to_string();
    let seed = d["seed"].as_u64().expect("card: dataset.seed").to_string();
    let ratios: Vec<String> = d["split_ratios"]
        .as_array()
        .expect("card: dataset.split_ratios")
        .iter()
        .map(|r| f(r).to_string())
        .collect();
    let labels = ct.join(d["labels"].as_str().expect("card: dataset.labels"));
    let output = anatomy_node(&[
        "dataset",
        "build",
        "--from",
        ct.to_str().expect("utf-8"),
        "--labels",
        labels.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
        "--size",
        &size,
        "--seed",
        &seed,
        "--split",
        &ratios.join(","),
    ]);
    assert!(output.status.success(), "dataset build: {}", text(&output));
    out.to_path_buf()
}

/// The headline figures agree within 1e-3 (the card may come from another device).
fn compare_headlines(card: &Value, m: &Value) {
    let same_data = card["dataset"]["manifest_sha256"] == m["dataset"]["manifest_sha256"];
    let hint = if same_data {
        ""
    } else {
        " (the rebuilt manifest.csv differs from the card's: the dataset is not the one the \
         card was computed on)"
    };
    let mut checks = vec![
        ("slice.error", &card["slice"]["error"], &m["slice"]["error"]),
        (
            "slice.mean_auc",
            &card["slice"]["mean_auc"],
            &m["slice"]["mean_auc"],
        ),
        (
            "patient.error",
            &card["patient"]["error"],
            &m["patient"]["error"],
        ),
        (
            "calibration.ece",
            &card["calibration"]["ece"],
            &m["calibration"]["ece"],
        ),
    ];
    let classes = card["model"]["classes"]
        .as_array()
        .expect("card: model.classes");
    for class in classes {
        let class = class.as_str().expect("class");
        checks.push((
            class,
            &card["slice"]["auc"][class],
            &m["slice"]["auc"][class],
        ));
    }
    for (what, expected, actual) in checks {
        match (expected.as_f64(), actual.as_f64()) {
            (Some(e), Some(a)) => assert!(
                (e - a).abs() <= 1e-3,
                "{what}: card says {e}, the model gives {a}{hint}"
            ),
            (None, None) => {}
            _ => panic!("{what}: card says {expected}, the model gives {actual}{hint}"),
        }
    }
    assert_eq!(
        card["slice"]["images"], m["slice"]["images"],
        "scored images{hint}"
    );
}

// ---------------------------------------------------------------------------------------
// Figures per group (--groups)

/// A grouping file laid out like ../shared/data/sources.csv: patient-a alone in `Alpha`,
/// patient-b and patient-c in a quoted `Beta (TCIA, test)`, a case the dataset lacks.
const SOURCES: &str = "case_id,folder,source,manufacturer,model
patient-a,ct,Alpha,GE MEDICAL SYSTEMS,LightSpeed16
patient-b,ct,\"Beta (TCIA, test)\",SIEMENS,Emotion
patient-c,ct-extra,\"Beta (TCIA, test)\",GE MEDICAL SYSTEMS,LightSpeed16
case-not-in-the-dataset,ct,Gamma,Philips,Brilliance
";
const BETA: &str = "Beta (TCIA, test)";

/// The tiny dataset with patient keys derived from the patient names as `dataset build`
/// derives them from case ids, and a grouping file of those case ids.
fn grouped_setup(setup: &Setup) -> (PathBuf, PathBuf) {
    let dataset = setup.out("dataset-cases");
    write_dataset_keyed(&dataset, &|p| anatomy_node::dataset::patient_key(p));
    let sources = setup.out("sources.csv");
    std::fs::write(&sources, SOURCES).expect("sources.csv");
    (dataset, sources)
}

fn group<'a>(m: &'a Value, name: &str) -> &'a Value {
    m["groups"]["groups"]
        .as_array()
        .expect("groups.groups")
        .iter()
        .find(|g| g["group"] == name)
        .unwrap_or_else(|| panic!("no group {name:?} in {}", m["groups"]))
}

#[test]
fn groups_give_figures_per_source_and_class_with_mean_and_worst() {
    let Some(setup) = Setup::new() else { return };
    let (dataset, sources) = grouped_setup(&setup);
    let out = setup.out("groups");
    let file = sources.to_str().expect("utf-8");
    let (m, stdout) = eval(
        &setup.model,
        &dataset,
        &out,
        &["--split", "all", "--groups", file],
    );
    let g = &m["groups"];
    assert_eq!(g["key_column"], "case_id");
    assert_eq!(g["group_columns"], serde_json::json!(["source"]));
    // groups in file order; Gamma has no patient in the dataset and is left out
    let names: Vec<&str> = g["groups"]
        .as_array()
        .expect("array")
        .iter()
        .map(|g| g["group"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["Alpha", BETA]);
    // Alpha = patient-a: a1 a2 a5 neck (a5 called pelvis), a3 lungs, a4 ambiguous
    let alpha = group(&m, "Alpha");
    assert_eq!(alpha["patients"], 1);
    assert_eq!(alpha["cases"], serde_json::json!(["patient-a"]));
    assert_eq!(
        (alpha["images"].as_u64(), alpha["scored"].as_u64()),
        (Some(5), Some(4))
    );
    assert_eq!(alpha["errors"], 1);
    close(&alpha["error"], 0.25, 1e-12, "Alpha error");
    let neck = &alpha["per_class"]["neck"];
    assert_eq!(
        (neck["images"].as_u64(), neck["errors"].as_u64()),
        (Some(3), Some(1))
    );
    close(&neck["error"], 1.0 / 3.0, 1e-12, "Alpha neck");
    assert_eq!(neck["called"], serde_json::json!({"pelvis": 1}));
    assert_eq!(alpha["per_class"]["lungs"]["errors"], 0);
    assert!(alpha["per_class"].get("liver").is_none(), "{alpha}");
    // Beta = patient-b (b2 lungs called liver; b4 legs not a class) + patient-c (c2 neck
    // called liver, c3 liver called lungs)
    let beta = group(&m, BETA);
    assert_eq!(beta["patients"], 2);
    assert_eq!(beta["cases"], serde_json::json!(["patient-b", "patient-c"]));
    assert_eq!(
        (beta["images"].as_u64(), beta["scored"].as_u64()),
        (Some(7), Some(6))
    );
    assert_eq!(beta["errors"], 3);
    close(&beta["error"], 0.5, 1e-12, "Beta error");
    let cell = |class: &str| &beta["per_class"][class];
    assert_eq!(cell("lungs")["called"], serde_json::json!({"liver": 1}));
    assert_eq!(cell("liver")["called"], serde_json::json!({"lungs": 1}));
    assert_eq!(cell("liver")["patients"], 2);
    assert_eq!(
        (
            cell("neck")["images"].as_u64(),
            cell("neck")["errors"].as_u64()
        ),
        (Some(1), Some(1))
    );
    close(&cell("liver")["error"], 1.0 / 3.0, 1e-12, "Beta liver");
    // mean and worst over the groups, overall and per class
    assert_eq!(g["scored_groups"], 2);
    close(
        &g["mean_error"],
        (0.25 + 0.5) / 2.0,
        1e-12,
        "mean over groups",
    );
    assert_eq!(g["worst"]["group"], BETA);
    close(&g["worst"]["error"], 0.5, 1e-12, "worst");
    let pc = &g["per_class_mean"];
    close(
        &pc["neck"]["mean_error"],
        (1.0 / 3.0 + 1.0) / 2.0,
        1e-12,
        "neck mean",
    );
    assert_eq!(pc["neck"]["worst"]["group"], BETA);
    close(&pc["lungs"]["mean_error"], 0.25, 1e-12, "lungs mean");
    assert_eq!(pc["liver"]["groups"], 1);
    // the overall figures do not change
    assert_eq!(m["slice"]["errors"], 4);
    // the summary and groups.csv
    assert!(stdout.contains("groups:   source of"), "{stdout}");
    assert!(
        stdout.contains(&format!("worst 50.00 % ({BETA})")),
        "{stdout}"
    );
    assert!(stdout.contains("neck 1/3 (pelvis 1)"), "{stdout}");
    assert!(stdout.contains("groups.csv"), "{stdout}");
    let csv = std::fs::read_to_string(out.join("groups.csv")).expect("groups.csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "group,class,patients,images,scored,errors,error,called_instead"
    );
    assert!(
        lines.contains(&"Alpha,all,1,5,4,1,0.250000,pelvis 1"),
        "{csv}"
    );
    assert!(
        lines.contains(&"Alpha,neck,1,3,3,1,0.333333,pelvis 1"),
        "{csv}"
    );
    assert!(
        lines.contains(&"\"Beta (TCIA, test)\",all,2,7,6,3,0.500000,liver 2; lungs 1"),
        "{csv}"
    );
    assert_eq!(lines.len(), 1 + 3 + 4, "{csv}");

    // another grouping of the same file: the scanner, two columns joined
    let (m, _) = eval(
        &setup.model,
        &dataset,
        &setup.out("groups-scanner"),
        &[
            "--split",
            "all",
            "--groups",
            file,
            "--group-by",
            "manufacturer,model",
        ],
    );
    let ge = group(&m, "GE MEDICAL SYSTEMS / LightSpeed16"); // a (1 of 4) + c (2 of 3)
    assert_eq!(
        (ge["scored"].as_u64(), ge["errors"].as_u64()),
        (Some(7), Some(3))
    );
    let siemens = group(&m, "SIEMENS / Emotion"); // b (1 of 3)
    close(&siemens["error"], 1.0 / 3.0, 1e-12, "SIEMENS");
    assert_eq!(
        m["groups"]["worst"]["group"],
        "GE MEDICAL SYSTEMS / LightSpeed16"
    );
    close(
        &m["groups"]["mean_error"],
        (3.0 / 7.0 + 1.0 / 3.0) / 2.0,
        1e-12,
        "mean",
    );

    // only the selected split's patients are grouped (test: a and b)
    let (m, _) = eval(
        &setup.model,
        &dataset,
        &setup.out("groups-test"),
        &["--groups", file],
    );
    assert_eq!(group(&m, BETA)["cases"], serde_json::json!(["patient-b"]));
    close(&group(&m, BETA)["error"], 1.0 / 3.0, 1e-12, "Beta on test");

    // keys that are the manifest's patient_key itself (a mined dataset)
    let keys = setup.out("keys.csv");
    std::fs::write(
        &keys,
        "patient_key,site\npatient-a,one\npatient-b,two\npatient-c,two\n",
    )
    .expect("keys.csv");
    let (m, _) = eval(
        &setup.model,
        &setup.dataset(),
        &setup.out("groups-keys"),
        &[
            "--split",
            "all",
            "--groups",
            keys.to_str().expect("utf-8"),
            "--group-key",
            "patient_key",
            "--group-by",
            "site",
        ],
    );
    close(&group(&m, "two")["error"], 0.5, 1e-12, "site two");
    assert_eq!(group(&m, "one")["cases"], serde_json::json!(["patient-a"]));

    // without --groups: no section, no file
    let plain = setup.out("no-groups");
    let (m, _) = eval(&setup.model, &dataset, &plain, &["--split", "all"]);
    assert!(m.get("groups").is_none());
    assert!(!plain.join("groups.csv").exists());
}

#[test]
fn grouping_problems_name_the_file_line_and_column() {
    let Some(setup) = Setup::new() else { return };
    let (dataset, sources) = grouped_setup(&setup);
    let model = setup.model.to_str().expect("utf-8");
    let data = dataset.to_str().expect("utf-8");
    let file = sources.to_str().expect("utf-8");
    let out = setup.out("group-errors");
    let out = out.to_str().expect("utf-8");
    let base = [
        "--model",
        model,
        "--dataset",
        data,
        "--out",
        out,
        "--split",
        "all",
    ];
    let run = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        eval_error(&args)
    };

    // a group column the file does not have
    let err = run(&["--groups", file, "--group-by", "scanner"]);
    assert!(
        err.contains(&format!("{file}: line 1: no column `scanner`")),
        "{err}"
    );
    assert!(
        err.contains("`case_id`, `folder`, `source`, `manufacturer`, `model`"),
        "{err}"
    );
    let err = run(&["--groups", file, "--group-key", "case"]);
    assert!(
        err.contains("no column `case`") && err.contains("--group-key"),
        "{err}"
    );

    // patients of the dataset without a row: how many, how many images, which
    let partial = setup.out("partial.csv");
    std::fs::write(
        &partial,
        "case_id,source\npatient-a,Alpha\npatient-b,Beta\n",
    )
    .expect("csv");
    let partial = partial.to_str().expect("utf-8");
    let err = run(&["--groups", partial]);
    assert!(err.contains(partial), "{err}");
    assert!(
        err.contains("1 of the 3 patients (3 of the 12 images)"),
        "{err}"
    );
    let c_key = anatomy_node::dataset::patient_key("patient-c");
    assert!(err.contains(&format!("{c_key} (3 images)")), "{err}");
    // ... which does not matter when the split scored has none of them
    let (m, _) = eval(
        &setup.model,
        &dataset,
        &setup.out("partial-test"),
        &["--groups", partial],
    );
    assert_eq!(m["groups"]["scored_groups"], 2);

    // an empty group cell is a group of its own
    let blank = setup.out("blank.csv");
    std::fs::write(
        &blank,
        "case_id,source\npatient-a,Alpha\npatient-b,\npatient-c,\n",
    )
    .expect("csv");
    let (m, _) = eval(
        &setup.model,
        &dataset,
        &setup.out("blank"),
        &["--split", "all", "--groups", blank.to_str().expect("utf-8")],
    );
    assert_eq!(group(&m, "(no source)")["patients"], 2);

    // an empty key, a case in two groups, a short row
    let bad = setup.out("bad.csv");
    let bad_path = bad.to_str().expect("utf-8");
    for (text, expected) in [
        (
            "case_id,source\npatient-a,Alpha\n,B\n",
            "line 3, column `case_id`: empty",
        ),
        (
            "case_id,source\npatient-a,Alpha\npatient-b,B\npatient-a,B\n",
            "line 4, column `case_id`",
        ),
        (
            "case_id,source,model\npatient-a,Alpha,x\npatient-b,B\n",
            "line 3",
        ),
    ] {
        std::fs::write(&bad, text).expect("csv");
        let err = run(&["--groups", bad_path]);
        assert!(
            err.contains(&format!("{bad_path}: {expected}")),
            "{text}: {err}"
        );
    }

    // no such file
    let err = run(&["--groups", "/nonexistent/sources.csv"]);
    assert!(
        err.contains("/nonexistent/sources.csv: cannot be read"),
        "{err}"
    );
    // --group-key and --group-by need --groups
    let err = run(&["--group-by", "model"]);
    assert!(err.contains("--groups"), "{err}");
}
