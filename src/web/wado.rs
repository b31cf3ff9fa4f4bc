//! WADO-RS (PS3.18 10.4): an instance as stored (multipart/related, application/dicom,
//! never transcoded), and rendered frames as PNG.

use std::io::Cursor;
use std::path::PathBuf;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use sqlx::Row;
use tokio::io::AsyncReadExt;
use tokio_util::io::ReaderStream;
use tracing::warn;

use super::error::WebError;
use super::render::{self, RenderError};
use super::request::{accepted, path_uid};
use super::WebState;

/// An instance the index knows, and where its file is.
pub struct StoredInstance {
    pub path: PathBuf,
    pub transfer_syntax_uid: String,
    pub sop_class_uid: String,
    pub frames: i64,
    pub is_image: bool,
}

type Params = Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>;

fn query_params(p: Params) -> Result<Vec<(String, String)>, WebError> {
    p.map(|Query(v)| v)
        .map_err(|e| WebError::BadRequest(format!("cannot read the query string: {e}")))
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

pub async fn lookup(
    state: &WebState,
    study: &str,
    series: &str,
    instance: &str,
) -> Result<StoredInstance, WebError> {
    let (study, series, instance) = (
        path_uid(study, "Study Instance UID")?,
        path_uid(series, "Series Instance UID")?,
        path_uid(instance, "SOP Instance UID")?,
    );
    let row = sqlx::query(
        "SELECT i.file_path, i.transfer_syntax_uid, i.sop_class_uid, i.number_of_frames, \
         i.image_rows FROM instances i JOIN series s ON s.id = i.series_ref \
         JOIN studies st ON st.id = s.study_ref \
         WHERE i.sop_instance_uid = $1 AND s.series_uid = $2 AND st.study_uid = $3",
    )
    .bind(&instance)
    .bind(&series)
    .bind(&study)
    .fetch_optional(state.index.pool())
    .await?
    .ok_or_else(|| {
        WebError::NotFound(format!(
            "no instance {instance} in series {series} of study {study}"
        ))
    })?;
    let file_path: String = row.try_get(0)?;
    Ok(StoredInstance {
        path: state.store.root().join(file_path),
        transfer_syntax_uid: row.try_get(1)?,
        sop_class_uid: row.try_get(2)?,
        frames: row.try_get::<Option<i64>, _>(3)?.unwrap_or(1).max(1),
        is_image: row.try_get::<Option<i64>, _>(4)?.is_some(),
    })
}

/// How the instance goes out.
#[derive(Debug, PartialEq)]
enum Form {
    Multipart,
    /// A bare `application/dicom` body, for clients that ask for exactly that.
    Single,
}

fn negotiate(headers: &HeaderMap, query_accept: Option<&str>, ts: &str) -> Result<Form, WebError> {
    let list = accepted(headers, query_accept);
    if list.is_empty() {
        return Ok(Form::Multipart);
    }
    let syntax_ok = |m: &super::request::MediaType| {
        m.param("transfer-syntax")
            .is_none_or(|t| t == "*" || t == ts)
    };
    for m in &list {
        if m.essence == "*/*" {
            return Ok(Form::Multipart);
        }
        if m.covers("multipart/related")
            && m.param("type")
                .is_none_or(|t| t.eq_ignore_ascii_case("application/dicom"))
            && syntax_ok(m)
        {
            return Ok(Form::Multipart);
        }
        if m.essence == "application/dicom" && syntax_ok(m) {
            return Ok(Form::Single);
        }
    }
    Err(WebError::NotAcceptable(format!(
        "this instance is available as multipart/related; type=\"application/dicom\"; \
         transfer-syntax={ts} (stored as received, never transcoded)"
    )))
}

async fn retrieve(
    state: WebState,
    (study, series, instance): (String, String, String),
    params: Params,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let params = query_params(params)?;
    let stored = lookup(&state, &study, &series, &instance).await?;
    let ts = stored.transfer_syntax_uid.clone();
    let form = negotiate(&headers, param(&params, "accept"), &ts)?;
    let file = tokio::fs::File::open(&stored.path).await.map_err(|e| {
        warn!(path = %stored.path.display(), error = %e, "an indexed instance cannot be read");
        WebError::Internal(format!(
            "the stored file of instance {instance} cannot be read: {e}"
        ))
    })?;
    let len = file
        .metadata()
        .await
        .map_err(|e| WebError::Internal(format!("cannot read the stored file: {e}")))?
        .len();
    let part_type = format!("application/dicom; transfer-syntax={ts}");
    let (content_type, prefix, suffix) = match form {
        Form::Single => (part_type, String::new(), String::new()),
        Form::Multipart => {
            // A boundary no stored byte sequence will contain by chance.
            let digest = Sha256::digest(format!("{instance}{}", crate::store::now_millis()));
            let boundary = format!("anatomy-node-{}", hex::encode(&digest[..16]));
            (
                format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
                format!(
                    "--{boundary}\r\nContent-Type: {part_type}\r\nContent-Length: {len}\r\n\r\n"
                ),
                format!("\r\n--{boundary}--\r\n"),
            )
        }
    };
    let total = len + prefix.len() as u64 + suffix.len() as u64;
    let reader = Cursor::new(prefix.into_bytes())
        .chain(file)
        .chain(Cursor::new(suffix.into_bytes()));
    let body = Body::from_stream(ReaderStream::with_capacity(reader, 64 * 1024));
    let content_type = HeaderValue::from_str(&content_type)
        .map_err(|e| WebError::Internal(format!("bad Content-Type: {e}")))?;
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_LENGTH, HeaderValue::from(total)),
        ],
        body,
    )
        .into_response())
}

