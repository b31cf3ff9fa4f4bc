//! A missing or broken ONNX Runtime library is an error naming the path and how to install
//! it, never a panic. This binary never loads the library successfully (tests/model.rs
//! does): a process loads it once, and a loaded library would hide these errors.

use std::path::Path;
use std::process::Command;

use anatomy_node::anatomy::model::{init_runtime, Device, Model, ModelError};

const CHILD_ENV: &str = "ANATOMY_MODEL_RUNTIME_CHILD";

fn assert_library_error(err: &ModelError, path: &Path) {
    assert!(
        matches!(err, ModelError::Library { path: p, .. } if p == path),
        "expected a library error for {}: {err}",
        path.display()
    );
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(
        text.contains("bash deploy/install-onnxruntime.sh"),
        "{text}"
    );
}

#[test]
fn missing_library_is_an_error() {
    let path = Path::new("/nonexistent/onnxruntime/libonnxruntime.so");
    let err = init_runtime(Some(path)).expect_err("missing library");
    assert_library_error(&err, path);
    assert!(err.to_string().contains("no such file"), "{err}");
}

#[test]
fn a_file_that_is_no_library_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("libonnxruntime.so");
    std::fs::write(&path, b"not an ELF file").expect("write");
    let err = init_runtime(Some(&path)).expect_err("not a library");
    assert_library_error(&err, &path);
}

/// `Model::load` with `ORT_DYLIB_PATH` pointing nowhere, in a child process (the variable is
/// process-wide): the error comes back as a value, the child does not panic or abort.
#[test]
fn model_load_without_library_is_an_error() {
    let exe = std::env::current_exe().expect("test binary");
    let missing = "/nonexistent/ort/libonnxruntime.so";
    let output = Command::new(exe)
        .args([
            "--exact",
            "child_loads_model_without_library",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .env("ORT_DYLIB_PATH", missing)
        .output()
        .expect("run child");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "child failed: {text}");
    assert!(
        text.contains("CHILD-OK") && text.contains(missing),
        "{text}"
    );
}

/// With neither an argument nor `ORT_DYLIB_PATH`, the library is looked for next to the
/// executable and in `.onnxruntime/` above it; a copy of this test binary in an empty
/// directory finds nothing, and the error lists where it looked.
#[test]
fn no_library_in_the_default_places_is_an_error() {
    let exe = std::env::current_exe().expect("test binary");
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).expect("bin");
    let copy = bin.join("model_runtime");
    std::fs::copy(&exe, &copy).expect("copy test binary");
    let output = Command::new(&copy)
        .args(["--exact", "child_finds_no_library", "--nocapture"])
        .env(CHILD_ENV, "1")
        .env_remove("ORT_DYLIB_PATH")
        .output()
        .expect("run child");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "child failed: {text}");
    assert!(text.contains("CHILD-OK"), "{text}");
    let searched = bin.join(".onnxruntime/libonnxruntime.so");
    assert!(text.contains(&searched.display().to_string()), "{text}");
}

/// Runs only as the child of [`no_library_in_the_default_places_is_an_error`].
#[test]
fn child_finds_no_library() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let err = Model::load(Path::new("any.onnx"), Device::Cpu, 1).expect_err("no library");
    assert!(
        matches!(&err, ModelError::LibraryNotFound { searched } if !searched.is_empty()),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("bash deploy/install-onnxruntime.sh"),
        "{err}"
    );
    println!("CHILD-OK: {err}");
}

/// Runs only as the child of [`model_load_without_library_is_an_error`].
#[test]
fn child_loads_model_without_library() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let missing = std::env::var_os("ORT_DYLIB_PATH").expect("ORT_DYLIB_PATH");
    for device in [Device::Cpu, Device::Auto, Device::Cuda] {
        let err = Model::load(Path::new("any.onnx"), device, 1).expect_err("no library");
        assert_library_error(&err, Path::new(&missing));
    }
    println!(
        "CHILD-OK: {}",
        init_runtime(None).expect_err("still no library")
    );
}
