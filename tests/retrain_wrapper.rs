//! deploy/mine-retrain.sh, the cron wrapper mine → retrain → evaluate → promote, run as a
//! subprocess the way cron runs it: the promoted-model wrapper refuses a model that
//! evaluates worse, promotes a better one atomically (keeping the previous one), refuses a
//! candidate that breaks the model contract, keeps the current model on a tie or a too small
//! test split, honours its lock, maps `anatomy-node mine`'s exit codes, and (with tiny
//! epochs) runs its real training stage.
//!
//! The dataset is a small subset of ../shared/data/ct built by `anatomy-node dataset build`
//! (192 px, the shipped model's size); the models are the shipped models/anatomy.onnx (good
//! on it: 0 of 38 test slices wrong) and a fixed-weight `stats` model of
//! tests/tools/make_test_model.py (bad: 37 of 38 wrong). Needs the real data (CI always has
//! it; elsewhere these tests say SKIPPED), the test Python of tests/tools/requirements.txt
//! (tests/common/models.rs) and, for the training case, training/.venv.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

/// The documented exit codes (the script's header).
const PROMOTED: i32 = 0;
const FAILED: i32 = 1;
const USAGE: i32 = 2;
const NOT_BETTER: i32 = 10;
const TOO_SMALL: i32 = 11;
const REFUSED: i32 = 12;
const MINE_INCOMPLETE: i32 = 13;
const RELOAD_FAILED: i32 = 14;
const UNCHANGED: i32 = 15;
const LOCKED: i32 = 75;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The cases of tests/training.rs: a few patients of every class, so the patient split with
/// seed 7 puts 2 patients (38 scored slices) in test.
const CASES: [&str; 12] = [
    "okbp-pt13",
    "okbp-pt2",
    "okbp-pt20",
    "elastix-chest",
    "ctmed-tcga-17-z011",
    "ctmed-tcga-17-z021",
    "ctmed-tcga-51-4079",
    "sts-012",
    "sts-014",
    "sts-026",
    "vhp-male",
    "dcmqa-ge-head",
];

/// A dataset of [`CASES`] at `size`, built by the node into `dir/dataset`.
fn build_dataset(data: &Path, dir: &Path, size: u32) -> PathBuf {
    let text = std::fs::read_to_string(data.join("labels.csv")).expect("labels.csv");
    let mut lines = text.lines();
    let header = lines.next().expect("header");
    let rows: Vec<&str> = lines
        .filter(|l| CASES.iter().any(|c| l.starts_with(&format!("{c},"))))
        .collect();
    let labels = dir.join("labels.csv");
    std::fs::write(&labels, format!("{header}\n{}\n", rows.join("\n"))).expect("labels");
    let out = dir.join("dataset");
    let output = Command::new(env!("CARGO_BIN_EXE_anatomy-node"))
        .args(["dataset", "build", "--from"])
        .arg(data)
        .arg("--labels")
        .arg(&labels)
        .arg("--out")
        .arg(&out)
        .args([
            "--size",
            &size.to_string(),
            "--seed",
            "7",
            "--split",
            "60,20,20",
        ])
        .args(["--threads", "2"])
        .env_remove("RUST_LOG")
        .output()
        .expect("run anatomy-node dataset build");
    assert!(output.status.success(), "{}", common::text(&output));
    out
}

/// What the tests share: the 192 px dataset and the two models (built once).
struct Fixture {
    _dir: tempfile::TempDir,
    dataset: PathBuf,
    /// models/anatomy.onnx: 0 of 38 test slices wrong.
    good: PathBuf,
    /// The stats test model at 192 px: 37 of 38 wrong.
    bad: PathBuf,
    /// The stats model without the `classes` metadata: fails the model contract.
    broken: PathBuf,
    /// A stats model without the class `other`.
    five_classes: PathBuf,
}

