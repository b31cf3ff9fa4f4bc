//! Configuration: one TOML file (`config.toml` documents every key) overridden by
//! environment variables `ANATOMY_<SECTION>__<KEY>` (e.g. `ANATOMY_DICOM__PORT=11112`).
//!
//! Every key has a safe default, so the node also runs with no file at all.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use crate::anatomy::model::Device;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration {path}: {source}")]
    Load {
        path: String,
        #[source]
        source: config::ConfigError,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub dicom: DicomConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub series: SeriesConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub classifier: ClassifierConfig,
    /// `[forward]`: the outbox (retries, batches, timeouts, Key Object Selection).
    #[serde(default)]
    pub forward: crate::forward::ForwardConfig,
    /// `[[destinations]]`: the C-STORE SCPs tagged copies are sent to.
    #[serde(default)]
    pub destinations: Vec<crate::forward::DestinationConfig>,
    /// `[[routes]]`: which labelled series go to which destinations.
    #[serde(default)]
    pub routes: Vec<crate::forward::RouteConfig>,
    /// `[archive]`: the archive `anatomy-node mine` queries and retrieves from.
    #[serde(default)]
    pub archive: crate::mine::ArchiveConfig,
    /// `[mine]`: label sources, the dataset and the load limits of `anatomy-node mine`.
    #[serde(default)]
    pub mine: crate::mine::MineConfig,
    /// `[audit]`: the audit trail (retention).
    #[serde(default)]
    pub audit: AuditConfig,
    /// The file this configuration was read from (not a setting; for the audit trail).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `classifier.key_images`: a number, or "all".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyImages {
    Count(usize),
    All,
}

impl<'de> Deserialize<'de> for KeyImages {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Number(usize),
            Text(String),
        }
        match Form::deserialize(deserializer)? {
            Form::Number(0) => Err(serde::de::Error::custom(
                "key_images must be at least 1 or \"all\"",
            )),
            Form::Number(n) => Ok(KeyImages::Count(n)),
            Form::Text(t) if t.eq_ignore_ascii_case("all") => Ok(KeyImages::All),
            // Environment variables arrive as text.
            Form::Text(t) => match t.trim().parse::<usize>() {
                Ok(n) if n > 0 => Ok(KeyImages::Count(n)),
                _ => Err(serde::de::Error::custom(format!(
                    "key_images must be a positive number or \"all\", not {t:?}"
                ))),
            },
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifierConfig {
    pub enabled: bool,
    pub model: PathBuf,
    pub onnxruntime_library: Option<PathBuf>,
    pub device: Device,
    pub threads: usize,
    pub max_batch: usize,
    pub key_images: KeyImages,
    pub axial_tolerance_deg: f64,
    /// `order` (labels decoded along z in the body's order) or `none` (each image's argmax).
    pub decoding: crate::anatomy::coverage::Decoding,
    /// Cost (nats) of each change of region along z when decoding.
    pub switch_penalty: f64,
    /// Cost (nats) of passing over a whole region between two images at the same z.
    pub skip_penalty: f64,
    /// Removed (the moving average gave way to `decoding`): accepted so an old file still
    /// loads, and reported by [`Config::warnings`].
    #[serde(rename = "smoothing_window")]
    pub removed_smoothing_window: Option<serde::de::IgnoredAny>,
    pub min_region_fraction: f64,
    pub min_region_images: usize,
    pub workers: usize,
    pub max_attempts: u32,
    pub claim_timeout_secs: u64,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            model: PathBuf::from("models/anatomy.onnx"),
            onnxruntime_library: None,
            device: Device::Auto,
            threads: 0,
            max_batch: 64,
            key_images: KeyImages::Count(32),
            axial_tolerance_deg: 35.0,
            decoding: crate::anatomy::coverage::Decoding::Order,
            switch_penalty: crate::anatomy::order::OrderRules::default().switch_penalty,
            skip_penalty: crate::anatomy::order::OrderRules::default().skip_penalty,
            removed_smoothing_window: None,
            min_region_fraction: 0.1,
            min_region_images: 2,
            workers: 1,
            max_attempts: 3,
            claim_timeout_secs: 600,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DicomConfig {
    pub ae_title: String,
    pub bind: IpAddr,
    pub port: u16,
    pub max_associations: usize,
    pub max_pdu_length: u32,
    pub artim_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    pub shutdown_grace_secs: u64,
    pub allow_any_peer: bool,
    pub allowed_peers: PeerList,
    /// `[dicom.tls]`: the DICOM TLS port (PS3.15 Annex B).
    pub tls: DicomTlsConfig,
}

/// `[dicom.tls]`: a TLS listener on its own port, beside (or instead of) the plain one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DicomTlsConfig {
    /// The TLS port (2762 by convention); unset: no TLS listener.
    pub port: Option<u16>,
    /// The server certificate chain and its private key (PEM).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// CA bundle (PEM) that client certificates are verified against; unset: none asked.
    pub client_ca: Option<PathBuf>,
    /// Refuse a handshake without a client certificate (needs `client_ca`).
    pub require_client_cert: bool,
    /// Keep the plain `dicom.port` open beside the TLS port.
    pub plain_port: bool,
}

impl Default for DicomTlsConfig {
    fn default() -> Self {
        Self {
            port: None,
            cert: None,
            key: None,
            client_ca: None,
            require_client_cert: false,
            plain_port: true,
        }
    }
}

impl DicomTlsConfig {
    /// The TLS server's files, when a TLS port is configured.
    pub fn server_files(&self) -> Option<crate::net::ServerFiles> {
        self.port?;
        Some(crate::net::ServerFiles {
            cert: self.cert.clone()?,
            key: self.key.clone()?,
            client_ca: self.client_ca.clone(),
            require_client_cert: self.require_client_cert,
        })
    }

    fn validate(&self) -> Result<(), String> {
        if self.port.is_some() && (self.cert.is_none() || self.key.is_none()) {
            return Err("dicom.tls.port needs dicom.tls.cert and dicom.tls.key".into());
        }
        if self.require_client_cert && self.client_ca.is_none() {
            return Err("dicom.tls.require_client_cert needs dicom.tls.client_ca".into());
        }
        if self.port.is_none() && !self.plain_port {
            return Err("dicom.tls.plain_port = false needs dicom.tls.port".into());
        }
        Ok(())
    }
}

impl Default for DicomConfig {
    fn default() -> Self {
        Self {
            ae_title: "ANATOMY".into(),
            bind: IpAddr::from([0, 0, 0, 0]),
            port: 11112,
            max_associations: 16,
            max_pdu_length: 262_144,
            artim_timeout_secs: 30,
            idle_timeout_secs: 120,
            shutdown_grace_secs: 30,
            allow_any_peer: false,
            allowed_peers: PeerList::default(),
            tls: DicomTlsConfig::default(),
        }
    }
}

/// One calling AE title allowed to open associations, optionally only from one address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowedPeer {
    pub ae_title: String,
    #[serde(default)]
    pub host: Option<IpAddr>,
    /// Pinned client certificate subject (`CN=...,O=...`): the peer must connect over TLS
    /// with a certificate whose subject this is.
    #[serde(default)]
    pub cert_subject: Option<String>,
    /// Pinned client certificate SHA-256 fingerprint (hex, colons optional).
    #[serde(default)]
    pub cert_sha256: Option<String>,
}

