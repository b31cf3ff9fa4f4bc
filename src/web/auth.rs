//! Who may use the HTTP port: API tokens (stored as SHA-256 hashes, each with a name and
//! roles) and OpenID Connect bearer JWTs (RS256 or ES256, checked against a JWKS from a file
//! or fetched from the provider by [`super::jwks`]: issuer, audience, expiry, not-before and a
//! roles claim). Credentials come in an
//! `Authorization: Bearer` header or, for the web page, in the HttpOnly cookie the login form
//! sets. Every route but `/healthz` (and the login form) needs a role:
//!
//! | role      | what it allows                                                    |
//! |-----------|-------------------------------------------------------------------|
//! | `read`    | QIDO-RS, WADO-RS, rendered images, the page                       |
//! | `write`   | STOW-RS                                                           |
//! | `metrics` | `/metrics` (unless `http.metrics_open`)                           |
//! | `admin`   | everything above (and any state-changing HTTP route added later)  |
//!
//! With `http.anonymous = true` (loopback binds only, checked when the configuration loads)
//! a request without credentials gets every role; credentials that are sent are still checked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Form;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::page::{escape, STYLE};
use super::WebState;
use crate::audit::{AuditEvent, EventType, Outcome};
use crate::config::HttpConfig;

/// The cookie the login form sets (HttpOnly, SameSite=Strict, Secure over HTTPS).
pub const COOKIE: &str = "anatomy_token";
const REALM: &str = "anatomy-node";
/// Generated API tokens start with this, so they are easy to recognise in a secret scanner.
const TOKEN_PREFIX: &str = "anp_";

// ---------------------------------------------------------------------------------------
// Configuration

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Write,
    Admin,
    Metrics,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Read, Role::Write, Role::Admin, Role::Metrics];

    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
            Role::Metrics => "metrics",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL
            .into_iter()
            .find(|r| r.name().eq_ignore_ascii_case(text.trim()))
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One API token: its name (for logs), the SHA-256 of the token (hex) and its roles.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub name: String,
    pub sha256: String,
    pub roles: Vec<Role>,
}

impl TokenEntry {
    /// `name:sha256:role+role`, the form used in environment variables.
    fn parse(text: &str) -> Result<TokenEntry, String> {
        let mut parts = text.trim().splitn(3, ':');
        let (Some(name), Some(sha256), Some(roles)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "token {:?} must be name:sha256:role+role",
                text.split(':').next().unwrap_or_default()
            ));
        };
        let roles = roles
            .split(['+', ' '])
            .filter(|r| !r.is_empty())
            .map(|r| Role::parse(r).ok_or_else(|| format!("token {name:?}: unknown role {r:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TokenEntry {
            name: name.trim().to_string(),
            sha256: sha256.trim().to_string(),
            roles,
        })
    }

    fn check(&self) -> Result<[u8; 32], String> {
        let name = &self.name;
        if name.is_empty() || name.contains([':', ',']) || name.chars().any(char::is_control) {
            return Err(format!(
                "token name {name:?} must be non-empty, without ':' or ','"
            ));
        }
        if self.roles.is_empty() {
            return Err(format!("token {name:?} has no roles"));
        }
        let mut hash = [0u8; 32];
        hex::decode_to_slice(self.sha256.trim(), &mut hash).map_err(|_| {
            format!(
                "token {name:?}: sha256 must be 64 hex digits (the SHA-256 of the token, as \
                 `anatomy-node token` prints it), never the token itself"
            )
        })?;
        Ok(hash)
    }
}

/// `http.tokens`: a TOML array of tables, or (for environment variables) a comma-separated
/// string `name:sha256:role+role,...`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenList(pub Vec<TokenEntry>);

impl<'de> Deserialize<'de> for TokenList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            List(Vec<TokenEntry>),
            Text(String),
        }
        match Form::deserialize(deserializer)? {
            Form::List(tokens) => Ok(TokenList(tokens)),
            Form::Text(text) => text
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(TokenEntry::parse)
                .collect::<Result<Vec<_>, _>>()
                .map(TokenList)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// `[http.jwt]`: OpenID Connect access tokens, checked against the identity provider's keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// The JWKS (the provider's `jwks_uri` document, saved to a file). Empty: no JWTs.
    pub jwks_file: Option<PathBuf>,
    /// Or the JWKS fetched from the provider (`jwks_uri`), refreshed every
    /// `jwks_refresh_secs` and when a token names an unknown `kid`.
    pub jwks_url: String,
    /// HTTPS `jwks_url`: the CA bundle (PEM) the provider's certificate must chain to.
    pub jwks_ca_file: Option<PathBuf>,
    pub jwks_refresh_secs: u64,
    /// Fetches for unknown `kid`s: at most one per this many seconds.
    pub jwks_min_refresh_secs: u64,
    /// The `iss` every token must carry.
    pub issuer: String,
    /// A value the token's `aud` (a string or a list) must hold.
    pub audience: String,
    /// Dotted path of the roles claim (a list of strings, or a space-separated string).
    pub roles_claim: String,
    /// Roles in the claim are this prefix + the role name (e.g. "anatomy-" + "read").
    pub role_prefix: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            jwks_file: None,
            jwks_url: String::new(),
            jwks_ca_file: None,
            jwks_refresh_secs: 300,
            jwks_min_refresh_secs: 30,
            issuer: String::new(),
            audience: String::new(),
            roles_claim: "realm_access.roles".into(),
            role_prefix: String::new(),
            leeway_secs: 60,
        }
    }
}