fn fixture() -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            let Some(data) = common::data::ct_data() else {
                eprintln!(
                    "SKIPPED: the retrain wrapper tests need ../shared/data/ct (the shipped \
                     model is scored on real slices)"
                );
                return None;
            };
            let dir = tempfile::tempdir().expect("tempdir");
            let models = dir.path().join("models");
            let bad = common::models::make(&models, "stats", &["--size", "192"])?;
            let broken = common::models::make(
                &models,
                "broken",
                &["--size", "192", "--drop-key", "classes"],
            )?;
            let five_classes = common::models::make(
                &models,
                "five",
                &["--size", "192", "--classes", "neck,lungs,liver,pelvis,legs"],
            )?;
            let dataset = build_dataset(&data, dir.path(), 192);
            Some(Fixture {
                good: root().join("models/anatomy.onnx"),
                bad,
                broken,
                five_classes,
                dataset,
                _dir: dir,
            })
        })
        .as_ref()
}

/// One site: a model folder with `anatomy.onnx` (a copy of `current`) and a reports folder.
struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new(current: Option<&Path>) -> Site {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("models")).expect("mkdir");
        if let Some(current) = current {
            std::fs::copy(current, dir.path().join("models/anatomy.onnx")).expect("copy");
        }
        Site { dir }
    }

    fn model(&self) -> PathBuf {
        self.dir.path().join("models/anatomy.onnx")
    }

    fn reports(&self) -> PathBuf {
        self.dir.path().join("reports")
    }

    /// The files of the model folder, sorted.
    fn model_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path().join("models"))
            .expect("models")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// The wrapper with `args`, the test defaults and `env`.
    fn run(&self, dataset: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = common::retrain::command(&[]);
        cmd.env_remove("RUST_LOG")
            .env("ANATOMY_NODE", env!("CARGO_BIN_EXE_anatomy-node"))
            .env("EVAL_THREADS", "1")
            // The subset's test split: 38 scored slices of 2 patients.
            .env("MIN_TEST_IMAGES", "30")
            .env("MIN_TEST_PATIENTS", "2")
            .arg("--dataset")
            .arg(dataset)
            .arg("--model")
            .arg(self.model())
            .arg("--reports")
            .arg(self.reports())
            .args(args)
            .current_dir(self.dir.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run deploy/mine-retrain.sh")
    }

    /// The newest run folder (`latest`).
    fn latest(&self) -> PathBuf {
        let link = self.reports().join("latest");
        let target = std::fs::read_link(&link).expect("reports/latest");
        self.reports().join(target)
    }

    fn decision(&self) -> Value {
        let path = self.latest().join("decision.json");
        let text = std::fs::read_to_string(&path).expect("decision.json");
        serde_json::from_str(&text).expect("decision.json is JSON")
    }
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exit code")
}

fn assert_exit(out: &Output, expected: i32) {
    assert_eq!(
        code(out),
        expected,
        "exit code of mine-retrain.sh\n{}",
        common::text(out)
    );
}

