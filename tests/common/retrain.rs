//! deploy/mine-retrain.sh as the tests run it.

use std::path::PathBuf;
use std::process::Command;

/// Every variable the script reads, so that nothing from the caller's environment leaks in.
pub const SCRIPT_VARS: &[&str] = &[
    "CONFIG",
    "DATASET",
    "MODEL",
    "REPORTS",
    "CANDIDATE",
    "SKIP_MINE",
    "SELF_TRAIN",
    "ALLOW_PARTIAL",
    "SINCE",
    "UNTIL",
    "FORCE",
    "RELOAD_CMD",
    "ANATOMY_REPO",
    "PY",
    "PYTHON3",
    "DEVICE",
    "SEED",
    "EPOCHS",
    "PATIENCE",
    "THREADS",
    "TRAIN_ARGS",
    "VERSION_PREFIX",
    "PSEUDO_WEIGHT",
    "WORK",
    "EVAL_DEVICE",
    "EVAL_THREADS",
    "MIN_TEST_IMAGES",
    "MIN_TEST_PATIENTS",
    "AUC_MARGIN",
    "KEEP_REPORTS",
    "LOCK_FILE",
];

/// training/.venv's Python, or None (the caller skips) when it is missing and
/// ANATOMY_ALLOW_SKIP_PYTHON=1 allows that; without it a missing venv fails the test.
pub fn training_python() -> Option<PathBuf> {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("training/.venv/bin/python");
    if python.is_file() {
        return Some(python);
    }
    let how = "training/.venv is missing: run `bash training/install.sh`";
    assert!(
        std::env::var("ANATOMY_ALLOW_SKIP_PYTHON").as_deref() == Ok("1"),
        "{how}; ANATOMY_ALLOW_SKIP_PYTHON=1 skips this test instead"
    );
    eprintln!("SKIPPED: {how}");
    None
}

/// The wrapper script.
pub fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/mine-retrain.sh")
}

/// `prefix... bash deploy/mine-retrain.sh` with none of the script's variables inherited.
pub fn command(prefix: &[&std::ffi::OsStr]) -> Command {
    let (program, rest) = match prefix.split_first() {
        Some((p, rest)) => (*p, rest),
        None => (std::ffi::OsStr::new("bash"), &[][..]),
    };
    let mut cmd = Command::new(program);
    cmd.args(rest);
    if !prefix.is_empty() {
        cmd.arg("bash");
    }
    cmd.arg(script());
    for var in SCRIPT_VARS {
        cmd.env_remove(var);
    }
    cmd
}
