//! Forwarding throughput: a release anatomy-node receives a 350-slice 512×512 16-bit CT
//! series, labels it (a one-class test model, so routing is certain) and forwards tagged
//! copies to DCMTK storescp; the same files are then sent to a fresh storescp by DCMTK
//! storescu. Both with TCP_NODELAY=1, both storescp with the same flags (`--ignore`: it
//! receives every byte and answers, but writes nothing, so the disk does not decide). The node's time
//! runs from routing (series_labels.routed_at: the jobs exist) to the last outcome
//! recorded (forward_jobs.finished_at), so it includes reading, tagging, sending and
//! committing; storescu's is the wall time of the process.
//!
//!     cargo bench --bench forward
//!
//! Environment: ANATOMY_BENCH_SLICES (default 350), ANATOMY_BENCH_RUNS (default 3),
//! ANATOMY_BENCH_MODEL (default: a one-class model written with tests/tools/make_test_model.py
//! by .venv-tests/bin/python or $ANATOMY_TEST_PYTHON), ANATOMY_BENCH_DIR (default /tmp),
//! ANATOMY_BENCH_STORESCP_WRITES=1 (storescp writes the files it receives).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anatomy_node::synth::{self, SeriesSpec};
use sqlx::Row;

fn main() {
    let slices: u32 = env_or("ANATOMY_BENCH_SLICES", 350);
    let runs: usize = env_or("ANATOMY_BENCH_RUNS", 3);
    let work =
        tempfile::tempdir_in(std::env::var("ANATOMY_BENCH_DIR").unwrap_or_else(|_| "/tmp".into()))
            .expect("bench directory");
    let model = model(work.path());
    let series_dir = work.path().join("series");
    std::fs::create_dir_all(&series_dir).expect("series dir");
    let files = synth::write_series(&series_dir, &SeriesSpec::new(1, slices, 512))
        .expect("synthetic series");
    let bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    println!(
        "series: {} slices 512x512 16-bit, {:.0} MB; {runs} runs each, best run reported; storescp {}",
        files.len(),
        bytes as f64 / 1e6,
        if writes() { "writes the files" } else { "--ignore (receives, writes nothing)" }
    );

    let mut node_best: f64 = 0.0;
    let mut scu_best: f64 = 0.0;
    for run in 0..runs {
        let dir = work.path().join(format!("run{run}"));
        std::fs::create_dir_all(&dir).expect("run dir");

        // anatomy-node → storescp
        let scp = StoreScp::start(&dir.join("node-scp"));
        let node = Node::start(&dir.join("node"), &model, scp.port);
        let out = Command::new("storescu")
            .env("TCP_NODELAY", "1")
            .args(["-aec", "ANATOMY", "127.0.0.1", &node.port.to_string()])
            .args(&files)
            .output()
            .expect("storescu");
        assert!(
            out.status.success(),
            "storescu to the node: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (n, ms) = wait_forwarded(&dir.join("node/storage/index.sqlite3"), files.len());
        let node_rate = n as f64 / (ms as f64 / 1000.0);
        drop(node);
        drop(scp);

        // storescu → storescp, the same files
        let scp = StoreScp::start(&dir.join("scu-scp"));
        let started = Instant::now();
        let out = Command::new("storescu")
            .env("TCP_NODELAY", "1")
            .args(["-aec", "CAD", "127.0.0.1", &scp.port.to_string()])
            .args(&files)
            .output()
            .expect("storescu");
        let elapsed = started.elapsed();
        assert!(
            out.status.success(),
            "storescu to storescp: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let scu_rate = files.len() as f64 / elapsed.as_secs_f64();
        drop(scp);
        let _ = std::fs::remove_dir_all(&dir);
        println!(
            "  run {run}: anatomy-node forward {node_rate:7.0} images/s ({:.2} s, {:.0} MB/s) | storescu {scu_rate:7.0} images/s ({:.2} s)",
            ms as f64 / 1000.0,
            bytes as f64 / 1e6 / (ms as f64 / 1000.0),
            elapsed.as_secs_f64()
        );
        node_best = node_best.max(node_rate);
        scu_best = scu_best.max(scu_rate);
    }
    println!();
    println!(
        "anatomy-node forwarding (tagged copies, outcomes committed): {node_best:7.0} images/s"
    );
    println!("DCMTK storescu, same files, same storescp:                  {scu_best:7.0} images/s");
    println!(
        "node / storescu = {:.2} (target >= 1.0)",
        node_best / scu_best
    );
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// ANATOMY_BENCH_STORESCP_WRITES=1: storescp writes the files (the disk takes part).
fn writes() -> bool {
    std::env::var("ANATOMY_BENCH_STORESCP_WRITES").as_deref() == Ok("1")
}

/// ANATOMY_BENCH_MODEL, or a one-class ("lungs") test model.
fn model(dir: &Path) -> PathBuf {
    if let Some(m) = std::env::var_os("ANATOMY_BENCH_MODEL") {
        return PathBuf::from(m);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("ANATOMY_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".venv-tests/bin/python"));
    let out = dir.join("lungs.onnx");
    let status = Command::new(&python)
        .arg(root.join("tests/tools/make_test_model.py"))
        .arg(&out)
        .args(["--size", "64", "--kind", "stats", "--classes", "lungs"])
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!(
            "cannot write the test model with {} (tests/run-all.sh makes .venv-tests); set ANATOMY_BENCH_MODEL",
            python.display()
        );
        std::process::exit(2);
    }
    out
}

struct StoreScp {
    child: Child,
    port: u16,
}

impl StoreScp {
    fn start(dir: &Path) -> StoreScp {
        std::fs::create_dir_all(dir).expect("storescp dir");
        let port = free_port();
        let child = Command::new("storescp")
            .env("TCP_NODELAY", "1")
            .args(["-aet", "CAD", "+xa"])
            .args(if writes() { &[][..] } else { &["--ignore"][..] })
            .arg("-od")
            .arg(dir)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start storescp (apt package dcmtk)");
        wait_port(port, "storescp");
        StoreScp { child, port }
    }
}

impl Drop for StoreScp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Node {
    child: Child,
    port: u16,
}

impl Node {
    fn start(dir: &Path, model: &Path, destination_port: u16) -> Node {
        std::fs::create_dir_all(dir).expect("node dir");
        let port = free_port();
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[dicom]\nae_title = \"ANATOMY\"\nbind = \"127.0.0.1\"\nport = {port}\nallowed_peers = \"STORESCU@127.0.0.1\"\n\
                 [http]\nenabled = false\n[storage]\npath = \"{}\"\n[series]\nstable_after_secs = 1\ncheck_interval_ms = 200\n\
                 [log]\nlevel = \"warn\"\n\
                 [classifier]\nmodel = \"{}\"\ndevice = \"cpu\"\nkey_images = 8\n\
                 [[destinations]]\nname = \"CAD\"\nae_title = \"CAD\"\nhost = \"127.0.0.1\"\nport = {destination_port}\n\
                 [[routes]]\nclasses = [\"lungs\"]\ndestinations = [\"CAD\"]\n",
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
        wait_port(port, "anatomy-node");
        Node { child, port }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait until `n` jobs are done; (jobs, ms from routing to the last outcome).
fn wait_forwarded(index: &Path, n: usize) -> (usize, i64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let url = format!("sqlite://{}?mode=ro", index.display());
    rt.block_on(async {
        sqlx::any::install_default_drivers();
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            assert!(Instant::now() < deadline, "forwarding did not finish");
            tokio::time::sleep(Duration::from_millis(200)).await;
            let Ok(pool) = sqlx::AnyPool::connect(&url).await else {
                continue;
            };
            let row = sqlx::query(
                "SELECT (SELECT COUNT(*) FROM forward_jobs WHERE state = 'done'), \
                        (SELECT COUNT(*) FROM forward_jobs WHERE state = 'dead'), \
                        (SELECT MIN(routed_at) FROM series_labels), \
                        (SELECT MAX(finished_at) FROM forward_jobs)",
            )
            .fetch_one(&pool)
            .await;
            pool.close().await;
            let Ok(row) = row else { continue };
            let done: i64 = row.get(0);
            let dead: i64 = row.get(1);
            assert_eq!(dead, 0, "dead letters in the bench");
            if done as usize >= n {
                let routed: i64 = row.get(2);
                let finished: i64 = row.get(3);
                return (done as usize, (finished - routed).max(1));
            }
        }
    })
}
