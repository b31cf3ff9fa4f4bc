//! A real `anatomy-node serve` process with its own ports, storage directory, database and
//! log file, started and stopped (gracefully or with kill -9) by the test.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::db::{IndexReader, TestDb};
use super::free_port;

/// Settings a test may change; everything else is the shipped default.
#[derive(Clone)]
pub struct NodeOptions {
    pub stable_after_secs: u64,
    pub max_associations: usize,
    pub artim_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    pub shutdown_grace_secs: u64,
    pub duplicates: &'static str,
    pub min_free_mb: u64,
    /// Storage directory; default: `<node dir>/storage`.
    pub storage: Option<PathBuf>,
    /// Raw TOML appended to the [dicom] section (may end with `[dicom.tls]` and its keys).
    pub extra_dicom: String,
    /// `dicom.allowed_peers` (a TOML value); default: STORESCU and ECHOSCU from 127.0.0.1,
    /// TESTSCU from anywhere.
    pub allowed_peers: Option<String>,
    /// Raw TOML appended to the [http] section (credentials, TLS); with `tls_cert` in it the
    /// node is ready when its HTTP port accepts connections.
    pub extra_http: String,
    /// Raw TOML after the [http] section (e.g. `[http.jwt]`, `[[http.tokens]]`).
    pub http_tables: String,
    /// Environment variables for the node process.
    pub env: Vec<(String, String)>,
    /// The [classifier] section (raw TOML, without the header); default: disabled.
    pub classifier: String,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            stable_after_secs: 10,
            max_associations: 16,
            artim_timeout_secs: 10,
            idle_timeout_secs: 60,
            shutdown_grace_secs: 20,
            duplicates: "keep-first",
            min_free_mb: 0,
            storage: None,
            extra_dicom: String::new(),
            allowed_peers: None,
            extra_http: String::new(),
            http_tables: String::new(),
            env: Vec::new(),
            classifier: "enabled = false".into(),
        }
    }
}

pub struct Node {
    pub dir: tempfile::TempDir,
    pub dicom_port: u16,
    pub http_port: u16,
    pub db: Arc<TestDb>,
    pub options: NodeOptions,
    config_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

pub const AE: &str = "ANATOMY";

const DEFAULT_PEERS: &str = r#"[
  { ae_title = "STORESCU", host = "127.0.0.1" },
  { ae_title = "ECHOSCU", host = "127.0.0.1" },
  { ae_title = "TESTSCU" },
]"#;

impl Node {
    /// Start a node with default options.
    pub fn start() -> Node {
        Node::start_with(NodeOptions::default())
    }

    pub fn start_with(options: NodeOptions) -> Node {
        Node::start_sharing(options, Arc::new(TestDb::create()))
    }

    /// Start a node on an existing database (several nodes on one PostgreSQL).
    pub fn start_sharing(options: NodeOptions, db: Arc<TestDb>) -> Node {
        let dir = tempfile::tempdir().expect("node directory");
        let mut node = Node {
            config_path: dir.path().join("config.toml"),
            log_path: dir.path().join("node.log"),
            dicom_port: free_port(),
            http_port: free_port(),
            dir,
            db,
            options,
            child: None,
        };
        node.write_config();
        node.spawn();
        node
    }

    pub fn storage(&self) -> PathBuf {
        self.options
            .storage
            .clone()
            .unwrap_or_else(|| self.dir.path().join("storage"))
    }

    /// The URL the test uses to read the node's index.
    pub fn index_url(&self) -> String {
        self.db.reader_url(&self.storage())
    }

    pub fn index(&self) -> IndexReader {
        IndexReader::open(&self.index_url())
    }

