//! The DICOMweb client of `archive.retrieve = "dicomweb"` (PS3.18): QIDO-RS searches with
//! `limit`/`offset` paging, WADO-RS retrieval of one instance at a time (its multipart body
//! streamed into the spool, never held whole). Blocking (ureq); the caller runs it on the
//! blocking pool. HTTP, or HTTPS verified against `archive.dicomweb_ca_file`; every request
//! carries the bearer token of `archive.dicomweb_token` (or its file) when one is set.

use std::io::Read;
use std::time::Duration;

use dicom_core::Tag;

use super::answer::Answer;
use super::spool::Spool;

/// Results asked for per QIDO-RS request.
const PAGE: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
    #[error("{url}: HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: {reason}")]
    Body { url: String, reason: String },
    #[error("writing a retrieved instance: {0}")]
    Spool(std::io::Error),
    #[error("{url}: more than {max} answers to one search")]
    TooManyAnswers { url: String, max: usize },
    #[error("{url}: the {what} is larger than {key} ({limit_mb} MB); refused")]
    TooLarge {
        url: String,
        what: &'static str,
        key: &'static str,
        limit_mb: u64,
    },
}

/// The most a response may hold (archive.dicomweb_max_search_mb, _instance_mb), in MB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub search_mb: u64,
    pub instance_mb: u64,
}

const MB: u64 = 1024 * 1024;

pub struct DicomWeb {
    agent: ureq::Agent,
    base: String,
    limits: Limits,
}

/// How the client proves who it is and whom it trusts (see `ArchiveConfig::web_security`).
#[derive(Default)]
pub struct WebSecurity {
    /// `Authorization: Bearer` on every request.
    pub token: Option<String>,
    /// HTTPS: the CA the archive's certificate must chain to.
    pub tls: Option<ureq::tls::TlsConfig>,
}

