//! HTTPS on the HTTP port: rustls (ring provider), TLS 1.2 and 1.3 only, HTTP/1.1.
//! Handshakes run in tasks of their own (with a time limit), so a slow or silent client never
//! holds up the others; finished connections are handed to axum through [`TlsListener`].
//! The certificate can be reloaded (SIGHUP, [`HttpsCertificate::reload`]): handshakes after
//! it use the new one, connections already open keep theirs.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// A client gets this long to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate or key of the HTTP port that does not load, named by its keys.
#[derive(Debug, thiserror::Error)]
#[error("http.tls_cert / http.tls_key: {0}")]
pub struct TlsError(#[from] crate::net::TlsError);

/// The server configuration from the PEM files of `http.tls_cert` and `http.tls_key`
/// (read by [`crate::net::tls`], as the DICOM port's are).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = crate::net::tls::single_cert_server(cert, key).map_err(TlsError)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The HTTPS configuration of the port, replaced as a whole by [`HttpsCertificate::reload`].
pub struct HttpsCertificate {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
}

impl HttpsCertificate {
    pub fn load(cert: &Path, key: &Path) -> Result<HttpsCertificate, TlsError> {
        Ok(HttpsCertificate {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(server_config(cert, key)?),
        })
    }

    /// Read the files again; on an error the previous certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = server_config(&self.cert, &self.key)?;
        match self.current.write() {
            Ok(mut current) => *current = fresh,
            // A panic while holding the lock cannot leave a half-written Arc.
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(())
    }

    /// The configuration of the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert
    }
}

/// TLS connections ready for HTTP, for `axum::serve`.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accept on `tcp` until `stop`, handshaking with the certificate current then.
    pub fn new(
        tcp: TcpListener,
        certificate: Arc<HttpsCertificate>,
        stop: CancellationToken,
    ) -> io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => break,
                    accepted = tcp.accept() => accepted,
                };
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little, go on.
                        tracing::warn!(error = %e, "HTTPS accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (acceptor, tx) = (TlsAcceptor::from(certificate.current()), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept loop stopped (shutdown): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