/// "E.EE % (errors/images)", as the reasons write a slice error.
fn figure(eval: &Value) -> String {
    let (errors, images) = (
        eval["slice_errors"].as_u64().unwrap(),
        eval["slice_images"].as_u64().unwrap(),
    );
    format!(
        "{:.2} % ({errors}/{images})",
        100.0 * errors as f64 / images as f64
    )
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn a_candidate_that_evaluates_worse_is_not_promoted() {
    let Some(f) = fixture() else { return };
    let site = Site::new(Some(&f.good));
    let before = read(&site.model());
    let out = site.run(&f.dataset, &["--skip-mine", "--candidate", s(&f.bad)], &[]);
    assert_exit(&out, NOT_BETTER);

    assert_eq!(
        read(&site.model()),
        before,
        "the current model is untouched"
    );
    assert_eq!(
        site.model_files(),
        ["anatomy.onnx"],
        "no backup, no temp file"
    );
    let d = site.decision();
    assert_eq!(d["outcome"], "not-better");
    assert_eq!(d["exit_code"], NOT_BETTER);
    // The shipped model gets at most a few of these 38 slices wrong (0 today); the stats
    // model 37, whatever the shipped model becomes.
    let good = &d["current_model"]["eval"];
    assert!(good["slice_errors"].as_u64().unwrap() <= 3, "{good}");
    assert_eq!(
        d["reason"],
        format!(
            "not promoted: the candidate is worse: slice error 97.37 % (37/38) vs {}",
            figure(good)
        )
    );
    assert_eq!(d["current_model"]["eval"]["slice_images"], 38);
    assert_eq!(
        d["current_model"]["eval"]["version"],
        "anatomy-convnet-2026.11.1"
    );
    assert_eq!(d["candidate_model"]["eval"]["slice_errors"], 37);
    assert_eq!(d["candidate_model"]["eval"]["version"], "test-stats-192");
    assert_eq!(d["comparison"]["verdict"], "keep");
    assert_eq!(d["promotion"]["backup"], Value::Null);
    assert_eq!(d["mine"]["skipped"], true);
    // Both evaluations read the same held-out patients.
    let run = site.latest();
    for which in ["eval-current", "eval-candidate"] {
        let m: Value =
            serde_json::from_slice(&read(&run.join(which).join("metrics.json"))).expect("json");
        assert_eq!(m["splits"], serde_json::json!(["test"]), "{which}");
        assert_eq!(
            m["dataset"]["manifest_sha256"], d["dataset"]["manifest_sha256"],
            "{which}"
        );
    }
    let summary = std::fs::read_to_string(run.join("summary.txt")).expect("summary.txt");
    assert!(summary.starts_with(&format!(
        "run {}: not-better (exit 10)\n",
        d["run_id"].as_str().unwrap()
    )));
    assert!(common::text(&out).contains("the candidate is worse"));
}

#[test]
fn a_better_candidate_is_promoted_atomically_and_the_previous_model_kept() {
    let Some(f) = fixture() else { return };
    let site = Site::new(Some(&f.bad));
    let old = read(&site.model());
    let marker = site.dir.path().join("reloaded");
    let reload = format!("echo reloaded > '{}'", marker.display());
    let out = site.run(
        &f.dataset,
        &[
            "--skip-mine",
            "--candidate",
            s(&f.good),
            "--reload-cmd",
            &reload,
        ],
        &[],
    );
    assert_exit(&out, PROMOTED);

    assert_eq!(
        read(&site.model()),
        read(&f.good),
        "the candidate is served"
    );
    assert_eq!(
        site.model_files(),
        ["anatomy.onnx", "anatomy.test-stats-192.onnx"],
        "the previous model is kept under its version, no temp file is left"
    );
    let backup = site.dir.path().join("models/anatomy.test-stats-192.onnx");
    assert_eq!(read(&backup), old);
    assert!(marker.is_file(), "the reload command ran");

    let d = site.decision();
    assert_eq!(d["outcome"], "promoted");
    assert_eq!(d["exit_code"], PROMOTED);
    assert_eq!(
        d["reason"],
        format!(
            "promoted: the candidate is better: slice error {} vs 97.37 % (37/38)",
            figure(&d["candidate_model"]["eval"])
        )
    );
    assert_eq!(d["promotion"]["backup"], s(&backup));
    assert_eq!(d["promotion"]["reload_exit_code"], 0);
    assert_eq!(d["comparison"]["verdict"], "promote");

    // The same candidate again: now it is the current model, a tie, so nothing changes.
    let out = site.run(&f.dataset, &["--skip-mine", "--candidate", s(&f.good)], &[]);
    assert_exit(&out, NOT_BETTER);
    let d = site.decision();
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .starts_with("not promoted: equal slice error"),
        "{}",
        d["reason"]
    );
    assert_eq!(read(&site.model()), read(&f.good));
    assert_eq!(read(&backup), old, "the backup is not overwritten");
}

