//! HTTPS against HTTP (issue #17): QIDO-RS latency on one index, served by the node once over
//! plain HTTP and once over HTTPS (a certificate made here with `openssl`), in the same run.
//! Each kind of request is timed twice: on a kept-alive connection (what a viewer or a mining
//! job does) and on a new connection per request (TCP, and for HTTPS the TLS handshake too).
//! Prints median and p95 per row and the HTTPS/HTTP ratios.
//!
//!     cargo bench --bench qido
//!
//! Environment: ANATOMY_BENCH_STUDIES (default 40, one 4-slice series each, stored with DCMTK
//! storescu), ANATOMY_BENCH_RUNS (requests per row, default 200), ANATOMY_BENCH_DIR (/tmp).

#[path = "../tests/common/pki.rs"]
#[allow(dead_code)]
mod pki;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anatomy_node::mine::web::{DicomWeb, Limits, WebSecurity};
use anatomy_node::synth::{self, SeriesSpec};

const LIMITS: Limits = Limits {
    search_mb: 64,
    instance_mb: 64,
};

fn main() {
    let studies: u32 = env_or("ANATOMY_BENCH_STUDIES", 40);
    let runs: usize = env_or("ANATOMY_BENCH_RUNS", 200);
    let work =
        tempfile::tempdir_in(std::env::var("ANATOMY_BENCH_DIR").unwrap_or_else(|_| "/tmp".into()))
            .expect("bench directory");
    let ca = pki::Ca::new(work.path(), "ca");
    let server = ca.server("server");
    let files = write_studies(&work.path().join("series"), studies);

    let plain = NodeConfig::write(work.path(), None);
    let mut node = plain.start();
    store(&files, node.dicom_port);
    let http = measure(&node.base("http"), None, runs);
    node.stop();

    let tls = NodeConfig::write(work.path(), Some((&server.cert, &server.key)));
    let mut node = tls.start();
    let https = measure(&node.base("https"), Some(&ca.cert), runs);
    node.stop();

    println!(
        "index: {studies} studies (one 4-slice series each), SQLite; {runs} requests per row; \
         median / p95 in ms"
    );
    println!(
        "{:<44} {:>16} {:>16} {:>12}",
        "request", "HTTP", "HTTPS", "HTTPS/HTTP"
    );
    for ((name, h), (_, s)) in http.iter().zip(&https) {
        println!(
            "{name:<44} {:>7.2} / {:>6.2} {:>7.2} / {:>6.2} {:>11.2}x",
            h.0,
            h.1,
            s.0,
            s.1,
            s.0 / h.0
        );
    }
}

/// (row name, (median ms, p95 ms)) for each kind of request and connection handling.
fn measure(base: &str, ca: Option<&Path>, runs: usize) -> Vec<(String, (f64, f64))> {
    let kept = client(base, ca);
    let first = kept
        .search("studies", &[], &[], 10_000)
        .expect("QIDO-RS studies");
    assert!(!first.is_empty(), "the index holds the stored studies");
    let mut rows = Vec::new();
    for (path, label) in [("studies", "all studies"), ("series", "all series")] {
        let times = time(runs, || {
            kept.search(path, &[], &[], 10_000).expect("QIDO-RS");
        });
        rows.push((format!("{label}, kept-alive connection"), times));
        let times = time(runs / 4, || {
            client(base, ca)
                .search(path, &[], &[], 10_000)
                .expect("QIDO-RS");
        });
        rows.push((format!("{label}, new connection each"), times));
    }
    rows
}

fn client(base: &str, ca: Option<&Path>) -> DicomWeb {
    let security = WebSecurity {
        token: None,
        tls: ca.map(|ca| anatomy_node::net::tls::https_client(ca).expect("CA for the client")),
    };
    DicomWeb::new(
        base,
        Duration::from_secs(5),
        Duration::from_secs(30),
        LIMITS,
        security,
    )
}

fn time(runs: usize, mut f: impl FnMut()) -> (f64, f64) {
    f(); // warm-up
    let mut ms: Vec<f64> = (0..runs.max(2))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.95))
}

fn write_studies(dir: &Path, studies: u32) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for n in 1..=studies {
        let d = dir.join(format!("s{n}"));
        std::fs::create_dir_all(&d).expect("series dir");
        files
            .extend(synth::write_series(&d, &SeriesSpec::new(n, 4, 64)).expect("synthetic series"));
    }
    files
}

fn store(files: &[PathBuf], port: u16) {
    let status = Command::new("storescu")
        .args([
            "-aet",
            "BENCHSCU",
            "-aec",
            "ANATOMY",
            "127.0.0.1",
            &port.to_string(),
        ])
        .args(files)
        .stdout(Stdio::null())
        .status()
        .expect("storescu (apt package dcmtk)");
    assert!(status.success(), "storescu failed");
}

struct NodeConfig {
    config: PathBuf,
    dicom_port: u16,
    http_port: u16,
}

impl NodeConfig {
    /// One storage folder and index for both runs; the HTTP port over TLS when a key pair is given.
    fn write(dir: &Path, tls: Option<(&Path, &Path)>) -> NodeConfig {
        let (dicom_port, http_port) = (free_port(), free_port());
        let tls = tls
            .map(|(cert, key)| {
                format!(
                    "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
                    cert.display(),
                    key.display()
                )
            })
            .unwrap_or_default();
        let config = dir.join(format!("config-{http_port}.toml"));
        std::fs::write(
            &config,
            format!(
                "[dicom]\nae_title = \"ANATOMY\"\nbind = \"127.0.0.1\"\nport = {dicom_port}\n\
                 allowed_peers = \"BENCHSCU@127.0.0.1\"\n[http]\nbind = \"127.0.0.1\"\n\
                 port = {http_port}\nanonymous = true\n{tls}[storage]\npath = \"{}\"\n\
                 [database]\nurl = \"sqlite://{}?mode=rwc\"\n[classifier]\nenabled = false\n\
                 [log]\nlevel = \"warn\"\n",
                dir.join("storage").display(),
                dir.join("index.db").display()
            ),
        )
        .expect("config");
        NodeConfig {
            config,
            dicom_port,
            http_port,
        }
    }

    fn start(&self) -> Node {
        let child = Command::new(env!("CARGO_BIN_EXE_anatomy-node"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start anatomy-node");
        let deadline = Instant::now() + Duration::from_secs(30);
        for port in [self.dicom_port, self.http_port] {
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "anatomy-node did not start");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Node {
            child,
            dicom_port: self.dicom_port,
            http_port: self.http_port,
        }
    }
}

struct Node {
    child: Child,
    dicom_port: u16,
    http_port: u16,
}

impl Node {
    fn base(&self, scheme: &str) -> String {
        format!("{scheme}://localhost:{}/dicom-web", self.http_port)
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// What tests/common/pki.rs reports when openssl fails (tests/common/mod.rs has the same).
fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
