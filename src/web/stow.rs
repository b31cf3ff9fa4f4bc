//! STOW-RS (PS3.18 10.5): `POST /dicom-web/studies[/{study}]` with a
//! `multipart/related; type="application/dicom"` body, one PS3.10 file per part.
//!
//! Two passes, so that a malformed body stores nothing and memory stays bounded:
//! 1. the body is streamed through the multipart parser into one spool file per part
//!    (under `storage.path/.incoming`, removed at start-up like every unacknowledged
//!    file); a body that is not well formed to its closing boundary, or a part that is not
//!    a PS3.10 file, ends the request here with a 4xx and nothing stored;
//! 2. each part goes through the same durable ingest path as a C-STORE
//!    ([`Store::begin`](crate::store::Store::begin) → `write` → `commit`: temporary file,
//!    check, fsync, rename, index), its outcome mapped like a C-STORE status
//!    ([`status_for`]) into the Store Instances Response (Annex I).

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR};
use dicom_object::InMemDicomObject;
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::error::WebError;
use super::qido::{warning, DICOM_JSON};
use super::request::{base_url, parse_media_type, path_uid};
use super::{json, WebState};
use crate::dimse::association::status_for;
use crate::dimse::sop_classes;
use crate::dimse::status::Status;
use crate::store::inspect::{self, DatasetSummary};
use crate::store::layout::trim_uid;
use crate::store::{IncomingHeader, StoreError, StoreOutcome};

/// The calling AE title recorded for instances received over STOW-RS.
pub const STOW_AE_TITLE: &str = "STOW-RS";
/// Longest file meta information accepted (real ones are a few hundred bytes).
const MAX_META_BYTES: u64 = 64 * 1024;
/// PS3.18 Table I.2-2: Referenced Transfer Syntax not supported.
const TRANSFER_SYNTAX_NOT_SUPPORTED: u16 = 0xC122;
const CHUNK: usize = 256 * 1024;

static SPOOL_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A part of the body on disk.
struct SpooledPart {
    path: PathBuf,
    len: u64,
}

/// The spooled parts of one request; whatever happens, their files go.
#[derive(Default)]
struct Spool {
    parts: Vec<SpooledPart>,
}

impl Drop for Spool {
    fn drop(&mut self) {
        for p in &self.parts {
            if let Err(e) = std::fs::remove_file(&p.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!(path = %p.path.display(), error = %e, "cannot remove a STOW-RS spool file");
                }
            }
        }
    }
}

/// What the file meta information of a part says.
#[derive(Debug, Clone, PartialEq)]
pub struct FileMeta {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax_uid: String,
    /// Where the data set starts in the file.
    pub dataset_offset: u64,
}

/// Read the preamble, "DICM" and group 0002 (Explicit VR Little Endian, PS3.10 7.1).
pub fn read_file_meta(mut r: impl Read) -> Result<FileMeta, String> {
    let mut head = [0u8; 132];
    r.read_exact(&mut head)
        .map_err(|_| "shorter than a PS3.10 preamble (132 bytes)".to_string())?;
    if &head[128..] != b"DICM" {
        return Err("not a DICOM PS3.10 file (no \"DICM\" after the 128-byte preamble)".into());
    }
    let mut pos = 132u64;
    let (mut class, mut instance, mut ts) = (None, None, None);
    loop {
        let mut h = [0u8; 8];
        match read_full(&mut r, &mut h) {
            Ok(0) => break,
            Ok(8) => {}
            Ok(_) => return Err("the file ends inside an element header".into()),
            Err(e) => return Err(format!("cannot read the part: {e}")),
        }
        let group = u16::from_le_bytes([h[0], h[1]]);
        if group != 0x0002 {
            break;
        }
        let element = u16::from_le_bytes([h[2], h[3]]);
        let vr = [h[4], h[5]];
        let (len, header_len) = if crate::store::inspect::has_long_length(vr) {
            let mut l = [0u8; 4];
            r.read_exact(&mut l)
                .map_err(|_| "the file ends inside the file meta information".to_string())?;
            (u64::from(u32::from_le_bytes(l)), 12)
        } else if vr.iter().all(u8::is_ascii_uppercase) {
            (u64::from(u16::from_le_bytes([h[6], h[7]])), 8)
        } else {
            return Err(format!(
                "file meta element (0002,{element:04X}) has no valid VR (not Explicit VR Little Endian)"
            ));
        };
        pos += header_len + len;
        if pos > 132 + MAX_META_BYTES {
            return Err("file meta information longer than 64 KiB".into());
        }
        let mut value = vec![0u8; len as usize];
        r.read_exact(&mut value)
            .map_err(|_| "the file ends inside the file meta information".to_string())?;
        let text = || {
            String::from_utf8_lossy(&value)
                .trim_end_matches(['\0', ' '])
                .trim_start()
                .to_string()
        };
        match element {
            0x0002 => class = Some(text()),
            0x0003 => instance = Some(text()),
            0x0010 => ts = Some(text()),
            _ => {}
        }
    }
    let need = |v: Option<String>, what: &str| {
        v.filter(|s| !s.is_empty())
            .ok_or_else(|| format!("the file meta information has no {what}"))
    };
    Ok(FileMeta {
        sop_class_uid: need(class, "Media Storage SOP Class UID (0002,0002)")?,
        sop_instance_uid: need(instance, "Media Storage SOP Instance UID (0002,0003)")?,
        transfer_syntax_uid: need(ts, "Transfer Syntax UID (0002,0010)")?,
        dataset_offset: pos,
    })
}

