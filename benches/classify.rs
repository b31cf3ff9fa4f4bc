//! Series complete → labels stored: a 300-slice 512×512 series is sent to a release
//! anatomy-node with storescu, and the time from its completion to its stored labels is
//! read from the index (series.completed_at → series_labels.labelled_at), with the
//! classifier's own select/decode/infer split, at K = 32 key-images and at K = all.
//! First, with no node: the time `anatomy::coverage` takes to decode the labels of 32 and 300
//! images along z (`classifier.decoding = "order"`), which must stay negligible.
//!
//!     cargo bench --bench classify
//!
//! Environment: ANATOMY_BENCH_MODEL (default models/anatomy.onnx), ANATOMY_BENCH_SLICES
//! (default 300), ANATOMY_BENCH_DEVICE (cpu, default; cuda needs --features cuda).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anatomy_node::anatomy::coverage::{self, CoverageRules, Decoding, Labelled};
use anatomy_node::synth::{self, SeriesSpec};
use sqlx::Row;

fn main() {
    decoding_figures();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = std::env::var_os("ANATOMY_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("models/anatomy.onnx"));
    if !model.is_file() {
        eprintln!(
            "no model at {} (set ANATOMY_BENCH_MODEL, e.g. to a model made by tests/tools/make_test_model.py)",
            model.display()
        );
        std::process::exit(2);
    }
    let slices: u32 = std::env::var("ANATOMY_BENCH_SLICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let device = std::env::var("ANATOMY_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    let work = tempfile::tempdir().expect("bench dir");
    let series_dir = work.path().join("series");
    std::fs::create_dir_all(&series_dir).expect("series dir");
    let files = synth::write_series(&series_dir, &SeriesSpec::new(1, slices, 512))
        .expect("synthetic series");
    println!(
        "model {}, device {device}, series of {} slices 512x512",
        model.display(),
        files.len()
    );

    for key_images in ["32", "\"all\""] {
        for run in 0..3 {
            let dir = work
                .path()
                .join(format!("node-{}-{run}", key_images.trim_matches('"')));
            let node = start_node(&dir, &model, key_images, &device);
            let out = Command::new("storescu")
                .env("TCP_NODELAY", "1")
                .args(["-aec", "ANATOMY", "127.0.0.1", &node.port.to_string()])
                .args(&files)
                .output()
                .expect("storescu");
            assert!(
                out.status.success(),
                "storescu: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let r = wait_for_labels(&dir.join("storage/index.sqlite3"));
            println!(
                "  K={:<3} run {run}: complete -> labels stored {:5} ms (classifier: select {} ms, decode {} ms, infer {} ms, {} key-images)",
                key_images.trim_matches('"'),
                r.latency_ms,
                r.select_ms,
                r.decode_ms,
                r.infer_ms,
                r.key_images
            );
            drop(node);
        }
    }
    println!(
        "targets on the 2-core CPU: K=32 <= 300 ms, K=all <= 1500 ms (complete -> labels stored)"
    );
}

/// Time per series of `coverage` with the order decoder and without it (each image's argmax),
/// on a chest-to-legs series with noisy probabilities.
fn decoding_figures() {
    let classes: Vec<String> = ["neck", "lungs", "liver", "pelvis", "legs", "other"]
        .map(String::from)
        .to_vec();
    for images in [32usize, 300] {
        let series: Vec<Labelled> = (0..images)
            .map(|i| {
                let along = i as f64 / images as f64;
                let class = [1, 2, 5, 3, 4][((along * 5.0) as usize).min(4)];
                let mut probabilities = vec![0.02f32; 6];
                probabilities[class] = 0.8;
                probabilities[(class + i) % 6] += 0.1; // noise that disagrees now and then
                Labelled {
                    z_mm: -1500.0 * along,
                    probabilities,
                }
            })
            .collect();
        let mut figures = Vec::new();
        for decoding in [Decoding::Order, Decoding::None] {
            let rules = CoverageRules {
                decoding,
                ..CoverageRules::default()
            };
            let runs = 20_000 / images;
            let started = Instant::now();
            for _ in 0..runs {
                std::hint::black_box(coverage::coverage(
                    std::hint::black_box(&series),
                    &classes,
                    &rules,
                ));
            }
            figures.push(started.elapsed().as_secs_f64() * 1e6 / runs as f64);
        }
        println!(
            "coverage of {images} images: {:.1} µs decoded along z, {:.1} µs per-image argmax",
            figures[0], figures[1]
        );
    }
}

struct NodeProcess {
    child: Child,
    port: u16,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node(dir: &Path, model: &Path, key_images: &str, device: &str) -> NodeProcess {
    std::fs::create_dir_all(dir).expect("node dir");
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[dicom]\nbind = \"127.0.0.1\"\nport = {port}\nallowed_peers = \"STORESCU@127.0.0.1\"\n\
             [http]\nenabled = false\n[storage]\npath = \"{}\"\n[series]\nstable_after_secs = 1\ncheck_interval_ms = 100\n\
             [log]\nlevel = \"warn\"\n[classifier]\nmodel = \"{}\"\ndevice = \"{device}\"\nkey_images = {key_images}\n",
            dir.join("storage").display(),
            model.display()
        ),
    )
    .expect("config");
    let child = Command::new(env!("CARGO_BIN_EXE_anatomy-node"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start anatomy-node");
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "node did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    NodeProcess { child, port }
}

struct Result {
    latency_ms: i64,
    select_ms: i64,
    decode_ms: i64,
    infer_ms: i64,
    key_images: i64,
}

fn wait_for_labels(db: &Path) -> Result {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&format!("sqlite://{}?mode=ro", db.display()))
            .await
            .expect("index");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let row = sqlx::query(
                "SELECT l.labelled_at - s.completed_at, COALESCE(l.select_ms, 0), COALESCE(l.decode_ms, 0), \
                     COALESCE(l.infer_ms, 0), l.key_images, l.status \
                 FROM series_labels l JOIN series s ON s.id = l.series_ref",
            )
            .fetch_optional(&pool)
            .await
            .expect("query");
            if let Some(r) = row {
                let status: String = r.get(5);
                assert_eq!(status, "labelled", "classification did not label the series");
                return Result {
                    latency_ms: r.get(0),
                    select_ms: r.get(1),
                    decode_ms: r.get(2),
                    infer_ms: r.get(3),
                    key_images: r.get(4),
                };
            }
            assert!(Instant::now() < deadline, "no labels within 120 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}