    fn write_config(&self) {
        let o = &self.options;
        let config = format!(
            r#"
[dicom]
ae_title = "{AE}"
bind = "127.0.0.1"
port = {dicom_port}
max_associations = {max_assoc}
artim_timeout_secs = {artim}
idle_timeout_secs = {idle}
shutdown_grace_secs = {grace}
allowed_peers = {peers}
{extra}

[http]
bind = "127.0.0.1"
port = {http_port}
{extra_http}
{http_tables}

[storage]
path = "{storage}"
duplicates = "{dups}"
min_free_mb = {free}

[database]
url = "{db}"

[series]
stable_after_secs = {stable}
check_interval_ms = 200

[log]
level = "info,anatomy_node=debug"

[classifier]
{classifier}
"#,
            classifier = o.classifier,
            dicom_port = self.dicom_port,
            http_port = self.http_port,
            max_assoc = o.max_associations,
            artim = o.artim_timeout_secs,
            idle = o.idle_timeout_secs,
            grace = o.shutdown_grace_secs,
            extra = o.extra_dicom,
            peers = o.allowed_peers.as_deref().unwrap_or(DEFAULT_PEERS),
            extra_http = o.extra_http,
            http_tables = o.http_tables,
            storage = self.storage().display(),
            dups = o.duplicates,
            free = o.min_free_mb,
            db = self.db.url,
            stable = o.stable_after_secs,
        );
        fs::write(&self.config_path, config).expect("write config");
    }

    /// Start the process and wait until it answers on both ports.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "node already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("log file");
        // ANATOMY_TEST_NODE_BIN: another build of the node (e.g. an older commit, to measure
        // a figure before a fix); default: this build's binary.
        let bin = std::env::var_os("ANATOMY_TEST_NODE_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_anatomy-node")));
        let child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env_remove("RUST_LOG")
            .envs(self.options.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start anatomy-node");
        self.child = Some(child);
        let tls = self.options.extra_http.contains("tls_cert");
        let ready = super::wait_until(30, || {
            self.exited().is_none()
                && TcpStream::connect(("127.0.0.1", self.dicom_port)).is_ok()
                && if tls {
                    TcpStream::connect(("127.0.0.1", self.http_port)).is_ok()
                } else {
                    self.http_get("/healthz").0 == 200
                }
        });
        assert!(ready, "node did not become ready:\n{}", self.log());
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("node running")
    }

    /// kill -9: no chance to clean up, as in a power cut of the process.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn sigterm(&self) {
        self.signal("-TERM");
    }

    /// SIGHUP: the node reloads its certificates.
    pub fn sighup(&self) {
        self.signal("-HUP");
    }

    fn signal(&self, which: &str) {
        let status = Command::new("kill")
            .args([which, &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {which}");
    }

    /// Wait for the process to end (after SIGTERM) and return its status.
    pub fn wait_exit(&mut self, secs: u64) -> ExitStatus {
        let ended = super::wait_until(secs, || self.exited().is_some());
        assert!(ended, "node did not exit within {secs}s:\n{}", self.log());
        let status = self.exited().expect("exited");
        self.child = None;
        status
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A GET with an optional bearer token (asking for DICOM JSON): the status.
    pub fn http_status(&self, path: &str, token: Option<&str>) -> u16 {
        let mut s = TcpStream::connect(("127.0.0.1", self.http_port)).expect("HTTP port");
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Accept: application/dicom+json\r\n\
             Connection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).expect("send request");
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        resp.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }

    /// Minimal HTTP/1.1 GET on the node's HTTP port: (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.http_port)) else {
            return (0, String::new());
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        if s.write_all(req.as_bytes()).is_err() {
            return (0, String::new());
        }
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// Run storescu against this node; files are sent in the order given.
    pub fn storescu(&self, flags: &[&str], files: &[PathBuf]) -> std::process::Output {
        let port = self.dicom_port.to_string();
        let mut args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        args.extend(["-aec".into(), AE.into(), "127.0.0.1".into(), port]);
        args.extend(files.iter().map(|p| p.display().to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        super::dcmtk("storescu", &refs)
    }

    pub fn echoscu(&self, calling: &str, called: &str) -> std::process::Output {
        let port = self.dicom_port.to_string();
        super::dcmtk(
            "echoscu",
            &["-aet", calling, "-aec", called, "127.0.0.1", &port],
        )
    }

    /// Every regular file under the storage directory, except the index and temporaries.
    pub fn stored_files(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            if let Ok(entries) = fs::read_dir(dir) {
                for e in entries.flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        walk(&p, out);
                    } else if p.extension().is_some_and(|x| x == "dcm") {
                        out.push(p);
                    }
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.storage(), &mut out);
        out
    }

    /// Files in the temporary directory (partial instances).
    pub fn temporary_files(&self) -> Vec<PathBuf> {
        fs::read_dir(self.storage().join(".incoming"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- node log ({}) ----\n{}", self.db.label(), self.log());
        }
    }
}
