//! The nightly loop end to end on a dataset MINED from an archive: Orthanc holds real CT
//! series of eight patients (../shared/data/ct), a RIS CSV labels every other slice of them,
//! and deploy/mine-retrain.sh runs as cron runs it: the real `anatomy-node mine` (C-GET),
//! the real training stage (`python -m training pack|train|export`, 2 epochs at 64 px), the
//! real `anatomy-node eval` of the current model and the candidate on the mined test split,
//! and the decision by the documented rule. A second run right after mines nothing and has
//! nothing to learn (exit 15).
//!
//! Self-training (`--self-train`): the node's index (written here as the node writes it)
//! holds predictions for the slices the RIS leaves out; only the confident ones that agree
//! with their series' decoded order become `pseudo:<model>` rows, never over a human label;
//! both models are judged on the human-labelled test images only, so a candidate whose
//! errors hide in pseudo-labelled test images is not promoted.
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

/// One labelled slice of labels.csv.
struct Slice {
    case: String,
    study: String,
    series: String,
    sop: String,
    z_mm: f64,
    label: String,
}

/// The slices labels.csv gives for [`CASES`], in its order.
fn slices(data: &Path) -> Vec<Slice> {
    let mut reader = csv::Reader::from_path(data.join("labels.csv")).expect("labels.csv");
    let header = reader.headers().expect("header").clone();
    let col = |name: &str| header.iter().position(|h| h == name).expect(name);
    let (case, sop, label) = (col("case_id"), col("sop_instance_uid"), col("label"));
    let (study, series, z) = (col("study_uid"), col("series_uid"), col("z_mm"));
    reader
        .records()
        .map(|r| r.expect("labels.csv row"))
        .filter(|r| CASES.contains(&&r[case]))
        .map(|r| Slice {
            case: r[case].to_string(),
            study: r[study].to_string(),
            series: r[series].to_string(),
            sop: r[sop].to_string(),
            z_mm: r[z].parse().expect("z_mm"),
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
    wrapper_with(config, site, python, &[])
}

/// The script as cron runs it, with more options (e.g. `--self-train`).
fn wrapper_with(config: &Path, site: &Path, python: &Path, extra: &[&str]) -> Output {
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
        .args(extra)
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

/// The archive: the whole series of the eight patients.
fn archive(data: &Path) -> Orthanc {
    let orthanc = Orthanc::start(OrthancOptions {
        ae_title: ARCHIVE_AE.into(),
        check_called_ae_title: true,
        dicomweb: false,
        // C-GET needs no port of ours; Orthanc answers only the AE titles it knows.
        modalities: vec![("miner".into(), MINER_AE.into(), common::free_port())],
        allow_any_query: false,
        limit_find_results: 0,
        dicom_tls: None,
    });
    for case in CASES {
        orthanc.upload_all(&case_files(data, case));
    }
    orthanc
}

/// The RIS CSV labelling every other slice of each patient (the others stay unlabelled):
/// its text, the (SOP Instance UID, label) pairs it gives, and each such slice's case.
fn ris_every_other_slice(
    all: &[Slice],
) -> (String, BTreeSet<(String, String)>, BTreeMap<String, String>) {
    let mut ris = String::from("sop_instance_uid,label\n");
    let mut expected: BTreeSet<(String, String)> = BTreeSet::new();
    let mut case_of: BTreeMap<String, String> = BTreeMap::new();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for s in all {
        let n = seen.entry(&s.case).or_default();
        *n += 1;
        if *n % 2 == 1 {
            ris.push_str(&format!("{},{}\n", s.sop, s.label));
            expected.insert((s.sop.clone(), s.label.clone()));
            case_of.insert(s.sop.clone(), s.case.clone());
        }
    }
    (ris, expected, case_of)
}

/// ris.csv and config.toml of the site: C-GET from the archive, 64 px, the node's index and
/// storage under `node/`.
fn write_config(site: &Path, orthanc: &Orthanc, ris: &str) -> PathBuf {
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
    config
}

/// The documented decision rule, worked out here from two metrics.json: strictly fewer
/// errors, or as many and a mean AUC (over the classes both score) higher by > 0.001.
fn better_by_the_rule(cur: &Value, cand: &Value) -> bool {
    let (nc, ec, auc_cur) = slice_figures(cur);
    let (nk, ek, auc_cand) = slice_figures(cand);
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
    ek * nc < ec * nk
        || (ek * nc == ec * nk
            && !common_classes.is_empty()
            && mean(&auc_cand) > mean(&auc_cur) + 0.001)
}

#[test]
fn a_mined_dataset_is_trained_on_evaluated_and_decided_by_the_rule() {
    let Some(data) = common::data::ct_data() else {
        eprintln!("SKIPPED: needs ../shared/data/ct (real series to mine)");
        return;
    };
    let Some(python) = common::retrain::training_python() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let site = dir.path();
    // The current model: the fixed-weight stats model at the mined size.
    let Some(current) = common::models::make(&site.join("models"), "anatomy", &["--size", "64"])
    else {
        return;
    };
    std::fs::remove_file(site.join("models/anatomy.json")).expect("model parameters");
    let current_bytes = read(&current);

    let orthanc = archive(&data);
    let all = slices(&data);
    let (ris, expected, case_of) = ris_every_other_slice(&all);
    assert!(expected.len() > 80, "{} labelled slices", expected.len());
    let config = write_config(site, &orthanc, &ris);

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
    let (nc, ec, _) = slice_figures(&cur);
    let (nk, ek, _) = slice_figures(&cand);
    let better = better_by_the_rule(&cur, &cand);
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

// ---------------------------------------------------------------------------------------
// Self-training (issue #16): the node's own confident, order-consistent predictions join
// the dataset as pseudo labels; models are judged on human labels only.

/// The model version the node's index says labelled the site's series.
const SITE_MODEL: &str = "site-model-1";

/// What the node's index holds for a key-image, and so what mining must make of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Planted {
    /// Confident (0.99) and its label is its series' decoded label: a pseudo label.
    Pseudo,
    /// Confident, but the decoded label differs: left out, counted out of order.
    OutOfOrder,
    /// Its label's probability is 0.6: left out, counted below the threshold (0.98).
    BelowThreshold,
    /// Confident, in order and wrong, on a slice the RIS labels: the human label stays.
    UnderHuman,
}

/// Another class than `label`, for wrong or out-of-order predictions.
fn another(label: &str) -> &'static str {
    if label == "neck" {
        "legs"
    } else {
        "neck"
    }
}

/// The node's index as the node writes it (SQLite, `<storage>/index.sqlite3`): every
/// series of `planted` labelled by [`SITE_MODEL`], with these key-images (raw label,
/// decoded label, probability of the raw label).
fn plant_index(site: &Path, planted: &[(&Slice, String, String, f64)]) {
    let storage = site.join("node");
    std::fs::create_dir_all(&storage).expect("storage");
    let url = format!(
        "sqlite://{}?mode=rwc",
        storage.join("index.sqlite3").display()
    );
    common::runtime().block_on(async {
        let index = anatomy_node::index::Index::connect(&url, 2, false)
            .await
            .expect("open the node's index");
        index.migrate().await.expect("migrate the node's index");
        let pool = index.pool();
        // Row ids by (table, UID): the first key-image of a patient, study or series adds it.
        let mut ids: BTreeMap<(&'static str, String), i64> = BTreeMap::new();
        for (slice, label, decoded, p) in planted {
            let mut id = |table: &'static str, key: &str| -> (i64, bool) {
                let next = ids.len() as i64 + 1;
                match ids.entry((table, key.to_string())) {
                    std::collections::btree_map::Entry::Occupied(e) => (*e.get(), false),
                    std::collections::btree_map::Entry::Vacant(e) => (*e.insert(next), true),
                }
            };
            let (patient, new_patient) = id("patient", &slice.case);
            let (study, new_study) = id("study", &slice.study);
            let (series, new_series) = id("series", &slice.series);
            let run = |sql: &'static str| sqlx::query(sql);
            if new_patient {
                run("INSERT INTO patients (id, patient_key, updated_at) VALUES ($1, $2, 0)")
                    .bind(patient)
                    .bind(slice.case.clone())
                    .execute(pool)
                    .await
                    .expect("patient");
            }
            if new_study {
                run("INSERT INTO studies (id, study_uid, patient_ref, updated_at) VALUES ($1, $2, $3, 0)")
                    .bind(study)
                    .bind(slice.study.clone())
                    .bind(patient)
                    .execute(pool)
                    .await
                    .expect("study");
            }
            if new_series {
                run("INSERT INTO series (id, series_uid, study_ref, first_received_at, \
                     last_received_at, state, label_status, label_generation) \
                     VALUES ($1, $2, $3, 0, 0, 'complete', 'labelled', 1)")
                .bind(series)
                .bind(slice.series.clone())
                .bind(study)
                .execute(pool)
                .await
                .expect("series");
                run("INSERT INTO series_labels (id, series_ref, generation, status, \
                     model_version, labelled_at) VALUES ($1, $1, 1, 'labelled', $2, 0)")
                .bind(series)
                .bind(SITE_MODEL)
                .execute(pool)
                .await
                .expect("series label");
            }
            let probabilities = serde_json::json!({ label.as_str(): p, another(label): 1.0 - p });
            run("INSERT INTO key_images (series_label_ref, sop_instance_uid, frame, z_mm, label, \
                 smoothed_label, probabilities) VALUES ($1, $2, 0, $3, $4, $5, $6)")
            .bind(series)
            .bind(slice.sop.clone())
            .bind(slice.z_mm)
            .bind(label.clone())
            .bind(decoded.clone())
            .bind(probabilities.to_string())
            .execute(pool)
            .await
            .expect("key-image");
        }
        index.close().await;
    });
}

/// `anatomy-node eval` of `model` on the test split (`labels`: all or human) → its
/// metrics.json and {image: predicted class}.
fn eval(
    model: &Path,
    dataset: &Path,
    labels: &str,
    out: &Path,
) -> (Value, BTreeMap<String, String>) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_anatomy-node"))
        .args([
            "eval",
            "--split",
            "test",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--labels",
            labels,
        ])
        .arg("--model")
        .arg(model)
        .arg("--dataset")
        .arg(dataset)
        .arg("--out")
        .arg(out)
        .env_remove("RUST_LOG")
        .output()
        .expect("run anatomy-node eval");
    assert!(output.status.success(), "eval: {}", common::text(&output));
    let predicted = rows(&out.join("predictions.csv"))
        .into_iter()
        .map(|r| (r["image"].clone(), r["predicted"].clone()))
        .collect();
    (json(&out.join("metrics.json")), predicted)
}

/// deploy/mine-retrain.sh judging `candidate` against `model` on `dataset` as it is.
fn judge(dataset: &Path, model: &Path, candidate: &Path, reports: &Path) -> Output {
    let mut cmd = common::retrain::command(&[]);
    cmd.env_remove("RUST_LOG")
        .env("ANATOMY_NODE", env!("CARGO_BIN_EXE_anatomy-node"))
        .env("EVAL_THREADS", "1")
        .env("MIN_TEST_IMAGES", "1")
        .env("MIN_TEST_PATIENTS", "1")
        .arg("--skip-mine")
        .arg("--dataset")
        .arg(dataset)
        .arg("--model")
        .arg(model)
        .arg("--candidate")
        .arg(candidate)
        .arg("--reports")
        .arg(reports);
    cmd.output().expect("run deploy/mine-retrain.sh")
}

/// `dataset` again in `out` (images linked) with some test rows' labels and sources
/// rewritten: {image: (label, label_source)}.
fn rewrite(dataset: &Path, out: &Path, changes: &BTreeMap<String, (String, String)>) {
    std::fs::create_dir_all(out).expect("dataset copy");
    std::fs::copy(dataset.join("dataset.json"), out.join("dataset.json")).expect("dataset.json");
    std::os::unix::fs::symlink(dataset.join("images"), out.join("images")).expect("images");
    let mut reader = csv::Reader::from_path(dataset.join("manifest.csv")).expect("manifest");
    let header = reader.headers().expect("header").clone();
    let col = |name: &str| header.iter().position(|h| h == name).expect(name);
    let (image, label, source) = (col("image"), col("label"), col("label_source"));
    let mut writer = csv::Writer::from_path(out.join("manifest.csv")).expect("manifest copy");
    writer.write_record(&header).expect("header");
    for r in reader.records() {
        let mut r: Vec<String> = r.expect("row").iter().map(str::to_string).collect();
        if let Some((l, s)) = changes.get(&r[image]) {
            r[label] = l.clone();
            r[source] = s.clone();
        }
        writer.write_record(&r).expect("row");
    }
    writer.flush().expect("manifest copy");
}

#[test]
fn self_training_pseudo_labels_confident_ordered_images_and_promotion_reads_human_labels_only() {
    let Some(data) = common::data::ct_data() else {
        eprintln!("SKIPPED: needs ../shared/data/ct (real series to mine)");
        return;
    };
    let Some(python) = common::retrain::training_python() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let site = dir.path();
    let Some(current) = common::models::make(&site.join("models"), "anatomy", &["--size", "64"])
    else {
        return;
    };
    std::fs::remove_file(site.join("models/anatomy.json")).expect("model parameters");
    let current_bytes = read(&current);
    let orthanc = archive(&data);
    let all = slices(&data);
    let (ris, human, _) = ris_every_other_slice(&all);
    let config = write_config(site, &orthanc, &ris);

    // The node's index: its predictions for the slices the RIS leaves out (in turn a pseudo
    // label, out of order, below the threshold) and wrong ones for some the RIS labels.
    let mut planted: Vec<(&Slice, String, String, f64)> = Vec::new();
    let mut kind_of: BTreeMap<String, Planted> = BTreeMap::new();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut turn = 0;
    for s in all.iter().filter(|s| s.label != "ambiguous") {
        let n = seen.entry(&s.case).or_default();
        *n += 1;
        let human_labelled = human.contains(&(s.sop.clone(), s.label.clone()));
        let kind = if human_labelled {
            if *n % 4 != 1 {
                continue;
            }
            Planted::UnderHuman
        } else {
            turn += 1;
            [
                Planted::Pseudo,
                Planted::OutOfOrder,
                Planted::BelowThreshold,
            ][turn % 3]
        };
        let label = s.label.clone();
        let (label, decoded, p) = match kind {
            Planted::Pseudo => (label.clone(), label, 0.99),
            Planted::OutOfOrder => (label.clone(), another(&label).to_string(), 0.99),
            Planted::BelowThreshold => (label.clone(), label, 0.6),
            Planted::UnderHuman => (
                another(&label).to_string(),
                another(&label).to_string(),
                0.99,
            ),
        };
        planted.push((s, label, decoded, p));
        kind_of.insert(s.sop.clone(), kind);
    }
    let count = |k: Planted| kind_of.values().filter(|v| **v == k).count();
    for k in [
        Planted::Pseudo,
        Planted::OutOfOrder,
        Planted::BelowThreshold,
        Planted::UnderHuman,
    ] {
        assert!(count(k) >= 3, "{k:?}: {}", count(k));
    }
    plant_index(site, &planted);

    // --- a self-training night ---------------------------------------------------------
    let out = wrapper_with(&config, site, &python, &["--self-train"]);
    let run = latest(site);
    let d = json(&run.join("decision.json"));
    assert_eq!(d["mine"]["exit_code"], 0, "{}", common::text(&out));
    assert_eq!(d["mine"]["pseudo_labels"], true);
    assert_eq!(d["self_train"]["enabled"], true);
    assert_eq!(
        d["trained_here"],
        true,
        "stopped in {}: {}\n{}",
        d["stage"],
        d["reason"],
        common::text(&out)
    );
    let pseudo_source = format!("pseudo:{SITE_MODEL}");
    let mut expected: BTreeSet<(String, String, String)> = human
        .iter()
        .map(|(sop, label)| (sop.clone(), label.clone(), "mined:ris".to_string()))
        .collect();
    for (s, label, _, _) in &planted {
        if kind_of[&s.sop] == Planted::Pseudo {
            expected.insert((s.sop.clone(), label.clone(), pseudo_source.clone()));
        }
    }
    let dataset = site.join("dataset");
    let manifest = rows(&dataset.join("manifest.csv"));
    let got: BTreeSet<(String, String, String)> = manifest
        .iter()
        .map(|r| {
            (
                r["sop_instance_uid"].clone(),
                r["label"].clone(),
                r["label_source"].clone(),
            )
        })
        .collect();
    // Human labels everywhere the RIS gives one (never a pseudo label over them), pseudo
    // labels exactly for the confident, order-consistent predictions.
    let planted_as = |sop: &String| kind_of.get(sop).copied();
    let unexpected: Vec<_> = got
        .difference(&expected)
        .map(|r| (r, planted_as(&r.0)))
        .collect();
    let missing: Vec<_> = expected
        .difference(&got)
        .map(|r| (r, planted_as(&r.0)))
        .collect();
    assert!(
        unexpected.is_empty() && missing.is_empty(),
        "rows not expected (planted as): {unexpected:?}\nrows missing: {missing:?}"
    );
    assert_eq!(manifest.len(), expected.len(), "no duplicates");
    let stats = &d["mine"]["report"]["report"]["stats"];
    assert_eq!(
        stats["pseudo_out_of_order"],
        count(Planted::OutOfOrder),
        "{stats}"
    );
    assert_eq!(
        stats["pseudo_below_threshold"],
        count(Planted::BelowThreshold),
        "{stats}"
    );
    let info = json(&dataset.join("dataset.json"));
    assert_eq!(
        info["label_kinds"],
        serde_json::json!({"human": human.len(), "pseudo": count(Planted::Pseudo)})
    );

    // Trained on both kinds; judged on the human-labelled test images only.
    let is_pseudo = |r: &&BTreeMap<String, String>| r["label_source"].starts_with("pseudo:");
    let pseudo_train = manifest
        .iter()
        .filter(|r| r["split"] == "train")
        .filter(is_pseudo)
        .count();
    assert!(pseudo_train > 0);
    let train = String::from_utf8_lossy(&read(&run.join("train.log"))).into_owned();
    assert!(
        train.contains(&format!(
            "pseudo-labelled training images: {pseudo_train} of "
        )),
        "{train}"
    );
    let test: Vec<_> = manifest
        .iter()
        .filter(|r| r["split"] == "test" && r["label"] != "ambiguous")
        .collect();
    let human_test: BTreeSet<String> = test
        .iter()
        .filter(|r| !is_pseudo(r))
        .map(|r| r["image"].clone())
        .collect();
    let pseudo_test = test.len() - human_test.len();
    assert!(pseudo_test > 0, "pseudo labels in the test split");
    assert_eq!(d["dataset"]["test_images"], human_test.len());
    assert_eq!(d["dataset"]["test_images_pseudo"], pseudo_test);
    let cur = json(&run.join("eval-current/metrics.json"));
    let cand = json(&run.join("eval-candidate/metrics.json"));
    for which in ["eval-current", "eval-candidate"] {
        let images: BTreeSet<String> = rows(&run.join(which).join("predictions.csv"))
            .into_iter()
            .map(|r| r["image"].clone())
            .collect();
        assert_eq!(
            images, human_test,
            "{which} scored the human-labelled test images"
        );
    }
    let model = site.join("models/anatomy.onnx");
    if better_by_the_rule(&cur, &cand) {
        assert_exit(&out, 0);
        assert_eq!(read(&model), read(&run.join("candidate.onnx")));
    } else {
        assert_exit(&out, 10);
        assert_eq!(read(&model), current_bytes);
    }
    eprintln!("self-training night: {}", d["reason"]);

    // --- a candidate whose errors hide in pseudo-labelled test images -------------------
    // Current: the stats model; candidate: a conv model. Where they disagree, one test image
    // in three (at least one) keeps a human label the candidate gets wrong; the others are
    // pseudo labels that agree with the candidate. Counting pseudo labels the candidate
    // would win; on the human labels it is worse and must not be promoted.
    let judged = site.join("judged");
    let current = judged.join("current.onnx");
    std::fs::create_dir_all(&judged).expect("judged");
    std::fs::write(&current, &current_bytes).expect("current model");
    let Some(candidate) = common::models::make(
        &judged,
        "conv",
        &["--size", "64", "--kind", "conv", "--seed", "3"],
    ) else {
        return;
    };
    let (_, by_current) = eval(&current, &dataset, "all", &judged.join("all-current"));
    let (_, by_candidate) = eval(&candidate, &dataset, "all", &judged.join("all-candidate"));
    assert_eq!(by_current.len(), test.len());
    let disagree: Vec<&String> = by_current
        .iter()
        .filter(|(image, p)| by_candidate[*image] != **p)
        .map(|(image, _)| image)
        .collect();
    assert!(
        disagree.len() >= 3,
        "the two test models disagree on {} test images; the test needs 3",
        disagree.len()
    );
    let hidden = (disagree.len() - 1) / 2;
    let mut changes: BTreeMap<String, (String, String)> = BTreeMap::new();
    for (image, p) in &by_current {
        // Where both agree, the label is theirs; the source stays.
        let source = test
            .iter()
            .find(|r| &r["image"] == image)
            .map(|r| r["label_source"].clone())
            .expect("a test row");
        changes.insert(image.clone(), (p.clone(), source));
    }
    for (i, image) in disagree.iter().enumerate() {
        let change = if i < hidden.max(1) {
            (by_current[*image].clone(), "mined:ris".to_string())
        } else {
            (by_candidate[*image].clone(), pseudo_source.clone())
        };
        changes.insert((*image).clone(), change);
    }
    let worse = judged.join("dataset-worse");
    rewrite(&dataset, &worse, &changes);
    // Counting every label, the candidate would look better...
    let (all_cur, _) = eval(&current, &worse, "all", &judged.join("worse-all-current"));
    let (all_cand, _) = eval(
        &candidate,
        &worse,
        "all",
        &judged.join("worse-all-candidate"),
    );
    assert!(
        better_by_the_rule(&all_cur, &all_cand),
        "with pseudo labels counted the candidate wins: {} vs {}",
        all_cand["slice"],
        all_cur["slice"]
    );
    // ...but the script judges on human labels: not promoted.
    let model = judged.join("models/anatomy.onnx");
    std::fs::create_dir_all(judged.join("models")).expect("models");
    std::fs::write(&model, &current_bytes).expect("served model");
    let out = judge(&worse, &model, &candidate, &judged.join("reports-worse"));
    assert_exit(&out, 10);
    assert_eq!(read(&model), current_bytes, "the served model is untouched");
    let c = json(&judged.join("reports-worse/latest/comparison.json"));
    assert!(
        c["slice_error_candidate"].as_f64() > c["slice_error_current"].as_f64(),
        "{c}"
    );

    // The same disagreements all human-labelled the candidate's way: now it is better on
    // the human labels, and promoted.
    for image in &disagree {
        changes.insert(
            (*image).clone(),
            (by_candidate[*image].clone(), "mined:ris".into()),
        );
    }
    let better = judged.join("dataset-better");
    rewrite(&dataset, &better, &changes);
    let out = judge(&better, &model, &candidate, &judged.join("reports-better"));
    assert_exit(&out, 0);
    assert_eq!(read(&model), read(&candidate));
}