impl JwtConfig {
    pub fn enabled(&self) -> bool {
        self.jwks_file.is_some() || !self.jwks_url.trim().is_empty()
    }

    pub fn validate(&self) -> Result<(), String> {
        let url = self.jwks_url.trim();
        if self.jwks_file.is_some() && !url.is_empty() {
            return Err("http.jwt.jwks_file and http.jwt.jwks_url: set one, not both".into());
        }
        if !url.is_empty() {
            super::jwks::check_url(url, self.jwks_ca_file.is_some())?;
        }
        if self.enabled()
            && (self.issuer.trim().is_empty()
                || self.audience.trim().is_empty()
                || self.roles_claim.trim().is_empty())
        {
            return Err(
                "http.jwt.jwks_file or jwks_url is set: http.jwt.issuer, http.jwt.audience \
                 and http.jwt.roles_claim must be set too"
                    .into(),
            );
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Errors

/// The credentials configuration cannot be used (the node refuses to start).
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("reading {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("http.tokens_file {path}: {reason}")]
    TokensFile { path: PathBuf, reason: String },
    #[error("http.tokens: {0}")]
    Token(String),
    #[error("http.jwt.jwks_file {path}: {reason}")]
    Jwks { path: PathBuf, reason: String },
    #[error("http.jwt.jwks_url: {0}")]
    JwksUrl(String),
    #[error(
        "http.anonymous = false and no credentials are configured, so nobody could use the \
         HTTP port: add http.tokens (anatomy-node token --name NAME --roles read), \
         http.tokens_file or [http.jwt] (README, \"Security\")"
    )]
    NoCredentials,
    #[error("generating a random token: {0}")]
    Random(String),
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// 401: nothing was sent.
    #[error(
        "authentication required: send Authorization: Bearer <token> (an API token or an \
         OpenID Connect access token), or sign in at /login"
    )]
    Missing,
    /// 401: what was sent is not valid.
    #[error("the credentials were not accepted: {0}")]
    Invalid(String),
    /// 403: valid, without the role.
    #[error("{who} does not have the role \"{role}\" this request needs")]
    Forbidden { who: String, role: Role },
}

// ---------------------------------------------------------------------------------------
// Checking credentials

/// Who made a request, and what they may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// "token NAME", "jwt SUBJECT" or "anonymous".
    pub name: String,
    pub roles: Vec<Role>,
}

impl Principal {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role) || self.roles.contains(&Role::Admin)
    }
}

/// The credentials checker of the HTTP port, built once at start-up.
pub struct Authenticator {
    anonymous: bool,
    metrics_open: bool,
    /// Cookies get `Secure` over HTTPS.
    tls: bool,
    tokens: HashMap<[u8; 32], TokenEntry>,
    jwt: Option<JwtVerifier>,
}

impl Authenticator {
    pub fn from_config(http: &HttpConfig) -> Result<Authenticator, AuthSetupError> {
        let mut entries = http.tokens.0.clone();
        if let Some(path) = &http.tokens_file {
            entries.extend(read_tokens_file(path)?);
        }
        let mut tokens = HashMap::new();
        for entry in entries {
            let hash = entry.check().map_err(AuthSetupError::Token)?;
            if let Some(other) = tokens.insert(hash, entry) {
                return Err(AuthSetupError::Token(format!(
                    "the hash of token {:?} is listed twice",
                    other.name
                )));
            }
        }
        let jwt = match &http.jwt.jwks_file {
            Some(path) => Some(JwtVerifier::load(path, &http.jwt)?),
            None if http.jwt.enabled() => Some(JwtVerifier::from_url(&http.jwt)?),
            None => None,
        };
        if !http.anonymous && tokens.is_empty() && jwt.is_none() {
            return Err(AuthSetupError::NoCredentials);
        }
        Ok(Authenticator {
            anonymous: http.anonymous,
            metrics_open: http.metrics_open,
            tls: http.tls(),
            tokens,
            jwt,
        })
    }

