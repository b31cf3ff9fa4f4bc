//! `[audit.syslog]`: each audit event also sent as a DICOM audit message ([`super::atna`])
//! to a syslog collector (an IHE ATNA Audit Record Repository), RFC 5424 over UDP
//! (RFC 5426, one datagram per message) or TLS (RFC 5425, octet-counted frames).
//!
//! Recording never waits for the collector: events go onto a bounded queue and one task
//! sends them, reconnecting with a backoff when the TLS connection fails. A full queue
//! drops the event (counted in `anatomy_audit_syslog_messages_dropped_total`, logged at most
//! once a minute); the audit table still holds it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::atna::{self, Envelope, Source};
use super::AuditEvent;
use crate::metrics::Metrics;
use crate::net::{ClientTls, ClientTlsConfig, TlsError};

/// A connection attempt or a write that takes longer than this has failed.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnection backoff: from the first to the last, doubling.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Warnings about the collector or drops: at most one per this interval.
const WARN_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SyslogError {
    #[error("audit.syslog: {0}")]
    Config(String),
    #[error("audit.syslog: {0}")]
    Tls(#[from] TlsError),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyslogTransport {
    /// RFC 5426: one datagram per message, no delivery guarantee.
    #[default]
    Udp,
    /// RFC 5425: TLS 1.2/1.3, octet-counting framing (what IHE ATNA requires).
    Tls,
}

/// `[audit.syslog]` (config.toml documents each key).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyslogConfig {
    pub enabled: bool,
    pub transport: SyslogTransport,
    /// `host:port` of the collector (conventionally 514 for UDP, 6514 for TLS).
    pub address: String,
    /// TLS: the CA bundle (PEM) the collector's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// TLS: the node's client certificate (PEM chain) and key, for collectors that ask.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// TLS: the name checked against the collector's certificate; default: its host.
    pub server_name: Option<String>,
    /// APP-NAME of the syslog header.
    pub app_name: String,
    /// AuditSourceID of the messages; empty: the node's AE title.
    pub audit_source_id: String,
    /// Messages waiting for the sender; past this, new ones are dropped (and counted).
    pub max_queue: usize,
}

impl Default for SyslogConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            transport: SyslogTransport::Udp,
            address: String::new(),
            ca_file: None,
            cert: None,
            key: None,
            server_name: None,
            app_name: "anatomy-node".into(),
            audit_source_id: String::new(),
            max_queue: 4096,
        }
    }
}

impl SyslogConfig {
    pub fn resolve_paths(&mut self, base: &Path) {
        crate::net::tls::resolve(base, [&mut self.ca_file, &mut self.cert, &mut self.key]);
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        if self.address.trim().is_empty() {
            return Err("audit.syslog.address (host:port) is required when enabled".into());
        }
        if self.max_queue == 0 {
            return Err("audit.syslog.max_queue must be at least 1".into());
        }
        if self.transport == SyslogTransport::Tls {
            self.tls_settings().check("audit.syslog")?;
        }
        Ok(())
    }

    fn tls_settings(&self) -> ClientTlsConfig {
        ClientTlsConfig {
            enabled: true,
            ca_file: self.ca_file.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            server_name: self.server_name.clone(),
        }
    }

    fn host(&self) -> &str {
        let address = self.address.trim();
        match address.rsplit_once(':') {
            Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
            None => address,
        }
    }
}

/// Where events are handed to the sender task; cheap to clone, never blocks.
#[derive(Clone)]
pub struct SyslogSender {
    tx: mpsc::Sender<AuditEvent>,
    metrics: Arc<Metrics>,
    warned: Arc<RateLimit>,
}

impl std::fmt::Debug for SyslogSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyslogSender").finish_non_exhaustive()
    }
}

