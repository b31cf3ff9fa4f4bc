//! Classifier throughput: images/s of `anatomy::model::Model::predict` at batch 1, 32 and
//! 256 (one `predict` call per batch, input copied in from host memory each time, as the node
//! does).
//!
//!     cargo bench --bench inference                       # CPU, a test model at 256×256
//!     ANATOMY_BENCH_MODEL=models/anatomy.onnx cargo bench --bench inference
//!     ANATOMY_BENCH_DEVICE=cuda cargo bench --features cuda --bench inference
//!
//! Without ANATOMY_BENCH_MODEL the model is tests/tools/make_test_model.py's `conv` kind
//! (two small convolutions, 256×256; needs the Python of tests/tools/requirements.txt:
//! ANATOMY_TEST_PYTHON, else .venv-tests/bin/python, else python3).
//! ANATOMY_BENCH_DEVICE is `classifier.device`: cpu (default), cuda (CUDA or an error, never
//! a silent CPU run) or auto. Also: ANATOMY_BENCH_THREADS (intra-op threads, 0 = one per
//! core, the default), ANATOMY_BENCH_BATCHES (default "1,32,256"), ANATOMY_BENCH_SECONDS
//! (time per batch size, default 3).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anatomy_node::anatomy::model::{Device, Model};

fn main() {
    let device: Device = env_or("ANATOMY_BENCH_DEVICE", Device::Cpu);
    let threads: usize = env_or("ANATOMY_BENCH_THREADS", 0);
    let seconds: f64 = env_or("ANATOMY_BENCH_SECONDS", 3.0);
    let batches: Vec<usize> = std::env::var("ANATOMY_BENCH_BATCHES")
        .unwrap_or_else(|_| "1,32,256".into())
        .split(',')
        .map(|b| {
            b.trim()
                .parse()
                .expect("ANATOMY_BENCH_BATCHES: comma-separated sizes")
        })
        .collect();
    let path = std::env::var_os("ANATOMY_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(test_model);

    let mut model = Model::load(&path, device, threads).unwrap_or_else(|e| panic!("{e}"));
    let size = model.info().input_size;
    println!(
        "model {} ({}, {size}×{size}), device {device} → {}, intra-op threads {}, {} CPU cores",
        path.display(),
        model.info().model_version,
        model.provider(),
        if threads == 0 {
            "default".to_string()
        } else {
            threads.to_string()
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let largest = batches.iter().copied().max().unwrap_or(1);
    let inputs = pseudo_images(largest * size * size);
    for batch in batches {
        model = model.with_max_batch(batch);
        let rate = images_per_second(&model, &inputs[..batch * size * size], batch, seconds);
        println!(
            "  batch {batch:>4}: {rate:9.1} images/s ({:.2} ms per batch)",
            1e3 * batch as f64 / rate
        );
    }
}

/// Runs `predict` on `batch` images for about `seconds` after one warm-up call.
fn images_per_second(model: &Model, inputs: &[f32], batch: usize, seconds: f64) -> f64 {
    model
        .predict(inputs, batch)
        .unwrap_or_else(|e| panic!("{e}"));
    let budget = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut images = 0usize;
    while images == 0 || start.elapsed() < budget {
        let rows = model
            .predict(inputs, batch)
            .unwrap_or_else(|e| panic!("{e}"));
        images += rows.len();
    }
    images as f64 / start.elapsed().as_secs_f64()
}

/// Values in [0, 1), different per pixel so no kernel sees a constant image.
fn pseudo_images(len: usize) -> Vec<f32> {
    let mut state = 0x9e3779b97f4a7c15u64;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

/// Writes the default bench model with make_test_model.py (under target/bench-models/).
fn test_model() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("target/bench-models/conv-256.onnx");
    let pythons = [
        std::env::var_os("ANATOMY_TEST_PYTHON").map(PathBuf::from),
        Some(root.join(".venv-tests/bin/python")),
        Some(PathBuf::from("python3")),
    ];
    let made = pythons.into_iter().flatten().any(|python| {
        Command::new(python)
            .arg(root.join("tests/tools/make_test_model.py"))
            .arg(&out)
            .args(["--kind", "conv", "--size", "256"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    assert!(
        made,
        "no Python with the `onnx` package to write the bench model: install \
         tests/tools/requirements.txt into .venv-tests, or set ANATOMY_BENCH_MODEL"
    );
    out
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T
where
    T::Err: std::fmt::Debug,
{
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|e| panic!("{name}={v:?}: {e:?}")),
        Err(_) => default,
    }
}