impl AllowedPeer {
    /// `AE` or `AE@address`, the form used in environment variables.
    fn parse(text: &str) -> Result<Self, String> {
        let (ae, host) = match text.split_once('@') {
            Some((ae, host)) => {
                let ip = host
                    .trim()
                    .parse::<IpAddr>()
                    .map_err(|e| format!("peer {text:?}: address {host:?}: {e}"))?;
                (ae, Some(ip))
            }
            None => (text, None),
        };
        Ok(Self {
            ae_title: ae.trim().to_string(),
            host,
            cert_subject: None,
            cert_sha256: None,
        })
    }
}

/// The allow-list of calling AEs: a TOML array of tables, or (for environment
/// variables) a comma-separated string such as `"PACS@10.0.0.5,STORESCU"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerList(pub Vec<AllowedPeer>);

impl<'de> Deserialize<'de> for PeerList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            List(Vec<AllowedPeer>),
            Text(String),
        }
        match Form::deserialize(deserializer)? {
            Form::List(peers) => Ok(PeerList(peers)),
            Form::Text(text) => text
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(AllowedPeer::parse)
                .collect::<Result<Vec<_>, _>>()
                .map(PeerList)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub enabled: bool,
    pub bind: IpAddr,
    pub port: u16,
    /// STOW-RS: the largest request body accepted, in MB (413 beyond).
    pub stow_max_mb: u64,
    /// QIDO-RS: the most results one response holds (`limit` is capped to it).
    pub qido_max_results: u64,
    /// HTTPS: the certificate chain (PEM); with `tls_key`. Empty: plain HTTP.
    pub tls_cert: Option<PathBuf>,
    /// HTTPS: the private key (PEM, PKCS#8, PKCS#1 or SEC1).
    pub tls_key: Option<PathBuf>,
    /// Requests without credentials get every role. Allowed only on a loopback `bind`.
    pub anonymous: bool,
    /// `/metrics` without credentials, whatever `anonymous` says.
    pub metrics_open: bool,
    /// API tokens: names, SHA-256 hashes and roles (never the tokens themselves).
    pub tokens: crate::web::auth::TokenList,
    /// More tokens, in a TOML file of `[[tokens]]` tables (the form of `tokens`).
    pub tokens_file: Option<PathBuf>,
    /// OpenID Connect bearer JWTs.
    pub jwt: crate::web::auth::JwtConfig,
    /// `/login`: this many failed sign-ins from one address within `login_window_secs`
    /// lock it out (429) for `login_lockout_secs`; 0: no limit.
    pub login_max_failures: u32,
    pub login_window_secs: u64,
    pub login_lockout_secs: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            bind: IpAddr::from([127, 0, 0, 1]),
            port: 8042,
            stow_max_mb: 1024,
            qido_max_results: 1000,
            tls_cert: None,
            tls_key: None,
            anonymous: true,
            metrics_open: false,
            tokens: crate::web::auth::TokenList::default(),
            tokens_file: None,
            jwt: crate::web::auth::JwtConfig::default(),
            login_max_failures: 5,
            login_window_secs: 300,
            login_lockout_secs: 300,
        }
    }
}