    /// One line for the start-up log.
    pub fn describe(&self) -> String {
        let mut ways = Vec::new();
        if !self.tokens.is_empty() {
            ways.push(format!("{} API tokens", self.tokens.len()));
        }
        if self.jwt.is_some() {
            ways.push("OpenID Connect JWTs".into());
        }
        if self.anonymous {
            ways.push("anonymous (loopback only)".into());
        }
        ways.join(", ")
    }

    /// Check one bearer credential (an API token or a JWT).
    pub fn authenticate(&self, credential: &str) -> Result<Principal, String> {
        let credential = credential.trim();
        if credential.is_empty() {
            return Err("empty token".into());
        }
        if credential.split('.').count() == 3 && !credential.starts_with(TOKEN_PREFIX) {
            return match &self.jwt {
                Some(jwt) => jwt.verify(credential, now_secs()),
                None => Err("JWTs are not accepted here (no [http.jwt] configured)".into()),
            };
        }
        let hash: [u8; 32] = Sha256::digest(credential.as_bytes()).into();
        match self.tokens.get(&hash) {
            Some(entry) => Ok(Principal {
                name: format!("token {}", entry.name),
                roles: entry.roles.clone(),
            }),
            None => Err("unknown API token".into()),
        }
    }

    /// Before checking `credential`: when it is a JWT whose `kid` the key set does not hold
    /// and the set comes from `http.jwt.jwks_url`, fetch the set again (rate-limited), so a
    /// key the provider has just rotated in is known.
    pub async fn refresh_keys_for(&self, credential: &str) {
        if let Some(jwt) = &self.jwt {
            jwt.refresh_for(credential.trim()).await;
        }
    }

    /// [`Authenticator::refresh_keys_for`] the bearer credential of `headers`, if any.
    pub async fn refresh_keys_for_request(&self, headers: &HeaderMap) {
        if let Ok(Some(token)) = credential(headers) {
            self.refresh_keys_for(&token).await;
        }
    }

    /// Refresh a `jwks_url` key set every `jwks_refresh_secs` until `stop`.
    pub fn spawn_key_refresh(&self, stop: tokio_util::sync::CancellationToken) {
        if let Some(url) = self.jwt.as_ref().and_then(|j| j.url.clone()) {
            tokio::spawn(url.refresh_every(stop));
        }
    }

    /// The principal of a request, checked for `role`.
    pub fn check(&self, headers: &HeaderMap, role: Role) -> Result<Principal, Rejection> {
        let principal = match credential(headers)? {
            Some(token) => self.authenticate(&token).map_err(Rejection::Invalid)?,
            None if self.anonymous => Principal {
                name: "anonymous".into(),
                roles: Role::ALL.to_vec(),
            },
            None => return Err(Rejection::Missing),
        };
        if principal.has(role) {
            Ok(principal)
        } else {
            Err(Rejection::Forbidden {
                who: principal.name,
                role,
            })
        }
    }
}

fn read_tokens_file(path: &Path) -> Result<Vec<TokenEntry>, AuthSetupError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        tokens: Vec<TokenEntry>,
    }
    let text = std::fs::read_to_string(path).map_err(|source| AuthSetupError::Read {
        what: "http.tokens_file",
        path: path.to_path_buf(),
        source,
    })?;
    let parsed = config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize::<File>())
        .map_err(|e| AuthSetupError::TokensFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(parsed.tokens)
}

/// The bearer credential of a request: the Authorization header, else the login cookie.
fn credential(headers: &HeaderMap) -> Result<Option<String>, Rejection> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let text = value
            .to_str()
            .map_err(|_| Rejection::Invalid("the Authorization header is not text".into()))?;
        return match text.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                Ok(Some(token.trim().to_string()))
            }
            _ => Err(Rejection::Invalid(
                "the Authorization header must be \"Bearer <token>\"".into(),
            )),
        };
    }
    for value in headers.get_all(header::COOKIE) {
        let Ok(text) = value.to_str() else { continue };
        for pair in text.split(';') {
            if let Some((name, token)) = pair.trim().split_once('=') {
                if name == COOKIE && !token.is_empty() {
                    return Ok(Some(token.to_string()));
                }
            }
        }
    }
    Ok(None)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// JWTs

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    Rs256,
    Es256,
}

impl Alg {
    fn parse(text: &str) -> Option<Alg> {
        match text {
            "RS256" => Some(Alg::Rs256),
            "ES256" => Some(Alg::Es256),
            _ => None,
        }
    }
}

enum PublicKey {
    Rsa(ring::signature::RsaPublicKeyComponents<Vec<u8>>),
    Ec(ring::signature::UnparsedPublicKey<Vec<u8>>),
}

pub(super) struct Jwk {
    pub(super) kid: Option<String>,
    alg: Alg,
    key: PublicKey,
}