/// Like `read_exact`, but says how much it got before the end.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The boundary of a STOW-RS body, or why the Content-Type is refused.
fn boundary(headers: &HeaderMap) -> Result<String, WebError> {
    let text = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            WebError::UnsupportedMediaType(
                "no Content-Type: send multipart/related; type=\"application/dicom\"".into(),
            )
        })?;
    let media = parse_media_type(text)
        .ok_or_else(|| WebError::BadRequest(format!("Content-Type {text:?} cannot be parsed")))?;
    if media.essence != "multipart/related" {
        return Err(WebError::UnsupportedMediaType(format!(
            "Content-Type {} is not accepted: send multipart/related; type=\"application/dicom\" \
             (PS3.10 files; the metadata and bulk data form is not supported)",
            media.essence
        )));
    }
    if let Some(t) = media.param("type") {
        if !t.eq_ignore_ascii_case("application/dicom") {
            return Err(WebError::UnsupportedMediaType(format!(
                "multipart/related of type {t} is not accepted: only type=\"application/dicom\" \
                 (PS3.10 files)"
            )));
        }
    }
    let boundary = media.param("boundary").unwrap_or("");
    if boundary.is_empty() || boundary.len() > 70 {
        return Err(WebError::BadRequest(
            "the multipart/related Content-Type has no boundary parameter (1 to 70 characters)"
                .into(),
        ));
    }
    Ok(boundary.to_string())
}

fn multipart_error(e: multer::Error, part: usize, boundary: &str) -> WebError {
    use multer::Error as E;
    match e {
        E::StreamSizeExceeded { limit } | E::FieldSizeExceeded { limit, .. } => {
            WebError::PayloadTooLarge(format!(
                "the request body is larger than http.stow_max_mb ({} MB)",
                limit / (1024 * 1024)
            ))
        }
        E::IncompleteStream => WebError::BadRequest(format!(
            "the multipart body ends before its closing boundary \"--{boundary}--\" (truncated, \
             or not delimited by the boundary of the Content-Type)"
        )),
        E::IncompleteFieldData { .. } => WebError::BadRequest(format!(
            "part {part} is truncated: the body ends inside it, before the next boundary or \
             the closing boundary \"--{boundary}--\""
        )),
        E::IncompleteHeaders
        | E::ReadHeaderFailed(_)
        | E::DecodeHeaderName { .. }
        | E::DecodeHeaderValue { .. } => {
            WebError::BadRequest(format!("the headers of part {part} cannot be read: {e}"))
        }
        E::StreamReadFailed(cause) => {
            WebError::BadRequest(format!("reading the request body failed: {cause}"))
        }
        other => WebError::BadRequest(format!("malformed multipart body: {other}")),
    }
}

