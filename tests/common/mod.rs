//! Test support shared by the integration tests: a real node process, real DCMTK peers,
//! a raw DIMSE SCU for what DCMTK will not send, the test databases and the CT data.
#![allow(dead_code)]

pub mod data;
pub mod db;
pub mod models;

pub mod node;
pub mod npy;
pub mod orthanc;
pub mod pki;
pub mod retrain;

pub mod scu;
pub mod smallfs;

use std::process::{Command, Output};

/// Run a DCMTK tool with Nagle off (Debian's DCMTK leaves it on, which costs 40 ms per
/// message against delayed ACKs).
pub fn dcmtk(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .env("TCP_NODELAY", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} (apt package dcmtk): {e}"))
}

/// stdout and stderr of a finished process, for assertions and failure messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Files `storescu -v` reports as acknowledged with a success status, from its log.
pub fn storescu_acknowledged(storescu_log: &str) -> Vec<std::path::PathBuf> {
    let mut current = None;
    let mut out = Vec::new();
    for line in storescu_log.lines() {
        if let Some(f) = line.strip_prefix("I: Sending file: ") {
            current = Some(std::path::PathBuf::from(f.trim()));
        } else if line.contains("Received Store Response (Success)") {
            if let Some(f) = current.take() {
                out.push(f);
            }
        }
    }
    out
}

/// A multi-threaded runtime for the few async calls the tests make (database queries).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A TCP port free on 127.0.0.1 now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Every file under `dir`, recursively, sorted (nothing when `dir` is missing).
pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Poll `check` until it holds or `secs` pass.
pub fn wait_until(secs: u64, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    check()
}

/// Tests that need root (mounting a small filesystem) skip only where that is allowed:
/// CI sets ANATOMY_REQUIRE_ROOT_TESTS=1 so they can never silently skip there.
pub fn require_root(test: &str) -> bool {
    let root = unsafe_free_is_root();
    if !root {
        assert!(
            std::env::var_os("ANATOMY_REQUIRE_ROOT_TESTS").is_none(),
            "{test} needs root (ANATOMY_REQUIRE_ROOT_TESTS is set)"
        );
        eprintln!("SKIPPED {test}: needs root to mount a small filesystem");
    }
    root
}

fn unsafe_free_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// DCMTK's storescp in bit-preserving mode: what it writes is exactly what a sender put on
/// the wire, so it is the reference for "the node stores what it received, byte for byte"
/// (storescu itself re-encodes some files, e.g. recomputes group lengths).
pub struct StoreScp {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: std::process::Child,
}

impl StoreScp {
    pub fn start(ae_title: &str) -> StoreScp {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let dir = tempfile::tempdir().expect("storescp dir");
        let child = Command::new("storescp")
            .env("TCP_NODELAY", "1")
            .args(["+B", "+xa", "-aet", ae_title, "-od"])
            .arg(dir.path())
            .arg(port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start storescp (apt package dcmtk)");
        let up = wait_until(10, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "storescp did not start");
        StoreScp { port, dir, child }
    }

    /// Files received so far, by SOP Instance UID.
    pub fn received(&self) -> std::collections::HashMap<String, std::path::PathBuf> {
        std::fs::read_dir(self.dir.path())
            .expect("storescp dir")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .map(|p| (data::media_storage_sop_instance_uid(&p), p))
            .collect()
    }
}

impl Drop for StoreScp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `anatomy-node token --name NAME --roles ROLES`: (the token, its hash, all it printed).
pub fn make_token(name: &str, roles: &str) -> (String, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_anatomy-node"))
        .args(["token", "--name", name, "--roles", roles])
        .output()
        .expect("anatomy-node token");
    assert!(out.status.success(), "{}", text(&out));
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    let token = printed
        .lines()
        .find(|l| l.starts_with("anp_"))
        .expect("a token line")
        .to_string();
    let hash = printed
        .lines()
        .find_map(|l| l.strip_prefix("sha256 = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("a sha256 line")
        .to_string();
    (token, hash, printed)
}
