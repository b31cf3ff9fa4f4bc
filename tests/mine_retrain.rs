//! The nightly loop end to end on a dataset MINED from an archive: Orthanc holds real CT
//! series of eight patients (../shared/data/ct), a RIS CSV labels every other slice of them,
//! and deploy/mine-retrain.sh runs as cron runs it: the real `anatomy-node mine` (C-GET),
//! the real training stage (`python -m training pack|train|export`, 2 epochs at 64 px), the
//! real `anatomy-node eval` of the current model and the candidate on the mined test split,
//! and the decision by the documented rule. A second run right after mines nothing and has
//! nothing to learn (exit 15).
//!
//! Needs ../shared/data/ct (else SKIPPED), Orthanc, the test Python (tests/common/models.rs)
//! and training/.venv. The index is SQLite in the test's storage folder: what is tested is
//! the dataset folder between mine, training/ and eval, not the index.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;

use common::orthanc::{Orthanc, OrthancOptions};
use serde_json::Value;
use sha2::{Digest, Sha256};

const ARCHIVE_AE: &str = "ARCHIVE";
const MINER_AE: &str = "MINER";
/// With this secret and split the keyed hash puts okbp-pt2 and sts-026 in test, sts-012 in
/// val and the other five patients in train (checked below, against the manifest).
const SECRET: &str = "mine-retrain test secret 6";
const SPLIT: &str = "60,20,20";
/// Head and neck (neck, lungs, other) and legs (legs, pelvis, other) patients.
const CASES: [&str; 8] = [
    "okbp-pt13",
    "okbp-pt2",
    "okbp-pt20",
    "okbp-pt21",
    "sts-012",
    "sts-014",
    "sts-026",
    "sts-018",
];
const TEST_PATIENTS: [&str; 2] = ["okbp-pt2", "sts-026"];
const IMAGE_SIZE: u64 = 64;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One labelled slice of labels.csv.
struct Slice {
    case: String,
    sop: String,
    label: String,
}

/// The slices labels.csv gives for [`CASES`], in its order.
fn slices(data: &Path) -> Vec<Slice> {
    let mut reader = csv::Reader::from_path(data.join("labels.csv")).expect("labels.csv");
    let header = reader.headers().expect("header").clone();
    let col = |name: &str| header.iter().position(|h| h == name).expect(name);
    let (case, sop, label) = (col("case_id"), col("sop_instance_uid"), col("label"));
    reader
        .records()
        .map(|r| r.expect("labels.csv row"))
        .filter(|r| CASES.contains(&&r[case]))
        .map(|r| Slice {
            case: r[case].to_string(),
            sop: r[sop].to_string(),
            label: r[label].to_string(),
        })
        .collect()
}

/// Every DICOM file of a case folder (the whole series goes into the archive).
fn case_files(data: &Path, case: &str) -> Vec<PathBuf> {
    let files: Vec<PathBuf> = common::files_under(&data.join(case))
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "dcm"))
        .collect();
    assert!(!files.is_empty(), "{case}: no DICOM files");
    files
}

fn wrapper(config: &Path, site: &Path, python: &Path) -> Output {
    let mut cmd = common::retrain::command(&[]);
    cmd.env_remove("RUST_LOG")
        .env("ANATOMY_NODE", env!("CARGO_BIN_EXE_anatomy-node"))
        .env("EVAL_THREADS", "1")
        .env("MIN_TEST_IMAGES", "10")
        .env("MIN_TEST_PATIENTS", "2")
        .env("PY", python)
        .env("EPOCHS", "2")
        .env("THREADS", "2")
        .env("SEED", "7")
        .env(
            "TRAIN_ARGS",
            "--width 8 --blocks 1,1,1,1 --batch-size 16 --no-nonaxial",
        )
        .env("VERSION_PREFIX", "ci-mined")
        .env("WORK", site.join("work"))
        .arg("--config")
        .arg(config)
        .arg("--dataset")
        .arg(site.join("dataset"))
        .arg("--model")
        .arg(site.join("models/anatomy.onnx"))
        .arg("--reports")
        .arg(site.join("reports"))
        // The real data's Study Date is 20000101.
        .args(["--since", "19991231", "--until", "20000102"])
        .current_dir(site);
    cmd.output().expect("run deploy/mine-retrain.sh")
}