/// Longest header block of one part (from its delimiter to the blank line). multer
/// buffers a part's headers until the blank line, so without this bound one part whose
/// headers never end would be held in memory up to `http.stow_max_mb` (issue #18).
pub const MAX_PART_HEADERS: usize = 16 * 1024;

/// Watches a multipart body as it streams: after each delimiter (`CRLF--boundary`), the
/// part's headers must end (CRLF CRLF) within [`MAX_PART_HEADERS`] bytes.
struct PartHeaderBound {
    /// `\r\n--boundary`
    delimiter: Vec<u8>,
    /// KMP failure function of `delimiter`.
    fail: Vec<usize>,
    matched: usize,
    state: BoundState,
}

#[derive(Clone, Copy, PartialEq)]
enum BoundState {
    /// In a part's content (or the preamble), looking for a delimiter.
    Body,
    /// Right after a delimiter (`first`: the byte after it, once seen): `--` here closes
    /// the body.
    AfterDelimiter { first: Option<u8> },
    /// In a part's headers: bytes so far, and how much of CRLF CRLF was just seen.
    Headers { bytes: usize, end: u8 },
    /// After the close delimiter: the epilogue, ignored.
    Epilogue,
}

impl PartHeaderBound {
    fn new(boundary: &str) -> Self {
        let delimiter: Vec<u8> = [b"\r\n--".as_slice(), boundary.as_bytes()].concat();
        let mut fail = vec![0; delimiter.len()];
        let mut k = 0;
        for i in 1..delimiter.len() {
            while k > 0 && delimiter[i] != delimiter[k] {
                k = fail[k - 1];
            }
            if delimiter[i] == delimiter[k] {
                k += 1;
            }
            fail[i] = k;
        }
        let mut bound = PartHeaderBound {
            delimiter,
            fail,
            matched: 0,
            state: BoundState::Body,
        };
        // The first delimiter may open the body, without the CRLF before it.
        let _ = bound.feed(b"\r\n");
        bound
    }

    fn feed(&mut self, chunk: &[u8]) -> Result<(), String> {
        for &b in chunk {
            self.state = match self.state {
                BoundState::Body => {
                    while self.matched > 0 && self.delimiter[self.matched] != b {
                        self.matched = self.fail[self.matched - 1];
                    }
                    if self.delimiter[self.matched] == b {
                        self.matched += 1;
                    }
                    if self.matched == self.delimiter.len() {
                        self.matched = 0;
                        BoundState::AfterDelimiter { first: None }
                    } else {
                        BoundState::Body
                    }
                }
                BoundState::AfterDelimiter { first: None } => {
                    BoundState::AfterDelimiter { first: Some(b) }
                }
                BoundState::AfterDelimiter { first: Some(b'-') } if b == b'-' => {
                    BoundState::Epilogue
                }
                // The line of the delimiter ends with CRLF: half of the CRLF CRLF that ends
                // the headers.
                BoundState::AfterDelimiter { first: Some(first) } => BoundState::Headers {
                    bytes: 2,
                    end: if first == b'\r' && b == b'\n' {
                        2
                    } else {
                        u8::from(b == b'\r')
                    },
                },
                BoundState::Headers { bytes, end } => {
                    if bytes > MAX_PART_HEADERS {
                        return Err(format!(
                            "the headers of a part are longer than {} KiB",
                            MAX_PART_HEADERS / 1024
                        ));
                    }
                    let expected = [b'\r', b'\n', b'\r', b'\n'][usize::from(end)];
                    let end = if b == expected {
                        end + 1
                    } else {
                        u8::from(b == b'\r')
                    };
                    if end == 4 {
                        BoundState::Body
                    } else {
                        BoundState::Headers {
                            bytes: bytes + 1,
                            end,
                        }
                    }
                }
                BoundState::Epilogue => return Ok(()),
            };
        }
        Ok(())
    }
}