impl DicomWeb {
    pub fn new(
        base: &str,
        connect: Duration,
        read: Duration,
        limits: Limits,
        security: WebSecurity,
    ) -> DicomWeb {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(connect))
            .timeout_per_read(Some(read))
            .timeout_per_write(Some(read));
        if let Some(tls) = security.tls {
            config = config.tls_config(tls);
        }
        if let Some(value) = security
            .token
            .and_then(|t| ureq::http::HeaderValue::from_str(&format!("Bearer {t}")).ok())
        {
            // Middleware, so every request (QIDO-RS pages, WADO-RS) carries it.
            config = config.middleware(
                move |mut request: ureq::http::Request<ureq::SendBody>,
                      next: ureq::middleware::MiddlewareNext| {
                    request
                        .headers_mut()
                        .insert(ureq::http::header::AUTHORIZATION, value.clone());
                    next.handle(request)
                },
            );
        }
        DicomWeb {
            agent: config.build().into(),
            base: base.trim_end_matches('/').to_string(),
            limits,
        }
    }

    /// A QIDO-RS search (`path` such as `studies` or `studies/{uid}/series`), every page.
    /// `params` are attribute matches (tag → value); `fields` go to `includefield`.
    pub fn search(
        &self,
        path: &str,
        params: &[(Tag, String)],
        fields: &[Tag],
        max_answers: usize,
    ) -> Result<Vec<Answer>, WebError> {
        let mut query: Vec<String> = params
            .iter()
            .map(|(tag, value)| format!("{}={}", tag_key(*tag), encode(value)))
            .collect();
        if !fields.is_empty() {
            let list: Vec<String> = fields.iter().map(|t| tag_key(*t)).collect();
            query.push(format!("includefield={}", list.join(",")));
        }
        let mut answers = Vec::new();
        loop {
            let url = format!(
                "{}/{path}?{}&limit={PAGE}&offset={}",
                self.base,
                query.join("&"),
                answers.len()
            );
            let mut response = self
                .agent
                .get(&url)
                .header("Accept", "application/dicom+json")
                .call()
                .map_err(|e| WebError::Http {
                    url: url.clone(),
                    reason: e.to_string(),
                })?;
            let status = response.status().as_u16();
            // PS3.18 8.3.4.4: "299 ...: There are additional results that can be
            // requested": a server that capped a page below `limit` says so.
            let more = response
                .headers()
                .get_all("warning")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.to_ascii_lowercase().contains("additional results"));
            if status == 204 {
                break;
            }
            let body = response
                .body_mut()
                .with_config()
                .limit(self.limits.search_mb.saturating_mul(MB))
                .read_to_string()
                .map_err(|e| match e {
                    ureq::Error::BodyExceedsLimit(_) => WebError::TooLarge {
                        url: url.clone(),
                        what: "QIDO-RS response",
                        key: "archive.dicomweb_max_search_mb",
                        limit_mb: self.limits.search_mb,
                    },
                    e => WebError::Body {
                        url: url.clone(),
                        reason: e.to_string(),
                    },
                })?;
            if status != 200 {
                return Err(WebError::Status {
                    url,
                    status,
                    body: body.chars().take(300).collect(),
                });
            }
            let page: Vec<serde_json::Value> =
                serde_json::from_str(&body).map_err(|e| WebError::Body {
                    url: url.clone(),
                    reason: format!("not a DICOM JSON array: {e}"),
                })?;
            let n = page.len();
            for item in &page {
                answers.push(Answer::from_json(item).map_err(|reason| WebError::Body {
                    url: url.clone(),
                    reason,
                })?);
            }
            if answers.len() > max_answers {
                return Err(WebError::TooManyAnswers {
                    url,
                    max: max_answers,
                });
            }
            if n == 0 || (n < PAGE && !more) {
                break;
            }
        }
        Ok(answers)
    }

    /// WADO-RS: one instance into the spool (when the spool expects it). Returns whether
    /// it was stored.
    pub fn retrieve_instance(
        &self,
        study: &str,
        series: &str,
        sop: &str,
        spool: &Spool,
    ) -> Result<bool, WebError> {
        let url = format!(
            "{}/studies/{}/series/{}/instances/{}",
            self.base,
            encode(study),
            encode(series),
            encode(sop)
        );
        let response = self
            .agent
            .get(&url)
            .header("Accept", "multipart/related; type=\"application/dicom\"")
            .call()
            .map_err(|e| WebError::Http {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let (_, body) = response.into_parts();
        let mut reader = body.into_reader();
        if status == 404 {
            // Not (or no longer) in the archive: the caller counts it as not sent, as a
            // C-MOVE or C-GET that finds nothing; the other instances go on.
            return Ok(false);
        }
        if status != 200 {
            let mut text = String::new();
            let _ = reader.take(300).read_to_string(&mut text);
            return Err(WebError::Status {
                url,
                status,
                body: text,
            });
        }
        let Some(boundary) = boundary_of(&content_type) else {
            return Err(WebError::Body {
                url,
                reason: format!("Content-Type {content_type:?} is not multipart with a boundary"),
            });
        };
        let Some(mut incoming) = spool.begin_file(sop).map_err(WebError::Spool)? else {
            return Ok(false);
        };
        // The part is written as it arrives, so it is bounded as it arrives: an incoming
        // file dropped on an error is removed.
        let max = self.limits.instance_mb.saturating_mul(MB);
        let mut too_large = false;
        let copied = copy_first_part(&mut reader, &boundary, &mut |bytes| {
            if incoming.bytes().saturating_add(bytes.len() as u64) > max {
                too_large = true;
                return Err(std::io::Error::other("instance too large"));
            }
            incoming.write(bytes)
        });
        if too_large {
            return Err(WebError::TooLarge {
                url,
                what: "WADO-RS instance",
                key: "archive.dicomweb_max_instance_mb",
                limit_mb: self.limits.instance_mb,
            });
        }
        copied.map_err(|e| WebError::Body {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        if incoming.bytes() < 132 {
            return Err(WebError::Body {
                url,
                reason: "the part is too short to be a DICOM file".into(),
            });
        }
        spool.finish(incoming).map_err(WebError::Spool)?;
        Ok(true)
    }
}

/// `00100020`: QIDO-RS names attributes by tag.
fn tag_key(tag: Tag) -> String {
    format!("{:04X}{:04X}", tag.0, tag.1)
}

/// Percent-encoding of a query value or path segment (RFC 3986 unreserved characters, and
/// the `,` `*` of QIDO-RS lists and wild cards, stay as they are).
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~,*".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn boundary_of(content_type: &str) -> Option<String> {
    if !content_type
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("multipart/")
    {
        return None;
    }
    content_type.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k.trim().eq_ignore_ascii_case("boundary"))
            .then(|| v.trim().trim_matches('"').to_string())
            .filter(|b| !b.is_empty())
    })
}