fn latest(site: &Path) -> PathBuf {
    let reports = site.join("reports");
    reports.join(std::fs::read_link(reports.join("latest")).expect("reports/latest"))
}

fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rows(path: &Path) -> Vec<BTreeMap<String, String>> {
    let mut reader = csv::Reader::from_path(path).unwrap_or_else(|e| panic!("{e}"));
    let header = reader.headers().expect("header").clone();
    reader
        .records()
        .map(|r| {
            let r = r.expect("row");
            header
                .iter()
                .map(str::to_string)
                .zip(r.iter().map(str::to_string))
                .collect()
        })
        .collect()
}

#[track_caller]
fn assert_exit(out: &Output, expected: i32) {
    assert_eq!(
        out.status.code(),
        Some(expected),
        "exit code of mine-retrain.sh\n{}",
        common::text(out)
    );
}

/// (images, errors, {class: AUC}) of an evaluation's slice metrics.
fn slice_figures(m: &Value) -> (u64, u64, BTreeMap<String, Option<f64>>) {
    let s = &m["slice"];
    let auc = s["auc"]
        .as_object()
        .expect("slice.auc")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64()))
        .collect();
    (
        s["images"].as_u64().expect("slice.images"),
        s["errors"].as_u64().expect("slice.errors"),
        auc,
    )
}

