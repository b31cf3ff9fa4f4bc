//! Small ONNX models for tests, written by tests/tools/make_test_model.py (needs a Python
//! with `onnx` and `numpy`: .venv-tests, made by tests/run-all.sh, or $ANATOMY_TEST_PYTHON).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A Python that can `import onnx, numpy`, or a panic that says how to get one.
pub fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        std::env::var_os("ANATOMY_TEST_PYTHON").map(PathBuf::from),
        Some(root.join(".venv-tests/bin/python")),
        Some(PathBuf::from("python3")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|python| {
            Command::new(python)
                .args(["-c", "import onnx, numpy"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .unwrap_or_else(|| {
            panic!(
                "no Python with the `onnx` package to write test models: run `python3 -m venv \
                 .venv-tests && .venv-tests/bin/pip install -r tests/tools/requirements.txt` \
                 (tests/run-all.sh does it), or set ANATOMY_TEST_PYTHON"
            )
        })
}

/// Write `dir/<name>.onnx` with make_test_model.py and `args` (e.g. `["--kind", "conv"]`).
pub fn make(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = dir.join(format!("{name}.onnx"));
    let output = Command::new(python())
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
    out
}