impl Jwk {
    /// A JWK of the set, or `Ok(None)` for keys not meant for signatures we check.
    fn parse(v: &Value) -> Result<Option<Jwk>, String> {
        let text = |name: &str| v.get(name).and_then(Value::as_str);
        if text("use").is_some_and(|u| u != "sig") {
            return Ok(None);
        }
        let kid = text("kid").map(str::to_string);
        let bytes = |name: &str| -> Result<Vec<u8>, String> {
            let t = text(name).ok_or_else(|| format!("key {kid:?}: no \"{name}\""))?;
            URL_SAFE_NO_PAD
                .decode(t.trim_end_matches('='))
                .map_err(|e| format!("key {kid:?}: \"{name}\" is not base64url: {e}"))
        };
        let (alg, key) = match (text("kty"), text("crv")) {
            (Some("RSA"), _) => {
                let strip = |mut b: Vec<u8>| {
                    let zeros = b.iter().take_while(|&&x| x == 0).count();
                    b.drain(..zeros);
                    b
                };
                let n = strip(bytes("n")?);
                let e = strip(bytes("e")?);
                if n.len() < 256 {
                    // Not trusted; the set's other keys still are.
                    tracing::warn!(kid = ?kid, bits = n.len() * 8, "JWKS: RSA key under 2048 bits ignored");
                    return Ok(None);
                }
                (
                    Alg::Rs256,
                    PublicKey::Rsa(ring::signature::RsaPublicKeyComponents { n, e }),
                )
            }
            (Some("EC"), Some("P-256")) => {
                let (x, y) = (bytes("x")?, bytes("y")?);
                if x.len() != 32 || y.len() != 32 {
                    return Err(format!("key {kid:?}: P-256 coordinates must be 32 bytes"));
                }
                let mut point = vec![4u8];
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                (
                    Alg::Es256,
                    PublicKey::Ec(ring::signature::UnparsedPublicKey::new(
                        &ring::signature::ECDSA_P256_SHA256_FIXED,
                        point,
                    )),
                )
            }
            // Other key types (HMAC secrets, other curves) are not used for our algorithms.
            _ => return Ok(None),
        };
        if let Some(declared) = text("alg") {
            if Alg::parse(declared) != Some(alg) {
                return Ok(None);
            }
        }
        Ok(Some(Jwk { kid, alg, key }))
    }

    fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        match &self.key {
            PublicKey::Rsa(k) => k
                .verify(
                    &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                    message,
                    signature,
                )
                .is_ok(),
            PublicKey::Ec(k) => k.verify(message, signature).is_ok(),
        }
    }
}

struct JwtVerifier {
    keys: super::jwks::KeySet,
    /// Where the keys come from when it is `http.jwt.jwks_url`.
    url: Option<std::sync::Arc<super::jwks::JwksUrl>>,
    issuer: String,
    audience: String,
    roles_path: Vec<String>,
    role_prefix: String,
    leeway: u64,
}

impl JwtVerifier {
    fn load(path: &Path, config: &JwtConfig) -> Result<JwtVerifier, AuthSetupError> {
        let failed = |reason: String| AuthSetupError::Jwks {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|source| AuthSetupError::Read {
            what: "http.jwt.jwks_file",
            path: path.to_path_buf(),
            source,
        })?;
        let keys = parse_key_set(&text).map_err(failed)?;
        Ok(JwtVerifier::with_keys(
            super::jwks::KeySet::new(keys),
            None,
            config,
        ))
    }

    /// Keys from `http.jwt.jwks_url`: fetched now (a provider that does not answer leaves
    /// the set empty, logged, until a refresh succeeds: the node still starts).
    fn from_url(config: &JwtConfig) -> Result<JwtVerifier, AuthSetupError> {
        let keys = super::jwks::KeySet::new(Vec::new());
        let url = super::jwks::JwksUrl::new(config, keys.clone())
            .map_err(|e| AuthSetupError::JwksUrl(e.to_string()))?;
        url.fetch_now();
        Ok(JwtVerifier::with_keys(
            keys,
            Some(std::sync::Arc::new(url)),
            config,
        ))
    }

    fn with_keys(
        keys: super::jwks::KeySet,
        url: Option<std::sync::Arc<super::jwks::JwksUrl>>,
        config: &JwtConfig,
    ) -> JwtVerifier {
        JwtVerifier {
            keys,
            url,
            issuer: config.issuer.trim().to_string(),
            audience: config.audience.trim().to_string(),
            roles_path: config.roles_claim.split('.').map(str::to_string).collect(),
            role_prefix: config.role_prefix.clone(),
            leeway: config.leeway_secs,
        }
    }