#[test]
fn a_mined_dataset_is_trained_on_evaluated_and_decided_by_the_rule() {
    let Some(data) = common::data::ct_data() else {
        eprintln!("SKIPPED: needs ../shared/data/ct (real series to mine)");
        return;
    };
    let python = root().join("training/.venv/bin/python");
    if !python.is_file() {
        let how = "training/.venv is missing: run `bash training/install.sh`";
        assert!(
            std::env::var("ANATOMY_ALLOW_SKIP_PYTHON").as_deref() == Ok("1"),
            "{how}; ANATOMY_ALLOW_SKIP_PYTHON=1 skips this test instead"
        );
        eprintln!("SKIPPED: {how}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let site = dir.path();
    // The current model: the fixed-weight stats model at the mined size.
    let Some(current) = common::models::make(&site.join("models"), "anatomy", &["--size", "64"])
    else {
        return;
    };
    std::fs::remove_file(site.join("models/anatomy.json")).expect("model parameters");
    let current_bytes = read(&current);

    // The archive: the whole series of the eight patients.
    let orthanc = Orthanc::start(OrthancOptions {
        ae_title: ARCHIVE_AE.into(),
        check_called_ae_title: true,
        dicomweb: false,
        // C-GET needs no port of ours; Orthanc answers only the AE titles it knows.
        modalities: vec![("miner".into(), MINER_AE.into(), common::free_port())],
        allow_any_query: false,
    });
    for case in CASES {
        orthanc.upload_all(&case_files(&data, case));
    }
    // The RIS labels every other slice of each patient (the others stay unlabelled).
    let all = slices(&data);
    let mut ris = String::from("sop_instance_uid,label\n");
    let mut expected: BTreeSet<(String, String)> = BTreeSet::new();
    let mut case_of: BTreeMap<String, String> = BTreeMap::new();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &all {
        let n = seen.entry(&s.case).or_default();
        *n += 1;
        if *n % 2 == 1 {
            ris.push_str(&format!("{},{}\n", s.sop, s.label));
            expected.insert((s.sop.clone(), s.label.clone()));
            case_of.insert(s.sop.clone(), s.case.clone());
        }
    }
    assert!(expected.len() > 80, "{} labelled slices", expected.len());
    let ris_path = site.join("ris.csv");
    std::fs::write(&ris_path, ris).expect("ris.csv");
    let config = site.join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[storage]
path = "{storage}"

[archive]
ae_title = "{ARCHIVE_AE}"
host = "127.0.0.1"
port = {port}
calling_ae_title = "{MINER_AE}"
retrieve = "get"
query_page_days = 10000
dimse_timeout_secs = 30

[mine]
patient_key_secret = "{SECRET}"
ris_csv = "{ris}"
image_size = {IMAGE_SIZE}
split = "{SPLIT}"
max_requests_per_second = 0
"#,
            storage = site.join("node").display(),
            port = orthanc.dicom_port,
            ris = ris_path.display(),
        ),
    )
    .expect("config.toml");

    // --- the first night: mine, train, evaluate, decide --------------------------------
    let started = std::time::Instant::now();
    let out = wrapper(&config, site, &python);
    let first_s = started.elapsed().as_secs_f64();
    let run = latest(site);
    let d = json(&run.join("decision.json"));
    assert_eq!(d["mine"]["exit_code"], 0, "{}", common::text(&out));
    assert_eq!(d["mine"]["meaning"], "complete");
    assert_eq!(
        d["trained_here"],
        true,
        "stopped in {}: {}\n{}",
        d["stage"],
        d["reason"],
        common::text(&out)
    );
    // mine's own report of this run, kept with the run.
    let stats = &d["mine"]["report"]["report"]["stats"];
    assert_eq!(d["mine"]["report"]["exit_code"], 0, "{}", d["mine"]);
    assert_eq!(stats["rows_added"], expected.len(), "{stats}");
    assert_eq!(stats["studies_mined"], CASES.len(), "{stats}");
    assert_eq!(d["mine"]["rows_added"], expected.len());

    // The dataset: exactly the RIS-labelled slices, at 64 px, split by patient.
    let dataset = site.join("dataset");
    let manifest = rows(&dataset.join("manifest.csv"));
    let got: BTreeSet<(String, String)> = manifest
        .iter()
        .map(|r| (r["sop_instance_uid"].clone(), r["label"].clone()))
        .collect();
    assert_eq!(got, expected, "one row per RIS-labelled slice");
    assert_eq!(manifest.len(), expected.len(), "no duplicates");
    assert!(manifest.iter().all(|r| r["label_source"] == "mined:ris"));
    let info = json(&dataset.join("dataset.json"));
    assert_eq!(info["input_size"], IMAGE_SIZE);
    let mut split_of: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for r in &manifest {
        split_of
            .entry(case_of[&r["sop_instance_uid"]].as_str())
            .or_default()
            .insert(r["split"].as_str());
    }
    let test_cases: Vec<&str> = split_of
        .iter()
        .filter(|(_, s)| s.contains("test"))
        .map(|(c, _)| *c)
        .collect();
    assert_eq!(test_cases, TEST_PATIENTS, "{split_of:?}");
    assert!(split_of.values().all(|s| s.len() == 1), "{split_of:?}");
    let test_rows: Vec<_> = manifest
        .iter()
        .filter(|r| r["split"] == "test" && r["label"] != "ambiguous")
        .collect();
    let manifest_sha = hex::encode(Sha256::digest(read(&dataset.join("manifest.csv"))));
    assert_eq!(d["dataset"]["manifest_sha256"], manifest_sha);
    assert_eq!(d["dataset"]["test_images"], test_rows.len());
    assert_eq!(d["dataset"]["test_patients"], 2);

    // Training ran on it: pack, train, export, the candidate stamped with the run.
    for log in ["pack.log", "train.log", "export.log"] {
        let path = run.join(log);
        assert!(
            path.is_file() && !read(&path).is_empty(),
            "{log} is missing or empty"
        );
    }
    let pack = String::from_utf8_lossy(&read(&run.join("pack.log"))).into_owned();
    assert!(
        pack.contains(&format!("packed {} images", expected.len())),
        "{pack}"
    );
    let train = String::from_utf8_lossy(&read(&run.join("train.log"))).into_owned();
    assert!(train.contains("epoch"), "{train}");
    let candidate = run.join("candidate.onnx");
    assert!(candidate.is_file());
    let run_id = d["run_id"].as_str().expect("run_id");
    assert_eq!(
        d["candidate_model"]["eval"]["version"],
        format!("ci-mined-{run_id}")
    );

    // Both models were evaluated on the same held-out patients of the mined dataset.
    let cur = json(&run.join("eval-current/metrics.json"));
    let cand = json(&run.join("eval-candidate/metrics.json"));
    let mut predicted = Vec::new();
    for (which, m) in [("eval-current", &cur), ("eval-candidate", &cand)] {
        assert_eq!(m["splits"], serde_json::json!(["test"]), "{which}");
        assert_eq!(m["dataset"]["manifest_sha256"], manifest_sha, "{which}");
        assert_eq!(m["slice"]["images"], test_rows.len(), "{which}");
        let images: BTreeSet<String> = rows(&run.join(which).join("predictions.csv"))
            .into_iter()
            .map(|r| r["image"].clone())
            .collect();
        predicted.push(images);
    }
    let test_images: BTreeSet<String> = test_rows.iter().map(|r| r["image"].clone()).collect();
    assert_eq!(predicted[0], test_images, "the current model's test images");
    assert_eq!(predicted[1], test_images, "the candidate's test images");

    // The outcome follows the rule, worked out here from the two metrics.json.
    let (nc, ec, auc_cur) = slice_figures(&cur);
    let (nk, ek, auc_cand) = slice_figures(&cand);
    let common_classes: Vec<&String> = auc_cur
        .iter()
        .filter(|(k, v)| v.is_some() && auc_cand.get(*k).copied().flatten().is_some())
        .map(|(k, _)| k)
        .collect();
    let mean = |auc: &BTreeMap<String, Option<f64>>| {
        common_classes
            .iter()
            .map(|k| auc[*k].unwrap_or_default())
            .sum::<f64>()
            / common_classes.len() as f64
    };
    let better = ek * nc < ec * nk
        || (ek * nc == ec * nk
            && !common_classes.is_empty()
            && mean(&auc_cand) > mean(&auc_cur) + 0.001);
    let model = site.join("models/anatomy.onnx");
    if better {
        assert_exit(&out, 0);
        assert_eq!(d["outcome"], "promoted");
        assert_eq!(read(&model), read(&candidate));
    } else {
        assert_exit(&out, 10);
        assert_eq!(d["outcome"], "not-better");
        assert_eq!(read(&model), current_bytes);
    }
    eprintln!(
        "first run {first_s:.1} s: {} (current {ec}/{nc} wrong, candidate {ek}/{nk})",
        d["reason"]
    );

    // --- the next night: nothing new in the archive ------------------------------------
    let manifest_before = read(&dataset.join("manifest.csv"));
    let model_before = read(&model);
    let out = wrapper(&config, site, &python);
    assert_exit(&out, 15);
    let run2 = latest(site);
    assert_ne!(run2, run);
    let d = json(&run2.join("decision.json"));
    assert_eq!(d["outcome"], "dataset-unchanged");
    assert_eq!(d["mine"]["exit_code"], 0);
    let stats = &d["mine"]["report"]["report"]["stats"];
    assert_eq!(stats["rows_added"], 0, "{stats}");
    assert_eq!(d["mine"]["rows_added"], 0);
    assert_eq!(stats["studies_unchanged"], CASES.len(), "{stats}");
    assert_eq!(read(&dataset.join("manifest.csv")), manifest_before);
    assert_eq!(read(&model), model_before);
    assert!(!run2.join("train.log").exists(), "nothing trained");
    assert!(!run2.join("eval-candidate").exists(), "nothing evaluated");
}