impl SyslogSender {
    /// Start the sender task; `None` when not enabled. The TLS files are read now, so a bad
    /// one stops the node at start-up. The task ends when every sender is dropped.
    pub fn start(
        config: &SyslogConfig,
        ae_title: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Option<(SyslogSender, JoinHandle<()>)>, SyslogError> {
        if !config.enabled {
            return Ok(None);
        }
        config.validate().map_err(SyslogError::Config)?;
        let tls = match config.transport {
            SyslogTransport::Udp => None,
            SyslogTransport::Tls => ClientTls::build(&config.tls_settings(), config.host())?,
        };
        let host = host_name();
        let source = Source {
            id: if config.audit_source_id.trim().is_empty() {
                ae_title.to_string()
            } else {
                config.audit_source_id.clone()
            },
            ae_title: ae_title.to_string(),
            host: host.clone(),
        };
        let (tx, rx) = mpsc::channel(config.max_queue);
        let sender = Sender {
            address: config.address.trim().to_string(),
            tls,
            envelope: Envelope::new(&host, &config.app_name),
            source,
            metrics: metrics.clone(),
            warned: RateLimit::default(),
            failures: AtomicU64::new(0),
        };
        info!(address = %sender.address, transport = ?config.transport, "audit messages go to the syslog collector");
        let task = tokio::spawn(sender.run(rx));
        Ok(Some((
            SyslogSender {
                tx,
                metrics,
                warned: Arc::new(RateLimit::default()),
            },
            task,
        )))
    }

    /// Queue an event for the collector; a full queue drops it (counted, logged).
    pub fn send(&self, event: &AuditEvent) {
        if self.tx.try_send(event.clone()).is_err() {
            self.metrics.audit_syslog_dropped.inc();
            if self.warned.allow() {
                warn!(
                    dropped_total = self.metrics.audit_syslog_dropped.get(),
                    "audit messages dropped: the syslog collector's queue is full (collector down or slow); the audit table still has them"
                );
            }
        }
    }
}

/// At most one `true` per [`WARN_EVERY`].
#[derive(Debug, Default)]
struct RateLimit(Mutex<Option<Instant>>);

impl RateLimit {
    fn allow(&self) -> bool {
        let Ok(mut last) = self.0.lock() else {
            return false;
        };
        if last.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

/// The node's host name (RFC 5424 HOSTNAME, the node's NetworkAccessPointID).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

enum Connection {
    Udp(UdpSocket),
    Tls(Box<TlsStream>),
}

struct Sender {
    address: String,
    tls: Option<ClientTls>,
    envelope: Envelope,
    source: Source,
    metrics: Arc<Metrics>,
    warned: RateLimit,
    failures: AtomicU64,
}

impl Sender {
    async fn run(self, mut rx: mpsc::Receiver<AuditEvent>) {
        let mut connection: Option<Connection> = None;
        let mut backoff = BACKOFF_FIRST;
        while let Some(event) = rx.recv().await {
            let xml = atna::message(&event, &self.source);
            let message = self.envelope.wrap(&event, &xml);
            // The message waits (and the queue fills) until the collector takes it.
            loop {
                if connection.is_none() {
                    match self.connect().await {
                        Ok(c) => {
                            connection = Some(c);
                            backoff = BACKOFF_FIRST;
                        }
                        Err(e) => {
                            self.failed(&format!("cannot connect: {e}"));
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                            continue;
                        }
                    }
                }
                let Some(c) = connection.as_mut() else {
                    continue;
                };
                match write(c, &message).await {
                    Ok(()) => {
                        self.metrics.audit_syslog_sent.inc();
                        break;
                    }
                    // UDP: the datagram is lost (RFC 5426 promises nothing more); a
                    // refused port must not hold back the next message.
                    Err(e) if matches!(c, Connection::Udp(_)) => {
                        self.failed(&format!("cannot send: {e}"));
                        break;
                    }
                    Err(e) => {
                        self.failed(&format!("connection lost: {e}"));
                        connection = None;
                    }
                }
            }
        }
        if let Some(Connection::Tls(mut s)) = connection {
            let _ = tokio::time::timeout(IO_TIMEOUT, s.shutdown()).await;
        }
    }

    fn failed(&self, what: &str) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if self.warned.allow() {
            warn!(collector = %self.address, failures = n, "audit.syslog: {what}; retrying");
        }
    }

    async fn connect(&self) -> std::io::Result<Connection> {
        let addr = resolve(&self.address).await?;
        match &self.tls {
            None => {
                let local: SocketAddr = if addr.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let socket = UdpSocket::bind(local).await?;
                socket.connect(addr).await?;
                Ok(Connection::Udp(socket))
            }
            Some(tls) => {
                let connect = async {
                    let tcp = TcpStream::connect(addr).await?;
                    let name = rustls_pki_types::ServerName::try_from(tls.server_name.clone())
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                    tokio_rustls::TlsConnector::from(tls.config.clone())
                        .connect(name, tcp)
                        .await
                };
                let stream = tokio::time::timeout(IO_TIMEOUT, connect)
                    .await
                    .map_err(|_| std::io::ErrorKind::TimedOut)??;
                Ok(Connection::Tls(Box::new(stream)))
            }
        }
    }
}

async fn resolve(address: &str) -> std::io::Result<SocketAddr> {
    tokio::net::lookup_host(address)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))
}

