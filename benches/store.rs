//! Receiving throughput: DCMTK storescu (TCP_NODELAY=1) sends a 350-slice 512×512 16-bit
//! CT series (about 184 MB) to anatomy-node (durable and indexed), to anatomy-node on its
//! DICOM TLS port (storescu `+tla`, a self-signed certificate made with openssl), to DCMTK
//! storescp (no fsync, no index) and to Orthanc (SQLite index), in the same run. Prints
//! images/s, the ratios and the node's peak RSS.
//!
//!     cargo bench --bench store            # SQLite index
//!     ANATOMY_BENCH_DATABASE_URL=postgres://... cargo bench --bench store
//!
//! Environment: ANATOMY_BENCH_SLICES (default 350), ANATOMY_BENCH_RUNS (default 3),
//! ANATOMY_BENCH_ONLY (receiver names, comma-separated: anatomy-node, node-tls, ...).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anatomy_node::synth::{self, SeriesSpec};

fn main() {
    let slices: u32 = env_or("ANATOMY_BENCH_SLICES", 350);
    let runs: usize = env_or("ANATOMY_BENCH_RUNS", 3);
    let work =
        tempfile::tempdir_in(std::env::var("ANATOMY_BENCH_DIR").unwrap_or_else(|_| "/tmp".into()))
            .expect("bench directory");
    let series_dir = work.path().join("series");
    std::fs::create_dir_all(&series_dir).expect("series dir");
    let spec = SeriesSpec::new(1, slices, 512);
    let files = synth::write_series(&series_dir, &spec).expect("synthetic series");
    let bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    println!(
        "series: {} slices 512x512 16-bit, {:.0} MB; {runs} runs per receiver, best run reported",
        files.len(),
        bytes as f64 / 1e6
    );

    let mut results = Vec::new();
    let only = std::env::var("ANATOMY_BENCH_ONLY").unwrap_or_default();
    for receiver in [
        Receiver::AnatomyNode,
        Receiver::AnatomyNodeTls,
        Receiver::AnatomyNodeNoFsync,
        Receiver::StoreScp,
        Receiver::Orthanc,
    ] {
        if !only.is_empty() && !only.split(',').any(|o| o.trim() == receiver.name()) {
            continue;
        }
        let mut best: Option<(f64, u64)> = None;
        for run in 0..runs {
            let dir = work.path().join(format!("{}-{run}", receiver.name()));
            let mut target = receiver.start(&dir);
            let elapsed = send(&files, &target, receiver.ae_title());
            let rate = files.len() as f64 / elapsed.as_secs_f64();
            let rss = peak_rss_kb(target.child.id());
            target.stop();
            let _ = std::fs::remove_dir_all(&dir);
            println!(
                "  {:<13} run {run}: {rate:7.0} images/s ({:.2} s), peak RSS {} MB",
                receiver.name(),
                elapsed.as_secs_f64(),
                rss / 1024
            );
            if best.is_none_or(|(r, _)| rate > r) {
                best = Some((rate, rss));
            }
        }
        if let Some(b) = best {
            results.push((receiver, b));
        }
    }
    let rate = |r: Receiver| {
        results
            .iter()
            .find(|(x, _)| *x == r)
            .map(|(_, (v, _))| *v)
            .unwrap_or(f64::NAN)
    };
    let node_rss = results
        .iter()
        .find(|(x, _)| *x == Receiver::AnatomyNode)
        .map(|(_, (_, rss))| *rss)
        .unwrap_or(0);
    let (node, scp, orthanc) = (
        rate(Receiver::AnatomyNode),
        rate(Receiver::StoreScp),
        rate(Receiver::Orthanc),
    );
    let no_fsync = rate(Receiver::AnatomyNodeNoFsync);
    let tls = rate(Receiver::AnatomyNodeTls);

    println!();
    println!(
        "anatomy-node (fsync + index): {node:7.0} images/s, peak RSS {} MB (target < 150 MB)",
        node_rss / 1024
    );
    println!(
        "anatomy-node over DICOM TLS:  {tls:7.0} images/s  -> TLS/plain = {:.2} (target >= 0.85)",
        tls / node
    );
    println!(
        "anatomy-node, fsync = false:  {no_fsync:7.0} images/s  -> /storescp = {:.2}",
        no_fsync / scp
    );
    println!("DCMTK storescp (no fsync):    {scp:7.0} images/s  -> node/storescp = {:.2} (target >= 0.8)", node / scp);
    println!("Orthanc (SQLite index):       {orthanc:7.0} images/s  -> node/Orthanc  = {:.2} (target >= 3)", node / orthanc);
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Receiver {
    AnatomyNode,
    /// The same node, storescu on the DICOM TLS port.
    AnatomyNodeTls,
    /// storage.fsync = false: survives a node crash, not a power cut.
    AnatomyNodeNoFsync,
    StoreScp,
    Orthanc,
}

struct Target {
    child: Child,
    port: u16,
    /// The certificate storescu trusts, when `port` speaks TLS.
    tls_cert: Option<PathBuf>,
}

impl Target {
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    fn name(self) -> &'static str {
        match self {
            Receiver::AnatomyNode => "anatomy-node",
            Receiver::AnatomyNodeTls => "node-tls",
            Receiver::AnatomyNodeNoFsync => "node-no-fsync",
            Receiver::StoreScp => "storescp",
            Receiver::Orthanc => "orthanc",
        }
    }

    fn ae_title(self) -> &'static str {
        match self {
            Receiver::AnatomyNode | Receiver::AnatomyNodeTls | Receiver::AnatomyNodeNoFsync => {
                "ANATOMY"
            }
            Receiver::StoreScp => "STORESCP",
            Receiver::Orthanc => "ORTHANC",
        }
    }

    fn start(self, dir: &Path) -> Target {
        std::fs::create_dir_all(dir).expect("receiver dir");
        let port = free_port();
        let mut tls_cert = None;
        let child = match self {
            Receiver::AnatomyNode | Receiver::AnatomyNodeTls | Receiver::AnatomyNodeNoFsync => {
                let db = std::env::var("ANATOMY_BENCH_DATABASE_URL").unwrap_or_default();
                if db.starts_with("postgres") {
                    reset_postgres(&db);
                }
                // On the TLS receiver `port` is the TLS port; the plain one is elsewhere.
                let (plain, tls) = if self == Receiver::AnatomyNodeTls {
                    let (cert, key) = self_signed(dir);
                    let section = format!(
                        "[dicom.tls]\nport = {port}\ncert = \"{}\"\nkey = \"{}\"\n",
                        cert.display(),
                        key.display()
                    );
                    tls_cert = Some(cert);
                    (free_port(), section)
                } else {
                    (port, String::new())
                };
                let config = dir.join("config.toml");
                std::fs::write(
                    &config,
                    format!(
                        "[dicom]\nae_title = \"ANATOMY\"\nbind = \"127.0.0.1\"\nport = {plain}\nallowed_peers = \"STORESCU@127.0.0.1\"\n{tls}\
                         [http]\nenabled = false\n[storage]\npath = \"{}\"\n[database]\nurl = \"{db}\"\n[log]\nlevel = \"warn\"\n[classifier]\nenabled = false\n",
                        dir.join("storage").display()
                    ),
                )
                .expect("config");
                Command::new(env!("CARGO_BIN_EXE_anatomy-node"))
                    .env(
                        "ANATOMY_STORAGE__FSYNC",
                        (self != Receiver::AnatomyNodeNoFsync).to_string(),
                    )
                    .args(["serve", "--config"])
                    .arg(&config)
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .expect("start anatomy-node")
            }
            Receiver::StoreScp => Command::new("storescp")
                .env("TCP_NODELAY", "1")
                .args(["-aet", "STORESCP", "+xa", "-od"])
                .arg(dir)
                .arg(port.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start storescp (apt package dcmtk)"),
            Receiver::Orthanc => {
                let config = dir.join("orthanc.json");
                std::fs::write(
                    &config,
                    format!(
                        r#"{{"Name": "bench", "StorageDirectory": "{0}/storage", "IndexDirectory": "{0}/index",
                            "DicomAet": "ORTHANC", "DicomPort": {port}, "HttpPort": {http}, "HttpServerEnabled": true,
                            "RemoteAccessAllowed": false, "AuthenticationEnabled": false, "Plugins": [],
                            "StorageCompression": false, "DicomCheckCalledAet": false}}"#,
                        dir.display(),
                        http = free_port()
                    ),
                )
                .expect("orthanc config");
                Command::new("Orthanc")
                    .env("TCP_NODELAY", "1")
                    .arg(&config)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start Orthanc (apt package orthanc)")
            }
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "{} did not start", self.name());
            std::thread::sleep(Duration::from_millis(50));
        }
        Target {
            child,
            port,
            tls_cert,
        }
    }
}

/// A self-signed RSA certificate for 127.0.0.1 in `dir`: (cert, key).
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status();
    assert!(
        matches!(status, Ok(s) if s.success()),
        "openssl (apt package openssl)"
    );
    (cert, key)
}

fn send(files: &[PathBuf], target: &Target, ae: &str) -> Duration {
    let tls: Vec<String> = match &target.tls_cert {
        Some(cert) => vec!["+tla".into(), "+cf".into(), cert.display().to_string()],
        None => Vec::new(),
    };
    let started = Instant::now();
    let out = Command::new("storescu")
        .env("TCP_NODELAY", "1")
        .args(&tls)
        .args(["-aec", ae, "127.0.0.1", &target.port.to_string()])
        .args(files)
        .output()
        .expect("storescu");
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "storescu to {ae} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Empty the bench database so every run starts from nothing.
fn reset_postgres(url: &str) {
    let status = Command::new("psql")
        .arg(url)
        .args([
            "-q",
            "-c",
            "DROP SCHEMA public CASCADE; CREATE SCHEMA public;",
        ])
        .stdout(Stdio::null())
        .status();
    assert!(matches!(status, Ok(s) if s.success()), "cannot reset {url}");
}