    /// See [`Authenticator::refresh_keys_for`].
    async fn refresh_for(&self, token: &str) {
        let Some(url) = &self.url else { return };
        let Some(kid) = jwt_kid(token) else { return };
        if !self
            .keys
            .current()
            .iter()
            .any(|k| k.kid.as_deref() == Some(kid.as_str()))
        {
            url.refresh_unknown_kid(&kid).await;
        }
    }

    fn verify(&self, token: &str, now: u64) -> Result<Principal, String> {
        let mut parts = token.split('.');
        let (Some(head64), Some(body64), Some(sig64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("a JWT has three parts".into());
        };
        let decode = |part: &str, what: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| format!("the JWT {what} is not base64url"))
        };
        let header: Value = serde_json::from_slice(&decode(head64, "header")?)
            .map_err(|_| "the JWT header is not JSON".to_string())?;
        let alg = header.get("alg").and_then(Value::as_str).unwrap_or("none");
        let alg = Alg::parse(alg)
            .ok_or_else(|| format!("JWT algorithm {alg:?} is not accepted (RS256, ES256)"))?;
        let kid = header.get("kid").and_then(Value::as_str);
        let signature = decode(sig64, "signature")?;
        let message = &token.as_bytes()[..head64.len() + 1 + body64.len()];
        let keys = self.keys.current();
        let candidates: Vec<&Jwk> = keys
            .iter()
            // A token's kid picks its key; keys the set gives no kid may sign any token.
            .filter(|k| {
                k.alg == alg && (kid.is_none() || k.kid.is_none() || k.kid.as_deref() == kid)
            })
            .collect();
        if candidates.is_empty() {
            return Err(format!(
                "no {alg:?} key {} in the JWKS",
                kid.map(|k| format!("with kid {k:?}")).unwrap_or_default()
            ));
        }
        if !candidates.iter().any(|k| k.verify(message, &signature)) {
            return Err("the JWT signature is not valid".into());
        }
        let claims: Value = serde_json::from_slice(&decode(body64, "payload")?)
            .map_err(|_| "the JWT payload is not JSON".to_string())?;
        let time = |name: &str| claims.get(name).and_then(Value::as_f64);
        let now_f = now as f64;
        let leeway = self.leeway as f64;
        match time("exp") {
            None => return Err("the JWT has no exp (expiry)".into()),
            Some(exp) if now_f > exp + leeway => return Err("the JWT has expired".into()),
            Some(_) => {}
        }
        if time("nbf").is_some_and(|nbf| now_f + leeway < nbf) {
            return Err("the JWT is not valid yet (nbf)".into());
        }
        if claims.get("iss").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err("the JWT issuer (iss) is not http.jwt.issuer".into());
        }
        let audience_ok = match claims.get("aud") {
            Some(Value::String(a)) => *a == self.audience,
            Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(&self.audience)),
            _ => false,
        };
        if !audience_ok {
            return Err("the JWT audience (aud) does not include http.jwt.audience".into());
        }
        let mut node = &claims;
        for step in &self.roles_path {
            node = node.get(step).unwrap_or(&Value::Null);
        }
        let names: Vec<&str> = match node {
            Value::Array(list) => list.iter().filter_map(Value::as_str).collect(),
            Value::String(s) => s.split_whitespace().collect(),
            _ => Vec::new(),
        };
        let mut roles: Vec<Role> = names
            .iter()
            .filter_map(|n| n.strip_prefix(self.role_prefix.as_str()))
            .filter_map(Role::parse)
            .collect();
        roles.sort();
        roles.dedup();
        let subject = ["preferred_username", "sub"]
            .iter()
            .find_map(|c| claims.get(*c).and_then(Value::as_str))
            .unwrap_or("?");
        Ok(Principal {
            name: format!("jwt {subject}"),
            roles,
        })
    }
}

/// The `kid` of a JWT's header, if it is a JWT and names one.
fn jwt_kid(token: &str) -> Option<String> {
    let head = token.split('.').next()?;
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(head).ok()?).ok()?;
    header.get("kid")?.as_str().map(str::to_string)
}

/// The signing keys of a JWK Set document (RFC 7517) we can check signatures with.
pub(super) fn parse_key_set(text: &str) -> Result<Vec<Jwk>, String> {
    let set: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let list = set
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| "no \"keys\" list (a JWK Set, RFC 7517)".to_string())?;
    let mut keys = Vec::new();
    for k in list {
        if let Some(jwk) = Jwk::parse(k)? {
            keys.push(jwk);
        }
    }
    if keys.is_empty() {
        return Err("no RS256 (RSA) or ES256 (EC P-256) signing key in the set".into());
    }
    Ok(keys)
}

// ---------------------------------------------------------------------------------------
// API tokens

