//! The key set JWTs are checked against, when it comes from the identity provider's
//! `jwks_uri` (`http.jwt.jwks_url`): fetched at start-up, every `jwks_refresh_secs`, and when
//! a token names a `kid` the set does not hold (a key rotated in), at most once per
//! `jwks_min_refresh_secs` (so tokens with made-up kids cannot make the node hammer the
//! provider). A failed fetch or a document without usable keys keeps the last good set.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::auth::{parse_key_set, Jwk, JwtConfig};

/// A JWKS document larger than this is not a key set.
const MAX_BYTES: u64 = 1024 * 1024;
/// Connection and read limits of one fetch.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("{0}")]
    Config(String),
    #[error("{url}: {reason}")]
    Fetch { url: String, reason: String },
}

/// `http://` (loopback or a trusted network) or `https://` with a CA file.
pub fn check_url(url: &str, has_ca: bool) -> Result<(), String> {
    if url.starts_with("https://") {
        if !has_ca {
            return Err(
                "http.jwt.jwks_url is https: set http.jwt.jwks_ca_file (the CA bundle the \
                 provider's certificate chains to)"
                    .into(),
            );
        }
        return Ok(());
    }
    if url.starts_with("http://") {
        return Ok(());
    }
    Err(format!(
        "http.jwt.jwks_url {url:?} must start with https:// or http://"
    ))
}

/// The current keys; a refresh swaps the whole set.
#[derive(Clone)]
pub struct KeySet(Arc<RwLock<Arc<Vec<Jwk>>>>);

impl KeySet {
    pub(super) fn new(keys: Vec<Jwk>) -> KeySet {
        KeySet(Arc::new(RwLock::new(Arc::new(keys))))
    }

    pub(super) fn current(&self) -> Arc<Vec<Jwk>> {
        match self.0.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, keys: Vec<Jwk>) {
        let fresh = Arc::new(keys);
        match self.0.write() {
            Ok(mut k) => *k = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
    }
}

/// `http.jwt.jwks_url` and the state of its fetches.
pub struct JwksUrl {
    url: String,
    agent: ureq::Agent,
    keys: KeySet,
    every: Duration,
    min_interval: Duration,
    /// The last fetch for an unknown kid; held while one runs, so concurrent requests with
    /// the new kid wait for that fetch instead of starting their own.
    last_kid_fetch: tokio::sync::Mutex<Option<Instant>>,
}

impl JwksUrl {
    pub(super) fn new(config: &JwtConfig, keys: KeySet) -> Result<JwksUrl, JwksError> {
        let url = config.jwks_url.trim().to_string();
        check_url(&url, config.jwks_ca_file.is_some()).map_err(JwksError::Config)?;
        let mut builder = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(TIMEOUT))
            .timeout_per_read(Some(TIMEOUT));
        if let Some(ca) = &config.jwks_ca_file {
            let tls = crate::net::tls::https_client(ca)
                .map_err(|e| JwksError::Config(format!("http.jwt.jwks_ca_file: {e}")))?;
            builder = builder.tls_config(tls);
        }
        Ok(JwksUrl {
            url,
            agent: builder.build().into(),
            keys,
            every: Duration::from_secs(config.jwks_refresh_secs.max(1)),
            min_interval: Duration::from_secs(config.jwks_min_refresh_secs),
            last_kid_fetch: tokio::sync::Mutex::new(None),
        })
    }

    /// The first fetch, at start-up (blocking: the port is not open yet). On a worker of
    /// the multi-threaded runtime the worker is handed over for the wait.
    pub(super) fn fetch_now(&self) {
        let fetch_it = || fetch(&self.agent, &self.url);
        let multi_threaded = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let fetched = if multi_threaded {
            tokio::task::block_in_place(fetch_it)
        } else {
            fetch_it()
        };
        self.install(fetched, "start-up");
    }

    /// Fetch again for a token whose `kid` the set does not hold, unless a fetch for an
    /// unknown kid ran less than `jwks_min_refresh_secs` ago.
    pub(super) async fn refresh_unknown_kid(&self, kid: &str) {
        let mut last = self.last_kid_fetch.lock().await;
        if last.is_some_and(|t| t.elapsed() < self.min_interval) {
            return;
        }
        *last = Some(Instant::now());
        // A concurrent request may have fetched the kid meanwhile (it held the lock).
        if self
            .keys
            .current()
            .iter()
            .any(|k| k.kid.as_deref() == Some(kid))
        {
            return;
        }
        self.refresh(&format!("unknown kid {kid:?}")).await;
    }

    async fn refresh(&self, why: &str) {
        let (agent, url) = (self.agent.clone(), self.url.clone());
        let fetched = tokio::task::spawn_blocking(move || fetch(&agent, &url))
            .await
            .unwrap_or_else(|e| {
                Err(JwksError::Fetch {
                    url: self.url.clone(),
                    reason: e.to_string(),
                })
            });
        self.install(fetched, why);
    }

    fn install(&self, fetched: Result<Vec<Jwk>, JwksError>, why: &str) {
        match fetched {
            Ok(keys) => {
                let kids: Vec<&str> = keys.iter().filter_map(|k| k.kid.as_deref()).collect();
                info!(url = %self.url, keys = keys.len(), kids = ?kids, reason = why, "JWKS fetched");
                self.keys.replace(keys);
            }
            Err(e) => {
                warn!(error = %e, reason = why, kept = self.keys.current().len(), "JWKS fetch failed; the last good key set stays in use");
            }
        }
    }

    /// Refresh every `jwks_refresh_secs` until `stop`.
    pub async fn refresh_every(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.every) => {}
            }
            self.refresh("periodic").await;
        }
    }
}

/// GET the key set (blocking).
fn fetch(agent: &ureq::Agent, url: &str) -> Result<Vec<Jwk>, JwksError> {
    let failed = |reason: String| JwksError::Fetch {
        url: url.to_string(),
        reason,
    };
    let mut response = agent
        .get(url)
        .header("Accept", "application/json, application/jwk-set+json")
        .call()
        .map_err(|e| failed(e.to_string()))?;
    if response.status() != 200 {
        return Err(failed(format!("HTTP status {}", response.status())));
    }
    let text = response
        .body_mut()
        .with_config()
        .limit(MAX_BYTES)
        .read_to_string()
        .map_err(|e| failed(e.to_string()))?;
    parse_key_set(&text).map_err(failed)
}