impl HttpConfig {
    /// Whether the port serves HTTPS.
    pub fn tls(&self) -> bool {
        self.tls_cert.is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DuplicatePolicy {
    /// Keep the stored instance; a resend with identical content is a success, different
    /// content is logged, counted and dropped (the sender still gets success).
    KeepFirst,
    /// Replace the stored instance with the new one (atomically).
    Overwrite,
    /// Refuse different content with status 0111 (duplicate SOP instance).
    Reject,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub path: PathBuf,
    pub duplicates: DuplicatePolicy,
    pub min_free_mb: u64,
    pub fsync: bool,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data"),
            duplicates: DuplicatePolicy::KeepFirst,
            min_free_mb: 64,
            fsync: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: String,
    pub max_connections: u32,
    pub batch_max: usize,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            max_connections: 8,
            batch_max: 64,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SeriesConfig {
    pub stable_after_secs: u64,
    pub check_interval_ms: u64,
}

impl Default for SeriesConfig {
    fn default() -> Self {
        Self {
            stable_after_secs: 10,
            check_interval_ms: 1000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
    /// Patient names, IDs, birth dates and accession numbers may appear in the log.
    pub phi: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
            phi: false,
        }
    }
}

/// `[audit]`: the audit trail in the index (README, "Audit trail").
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Events older than this many days are deleted (hourly) by the running node; 0 keeps
    /// every event (the default).
    pub retention_days: u32,
    /// `[audit.syslog]`: each event also sent as a DICOM audit message (IHE ATNA).
    pub syslog: crate::audit::syslog::SyslogConfig,
}

impl Config {
    /// Load `path` (when given) and the environment, then resolve relative paths against
    /// the directory of the file so the node behaves the same from any working directory.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = path {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        // Only ANATOMY_<SECTION>__<KEY> variables are configuration; other ANATOMY_*
        // variables (e.g. ANATOMY_CT_DATA used by the tests) are not.
        let overrides: config::Map<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("ANATOMY_") && k.contains("__"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("ANATOMY")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(overrides)),
        );
        let shown = path.map_or_else(|| "(defaults)".to_string(), |p| p.display().to_string());
        let mut cfg: Config =
            builder
                .build()
                .and_then(|c| c.try_deserialize())
                .map_err(|source| ConfigError::Load {
                    path: shown,
                    source,
                })?;
        let base = path
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        cfg.resolve_paths(&base);
        cfg.source = path.map(Path::to_path_buf);
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        if self.storage.path.is_relative() {
            self.storage.path = base.join(&self.storage.path);
        }
        if self.classifier.model.is_relative() {
            self.classifier.model = base.join(&self.classifier.model);
        }
        self.mine.resolve_paths(base);
        self.archive.resolve_paths(base);
        self.audit.syslog.resolve_paths(base);
        for d in &mut self.destinations {
            d.tls.resolve_paths(base);
        }
        for file in [
            &mut self.dicom.tls.cert,
            &mut self.dicom.tls.key,
            &mut self.dicom.tls.client_ca,
            &mut self.http.tls_cert,
            &mut self.http.tls_key,
            &mut self.http.tokens_file,
            &mut self.http.jwt.jwks_file,
            &mut self.http.jwt.jwks_ca_file,
        ] {
            match file.as_mut() {
                Some(f) if f.as_os_str().is_empty() => *file = None,
                Some(f) if f.is_relative() => *f = base.join(&*f),
                _ => {}
            }
        }
        if let Some(lib) = self.classifier.onnxruntime_library.as_mut() {
            if lib.as_os_str().is_empty() {
                self.classifier.onnxruntime_library = None;
            } else if lib.is_relative() {
                *lib = base.join(&*lib);
            }
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let ae = &self.dicom.ae_title;
        if ae.trim().is_empty() || ae.len() > 16 || !ae.chars().all(is_ae_char) {
            return Err(ConfigError::Invalid(format!(
                "dicom.ae_title {ae:?} must be 1-16 printable ASCII characters without backslash"
            )));
        }
        for peer in &self.dicom.allowed_peers.0 {
            let t = &peer.ae_title;
            if t.trim().is_empty() || t.len() > 16 || !t.chars().all(is_ae_char) {
                return Err(ConfigError::Invalid(format!(
                    "dicom.allowed_peers: AE title {t:?} must be 1-16 printable ASCII characters"
                )));
            }
        }
        self.dicom.tls.validate().map_err(ConfigError::Invalid)?;
        self.audit.syslog.validate().map_err(ConfigError::Invalid)?;
        if self.dicom.max_associations == 0 {
            return Err(ConfigError::Invalid(
                "dicom.max_associations must be at least 1".into(),
            ));
        }
        if !(4096..=16 * 1024 * 1024).contains(&self.dicom.max_pdu_length) {
            return Err(ConfigError::Invalid(
                "dicom.max_pdu_length must be between 4096 and 16777216".into(),
            ));
        }
        let c = &self.classifier;
        if !(0.0..=90.0).contains(&c.axial_tolerance_deg) {
            return Err(ConfigError::Invalid(
                "classifier.axial_tolerance_deg must be between 0 and 90".into(),
            ));
        }
        let finite_non_negative = |x: f64| x.is_finite() && x >= 0.0;
        if !finite_non_negative(c.switch_penalty) || !finite_non_negative(c.skip_penalty) {
            return Err(ConfigError::Invalid(
                "classifier.switch_penalty and skip_penalty must be finite and at least 0".into(),
            ));
        }
        if !(0.0..=1.0).contains(&c.min_region_fraction) {
            return Err(ConfigError::Invalid(
                "classifier.min_region_fraction must be between 0 and 1".into(),
            ));
        }
        if c.max_batch == 0 || c.workers == 0 || c.max_attempts == 0 {
            return Err(ConfigError::Invalid(
                "classifier.max_batch, workers and max_attempts must be at least 1".into(),
            ));
        }
        if self.database.batch_max == 0 {
            return Err(ConfigError::Invalid(
                "database.batch_max must be at least 1".into(),
            ));
        }
        if self.http.stow_max_mb == 0 || self.http.qido_max_results == 0 {
            return Err(ConfigError::Invalid(
                "http.stow_max_mb and http.qido_max_results must be at least 1".into(),
            ));
        }
        if self.http.tls_cert.is_some() != self.http.tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "http.tls_cert and http.tls_key go together: set both (HTTPS) or neither (plain HTTP)"
                    .into(),
            ));
        }
        if self.http.enabled && self.http.anonymous && !self.http.bind.is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "http.anonymous = true is allowed only on a loopback http.bind (127.0.0.1 or ::1), \
                 and http.bind is {}: set http.anonymous = false (ANATOMY_HTTP__ANONYMOUS=false) and \
                 give clients credentials with http.tokens (anatomy-node token) or [http.jwt] \
                 (README, \"Security\"), or bind to 127.0.0.1",
                self.http.bind
            )));
        }
        self.http.jwt.validate().map_err(ConfigError::Invalid)?;
        crate::forward::validate(&self.forward, &self.destinations, &self.routes)
            .map_err(ConfigError::Invalid)?;
        crate::mine::validate(&self.archive, &self.mine).map_err(ConfigError::Invalid)?;
        let url = &self.database.url;
        if !(url.is_empty()
            || url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err(ConfigError::Invalid(format!(
                "database.url must be empty (SQLite in the storage directory), sqlite:... or postgres://..., not {url:?}"
            )));
        }
        Ok(())
    }

    /// Keys that are accepted but no longer do anything, each with what replaced it; the
    /// commands log them once logging is set up.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.classifier.removed_smoothing_window.is_some() {
            out.push(
                "classifier.smoothing_window is no longer used and is ignored: labels are now \
                 decoded along z in the body's order (classifier.decoding = \"order\", with \
                 classifier.switch_penalty and classifier.skip_penalty; \"none\" for each \
                 image's own label); remove smoothing_window from the configuration"
                    .to_string(),
            );
        }
        out
    }

    /// The database URL, defaulting to an SQLite file inside the storage directory.
    pub fn database_url(&self) -> String {
        if self.database.url.is_empty() {
            format!(
                "sqlite://{}?mode=rwc",
                self.storage.path.join("index.sqlite3").display()
            )
        } else {
            self.database.url.clone()
        }
    }
}

