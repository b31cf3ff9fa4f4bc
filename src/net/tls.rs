//! The one place TLS is configured: PEM files, the ring provider, TLS 1.2 and 1.3 only
//! (BCP 195, as PS3.15 Annex B asks), server configurations that can be reloaded while
//! associations run, and client configurations for the SCU roles.
//!
//! A server configuration is built for each connection from the files loaded last: the
//! certificate and the CA bundle are swapped by [`ServerTls::reload`] (SIGHUP), and the
//! connection's verifier records the client certificate it accepted, so the access control
//! of the A-ASSOCIATE-RQ that follows can check a pinned peer.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate file {path}: {reason}")]
    Certificate { path: PathBuf, reason: String },
    #[error("private key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("CA file {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("server name {0:?} is not a DNS name or an IP address")]
    ServerName(String),
    #[error("the certificates and key do not make a TLS configuration: {0}")]
    Config(String),
}

/// The crypto provider of every TLS connection of the node.
pub fn provider() -> Arc<CryptoProvider> {
    // rustls 0.23.48 deprecates the ring provider because it has no post-quantum key
    // exchange; its X25519 / P-256 / P-384 exchanges are what TLS 1.2 and 1.3 clients use
    // today, and aws-lc-rs (which has ML-KEM) needs a long C build. Revisit with rustls 0.24.
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    Arc::new(provider)
}

/// TLS 1.3 and 1.2, nothing older (BCP 195).
pub const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Every certificate of a PEM file, in order (a chain: the end entity first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::Certificate {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE in the file".into()));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The trust anchors of a CA bundle (PEM).
fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let bad = |reason: String| TlsError::Ca {
        path: path.to_path_buf(),
        reason,
    };
    let certs = load_certs(path).map_err(|e| bad(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    Ok(roots)
}

fn certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = load_certs(cert)?;
    let key_der = load_key(key)?;
    let signing = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| TlsError::Key {
            path: key.to_path_buf(),
            reason: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| TlsError::Config(format!("{} and {}: {e}", cert.display(), key.display())))?;
    Ok(Arc::new(certified))
}

/// A server configuration for one certificate and key (HTTPS: no client certificates).
pub fn single_cert_server(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let certified = certified_key(cert, key)?;
    ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Config(e.to_string()))
        .map(|b| {
            b.with_no_client_auth()
                .with_cert_resolver(Arc::new(Fixed(certified)))
        })
}

/// The files of a TLS server (`[dicom.tls]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client certificates are asked for and verified against this bundle.
    pub client_ca: Option<PathBuf>,
    /// Without a client certificate the handshake fails (needs `client_ca`).
    pub require_client_cert: bool,
}

/// What one handshake uses, replaced as a whole by a reload.
struct Loaded {
    certified: Arc<CertifiedKey>,
    clients: Option<Arc<dyn ClientCertVerifier>>,
}

impl Loaded {
    fn read(files: &ServerFiles) -> Result<Loaded, TlsError> {
        let certified = certified_key(&files.cert, &files.key)?;
        let clients = match &files.client_ca {
            None => None,
            Some(ca) => {
                let roots = Arc::new(load_roots(ca)?);
                let builder = WebPkiClientVerifier::builder_with_provider(roots, provider());
                let builder = if files.require_client_cert {
                    builder
                } else {
                    builder.allow_unauthenticated()
                };
                Some(
                    builder
                        .build()
                        .map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))?,
                )
            }
        };
        Ok(Loaded { certified, clients })
    }
}

/// A TLS server whose certificate and client CA can be reloaded (SIGHUP): handshakes after
/// the reload use the new files, associations already open keep their session.
pub struct ServerTls {
    files: ServerFiles,
    loaded: RwLock<Arc<Loaded>>,
}

/// The client certificate a connection's handshake accepted (set once, during it).
pub type ClientCertSlot = Arc<OnceLock<CertificateDer<'static>>>;

impl ServerTls {
    pub fn load(files: ServerFiles) -> Result<ServerTls, TlsError> {
        if files.require_client_cert && files.client_ca.is_none() {
            return Err(TlsError::Config(
                "require_client_cert needs client_ca (the CA bundle client certificates are checked against)".into(),
            ));
        }
        let loaded = Loaded::read(&files)?;
        Ok(ServerTls {
            files,
            loaded: RwLock::new(Arc::new(loaded)),
        })
    }

    /// Read the files again; on an error the previous certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = Arc::new(Loaded::read(&self.files)?);
        match self.loaded.write() {
            Ok(mut current) => *current = fresh,
            // A panic while holding the lock cannot leave a half-written Arc.
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(())
    }