#[test]
fn a_candidate_that_fails_the_model_contract_is_refused() {
    let Some(f) = fixture() else { return };
    let site = Site::new(Some(&f.good));
    let before = read(&site.model());
    let out = site.run(
        &f.dataset,
        &["--skip-mine", "--candidate", s(&f.broken)],
        &[],
    );
    assert_exit(&out, REFUSED);
    assert_eq!(
        read(&site.model()),
        before,
        "the current model is untouched"
    );
    assert_eq!(site.model_files(), ["anatomy.onnx"]);
    let d = site.decision();
    assert_eq!(d["outcome"], "candidate-refused");
    let reason = d["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("candidate refused (it fails the model contract")
            && reason.ends_with("metadata `classes` is missing"),
        "{reason}"
    );
    assert_eq!(d["candidate_model"]["eval"], Value::Null);
    assert!(common::text(&out).contains("metadata `classes` is missing"));

    // A valid model that drops a class the node serves today is no drop-in replacement.
    let out = site.run(
        &f.dataset,
        &["--skip-mine", "--candidate", s(&f.five_classes)],
        &[],
    );
    assert_exit(&out, REFUSED);
    assert_eq!(read(&site.model()), before);
    assert_eq!(
        site.decision()["reason"],
        "candidate refused: the candidate lacks classes of the current model: other"
    );
}

#[test]
fn no_model_is_promoted_on_a_too_small_test_split() {
    let Some(f) = fixture() else { return };
    let site = Site::new(Some(&f.bad));
    let before = read(&site.model());
    let out = site.run(
        &f.dataset,
        &["--skip-mine", "--candidate", s(&f.good)],
        &[("MIN_TEST_PATIENTS", "3")],
    );
    assert_exit(&out, TOO_SMALL);
    assert_eq!(read(&site.model()), before);
    let d = site.decision();
    assert_eq!(d["outcome"], "test-split-too-small");
    assert_eq!(
        d["reason"],
        "the test split holds 38 scored human-labelled images of 2 patients; comparing models \
         needs at least 30 images of 3 patients (MIN_TEST_IMAGES, MIN_TEST_PATIENTS): not promoted"
    );
    assert!(
        !site.latest().join("eval-candidate").exists(),
        "nothing evaluated"
    );

    // A dataset whose test split is empty.
    let empty = site.dir.path().join("no-test");
    copy_dir(&f.dataset, &empty);
    let manifest = std::fs::read_to_string(empty.join("manifest.csv")).unwrap();
    std::fs::write(
        empty.join("manifest.csv"),
        manifest.replace(",test\n", ",val\n"),
    )
    .unwrap();
    let out = site.run(&empty, &["--skip-mine", "--candidate", s(&f.good)], &[]);
    assert_exit(&out, TOO_SMALL);
    assert!(site.decision()["reason"]
        .as_str()
        .unwrap()
        .starts_with("the test split holds 0 scored human-labelled images of 0 patients"));
    assert_eq!(read(&site.model()), before);
}

/// Copies a dataset folder (manifest, dataset.json, images/).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// With no model yet the candidate is installed; a reload command that fails is reported
/// (exit 14), the new file staying in place.
#[test]
fn the_first_model_is_installed_when_there_is_none() {
    let Some(f) = fixture() else { return };
    let site = Site::new(None);
    let out = site.run(
        &f.dataset,
        &["--skip-mine", "--candidate", s(&f.good)],
        &[("RELOAD_CMD", "echo cannot restart; exit 3")],
    );
    assert_exit(&out, RELOAD_FAILED);
    assert_eq!(read(&site.model()), read(&f.good));
    assert_eq!(site.model_files(), ["anatomy.onnx"]);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(site.model()).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o644, "readable by the node's user");
    let d = site.decision();
    assert_eq!(d["outcome"], "promoted-reload-failed");
    let first = figure(&d["candidate_model"]["eval"]);
    let first = first.split(" (").next().unwrap();
    assert_eq!(
        d["reason"],
        format!(
            "promoted (no current model: the candidate becomes the first one (slice error \
             {first})), but the reload command failed with exit 3: the node serves the previous \
             model until it restarts"
        )
    );
    assert_eq!(d["promotion"]["reload_exit_code"], 3);
    assert_eq!(d["current_model"]["eval"], Value::Null);
    let log = std::fs::read_to_string(site.latest().join("reload.log")).unwrap();
    assert_eq!(log, "cannot restart\n");
}