fn is_ae_char(c: char) -> bool {
    c.is_ascii() && !c.is_ascii_control() && c != '\\'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_list_accepts_text_form() {
        let list: PeerList =
            serde_json::from_str(r#""PACS@10.0.0.5, STORESCU""#).expect("valid peer list");
        assert_eq!(
            list.0,
            vec![
                AllowedPeer {
                    ae_title: "PACS".into(),
                    host: Some("10.0.0.5".parse().unwrap()),
                    ..Default::default()
                },
                AllowedPeer {
                    ae_title: "STORESCU".into(),
                    ..Default::default()
                }
            ]
        );
    }

    #[test]
    fn peer_list_rejects_bad_address() {
        let err = serde_json::from_str::<PeerList>(r#""PACS@not-an-ip""#).unwrap_err();
        assert!(err.to_string().contains("not-an-ip"), "{err}");
    }

    #[test]
    fn shipped_config_keeps_the_http_security_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let cfg = Config::load(Some(&path)).expect("config.toml loads");
        let defaults = HttpConfig::default();
        let h = &cfg.http;
        assert!(h.anonymous && defaults.anonymous && h.bind.is_loopback());
        assert!(!h.metrics_open && h.tls_cert.is_none() && h.tls_key.is_none());
        assert!(h.tokens.0.is_empty() && h.tokens_file.is_none() && !h.jwt.enabled());
        assert_eq!(h.jwt.roles_claim, defaults.jwt.roles_claim);
        assert_eq!(h.jwt.leeway_secs, defaults.jwt.leeway_secs);
        assert!(!cfg.log.phi);
        // The audit trail keeps every event unless a site sets a retention, and knows its file.
        assert_eq!(
            cfg.audit.retention_days,
            AuditConfig::default().retention_days
        );
        assert_eq!(cfg.audit.retention_days, 0);
        assert_eq!(cfg.source.as_deref(), Some(path.as_path()));
    }

    #[test]
    fn audit_retention_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.toml");
        std::fs::write(&path, "[audit]\nretention_days = 400\n").unwrap();
        let cfg = Config::load(Some(&path)).expect("loads");
        assert_eq!(cfg.audit.retention_days, 400);
        std::fs::write(&path, "[audit]\nretention_days = -1\n").unwrap();
        assert!(Config::load(Some(&path)).is_err(), "a negative retention");
        std::fs::write(&path, "[audit]\nkeep = 1\n").unwrap();
        let err = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("keep"), "{err}");
    }

    #[test]
    fn an_old_smoothing_window_is_accepted_with_a_warning_naming_its_replacement() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.toml");
        std::fs::write(&path, "[classifier]\nsmoothing_window = 3\n").unwrap();
        let cfg = Config::load(Some(&path)).expect("an old file still loads");
        assert_eq!(
            cfg.classifier.decoding,
            crate::anatomy::coverage::Decoding::Order
        );
        let warnings = cfg.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("classifier.smoothing_window")
                && warnings[0].contains("classifier.decoding"),
            "{}",
            warnings[0]
        );
        assert!(Config::load(None).unwrap().warnings().is_empty());
    }

    #[test]
    fn decoding_settings_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[classifier]\ndecoding = \"none\"\nswitch_penalty = 2.5\nskip_penalty = 0\n",
        )
        .unwrap();
        let cfg = Config::load(Some(&path)).unwrap();
        assert_eq!(
            cfg.classifier.decoding,
            crate::anatomy::coverage::Decoding::None
        );
        assert_eq!(cfg.classifier.switch_penalty, 2.5);
        std::fs::write(&path, "[classifier]\ndecoding = \"smooth\"\n").unwrap();
        let err = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("smooth"), "{err}");
        std::fs::write(&path, "[classifier]\nskip_penalty = -1\n").unwrap();
        let err = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("skip_penalty"), "{err}");
    }

    #[test]
    fn defaults_are_valid() {
        let cfg = Config::load(None).expect("defaults load");
        assert_eq!(cfg.dicom.port, 11112);
        assert!(cfg.database_url().starts_with("sqlite://"));
    }
}