    fn current(&self) -> Arc<Loaded> {
        match self.loaded.read() {
            Ok(l) => l.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn files(&self) -> &ServerFiles {
        &self.files
    }

    /// The configuration of one connection's handshake, and where it will put the client
    /// certificate it accepted.
    pub fn for_connection(&self) -> Result<(Arc<ServerConfig>, ClientCertSlot), TlsError> {
        let loaded = self.current();
        let slot = ClientCertSlot::default();
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &loaded.clients {
            Some(inner) => builder.with_client_cert_verifier(Arc::new(Recording {
                inner: inner.clone(),
                slot: slot.clone(),
            })),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(Fixed(loaded.certified.clone())));
        // A resumed session skips client certificate verification, and with it the record
        // the pinning needs: every connection does a full handshake.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok((Arc::new(config), slot))
    }
}

/// The one certificate of a server (a resolver, so it is parsed once per load).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The WebPKI client verifier, keeping the end-entity certificate it accepted.
#[derive(Debug)]
struct Recording {
    inner: Arc<dyn ClientCertVerifier>,
    slot: ClientCertSlot,
}

impl ClientCertVerifier for Recording {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let _ = self.slot.set(end_entity.clone().into_owned());
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A TLS server that is switched on by a key (`archive.move_tls`, the C-MOVE destination of
/// `mine`), as opposed to `[dicom.tls]`, which a port switches on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerTlsConfig {
    pub enabled: bool,
    /// The certificate chain and private key (PEM).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// CA bundle client certificates are verified against; unset: none asked for.
    pub client_ca: Option<PathBuf>,
    /// Refuse a handshake without a client certificate (needs `client_ca`).
    pub require_client_cert: bool,
}

impl ServerTlsConfig {
    pub fn resolve_paths(&mut self, base: &Path) {
        resolve(base, [&mut self.cert, &mut self.key, &mut self.client_ca]);
    }

    /// The server, `None` when not enabled; `what` names the key in errors.
    pub fn load(&self, what: &str) -> Result<Option<ServerTls>, String> {
        if !self.enabled {
            return Ok(None);
        }
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return Err(format!(
                "{what}.cert and {what}.key are required when enabled"
            ));
        };
        ServerTls::load(ServerFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: self.client_ca.clone(),
            require_client_cert: self.require_client_cert,
        })
        .map(Some)
        .map_err(|e| format!("{what}: {e}"))
    }
}

/// Relative file names are taken from the configuration file's directory; empty is unset.
pub(crate) fn resolve<const N: usize>(base: &Path, files: [&mut Option<PathBuf>; N]) {
    for file in files {
        match file.as_mut() {
            Some(f) if f.as_os_str().is_empty() => *file = None,
            Some(f) if f.is_relative() => *f = base.join(&*f),
            _ => {}
        }
    }
}

/// `tls` of a destination or of the archive: how the node, as SCU, reaches a TLS peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTlsConfig {
    /// Connect with TLS (the other keys alone do not switch it on).
    pub enabled: bool,
    /// The CA bundle (PEM) the peer's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// The node's client certificate (PEM chain) and key, for peers that ask for one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name checked against the peer's certificate; default: the peer's host.
    pub server_name: Option<String>,
}

impl ClientTlsConfig {
    /// Relative file names are taken from the configuration file's directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        resolve(base, [&mut self.ca_file, &mut self.cert, &mut self.key]);
    }

    /// A configuration error, said with the key's place (`what`).
    pub fn check(&self, what: &str) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        if self.ca_file.is_none() {
            return Err(format!(
                "{what}.tls.ca_file is required when TLS is enabled"
            ));
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err(format!("{what}.tls.cert and {what}.tls.key go together"));
        }
        Ok(())
    }
}

/// A TLS client ready to connect: the configuration and the name to verify.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    pub server_name: String,
}

impl ClientTls {
    /// `None` when `settings` does not enable TLS; `host` is the default server name.
    pub fn build(settings: &ClientTlsConfig, host: &str) -> Result<Option<ClientTls>, TlsError> {
        if !settings.enabled {
            return Ok(None);
        }
        let ca = settings
            .ca_file
            .as_deref()
            .ok_or_else(|| TlsError::Config("tls.ca_file is required".into()))?;
        let roots = load_roots(ca)?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let config = match (&settings.cert, &settings.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
                .map_err(|e| TlsError::Config(e.to_string()))?,
            _ => builder.with_no_client_auth(),
        };
        let server_name = settings.server_name.clone().unwrap_or_else(|| host.into());
        // Checked now, so a typo is a configuration error and not a failure per job.
        ServerName::try_from(server_name.as_str())
            .map_err(|_| TlsError::ServerName(server_name.clone()))?;
        Ok(Some(ClientTls {
            config: Arc::new(config),
            server_name,
        }))
    }
}

/// The TLS settings of an HTTPS client (ureq): the peer must chain to `ca_file`; the ring
/// provider and TLS 1.2/1.3 as everywhere else.
pub fn https_client(ca_file: &Path) -> Result<ureq::tls::TlsConfig, TlsError> {
    let roots: Vec<ureq::tls::Certificate<'static>> = load_certs(ca_file)
        .map_err(|e| TlsError::Ca {
            path: ca_file.to_path_buf(),
            reason: e.to_string(),
        })?
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    Ok(ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
        .unversioned_rustls_crypto_provider(provider())
        .build())
}