/// A new random API token (32 bytes from the system's CSPRNG, base64url).
pub fn generate_token() -> Result<String, AuthSetupError> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|e| AuthSetupError::Random(e.to_string()))?;
    Ok(format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

/// What the configuration holds of a token: the hex SHA-256 of its text.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

// ---------------------------------------------------------------------------------------
// The middleware and the login form

/// The role a request needs; `None`: open to all.
fn required_role(method: &Method, path: &str, metrics_open: bool) -> Option<Role> {
    match path {
        "/healthz" | "/login" | "/logout" => None,
        "/metrics" if metrics_open => None,
        "/metrics" => Some(Role::Metrics),
        p if *method == Method::POST && p.starts_with("/dicom-web/") => Some(Role::Write),
        _ => Some(Role::Read),
    }
}

fn is_page(path: &str) -> bool {
    matches!(path, "/" | "/ui")
}

/// Requests recorded in the audit trail when they pass: DICOMweb and the page (not the
/// Prometheus scrapes and health checks, which would drown it). Refusals are always recorded.
fn is_audited(path: &str) -> bool {
    path.starts_with("/dicom-web") || is_page(path)
}

/// An HTTP request for the audit trail: the path only, never the query string (a QIDO-RS
/// query may name a patient).
fn audit_request(
    state: &WebState,
    peer: Option<SocketAddr>,
    event_type: EventType,
    outcome: Outcome,
    actor: &str,
    route: String,
    detail: String,
) {
    let mut event = AuditEvent::new(event_type, outcome, actor)
        .object(route)
        .detail(detail);
    if let Some(peer) = peer {
        event = event.peer(peer);
    }
    state.audit.record(event);
}

fn peer_of(request: &Request) -> Option<SocketAddr> {
    request
        .extensions()
        .get::<ConnectInfo<super::ClientAddr>>()
        .map(|c| c.0 .0)
}

/// Every request passes here before its route.
pub async fn require(State(state): State<WebState>, mut request: Request, next: Next) -> Response {
    let auth = &state.auth;
    let path = request.uri().path().to_string();
    let Some(role) = required_role(request.method(), &path, auth.metrics_open) else {
        return next.run(request).await;
    };
    let peer = peer_of(&request);
    let route = format!("{} {path}", request.method());
    auth.refresh_keys_for_request(request.headers()).await;
    match auth.check(request.headers(), role) {
        Ok(principal) => {
            let who = principal.name.clone();
            request.extensions_mut().insert(principal);
            let response = next.run(request).await;
            if is_audited(&path) {
                let status = response.status();
                let outcome = match status.as_u16() {
                    0..=399 => Outcome::Success,
                    401 | 403 => Outcome::Refused,
                    _ => Outcome::Failure,
                };
                audit_request(
                    &state,
                    peer,
                    EventType::HttpRequest,
                    outcome,
                    &who,
                    route,
                    format!("status {}", status.as_u16()),
                );
            }
            response
        }
        Err(rejection) => {
            match &rejection {
                Rejection::Missing => tracing::debug!(%path, "HTTP request without credentials"),
                other => tracing::info!(%path, reason = %other, "HTTP request refused"),
            }
            let (event_type, outcome, who, status) = match &rejection {
                Rejection::Forbidden { who, .. } => {
                    (EventType::HttpRequest, Outcome::Refused, who.as_str(), 403)
                }
                _ => (
                    EventType::AuthFailure,
                    Outcome::Failure,
                    "unauthenticated",
                    401,
                ),
            };
            audit_request(
                &state,
                peer,
                event_type,
                outcome,
                who,
                route,
                format!("status {status}: {rejection}"),
            );
            refuse(&rejection, is_page(&path))
        }
    }
}

/// 401 (with `WWW-Authenticate`) or 403, with the reason: a login page for the web page,
/// one line of text elsewhere.
fn refuse(rejection: &Rejection, page: bool) -> Response {
    let (status, challenge) = match rejection {
        Rejection::Missing => (
            StatusCode::UNAUTHORIZED,
            format!("Bearer realm=\"{REALM}\""),
        ),
        Rejection::Invalid(why) => (
            StatusCode::UNAUTHORIZED,
            format!(
                "Bearer realm=\"{REALM}\", error=\"invalid_token\", error_description=\"{}\"",
                why.replace(['"', '\\'], "'")
            ),
        ),
        Rejection::Forbidden { .. } => (
            StatusCode::FORBIDDEN,
            format!("Bearer realm=\"{REALM}\", error=\"insufficient_scope\""),
        ),
    };
    let challenge = HeaderValue::from_str(&challenge)
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer realm=\"anatomy-node\""));
    let mut response = if page {
        let message = match rejection {
            Rejection::Missing => None,
            other => Some(other.to_string()),
        };
        (status, login_html(message.as_deref())).into_response()
    } else {
        (status, format!("{rejection}\n")).into_response()
    };
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, challenge);
    response
}