pub async fn retrieve_instance(
    State(state): State<WebState>,
    Path(uids): Path<(String, String, String)>,
    headers: HeaderMap,
    params: Params,
) -> Response {
    retrieve(state, uids, params, headers).await.into_response()
}

async fn rendered(
    state: WebState,
    (study, series, instance): (String, String, String),
    frame: u32,
    params: Params,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let params = query_params(params)?;
    let accept = accepted(&headers, param(&params, "accept"));
    if !accept.is_empty() && !accept.iter().any(|m| m.covers("image/png")) {
        return Err(WebError::NotAcceptable(
            "rendered images are image/png only".into(),
        ));
    }
    let window = param(&params, "window")
        .map(render::parse_window)
        .transpose()
        .map_err(WebError::BadRequest)?;
    let viewport = param(&params, "viewport")
        .map(render::parse_viewport)
        .transpose()
        .map_err(WebError::BadRequest)?
        .unwrap_or((render::DEFAULT_MAX_SIDE, render::DEFAULT_MAX_SIDE));
    let stored = lookup(&state, &study, &series, &instance).await?;
    if !stored.is_image {
        return Err(WebError::NotAcceptable(format!(
            "instance {instance} is not an image (SOP class {})",
            stored.sop_class_uid
        )));
    }
    if i64::from(frame) >= stored.frames {
        return Err(WebError::NotFound(format!(
            "frame {} of instance {instance}: it has {} frame(s)",
            frame + 1,
            stored.frames
        )));
    }
    // Decoding takes memory and CPU: a few at a time, however many thumbnails a page asks for.
    let _slot = state
        .render_slots
        .acquire()
        .await
        .map_err(|_| WebError::Unavailable("shutting down".into()))?;
    let is_ct = render::is_ct(&stored.sop_class_uid);
    let path = stored.path.clone();
    let png = tokio::task::spawn_blocking(move || {
        render::render_png(&path, frame, window, is_ct, viewport)
    })
    .await
    .map_err(|e| WebError::Internal(format!("rendering crashed: {e}")))?
    .map_err(|e| match e {
        RenderError::Unrenderable(m) => WebError::NotAcceptable(m),
        RenderError::Broken(m) => {
            warn!(path = %stored.path.display(), error = %m, "cannot render a stored instance");
            WebError::Internal(m)
        }
    })?;
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("image/png")),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, max-age=300"),
            ),
        ],
        png,
    )
        .into_response())
}

pub async fn rendered_instance(
    State(state): State<WebState>,
    Path(uids): Path<(String, String, String)>,
    headers: HeaderMap,
    params: Params,
) -> Response {
    rendered(state, uids, 0, params, headers)
        .await
        .into_response()
}

pub async fn rendered_frame(
    State(state): State<WebState>,
    Path((study, series, instance, frames)): Path<(String, String, String, String)>,
    headers: HeaderMap,
    params: Params,
) -> Response {
    let frame = match frames.trim().parse::<u32>() {
        Ok(n) if n >= 1 => n - 1,
        _ => {
            return WebError::BadRequest(format!(
                "frames/{frames}: give one frame number, counted from 1"
            ))
            .into_response()
        }
    };
    rendered(state, (study, series, instance), frame, params, headers)
        .await
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn media_types_of_a_retrieve() {
        let ts = "1.2.840.10008.1.2.4.90";
        assert_eq!(
            negotiate(&HeaderMap::new(), None, ts).unwrap(),
            Form::Multipart
        );
        assert_eq!(
            negotiate(
                &accept("multipart/related; type=\"application/dicom\"; transfer-syntax=*"),
                None,
                ts
            )
            .unwrap(),
            Form::Multipart
        );
        assert_eq!(
            negotiate(&accept("application/dicom"), None, ts).unwrap(),
            Form::Single
        );
        assert!(matches!(
            negotiate(
                &accept("multipart/related; type=\"application/dicom\"; transfer-syntax=1.2.840.10008.1.2.1"),
                None,
                ts
            ),
            Err(WebError::NotAcceptable(_))
        ));
        assert!(negotiate(&accept("image/jpeg"), None, ts).is_err());
    }
}
