//! The HTTP port: `/healthz` for load balancers and systemd watchdogs, `/metrics` for
//! Prometheus, DICOMweb under `/dicom-web` (QIDO-RS [`qido`], STOW-RS [`stow`], WADO-RS
//! [`wado`] with [`render`]ed frames), and a page of the recent series at `/` ([`page`]).
//! Every route but `/healthz` needs credentials with a role ([`auth`]); the port speaks
//! HTTPS when a certificate is configured ([`tls`]).

pub mod auth;
mod error;
pub mod json;
pub mod jwks;
pub mod login_limit;
mod page;
pub mod qido;
pub mod render;
pub mod request;
pub mod stow;
pub mod tls;
pub mod wado;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::Semaphore;

use crate::config::Config;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::store::Store;

pub use error::WebError;

/// The client's address, for the audit trail (`ConnectInfo<ClientAddr>`, plain or HTTPS).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::SocketAddr);

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>>
    for ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tls::TlsListener>>
    for ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tls::TlsListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}

/// Rendered frames decoded at once (each holds a frame in memory and a core busy).
const RENDER_SLOTS: usize = 2;

#[derive(Clone)]
pub struct WebState {
    pub index: Index,
    pub metrics: Arc<Metrics>,
    /// One line on the classifier ("ready ...", "unavailable: why", "disabled").
    pub classifier: Arc<String>,
    /// STOW-RS stores through the same store as C-STORE.
    pub store: Arc<Store>,
    pub config: Arc<Config>,
    pub render_slots: Arc<Semaphore>,
    /// Who may do what on the port.
    pub auth: Arc<auth::Authenticator>,
    /// The audit trail (requests, authentication failures).
    pub audit: crate::audit::AuditLog,
    /// Failed sign-ins on `/login` by client address.
    pub login_limit: Arc<login_limit::LoginLimiter>,
}

impl WebState {
    pub fn new(
        index: Index,
        metrics: Arc<Metrics>,
        classifier: Arc<String>,
        store: Arc<Store>,
        config: Arc<Config>,
        auth: Arc<auth::Authenticator>,
    ) -> WebState {
        let http = &config.http;
        let login_limit = Arc::new(login_limit::LoginLimiter::new(
            http.login_max_failures,
            std::time::Duration::from_secs(http.login_window_secs),
            std::time::Duration::from_secs(http.login_lockout_secs),
        ));
        WebState {
            index,
            metrics,
            classifier,
            store,
            config,
            render_slots: Arc::new(Semaphore::new(RENDER_SLOTS)),
            auth,
            audit: crate::audit::AuditLog::disabled(),
            login_limit,
        }
    }

    /// Record requests and authentication failures in `audit`.
    pub fn with_audit(mut self, audit: crate::audit::AuditLog) -> WebState {
        self.audit = audit;
        self
    }

    /// `host:port` of the HTTP port as configured, for URLs when a request has no Host.
    pub fn http_host(&self) -> String {
        std::net::SocketAddr::new(self.config.http.bind, self.config.http.port).to_string()
    }
}

pub fn router(state: WebState) -> Router {
    let instance = "/dicom-web/studies/{study}/series/{series}/instances/{instance}";
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/", get(page::index))
        .route("/ui", get(page::index))
        .route("/login", get(auth::login_form).post(auth::login))
        .route("/logout", post(auth::logout))
        .route(
            "/dicom-web/studies",
            get(qido::studies).post(stow::store_instances),
        )
        .route(
            "/dicom-web/studies/{study}",
            post(stow::store_study_instances),
        )
        .route("/dicom-web/studies/{study}/series", get(qido::study_series))
        .route(
            "/dicom-web/studies/{study}/instances",
            get(qido::study_instances),
        )
        .route(
            "/dicom-web/studies/{study}/series/{series}/instances",
            get(qido::series_instances),
        )
        .route("/dicom-web/series", get(qido::series))
        .route("/dicom-web/instances", get(qido::instances))
        .route(instance, get(wado::retrieve_instance))
        .route(
            &format!("{instance}/rendered"),
            get(wado::rendered_instance),
        )
        .route(
            &format!("{instance}/frames/{{frames}}/rendered"),
            get(wado::rendered_frame),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require,
        ))
        .with_state(state)
}

/// 200 when the index answers (the node can take images), 503 with the reason otherwise.
/// The second line says whether series are being classified.
async fn healthz(State(state): State<WebState>) -> impl IntoResponse {
    match tokio::time::timeout(Duration::from_secs(3), state.index.ping()).await {
        Ok(Ok(())) => (
            StatusCode::OK,
            format!("ok\nclassifier: {}\n", state.classifier),
        ),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("index unavailable: {e}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "index did not answer within 3 s\n".to_string(),
        ),
    }
}

async fn metrics(State(state): State<WebState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