async fn write(connection: &mut Connection, message: &[u8]) -> std::io::Result<()> {
    match connection {
        Connection::Udp(socket) => socket.send(message).await.map(|_| ()),
        Connection::Tls(stream) => {
            let framed = atna::octet_counted(message);
            tokio::time::timeout(IO_TIMEOUT, async {
                stream.write_all(&framed).await?;
                stream.flush().await
            })
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_needs_a_ca_and_enabled_needs_an_address() {
        let mut c = SyslogConfig {
            enabled: true,
            ..SyslogConfig::default()
        };
        assert!(c.validate().is_err());
        c.address = "collector:6514".into();
        assert!(c.validate().is_ok());
        c.transport = SyslogTransport::Tls;
        assert!(c.validate().is_err());
        c.ca_file = Some("ca.pem".into());
        assert!(c.validate().is_ok());
        assert_eq!(c.host(), "collector");
        c.address = "[::1]:6514".into();
        assert_eq!(c.host(), "::1");
    }

    #[tokio::test]
    async fn a_dead_collector_drops_and_counts_instead_of_waiting() {
        let metrics = Arc::new(Metrics::new());
        let (tx, _rx) = mpsc::channel(2);
        let sender = SyslogSender {
            tx,
            metrics: metrics.clone(),
            warned: Arc::new(RateLimit::default()),
        };
        let e = AuditEvent::new(
            super::super::EventType::CFind,
            super::super::Outcome::Success,
            "X",
        );
        for _ in 0..5 {
            sender.send(&e);
        }
        assert_eq!(metrics.audit_syslog_dropped.get(), 3);
    }

    #[tokio::test]
    async fn udp_messages_arrive_one_per_datagram() {
        let collector = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let config = SyslogConfig {
            enabled: true,
            address: collector.local_addr().unwrap().to_string(),
            ..SyslogConfig::default()
        };
        let metrics = Arc::new(Metrics::new());
        let (sender, task) = SyslogSender::start(&config, "ANATOMY", metrics.clone())
            .unwrap()
            .unwrap();
        let e = AuditEvent::new(
            super::super::EventType::NodeStart,
            super::super::Outcome::Success,
            "node",
        );
        sender.send(&e);
        let mut buf = vec![0u8; 65536];
        let n = tokio::time::timeout(Duration::from_secs(5), collector.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("<85>1 "), "{text}");
        assert!(text.contains("csd-code=\"110100\""), "{text}");
        drop(sender);
        task.await.unwrap();
        assert_eq!(metrics.audit_syslog_sent.get(), 1);
    }
}
