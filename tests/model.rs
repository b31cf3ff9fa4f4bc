//! `anatomy::model` against real ONNX files: small models that tests/tools/make_test_model.py
//! writes (needs the `onnx` Python package of tests/tools/requirements.txt), run by the ONNX
//! Runtime library of deploy/install-onnxruntime.sh.
//!
//! Without that Python the tests fail and say how to install it, unless
//! `ANATOMY_ALLOW_SKIP_PYTHON=1`. `ANATOMY_PARITY_FIXTURE=<dir>` (written by
//! training/tools/parity_fixture.py) adds the comparison with PyTorch. `ANATOMY_EXPECT_CUDA=1`
//! (a GPU machine, `--features cuda`) makes `device = cuda` mandatory instead of allowed to
//! fail. The missing-library cases live in tests/model_runtime.rs: this binary loads the
//! library, and a process loads it only once.

mod common;

use common::npy::read_npy;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anatomy_node::anatomy::model::{
    init_runtime, runtime_library, Device, Model, ModelError, Provider, DEFAULT_MAX_BATCH,
};

const CLASSES: [&str; 6] = ["neck", "lungs", "liver", "pelvis", "legs", "other"];

/// Writes `<name>.onnx` (and `<name>.json`) with make_test_model.py and `args`.
fn make_model(name: &str, args: &[&str]) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("model-tests");
    common::models::make(&dir, name, args)
}

fn load(path: &Path) -> Model {
    Model::load(path, Device::Cpu, 2).unwrap_or_else(|e| panic!("load {}: {e}", path.display()))
}

/// Deterministic pseudo-random values in [0, 1) (no rand crate needed).
fn noise(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

/// What the `stats` model computes (see make_test_model.py), from its `.json` parameters.
fn stats_expected(params: &serde_json::Value, image: &[f32], size: usize) -> Vec<f32> {
    let half = size / 2;
    let mut quadrants = [0f64; 4];
    for row in 0..size {
        for col in 0..size {
            quadrants[(row / half) * 2 + col / half] += f64::from(image[row * size + col]);
        }
    }
    quadrants
        .iter_mut()
        .for_each(|q| *q /= (half * half) as f64);
    let w = params["W"].as_array().expect("W");
    let b = params["b"].as_array().expect("b");
    let t = params["temperature"].as_f64().expect("temperature");
    let logits: Vec<f64> = (0..b.len())
        .map(|c| {
            let dot: f64 = (0..4)
                .map(|f| quadrants[f] * w[f][c].as_f64().expect("w"))
                .sum();
            (dot + b[c].as_f64().expect("b")) / t
        })
        .collect();
    let max = logits.iter().cloned().fold(f64::MIN, f64::max);
    let exp: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|e| (e / sum) as f32).collect()
}

/// Images that tell the quadrants apart (a transposed or flipped input would change them).
fn quadrant_images(size: usize) -> Vec<f32> {
    let mut images = Vec::new();
    for bright in 0..4 {
        images.extend((0..size * size).map(|i| {
            let (row, col) = (i / size, i % size);
            let quadrant = (row / (size / 2)) * 2 + col / (size / 2);
            if quadrant == bright {
                1.0
            } else {
                0.1
            }
        }));
    }
    images.extend((0..size * size).map(|i| (i % size) as f32 / size as f32)); // left→right ramp
    images.extend(noise(size * size, 7));
    images
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

#[test]
fn loads_and_reads_metadata() {
    let Some(path) = make_model(
        "meta",
        &[
            "--size",
            "32",
            "--classes",
            "neck,lungs,legs",
            "--temperature",
            "0.5",
        ],
    ) else {
        return;
    };
    let model = load(&path);
    let info = model.info();
    assert_eq!(info.classes, ["neck", "lungs", "legs"]);
    assert_eq!(info.input_size, 32);
    assert_eq!(info.hu_window, [-100.0, 200.0]);
    assert_eq!(info.normalization, "unit");
    assert_eq!(info.model_version, "test-stats-32");
    assert!(info.trained_on.contains("make_test_model.py"));
    assert_eq!(info.temperature, Some(0.5));
    assert_eq!(model.provider(), Provider::Cpu);
    assert_eq!(model.max_batch(), DEFAULT_MAX_BATCH);
    assert_eq!(model.path(), path);

    // The library is now loaded once for the process; asking again is fine, asking for
    // another one is an error that names both.
    let library = runtime_library().expect("library loaded by Model::load");
    init_runtime(None).expect("second init");
    init_runtime(Some(library)).expect("same library");
    let other = Path::new("/nonexistent/libonnxruntime.so");
    let err = init_runtime(Some(other)).expect_err("another library");
    assert!(matches!(err, ModelError::Library { .. }), "{err}");
    assert!(
        err.to_string().contains(&library.display().to_string()),
        "{err}"
    );
}

#[test]
fn predicts_what_the_graph_computes() {
    let size = 64;
    let Some(path) = make_model("stats", &["--size", "64", "--temperature", "0.7"]) else {
        return;
    };
    let params: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(path.with_extension("json")).expect("params"),
    )
    .expect("params json");
    let model = load(&path);
    let images = quadrant_images(size);
    let n = images.len() / (size * size);
    let rows = model.predict(&images, n).expect("predict");
    assert_eq!(rows.len(), n);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.len(), CLASSES.len());
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5, "row {i} sums to {sum}");
        let expected = stats_expected(&params, &images[i * size * size..][..size * size], size);
        let diff = max_abs_diff(std::slice::from_ref(row), std::slice::from_ref(&expected));
        assert!(diff < 1e-5, "image {i}: got {row:?}, expected {expected:?}");
    }
    // The four one-bright-quadrant images must not all look alike.
    assert!(max_abs_diff(&rows[0..1], &rows[1..2]) > 1e-3);
    assert!(max_abs_diff(&rows[1..2], &rows[2..3]) > 1e-3);
}