/// Stream the body of the first part of a multipart body to `sink` (PS3.18 8.6.1.2: one
/// part per instance; the others, if any, are not read).
fn copy_first_part(
    reader: &mut impl Read,
    boundary: &str,
    sink: &mut impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let bad = |why: &str| std::io::Error::other(why.to_string());
    let opening = format!("--{boundary}");
    let delimiter = format!("\r\n--{boundary}").into_bytes();
    let mut buf: Vec<u8> = Vec::with_capacity(256 * 1024);
    let mut chunk = vec![0u8; 128 * 1024];
    let mut fill = |buf: &mut Vec<u8>| -> std::io::Result<bool> {
        let n = reader.read(&mut chunk)?;
        buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    };
    // The opening delimiter and the part's headers, up to the empty line.
    let body_start = loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]);
            if !head.trim_start().starts_with(&opening) {
                return Err(bad("the body does not start with its boundary"));
            }
            break end + 4;
        }
        if buf.len() > 64 * 1024 || !fill(&mut buf)? {
            return Err(bad("no part headers"));
        }
    };
    buf.drain(..body_start);
    loop {
        if let Some(end) = find(&buf, &delimiter) {
            return sink(&buf[..end]);
        }
        // Keep what could be the start of the delimiter.
        let keep = delimiter.len().min(buf.len());
        let flush = buf.len() - keep;
        if flush > 0 {
            sink(&buf[..flush])?;
            buf.drain(..flush);
        }
        if !fill(&mut buf)? {
            return Err(bad("the part has no closing boundary (truncated body)"));
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_and_parts() {
        assert_eq!(
            boundary_of("multipart/related; type=\"application/dicom\"; boundary=\"a b\"")
                .as_deref(),
            Some("a b")
        );
        assert_eq!(boundary_of("application/dicom"), None);
        let body = b"--XX\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n--X-body\r\n--XX\r\nContent-Type: application/dicom\r\n\r\nsecond\r\n--XX--";
        for step in [1usize, 3, 7, 1000] {
            let mut reader = Slow(&body[..], step);
            let mut out = Vec::new();
            copy_first_part(&mut reader, "XX", &mut |b| {
                out.extend_from_slice(b);
                Ok(())
            })
            .unwrap();
            assert_eq!(out, b"DICM\r\n--X-body", "step {step}");
        }
        let mut truncated = &b"--XX\r\n\r\nDICM..."[..];
        assert!(copy_first_part(&mut truncated, "XX", &mut |_| Ok(())).is_err());
    }

    #[test]
    fn values_are_percent_encoded() {
        assert_eq!(encode("1.2.3,1.2.4"), "1.2.3,1.2.4");
        assert_eq!(encode("20240101-20240131"), "20240101-20240131");
        assert_eq!(encode("a b&c"), "a%20b%26c");
    }

    /// An HTTP server on loopback that answers one request with `head`, `prefix`, then
    /// `body_len` bytes of filler (a hostile archive that answers without end, in short).
    fn serve_once(head: String, prefix: Vec<u8>, body_len: usize) -> String {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let Ok((mut socket, _)) = listener.accept() else {
                return;
            };
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request);
            let _ = socket.write_all(head.as_bytes());
            let _ = socket.write_all(&prefix);
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = body_len;
            while left > 0 {
                let n = left.min(chunk.len());
                if socket.write_all(&chunk[..n]).is_err() {
                    return; // the client stopped reading: that is the point
                }
                left -= n;
            }
        });
        format!("http://127.0.0.1:{port}/dicom-web")
    }

    fn client(base: &str) -> DicomWeb {
        let limits = Limits {
            search_mb: 1,
            instance_mb: 1,
        };
        DicomWeb::new(
            base,
            Duration::from_secs(5),
            Duration::from_secs(5),
            limits,
            WebSecurity::default(),
        )
    }

    #[test]
    fn a_search_response_over_the_cap_is_refused_by_name() {
        let len = 3 * MB as usize;
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\nContent-Length: {len}\r\n\r\n"
        );
        let base = serve_once(head, b"[".to_vec(), len - 1);
        let err = client(&base)
            .search("studies", &[], &[], 1000)
            .expect_err("a 3 MB page over a 1 MB cap");
        assert!(
            matches!(err, WebError::TooLarge { limit_mb: 1, .. }),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains("archive.dicomweb_max_search_mb"), "{text}");
        assert!(text.contains("QIDO-RS response"), "{text}");
    }

    #[test]
    fn an_instance_over_the_cap_is_refused_and_its_file_removed() {
        let spool_dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(spool_dir.path()).unwrap();
        spool.expect(&["1.2.3".into()]);
        // Chunked, no length: the cap must hold while the body streams in.
        let head = "HTTP/1.1 200 OK\r\nContent-Type: multipart/related; type=\"application/dicom\"; boundary=B\r\nConnection: close\r\n\r\n".to_string();
        let base = serve_once(
            head,
            b"--B\r\nContent-Type: application/dicom\r\n\r\n".to_vec(),
            4 * MB as usize,
        );
        let err = client(&base)
            .retrieve_instance("1", "2", "1.2.3", &spool)
            .expect_err("a 4 MB instance over a 1 MB cap");
        let text = err.to_string();
        assert!(
            text.contains("archive.dicomweb_max_instance_mb (1 MB)"),
            "{text}"
        );
        let left = files_under(spool_dir.path());
        assert!(left.is_empty(), "nothing kept in the spool: {left:?}");
    }

    fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(files_under(&path));
            } else {
                out.push(path);
            }
        }
        out
    }

    struct Slow<'a>(&'a [u8], usize);

    impl Read for Slow<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.1.min(out.len()).min(self.0.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
}
