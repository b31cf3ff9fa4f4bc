//! What every DICOMweb request needs: media types (Content-Type, Accept), the service's
//! base URL for Retrieve URLs, and UIDs taken from the path.

use axum::http::{header, HeaderMap};

use super::error::WebError;

/// A media type with its parameters: names in lower case, values unquoted.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaType {
    /// `type/subtype` in lower case.
    pub essence: String,
    pub params: Vec<(String, String)>,
}

impl MediaType {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// True for `*/*`, `type/*` or the same essence.
    pub fn covers(&self, essence: &str) -> bool {
        let (kind, _) = essence.split_once('/').unwrap_or((essence, ""));
        self.essence == "*/*"
            || self.essence == essence
            || self
                .essence
                .strip_suffix("/*")
                .is_some_and(|k| k.eq_ignore_ascii_case(kind))
    }

    /// The quality an Accept entry gives (`q`, default 1).
    pub fn quality(&self) -> f32 {
        self.param("q")
            .and_then(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0)
    }
}

/// Parse `type/subtype; name=value; name="quoted value"`.
pub fn parse_media_type(text: &str) -> Option<MediaType> {
    let parts = split_outside_quotes(text, ';');
    let mut parts = parts.into_iter();
    let essence = parts.next()?.trim().to_ascii_lowercase();
    let (kind, sub) = essence.split_once('/')?;
    if kind.is_empty() || sub.is_empty() || essence.contains(char::is_whitespace) {
        return None;
    }
    let mut params = Vec::new();
    for p in parts {
        let p = p.trim();
        if p.is_empty() {
            continue;
        }
        let (name, value) = p.split_once('=')?;
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .map(|v| v.replace("\\\"", "\""))
            .unwrap_or_else(|| value.to_string());
        params.push((name.trim().to_ascii_lowercase(), value));
    }
    Some(MediaType { essence, params })
}

/// Split at `sep` where it is not inside a quoted string.
fn split_outside_quotes(text: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let mut quoted = false;
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                out.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out
}

/// The media ranges of the Accept header fields (and of an `accept` query parameter), those
/// with q=0 left out. Empty: anything is acceptable.
pub fn accepted(headers: &HeaderMap, query_accept: Option<&str>) -> Vec<MediaType> {
    let mut out = Vec::new();
    let values = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .chain(query_accept);
    for value in values {
        for range in split_outside_quotes(value, ',') {
            if let Some(m) = parse_media_type(range) {
                if m.quality() > 0.0 {
                    out.push(m);
                }
            }
        }
    }
    out
}

/// The base of the DICOMweb URLs this node gives out (Retrieve URL, the page's images):
/// `http://<Host of the request>/dicom-web`, or the configured address without a Host.
pub fn base_url(headers: &HeaderMap, fallback_host: &str) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.:[]_".contains(c))
        })
        .unwrap_or(fallback_host);
    format!("http://{host}/dicom-web")
}

/// A UID from the path: never a list, a wild card or empty, so it can only match itself.
/// The value is otherwise taken as sent: the index also holds UIDs that do not follow
/// the UID grammar (anonymisers write hex strings).
pub fn path_uid(uid: &str, what: &str) -> Result<String, WebError> {
    let uid = uid.trim();
    if uid.is_empty()
        || uid.len() > 64
        || uid
            .chars()
            .any(|c| matches!(c, '\\' | ',' | '*' | '?' | '/') || c.is_control())
    {
        return Err(WebError::BadRequest(format!(
            "{what} {uid:?} in the path is not a UID"
        )));
    }
    Ok(uid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn media_types_with_quoted_parameters() {
        let m = parse_media_type(
            "Multipart/Related; type=\"application/dicom\"; boundary=\"a;b c\"; start=x",
        )
        .unwrap();
        assert_eq!(m.essence, "multipart/related");
        assert_eq!(m.param("type"), Some("application/dicom"));
        assert_eq!(m.param("boundary"), Some("a;b c"));
        assert_eq!(m.param("start"), Some("x"));
        assert!(parse_media_type("nonsense").is_none());
        assert!(parse_media_type("text/plain; broken").is_none());
    }

    #[test]
    fn accept_lists_and_ranges() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static(
                "multipart/related; type=\"application/dicom\"; transfer-syntax=*, image/*;q=0.5, text/html;q=0",
            ),
        );
        let list = accepted(&headers, None);
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].param("transfer-syntax"), Some("*"));
        assert!(list[1].covers("image/png"));
        assert!(!list[1].covers("application/dicom"));
    }

    #[test]
    fn uids_in_paths() {
        assert_eq!(path_uid("1.2.3", "study").unwrap(), "1.2.3");
        for bad in ["", "*", "1.2\\1.3", "1.2,1.3", "1.?"] {
            assert!(path_uid(bad, "study").is_err(), "{bad}");
        }
    }

    #[test]
    fn base_url_from_host() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            base_url(&headers, "127.0.0.1:8042"),
            "http://127.0.0.1:8042/dicom-web"
        );
        headers.insert(header::HOST, HeaderValue::from_static("node.example:80"));
        assert_eq!(base_url(&headers, "x"), "http://node.example:80/dicom-web");
        headers.insert(header::HOST, HeaderValue::from_static("evil\"host"));
        assert_eq!(base_url(&headers, "x"), "http://x/dicom-web");
    }
}