fn login_html(message: Option<&str>) -> ([(header::HeaderName, HeaderValue); 2], String) {
    let message = message
        .map(|m| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(m)))
        .unwrap_or_default();
    let html = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>anatomy-node · sign in</title><style>{STYLE}\
         form.login{{max-width:560px;background:#fff;padding:16px 20px;border-radius:6px}}\
         form.login input{{width:100%;box-sizing:border-box;font:inherit;padding:6px;margin:6px 0 12px}}\
         p.error{{color:#a00}}</style></head>\
         <body><main><h1>anatomy-node · sign in</h1>{message}\
         <form class=\"login\" method=\"post\" action=\"/login\">\
         <label for=\"token\">API token or OpenID Connect access token (role \"read\")</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"off\" required>\
         <button type=\"submit\">Sign in</button></form></main></body></html>"
    );
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        html,
    )
}

/// `GET /login`: the form.
pub async fn login_form() -> Response {
    login_html(None).into_response()
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
}

/// `POST /login`: a token good for `read` becomes the session cookie; the answer sends the
/// browser on to the page (a same-site navigation, so the SameSite=Strict cookie goes along).
pub async fn login(
    State(state): State<WebState>,
    peer: Option<axum::Extension<ConnectInfo<super::ClientAddr>>>,
    Form(form): Form<LoginForm>,
) -> Response {
    let peer = peer.map(|axum::Extension(ConnectInfo(p))| p.0);
    if let Some(locked) = locked_out(&state, peer) {
        return locked;
    }
    let token = form.token.trim();
    let cookie_safe = token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.~+/=".contains(&b));
    let principal = if cookie_safe {
        state.auth.refresh_keys_for(token).await;
        state.auth.authenticate(token)
    } else {
        Err("the token holds characters no token has".into())
    };
    let refused = match principal {
        Ok(p) if p.has(Role::Read) => {
            if let Some(peer) = peer {
                state.login_limit.succeeded(peer.ip());
            }
            tracing::info!(who = %p.name, "signed in to the web page");
            audit_request(
                &state,
                peer,
                EventType::HttpRequest,
                Outcome::Success,
                &p.name,
                "POST /login".into(),
                "signed in to the web page".into(),
            );
            let secure = if state.auth.tls { "; Secure" } else { "" };
            let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict{secure}");
            let Ok(cookie) = HeaderValue::from_str(&cookie) else {
                return (StatusCode::BAD_REQUEST, "unusable token\n").into_response();
            };
            let html = format!(
                "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
                 <meta http-equiv=\"refresh\" content=\"0; url=/\">\
                 <title>anatomy-node · signed in</title><style>{STYLE}</style></head>\
                 <body><main><p>Signed in. <a href=\"/\">The recent series</a></p></main>\
                 </body></html>"
            );
            return (
                StatusCode::OK,
                [
                    (header::SET_COOKIE, cookie),
                    (
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/html; charset=utf-8"),
                    ),
                    (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
                ],
                html,
            )
                .into_response();
        }
        Ok(p) => Rejection::Forbidden {
            who: p.name,
            role: Role::Read,
        },
        Err(why) => Rejection::Invalid(why),
    };
    tracing::info!(reason = %refused, "web page sign-in refused");
    if let (Rejection::Invalid(_), Some(peer)) = (&refused, peer) {
        if state.login_limit.failed(peer.ip()) {
            tracing::warn!(peer = %peer.ip(), "too many failed sign-ins: the address is locked out of /login for http.login_lockout_secs");
        }
    }
    let (event_type, outcome, who) = match &refused {
        Rejection::Forbidden { who, .. } => {
            (EventType::HttpRequest, Outcome::Refused, who.as_str())
        }
        _ => (EventType::AuthFailure, Outcome::Failure, "unauthenticated"),
    };
    audit_request(
        &state,
        peer,
        event_type,
        outcome,
        who,
        "POST /login".into(),
        format!("sign-in refused: {refused}"),
    );
    refuse(&refused, true)
}

/// 429 with Retry-After (audited) while `peer` is locked out of `/login` after too many
/// failed sign-ins; `None` when it may try.
fn locked_out(state: &WebState, peer: Option<SocketAddr>) -> Option<Response> {
    let peer = peer?;
    let wait = state.login_limit.check(peer.ip()).err()?;
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    tracing::info!(peer = %peer.ip(), retry_after = secs, "sign-in refused: too many failed sign-ins from this address");
    audit_request(
        state,
        Some(peer),
        EventType::AuthFailure,
        Outcome::Refused,
        "unauthenticated",
        "POST /login".into(),
        format!("status 429: too many failed sign-ins from this address; retry after {secs} s"),
    );
    Some(
        (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, HeaderValue::from(secs))],
            format!("Too many failed sign-ins from this address; try again in {secs} s.\n"),
        )
            .into_response(),
    )
}