#[test]
fn an_overlapping_run_exits_locked_and_does_nothing() {
    let Some(f) = fixture() else { return };
    let site = Site::new(Some(&f.bad));
    let before = read(&site.model());
    std::fs::create_dir_all(site.reports()).unwrap();
    let lock = site.reports().join("mine-retrain.lock");
    // flock(1) holds the lock while the wrapper runs under it, as an overlapping run would.
    let mut cmd = common::retrain::command(&["flock".as_ref(), lock.as_os_str()]);
    let out = cmd
        .env("ANATOMY_NODE", env!("CARGO_BIN_EXE_anatomy-node"))
        .args(["--skip-mine", "--candidate", s(&f.good), "--dataset"])
        .arg(&f.dataset)
        .arg("--model")
        .arg(site.model())
        .arg("--reports")
        .arg(site.reports())
        .output()
        .expect("flock (util-linux)");
    assert_exit(&out, LOCKED);
    assert!(common::text(&out).contains("another run holds"));
    assert_eq!(read(&site.model()), before, "nothing promoted");
    assert!(!site.reports().join("latest").exists(), "no run folder");
}

/// A stand-in for `anatomy-node` whose `mine` prints a line and exits with $FAKE_MINE_EXIT;
/// every other command goes to the real binary.
fn fake_node(dir: &Path) -> PathBuf {
    let path = dir.join("anatomy-node");
    std::fs::write(
        &path,
        format!(
            "#!/bin/bash\nif [[ $1 == mine ]]; then echo \"mine $*: 3 studies\"; exit \
             $FAKE_MINE_EXIT; fi\nexec '{}' \"$@\"\n",
            env!("CARGO_BIN_EXE_anatomy-node")
        ),
    )
    .unwrap();
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&path, perms).unwrap();
    path
}

#[test]
fn the_exit_codes_of_mine_decide_whether_the_run_goes_on() {
    let Some(f) = fixture() else { return };
    let site = Site::new(Some(&f.good));
    let before = read(&site.model());
    let node = fake_node(site.dir.path());
    let config = site.dir.path().join("config.toml");
    std::fs::write(&config, "").unwrap();
    let base = [
        "--config",
        s(&config),
        "--candidate",
        s(&f.bad),
        "--since",
        "20261101",
    ];
    // (mine's exit, extra arguments, the wrapper's exit, the stage it stopped in)
    let cases: [(&str, &[&str], i32, &str); 6] = [
        ("75", &[], LOCKED, "mine"),
        ("1", &[], FAILED, "mine"),
        ("2", &[], FAILED, "mine"),
        ("3", &[], MINE_INCOMPLETE, "mine"),
        ("4", &[], MINE_INCOMPLETE, "mine"),
        // Allowed to go on: evaluated, and the worse candidate is kept out.
        ("4", &["--allow-partial"], NOT_BETTER, "decide"),
    ];
    for (mine_exit, extra, expected, stage) in cases {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let out = site.run(
            &f.dataset,
            &args,
            &[("ANATOMY_NODE", s(&node)), ("FAKE_MINE_EXIT", mine_exit)],
        );
        assert_exit(&out, expected);
        let d = site.decision();
        assert_eq!(d["mine"]["exit_code"], mine_exit.parse::<i32>().unwrap());
        assert_eq!(d["stage"], stage, "mine exit {mine_exit}");
        let log = std::fs::read_to_string(site.latest().join("mine.log")).unwrap();
        assert!(
            log.contains(&format!(
                "mine mine --config {} --out {} --since 20261101: 3 studies",
                config.display(),
                f.dataset.display()
            )),
            "{log}"
        );
        assert_eq!(read(&site.model()), before);
    }
    // Without --skip-mine, a configuration file is required.
    let out = site.run(&f.dataset, &["--config", "/nonexistent.toml"], &[]);
    assert_exit(&out, USAGE);
    let out = site.run(&f.dataset, &["--bogus"], &[]);
    assert_exit(&out, USAGE);
    assert!(common::text(&out).contains("unknown argument: --bogus"));
}

