//! Errors of the HTTP services, each with the status a client gets and a message that says
//! what to change (plain text, one line).

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use tracing::warn;

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// The request cannot be understood as sent (bad parameter, malformed body): 400.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// None of the media types the Accept header allows can be produced: 406.
    #[error("{0}")]
    NotAcceptable(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The index or the disk is out of reach for now: 503, try again later.
    #[error("{0}")]
    Unavailable(String),
    /// A fault of this node (a stored file missing, a query that failed): 500.
    #[error("{0}")]
    Internal(String),
}

impl WebError {
    pub fn status(&self) -> StatusCode {
        match self {
            WebError::BadRequest(_) => StatusCode::BAD_REQUEST,
            WebError::NotFound(_) => StatusCode::NOT_FOUND,
            WebError::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            WebError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            WebError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            WebError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            WebError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<sqlx::Error> for WebError {
    fn from(e: sqlx::Error) -> Self {
        warn!(error = %e, "index query failed");
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                WebError::Unavailable(format!("index unavailable: {e}"))
            }
            e => WebError::Internal(format!("index query failed: {e}")),
        }
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        (
            self.status(),
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{self}\n"),
        )
            .into_response()
    }
}