/// `POST /logout`: the cookie is cleared.
pub async fn logout() -> Response {
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                HeaderValue::from_static(
                    "anatomy_token=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
                ),
            ),
            (header::LOCATION, HeaderValue::from_static("/login")),
        ],
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(tokens: &[(&str, &str, &[Role])], anonymous: bool) -> Authenticator {
        let http = HttpConfig {
            anonymous,
            tokens: TokenList(
                tokens
                    .iter()
                    .map(|(name, token, roles)| TokenEntry {
                        name: name.to_string(),
                        sha256: token_hash(token),
                        roles: roles.to_vec(),
                    })
                    .collect(),
            ),
            ..HttpConfig::default()
        };
        Authenticator::from_config(&http).expect("valid")
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
        );
        h
    }

    #[test]
    fn tokens_are_checked_by_hash_and_role() {
        let a = auth(&[("viewer", "anp_secret1", &[Role::Read])], false);
        let p = a
            .check(&bearer("anp_secret1"), Role::Read)
            .expect("read ok");
        assert_eq!(p.name, "token viewer");
        assert!(matches!(
            a.check(&bearer("anp_secret1"), Role::Write),
            Err(Rejection::Forbidden { .. })
        ));
        assert!(matches!(
            a.check(&bearer("anp_other"), Role::Read),
            Err(Rejection::Invalid(_))
        ));
        assert_eq!(
            a.check(&HeaderMap::new(), Role::Read),
            Err(Rejection::Missing)
        );
        let mut cookie = HeaderMap::new();
        cookie.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; anatomy_token=anp_secret1"),
        );
        assert!(a.check(&cookie, Role::Read).is_ok());
    }

    #[test]
    fn admin_has_every_role_and_anonymous_only_without_credentials() {
        let a = auth(&[("ops", "anp_ops", &[Role::Admin])], true);
        for role in Role::ALL {
            assert!(a.check(&bearer("anp_ops"), role).is_ok());
            assert!(a.check(&HeaderMap::new(), role).is_ok());
        }
        assert!(a.check(&bearer("anp_wrong"), Role::Read).is_err());
    }

    #[test]
    fn no_credentials_and_no_anonymous_is_refused() {
        let http = HttpConfig {
            anonymous: false,
            ..HttpConfig::default()
        };
        assert!(matches!(
            Authenticator::from_config(&http),
            Err(AuthSetupError::NoCredentials)
        ));
    }

    #[test]
    fn tokens_file_adds_tokens() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("tokens.toml");
        std::fs::write(
            &file,
            format!(
                "[[tokens]]\nname = \"scanner\"\nsha256 = \"{}\"\nroles = [\"write\"]\n",
                token_hash("anp_from_file")
            ),
        )
        .expect("write");
        let http = HttpConfig {
            anonymous: false,
            tokens_file: Some(file.clone()),
            ..HttpConfig::default()
        };
        let a = Authenticator::from_config(&http).expect("valid");
        assert!(a.check(&bearer("anp_from_file"), Role::Write).is_ok());
        std::fs::write(
            &file,
            "[[tokens]]\nname = \"x\"\nsha256 = \"abc\"\nroles = [\"read\"]\n",
        )
        .expect("write");
        let err = Authenticator::from_config(&http).err().expect("a bad hash");
        assert!(err.to_string().contains("64 hex digits"), "{err}");
    }

    #[test]
    fn token_list_text_form() {
        let hash = token_hash("x");
        let list: TokenList = serde_json::from_value(Value::String(format!(
            "a:{hash}:read+write, b:{hash}:metrics"
        )))
        .expect("valid");
        assert_eq!(list.0.len(), 2);
        assert_eq!(list.0[0].roles, vec![Role::Read, Role::Write]);
        assert!(
            serde_json::from_value::<TokenList>(Value::String(format!("a:{hash}:root"))).is_err()
        );
    }

    #[test]
    fn routes_need_their_roles() {
        assert_eq!(required_role(&Method::GET, "/healthz", false), None);
        assert_eq!(
            required_role(&Method::GET, "/metrics", false),
            Some(Role::Metrics)
        );
        assert_eq!(required_role(&Method::GET, "/metrics", true), None);
        assert_eq!(
            required_role(&Method::POST, "/dicom-web/studies", false),
            Some(Role::Write)
        );
        assert_eq!(
            required_role(&Method::GET, "/dicom-web/studies", false),
            Some(Role::Read)
        );
        assert_eq!(required_role(&Method::GET, "/", false), Some(Role::Read));
    }

    #[test]
    fn generated_tokens_are_random_and_prefixed() {
        let (a, b) = (generate_token().expect("a"), generate_token().expect("b"));
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() > 40);
        assert_ne!(a, b);
        assert_eq!(token_hash(&a).len(), 64);
    }
}