/// `stream` with the headers of every part bounded ([`MAX_PART_HEADERS`]); a longer header
/// block ends the stream with an error, which multer reports as a failed read.
pub fn bounded_part_headers<S, B, E>(
    stream: S,
    boundary: &str,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, Box<dyn std::error::Error + Send + Sync>>>
where
    S: futures_util::Stream<Item = Result<B, E>>,
    B: Into<bytes::Bytes>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use futures_util::StreamExt;
    let mut bound = PartHeaderBound::new(boundary);
    stream.map(move |item| {
        let chunk: bytes::Bytes = item.map_err(Into::into)?.into();
        bound
            .feed(&chunk)
            .map_err(|why| io::Error::new(io::ErrorKind::InvalidData, why))?;
        Ok(chunk)
    })
}

/// Pass 1: the body into spool files, every part checked to be a PS3.10 file.
async fn spool(
    state: &WebState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Spool, Vec<FileMeta>), WebError> {
    let boundary = boundary(headers)?;
    let limit = state.config.http.stow_max_mb.saturating_mul(1024 * 1024);
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(WebError::PayloadTooLarge(format!(
            "the request body is larger than http.stow_max_mb ({} MB)",
            state.config.http.stow_max_mb
        )));
    }
    let constraints =
        multer::Constraints::new().size_limit(multer::SizeLimit::new().whole_stream(limit));
    let body = bounded_part_headers(body.into_data_stream(), &boundary);
    let mut multipart = multer::Multipart::with_constraints(body, boundary.clone(), constraints);
    let dir = state.store.temp_dir().to_path_buf();
    let mut spool = Spool::default();
    loop {
        let part = spool.parts.len() + 1;
        let field = multipart
            .next_field()
            .await
            .map_err(|e| multipart_error(e, part, &boundary))?;
        let Some(mut field) = field else { break };
        if let Some(ct) = field.content_type() {
            if !ct.essence_str().eq_ignore_ascii_case("application/dicom") {
                return Err(WebError::UnsupportedMediaType(format!(
                    "part {part} has Content-Type {}: only application/dicom parts (PS3.10 files) \
                     are accepted",
                    ct.essence_str()
                )));
            }
        }
        let path = dir.join(format!(
            "stow-{}-{}.part",
            std::process::id(),
            SPOOL_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let mut file = tokio::fs::File::create(&path).await.map_err(|e| {
            WebError::Unavailable(format!(
                "cannot create a spool file in {}: {e}",
                dir.display()
            ))
        })?;
        spool.parts.push(SpooledPart {
            path: path.clone(),
            len: 0,
        });
        let mut len = 0u64;
        while let Some(chunk) = field
            .chunk()
            .await
            .map_err(|e| multipart_error(e, part, &boundary))?
        {
            file.write_all(&chunk)
                .await
                .map_err(|e| WebError::Unavailable(format!("cannot write a spool file: {e}")))?;
            len += chunk.len() as u64;
        }
        file.flush()
            .await
            .map_err(|e| WebError::Unavailable(format!("cannot write a spool file: {e}")))?;
        if let Some(last) = spool.parts.last_mut() {
            last.len = len;
        }
    }
    if spool.parts.is_empty() {
        return Err(WebError::BadRequest(
            "the multipart body has no parts".into(),
        ));
    }
    let mut metas = Vec::with_capacity(spool.parts.len());
    for (i, part) in spool.parts.iter().enumerate() {
        let meta = tokio::task::block_in_place(|| {
            let file = File::open(&part.path).map_err(|e| e.to_string())?;
            read_file_meta(BufReader::new(file.take(part.len)))
        })
        .map_err(|why| WebError::BadRequest(format!("part {}: {why}", i + 1)))?;
        metas.push(meta);
    }
    Ok((spool, metas))
}

/// How one part ended.
enum Outcome {
    Stored {
        study: String,
        series: String,
        outcome: StoreOutcome,
    },
    Failed(Status),
}

/// Pass 2 for one part: the C-STORE path, from the spool file.
async fn ingest(
    state: &WebState,
    part: &SpooledPart,
    meta: &FileMeta,
    target_study: Option<&str>,
) -> Outcome {
    let sop_class = trim_uid(&meta.sop_class_uid);
    if !sop_classes::is_storage_class(sop_class) {
        return Outcome::Failed(Status::failure(
            Status::SOP_CLASS_NOT_SUPPORTED,
            format!("SOP class {sop_class} is not one this node stores"),
        ));
    }
    let ts = trim_uid(&meta.transfer_syntax_uid);
    if !sop_classes::TRANSFER_SYNTAXES.contains(&ts) {
        return Outcome::Failed(Status::failure(
            TRANSFER_SYNTAX_NOT_SUPPORTED,
            format!("transfer syntax {ts} is not one this node stores"),
        ));
    }
    // The Study Instance UID (for a request to one study) and the Retrieve URL need the
    // hierarchy before the instance is stored; the store checks the data set again.
    let summary: Result<DatasetSummary, StoreError> = tokio::task::block_in_place(|| {
        let file = File::open(&part.path).map_err(|source| StoreError::Io {
            context: "reading the spooled part",
            source,
        })?;
        inspect::inspect_file(file, meta.dataset_offset, ts).map_err(StoreError::from)
    });
    let summary = match summary {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(status_for(&e)),
    };
    let (Some(study), Some(series)) = (summary.study_uid.clone(), summary.series_uid.clone())
    else {
        return Outcome::Failed(Status::failure(
            Status::DATASET_DOES_NOT_MATCH,
            "data set has no Study or Series Instance UID",
        ));
    };
    if let Some(target) = target_study {
        if trim_uid(&study) != target {
            return Outcome::Failed(Status::failure(
                Status::DATASET_DOES_NOT_MATCH,
                format!("Study Instance UID {study} is not the study {target} of the request"),
            ));
        }
    }
    let header = IncomingHeader {
        sop_class_uid: sop_class.to_string(),
        sop_instance_uid: trim_uid(&meta.sop_instance_uid).to_string(),
        transfer_syntax_uid: ts.to_string(),
        calling_ae: STOW_AE_TITLE.to_string(),
        // STOW-RS is audited by its HTTP request.
        received: None,
    };
    let stored = async {
        let mut incoming = state.store.begin(header).await?;
        let mut file = File::open(&part.path).map_err(|source| StoreError::Io {
            context: "reading the spooled part",
            source,
        })?;
        let read_error = |source| StoreError::Io {
            context: "reading the spooled part",
            source,
        };
        file.seek(SeekFrom::Start(meta.dataset_offset))
            .map_err(read_error)?;
        let mut rest = part.len.saturating_sub(meta.dataset_offset);
        let mut buf = vec![0u8; CHUNK];
        while rest > 0 {
            let want = rest.min(CHUNK as u64) as usize;
            tokio::task::block_in_place(|| file.read_exact(&mut buf[..want]))
                .map_err(read_error)?;
            incoming.write(&buf[..want])?;
            rest -= want as u64;
        }
        state.store.commit(incoming).await
    };
    match stored.await {
        Ok(outcome) => Outcome::Stored {
            study: trim_uid(&study).to_string(),
            series: trim_uid(&series).to_string(),
            outcome,
        },
        Err(e) => Outcome::Failed(status_for(&e)),
    }
}

/// Pass 2 for every part, in order: (SOP class, SOP instance, outcome). The spool goes
/// when it is done.
async fn ingest_all(
    state: WebState,
    spool: Spool,
    metas: Vec<FileMeta>,
    target_study: Option<String>,
) -> Vec<(String, String, Outcome)> {
    let mut out = Vec::with_capacity(metas.len());
    for (part, meta) in spool.parts.iter().zip(&metas) {
        let outcome = ingest(&state, part, meta, target_study.as_deref()).await;
        out.push((
            trim_uid(&meta.sop_class_uid).to_string(),
            trim_uid(&meta.sop_instance_uid).to_string(),
            outcome,
        ));
    }
    out
}

fn text(tag: Tag, vr: VR, value: impl Into<String>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(value.into()))
}