#[test]
fn deterministic_and_batching_equals_one_by_one() {
    let size = 48;
    let Some(path) = make_model("conv48", &["--kind", "conv", "--size", "48"]) else {
        return;
    };
    let n = 11;
    let images = noise(n * size * size, 42);
    let model = load(&path).with_max_batch(4); // 4 + 4 + 3
    let batched = model.predict(&images, n).expect("batched");
    assert_eq!(
        batched,
        model.predict(&images, n).expect("again"),
        "not deterministic"
    );

    let one_by_one: Vec<Vec<f32>> = images
        .chunks(size * size)
        .flat_map(|image| model.predict(image, 1).expect("one"))
        .collect();
    let whole = load(&path)
        .with_max_batch(64)
        .predict(&images, n)
        .expect("one batch");
    assert!(max_abs_diff(&batched, &one_by_one) < 1e-6);
    assert!(max_abs_diff(&batched, &whole) < 1e-6);
    assert!(model.predict(&[], 0).expect("empty").is_empty());
}

#[test]
fn concurrent_callers_get_their_own_results() {
    let size = 32;
    let Some(path) = make_model("conv32", &["--kind", "conv", "--size", "32"]) else {
        return;
    };
    let model = Arc::new(load(&path).with_max_batch(3));
    let inputs: Vec<Vec<f32>> = (0..4).map(|seed| noise(5 * size * size, seed)).collect();
    let expected: Vec<_> = inputs
        .iter()
        .map(|x| model.predict(x, 5).expect("serial"))
        .collect();
    let handles: Vec<_> = inputs
        .into_iter()
        .map(|x| {
            let model = Arc::clone(&model);
            std::thread::spawn(move || {
                (0..5)
                    .map(|_| model.predict(&x, 5).expect("concurrent"))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for (handle, expected) in handles.into_iter().zip(expected) {
        for got in handle.join().expect("thread") {
            assert!(max_abs_diff(&got, &expected) < 1e-6);
        }
    }
}

#[test]
fn predict_refuses_wrong_input_length_and_nan_output() {
    let Some(path) = make_model("len", &["--size", "16"]) else {
        return;
    };
    let model = load(&path);
    let err = model
        .predict(&vec![0.5; 16 * 16 * 2 - 1], 2)
        .expect_err("short input");
    assert!(matches!(err, ModelError::Input { .. }), "{err}");
    assert!(err.to_string().contains("len.onnx"), "{err}");

    let Some(path) = make_model("nan", &["--kind", "nan", "--size", "16"]) else {
        return;
    };
    let err = load(&path)
        .predict(&[0.5; 16 * 16], 1)
        .expect_err("NaN output");
    assert!(matches!(err, ModelError::Output { .. }), "{err}");
    assert!(err.to_string().contains("not finite"), "{err}");
}

#[test]
fn dynamic_spatial_size_is_checked_at_run_time() {
    let Some(path) = make_model("dynamic", &["--size", "16", "--dynamic-size"]) else {
        return;
    };
    let model = load(&path);
    assert_eq!(model.info().input_size, 16);
    let rows = model.predict(&[0.25; 16 * 16 * 3], 3).expect("predict");
    assert_eq!(rows.len(), 3);
}

/// Every broken model is refused at load, and the error names the file and the key (or the
/// input/output) that breaks the contract.
#[test]
fn bad_models_name_the_key() {
    let cases: &[(&str, &[&str], &str)] = &[
        ("no-classes", &["--drop-key", "classes"], "classes"),
        ("no-input-size", &["--drop-key", "input_size"], "input_size"),
        ("no-hu-window", &["--drop-key", "hu_window"], "hu_window"),
        (
            "no-normalization",
            &["--drop-key", "normalization"],
            "normalization",
        ),
        (
            "no-model-version",
            &["--drop-key", "model_version"],
            "model_version",
        ),
        ("no-trained-on", &["--drop-key", "trained_on"], "trained_on"),
        (
            "classes-short",
            &["--set-key", r#"classes=["neck","lungs"]"#],
            "classes",
        ),
        (
            "classes-twice",
            &["--set-key", r#"classes=["a","b","c","d","e","a"]"#],
            "classes",
        ),
        (
            "classes-not-json",
            &["--set-key", "classes=neck,lungs"],
            "classes",
        ),
        (
            "size-mismatch",
            &["--set-key", "input_size=32"],
            "input_size",
        ),
        (
            "window-reversed",
            &["--set-key", "hu_window=[200, -100]"],
            "hu_window",
        ),
        (
            "window-one",
            &["--set-key", "hu_window=[-100]"],
            "hu_window",
        ),
        (
            "normalization-zscore",
            &["--set-key", "normalization=zscore"],
            "normalization",
        ),
        (
            "temperature-bad",
            &["--set-key", "temperature=hot"],
            "temperature",
        ),
    ];
    for (name, args, key) in cases {
        let Some(path) = make_model(name, args) else {
            return;
        };
        let err = Model::load(&path, Device::Cpu, 1).expect_err(name);
        match &err {
            ModelError::Metadata { file, key: got, .. } => {
                assert_eq!(got, key, "{name}: {err}");
                assert_eq!(file, &path);
            }
            other => panic!("{name}: expected a metadata error on `{key}`, got {other}"),
        }
        let text = err.to_string();
        eprintln!("{text}");
        assert!(
            text.contains(&format!("{name}.onnx")) && text.contains(key),
            "{text}"
        );
    }
}

#[test]
fn bad_interfaces_name_the_input_or_output() {
    let cases: &[(&str, &[&str], &str)] = &[
        ("input-name", &["--input-name", "x"], "image"),
        ("output-name", &["--output-name", "probs"], "probabilities"),
        ("three-channels", &["--channels", "3"], "image"),
    ];
    for (name, args, expected) in cases {
        let Some(path) = make_model(name, args) else {
            return;
        };
        let err = Model::load(&path, Device::Cpu, 1).expect_err(name);
        match &err {
            ModelError::Interface {
                name: got, file, ..
            } => {
                assert_eq!(got, expected, "{err}");
                assert_eq!(file, &path);
            }
            other => panic!("{name}: expected an interface error on `{expected}`, got {other}"),
        }
        eprintln!("{err}");
        assert!(err.to_string().contains(&format!("{name}.onnx")), "{err}");
    }
}

#[test]
fn unreadable_files_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.onnx");
    let err = Model::load(&missing, Device::Cpu, 1).expect_err("missing");
    assert!(matches!(err, ModelError::Open { .. }), "{err}");
    assert!(err.to_string().contains("missing.onnx"), "{err}");

    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"this is not a protobuf").expect("write");
    let err = Model::load(&garbage, Device::Cpu, 1).expect_err("garbage");
    assert!(matches!(err, ModelError::Open { .. }), "{err}");
    assert!(err.to_string().contains("garbage.onnx"), "{err}");
}

/// `device = cuda` either runs on CUDA or fails: it never quietly runs on the CPU.
#[test]
fn cuda_never_falls_back_to_cpu() {
    let Some(path) = make_model("cuda", &["--kind", "conv", "--size", "32"]) else {
        return;
    };
    let must_run = std::env::var("ANATOMY_EXPECT_CUDA").as_deref() == Ok("1");
    match Model::load(&path, Device::Cuda, 1) {
        Ok(model) => {
            assert_eq!(model.provider(), Provider::Cuda);
            let cpu = load(&path);
            let x = noise(3 * 32 * 32, 3);
            let diff = max_abs_diff(
                &model.predict(&x, 3).expect("cuda"),
                &cpu.predict(&x, 3).expect("cpu"),
            );
            assert!(diff < 1e-4, "CUDA and CPU differ by {diff}");
        }
        Err(err) => {
            assert!(!must_run, "ANATOMY_EXPECT_CUDA=1 but: {err}");
            assert!(
                matches!(
                    err,
                    ModelError::Provider {
                        device: Device::Cuda,
                        ..
                    }
                ),
                "{err}"
            );
            eprintln!("CUDA unavailable, as expected here: {err}");
        }
    }
    // Auto picks CUDA only when it works, and says which one runs.
    let auto = Model::load(&path, Device::Auto, 1).expect("auto");
    if !cfg!(feature = "cuda") {
        assert_eq!(auto.provider(), Provider::Cpu);
    } else if must_run {
        assert_eq!(auto.provider(), Provider::Cuda);
    }
}

// ---------------------------------------------------------------------------------------
// Parity with PyTorch (training/tools/parity_fixture.py)

#[test]
fn npy_reader_reads_what_numpy_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.npy");
    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    let padded = format!("{header:<117}\n"); // 10 + 118 = 128, as numpy aligns it
    bytes.extend((padded.len() as u16).to_le_bytes());
    bytes.extend(padded.as_bytes());
    for v in [1.0f32, 2.0, 3.0, 4.0, 5.0, -6.5] {
        bytes.extend(v.to_le_bytes());
    }
    std::fs::write(&path, bytes).expect("write");
    assert_eq!(
        read_npy(&path),
        (vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.5])
    );
}

/// `ANATOMY_PARITY_FIXTURE=<dir>`: the ONNX model of that fixture, run here, gives PyTorch's
/// probabilities within 1e-4, and windowing its HU gives its input. The model is
/// `ANATOMY_PARITY_MODEL`, else fixture.json's `onnx`, else `<dir>/model.onnx`;
/// `ANATOMY_PARITY_DEVICE` (cpu, cuda, auto) picks the device, cpu by default.
#[test]
fn parity_with_pytorch() {
    let Some(dir) = std::env::var_os("ANATOMY_PARITY_FIXTURE").map(PathBuf::from) else {
        eprintln!(
            "SKIPPED: set ANATOMY_PARITY_FIXTURE to a training/tools/parity_fixture.py output"
        );
        return;
    };
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("fixture.json")).expect("fixture.json"),
    )
    .expect("fixture.json is JSON");
    let onnx = std::env::var_os("ANATOMY_PARITY_MODEL")
        .map(PathBuf::from)
        .or_else(|| fixture["onnx"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| dir.join("model.onnx"));
    let device: Device = std::env::var("ANATOMY_PARITY_DEVICE")
        .unwrap_or_else(|_| "cpu".into())
        .parse()
        .expect("ANATOMY_PARITY_DEVICE");
    let model = Model::load(&onnx, device, 0).unwrap_or_else(|e| panic!("{e}"));
    let info = model.info();
    let classes: Vec<String> = serde_json::from_value(fixture["classes"].clone()).expect("classes");
    assert_eq!(info.classes, classes);
    assert_eq!(Some(info.input_size as u64), fixture["input_size"].as_u64());

    let (shape, input) = read_npy(&dir.join("input.npy"));
    let s = info.input_size;
    assert_eq!(shape[1..], [1, s, s], "input.npy shape");
    let n = shape[0];
    let (_, hu) = read_npy(&dir.join("hu.npy"));
    let windowed = info.to_input(&hu);
    let window_diff = windowed
        .iter()
        .zip(&input)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(
        window_diff < 1e-6,
        "ModelInfo::to_input differs from training's by {window_diff}"
    );

    let (pshape, probabilities) = read_npy(&dir.join("probabilities.npy"));
    assert_eq!(pshape, [n, classes.len()]);
    let expected: Vec<Vec<f32>> = probabilities
        .chunks(classes.len())
        .map(<[f32]>::to_vec)
        .collect();
    let got = model.predict(&input, n).expect("predict");
    let diff = max_abs_diff(&got, &expected);
    eprintln!(
        "parity: {n} images on {}: max |Rust - PyTorch| = {diff:e}",
        model.provider()
    );
    assert!(diff < 1e-4, "max |Rust - PyTorch| = {diff}");
}
