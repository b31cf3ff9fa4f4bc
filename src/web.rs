//! The HTTP port: `/healthz` for load balancers and systemd watchdogs, `/metrics` for
//! Prometheus.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::index::Index;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct WebState {
    pub index: Index,
    pub metrics: Arc<Metrics>,
    /// One line on the classifier ("ready ...", "unavailable: why", "disabled").
    pub classifier: Arc<String>,
}

pub fn router(state: WebState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
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