async fn store(
    state: WebState,
    target_study: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, WebError> {
    let started = Instant::now();
    let (spool, metas) = spool(&state, &headers, body).await?;
    let base = base_url(&headers, &state.http_host());
    // Stored in a task of its own: a client that goes away does not cancel a commit half
    // way (the same guarantee as C-STORE's, where the association awaits each commit).
    let outcomes = tokio::spawn(ingest_all(
        state.clone(),
        spool,
        metas,
        target_study.clone(),
    ))
    .await
    .map_err(|e| WebError::Internal(format!("storing the instances crashed: {e}")))?;
    let mut referenced = Vec::new();
    let mut failed = Vec::new();
    let mut reasons = Vec::new();
    let mut studies = std::collections::BTreeSet::new();
    let mut all_out_of_resources = true;
    for (class, instance, outcome) in outcomes {
        match outcome {
            Outcome::Stored {
                study,
                series,
                outcome,
            } => {
                tracing::debug!(sop_instance_uid = %instance, ?outcome, "STOW-RS instance stored");
                let url = format!("{base}/studies/{study}/series/{series}/instances/{instance}");
                studies.insert(study);
                referenced.push(InMemDicomObject::from_element_iter([
                    text(Tag(0x0008, 0x1150), VR::UI, class),
                    text(Tag(0x0008, 0x1155), VR::UI, instance),
                    text(Tag(0x0008, 0x1190), VR::UR, url),
                ]));
            }
            Outcome::Failed(status) => {
                let why = status.comment.clone().unwrap_or_default();
                warn!(sop_instance_uid = %instance, status = format_args!("{:04X}", status.code), reason = %why, "STOW-RS instance not stored");
                all_out_of_resources &= (status.code & 0xFF00) == Status::OUT_OF_RESOURCES;
                reasons.push(format!("{instance}: {:04X} {why}", status.code));
                failed.push(InMemDicomObject::from_element_iter([
                    text(Tag(0x0008, 0x1150), VR::UI, class),
                    text(Tag(0x0008, 0x1155), VR::UI, instance),
                    DataElement::new(
                        Tag(0x0008, 0x1197),
                        VR::US,
                        PrimitiveValue::from(status.code),
                    ),
                ]));
            }
        }
    }
    info!(
        stored = referenced.len(),
        failed = failed.len(),
        ms = started.elapsed().as_millis() as u64,
        "STOW-RS"
    );
    let status = match (referenced.is_empty(), failed.is_empty()) {
        (false, true) => StatusCode::OK,
        (false, false) => StatusCode::ACCEPTED,
        (true, _) if all_out_of_resources => StatusCode::SERVICE_UNAVAILABLE,
        (true, _) => StatusCode::CONFLICT,
    };
    let mut response = InMemDicomObject::new_empty();
    let study_url = match (&target_study, studies.len()) {
        (Some(study), _) => Some(study.clone()),
        (None, 1) => studies.iter().next().cloned(),
        _ => None,
    };
    if let Some(study) = study_url {
        response.put(text(
            Tag(0x0008, 0x1190),
            VR::UR,
            format!("{base}/studies/{study}"),
        ));
    }
    if !failed.is_empty() {
        response.put(DataElement::new(
            Tag(0x0008, 0x1198),
            VR::SQ,
            DataSetSequence::from(failed),
        ));
    }
    if !referenced.is_empty() {
        response.put(DataElement::new(
            Tag(0x0008, 0x1199),
            VR::SQ,
            DataSetSequence::from(referenced),
        ));
    }
    let body = serde_json::to_vec(&json::object(&response))
        .map_err(|e| WebError::Internal(format!("cannot write the response: {e}")))?;
    let mut response = (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(DICOM_JSON))],
        body,
    )
        .into_response();
    // The reasons in words, beside the codes of the Failed SOP Sequence.
    for reason in reasons.iter().take(20) {
        if let Some(v) = warning(&base, reason) {
            response.headers_mut().append(header::WARNING, v);
        }
    }
    Ok(response)
}