/// The training stage for real (pack, train, export), with tiny epochs on a 64 px dataset:
/// the candidate carries the run's version stamp, and the wrapper decides by the rule on the
/// two evaluations. A second run on the same dataset has nothing new to learn.
#[test]
fn the_training_stage_trains_stamps_and_decides_by_the_rule() {
    let Some(data) = common::data::ct_data() else {
        eprintln!("SKIPPED: needs ../shared/data/ct");
        return;
    };
    let Some(python) = common::retrain::training_python() else {
        return;
    };
    let site = Site::new(None);
    let Some(current) = common::models::make(
        &site.dir.path().join("models"),
        "anatomy",
        &["--size", "64"],
    ) else {
        return;
    };
    assert_eq!(current, site.model());
    std::fs::remove_file(site.dir.path().join("models/anatomy.json")).unwrap();
    let before = read(&current);
    let dataset = build_dataset(&data, site.dir.path(), 64);
    let env = [
        ("PY", s(&python)),
        ("EPOCHS", "2"),
        ("THREADS", "2"),
        ("SEED", "7"),
        (
            "TRAIN_ARGS",
            "--width 8 --blocks 1,1,1,1 --batch-size 16 --no-nonaxial",
        ),
        ("VERSION_PREFIX", "ci-retrain"),
    ];
    let work = site.dir.path().join("work");
    let mut env = env.to_vec();
    env.push(("WORK", s(&work)));
    let out = site.run(&dataset, &["--skip-mine"], &env);
    let d = site.decision();
    let run = site.latest();
    let run_id = d["run_id"].as_str().unwrap();
    assert_eq!(d["trained_here"], true, "{}", common::text(&out));
    assert!(run.join("train/model.pt").is_file());
    assert!(work.join("dataset.npz").is_file());
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(log.contains("epoch"), "{log}");
    let cand = &d["candidate_model"]["eval"];
    assert_eq!(cand["version"], format!("ci-retrain-{run_id}"));
    assert_eq!(d["candidate_model"]["path"], s(&run.join("candidate.onnx")));
    // The rule, worked out here from the two evaluations.
    let cur = &d["current_model"]["eval"];
    assert_eq!(cur["version"], "test-stats-64");
    let (ec, nc) = (
        cur["slice_errors"].as_u64().unwrap(),
        cur["slice_images"].as_u64().unwrap(),
    );
    let (ek, nk) = (
        cand["slice_errors"].as_u64().unwrap(),
        cand["slice_images"].as_u64().unwrap(),
    );
    let better = ek * nc < ec * nk
        || (ek * nc == ec * nk && {
            let c = &d["comparison"];
            c["mean_auc_candidate"].as_f64().unwrap()
                > c["mean_auc_current"].as_f64().unwrap() + 0.001
        });
    if better {
        assert_exit(&out, PROMOTED);
        assert_eq!(read(&site.model()), read(&run.join("candidate.onnx")));
    } else {
        assert_exit(&out, NOT_BETTER);
        assert_eq!(read(&site.model()), before);
    }
    eprintln!("trained candidate: {}", d["reason"]);

    // Nothing new in the dataset: no second training.
    let out = site.run(&dataset, &["--skip-mine"], &env);
    assert_exit(&out, UNCHANGED);
    assert!(!site.latest().join("train.log").exists());
}

#[test]
fn the_script_parses_and_passes_shellcheck() {
    let out = Command::new("bash")
        .arg("-n")
        .arg(common::retrain::script())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    let help = Command::new("bash")
        .arg(common::retrain::script())
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for line in [
        "  10  not promoted",
        "  12  candidate refused",
        "  75  locked",
    ] {
        assert!(help.contains(line), "--help documents `{line}`:\n{help}");
    }
    match Command::new("shellcheck")
        .arg(common::retrain::script())
        .output()
    {
        Ok(out) => assert!(out.status.success(), "shellcheck:\n{}", common::text(&out)),
        Err(_) => eprintln!("NOTE: shellcheck is not installed; only `bash -n` checked"),
    }
}
