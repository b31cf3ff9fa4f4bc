//! Small ONNX models for tests, written by tests/tools/make_test_model.py (needs a Python
//! with `onnx` and `numpy`: .venv-tests, made by tests/run-all.sh, or $ANATOMY_TEST_PYTHON).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A Python that can `import onnx, numpy`: `ANATOMY_TEST_PYTHON`, else
/// `.venv-tests/bin/python`, else `python3`. Without one the test fails saying how to get
/// it; `None` (a skip) only where ANATOMY_ALLOW_SKIP_PYTHON=1 allows it.
pub fn python() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        std::env::var_os("ANATOMY_TEST_PYTHON").map(PathBuf::from),
        Some(root.join(".venv-tests/bin/python")),
        Some(PathBuf::from("python3")),
    ];
    let found = candidates.into_iter().flatten().find(|python| {
        Command::new(python)
            .args(["-c", "import onnx, numpy"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        let how = "no Python with the `onnx` package to write test models: run \
                   `python3 -m venv .venv-tests && .venv-tests/bin/pip install -r \
                   tests/tools/requirements.txt` (tests/run-all.sh does it), or set \
                   ANATOMY_TEST_PYTHON";
        if std::env::var("ANATOMY_ALLOW_SKIP_PYTHON").as_deref() == Ok("1") {
            eprintln!("SKIPPED: {how}");
        } else {
            panic!("{how}; ANATOMY_ALLOW_SKIP_PYTHON=1 skips these tests instead");
        }
    }
    found
}

/// Write `dir/<name>.onnx` (and its `.json` parameters) with make_test_model.py and
/// `args` (e.g. `["--size", "64", "--kind", "conv"]`); `None` when skipping is allowed and
/// there is no suitable Python.
pub fn make(dir: &Path, name: &str, args: &[&str]) -> Option<PathBuf> {
    let python = python()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(dir).expect("model directory");
    let out = dir.join(format!("{name}.onnx"));
    let output = Command::new(python)
        .arg(root.join("tests/tools/make_test_model.py"))
        .arg(&out)
        .args(args)
        .output()
        .expect("run make_test_model.py");
    assert!(
        output.status.success(),
        "make_test_model.py {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(out)
}