pub async fn store_instances(
    State(state): State<WebState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    store(state, None, headers, body).await.into_response()
}

pub async fn store_study_instances(
    State(state): State<WebState>,
    Path(study): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match path_uid(&study, "Study Instance UID") {
        Ok(study) => store(state, Some(study), headers, body)
            .await
            .into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part10(meta: &[(u16, &str)]) -> Vec<u8> {
        let mut out = vec![0u8; 128];
        out.extend_from_slice(b"DICM");
        for (element, value) in meta {
            let mut v = value.as_bytes().to_vec();
            if v.len() % 2 == 1 {
                v.push(0);
            }
            out.extend_from_slice(&2u16.to_le_bytes());
            out.extend_from_slice(&element.to_le_bytes());
            out.extend_from_slice(b"UI");
            out.extend_from_slice(&(v.len() as u16).to_le_bytes());
            out.extend_from_slice(&v);
        }
        out.extend_from_slice(&[0x08, 0x00, 0x16, 0x00, b'U', b'I', 0, 0]);
        out
    }

    #[test]
    fn file_meta_is_read_to_the_data_set() {
        let bytes = part10(&[
            (0x0002, "1.2.840.10008.5.1.4.1.1.2"),
            (0x0003, "1.2.3.4"),
            (0x0010, "1.2.840.10008.1.2.1"),
        ]);
        let meta = read_file_meta(&bytes[..]).unwrap();
        assert_eq!(meta.sop_class_uid, "1.2.840.10008.5.1.4.1.1.2");
        assert_eq!(meta.sop_instance_uid, "1.2.3.4");
        assert_eq!(meta.transfer_syntax_uid, "1.2.840.10008.1.2.1");
        assert_eq!(meta.dataset_offset as usize, bytes.len() - 8);
    }

    #[test]
    fn what_is_not_a_part10_file_says_why() {
        assert!(read_file_meta(&b"hello"[..])
            .unwrap_err()
            .contains("preamble"));
        assert!(read_file_meta(&[0u8; 200][..])
            .unwrap_err()
            .contains("DICM"));
        let no_ts = part10(&[(0x0002, "1.2"), (0x0003, "1.3")]);
        assert!(read_file_meta(&no_ts[..])
            .unwrap_err()
            .contains("Transfer Syntax"));
        let mut cut = part10(&[(0x0002, "1.2.840.10008.5.1.4.1.1.2")]);
        cut.truncate(cut.len() - 10);
        assert!(read_file_meta(&cut[..]).is_err());
    }

    #[test]
    fn content_types() {
        let with = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            boundary(&h)
        };
        assert_eq!(
            with("multipart/related; type=\"application/dicom\"; boundary=abc").unwrap(),
            "abc"
        );
        assert!(matches!(
            with("multipart/related; type=\"application/dicom\""),
            Err(WebError::BadRequest(_))
        ));
        assert!(matches!(
            with("multipart/related; type=\"application/dicom+json\"; boundary=x"),
            Err(WebError::UnsupportedMediaType(_))
        ));
        assert!(matches!(
            with("application/dicom"),
            Err(WebError::UnsupportedMediaType(_))
        ));
    }

    /// Regression (issue #18): a part whose headers never end was buffered by multer up to
    /// `http.stow_max_mb`; the stream now fails once they pass 16 KiB.
    #[test]
    fn part_headers_are_bounded_while_part_content_is_not() {
        let boundary = "XyZ";
        let mut ok = PartHeaderBound::new(boundary);
        let mut body = b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n".to_vec();
        body.extend(vec![b'a'; 100_000]);
        body.extend_from_slice(b"\r\n--XyZ\r\n\r\n");
        body.extend(vec![b'\n'; 50_000]);
        body.extend_from_slice(b"\r\n--XyZ--\r\n");
        body.extend(vec![b'e'; 50_000]);
        for chunk in body.chunks(7) {
            ok.feed(chunk)
                .expect("content and epilogue are not headers");
        }
        let mut bad = PartHeaderBound::new(boundary);
        let mut body = b"--XyZ\r\nContent-Type: application/dicom\r\nX-Junk: ".to_vec();
        body.extend(vec![b'h'; MAX_PART_HEADERS + 10]);
        let failed = body.chunks(1000).any(|c| bad.feed(c).is_err());
        assert!(failed, "headers past 16 KiB are refused");
        // A delimiter split across chunks is still seen.
        let mut split = PartHeaderBound::new(boundary);
        let mut body = b"preamble\r\n--X".to_vec();
        split.feed(&body).unwrap();
        body = b"yZ\r\nA: b".to_vec();
        body.extend(vec![b'h'; MAX_PART_HEADERS + 10]);
        assert!(split.feed(&body).is_err());
    }
}
