//! The archive as `mine` sees it: queries (C-FIND or QIDO-RS) that return [`Answer`]s, and
//! retrieval (C-MOVE, C-GET or WADO-RS) of chosen instances into the [`Spool`].
//!
//! Load on the archive is bounded here, for every kind of request alike: at most
//! `mine.max_concurrent_retrieves` operations at once (each on its own association or HTTP
//! request), at most `mine.max_requests_per_second` started per second. The time spent
//! waiting on the archive is summed for the run's report.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{InMemDicomObject, StandardDataDictionary};
use tokio::sync::Semaphore;

use super::answer::Answer;
use super::dimse::{self, Peer, QrAssociation, QrError, Service, Timeouts, MAX_ANSWERS};
use super::range::Found;
use super::scp::StorageScp;
use super::settings::{ArchiveConfig, MineConfig, Retrieve};
use super::spool::Spool;
use super::web::{DicomWeb, WebError};

/// SOP Instance UIDs per C-MOVE/C-GET request (a List of UID Matching key).
const UIDS_PER_REQUEST: usize = 200;
/// After a C-MOVE's final response, how long stragglers the archive counted as sent may
/// take to reach our SCP (an archive that answers before its sub-operations finish).
const MOVE_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Study,
    Series,
    Image,
}

impl Level {
    fn keyword(self) -> &'static str {
        match self {
            Level::Study => "STUDY",
            Level::Series => "SERIES",
            Level::Image => "IMAGE",
        }
    }
}

/// A query: its level, the keys it matches on, the attributes it wants back, and (for
/// QIDO-RS paths) the study and series it is inside.
#[derive(Debug, Clone)]
pub struct Query {
    pub level: Level,
    pub keys: Vec<(Tag, String)>,
    pub returns: Vec<Tag>,
    pub study: Option<String>,
    pub series: Option<String>,
}

impl Query {
    pub fn new(level: Level) -> Query {
        Query {
            level,
            keys: Vec::new(),
            returns: Vec::new(),
            study: None,
            series: None,
        }
    }

    pub fn key(mut self, tag: Tag, value: impl Into<String>) -> Query {
        self.keys.push((tag, value.into()));
        self
    }

    pub fn returns(mut self, tags: &[Tag]) -> Query {
        self.returns.extend_from_slice(tags);
        self
    }

    pub fn in_study(mut self, study: &str) -> Query {
        self.study = Some(study.to_string());
        self
    }

    pub fn in_series(mut self, series: &str) -> Query {
        self.series = Some(series.to_string());
        self
    }

    /// The C-FIND identifier: Query/Retrieve Level, the keys, the study and series unique
    /// keys, and an empty element for every attribute to return.
    fn identifier(&self) -> InMemDicomObject {
        let mut obj = InMemDicomObject::new_empty();
        let put = |obj: &mut InMemDicomObject, tag: Tag, value: &str| {
            let vr = vr_of(tag);
            let value = if value.is_empty() {
                PrimitiveValue::Empty
            } else {
                PrimitiveValue::from(value)
            };
            obj.put(DataElement::new(tag, vr, value));
        };
        put(&mut obj, tags::QUERY_RETRIEVE_LEVEL, self.level.keyword());
        for tag in &self.returns {
            put(&mut obj, *tag, "");
        }
        if let Some(study) = &self.study {
            put(&mut obj, tags::STUDY_INSTANCE_UID, study);
        }
        if let Some(series) = &self.series {
            put(&mut obj, tags::SERIES_INSTANCE_UID, series);
        }
        for (tag, value) in &self.keys {
            put(&mut obj, *tag, value);
        }
        obj
    }

    /// QIDO-RS: the resource path, matching parameters and includefield.
    fn qido(&self) -> (String, Vec<(Tag, String)>, Vec<Tag>) {
        let path = match (self.level, &self.study, &self.series) {
            (Level::Study, _, _) => "studies".to_string(),
            (Level::Series, Some(st), _) => format!("studies/{}/series", super::web::encode(st)),
            (Level::Series, None, _) => "series".to_string(),
            (Level::Image, Some(st), Some(se)) => format!(
                "studies/{}/series/{}/instances",
                super::web::encode(st),
                super::web::encode(se)
            ),
            (Level::Image, Some(st), None) => {
                format!("studies/{}/instances", super::web::encode(st))
            }
            (Level::Image, None, _) => "instances".to_string(),
        };
        // QIDO-RS writes lists of UIDs with commas (PS3.18 8.3.4.1), C-FIND with backslashes.
        let params = self
            .keys
            .iter()
            .map(|(t, v)| (*t, v.replace('\\', ",")))
            .collect();
        (path, params, self.returns.clone())
    }
}

fn vr_of(tag: Tag) -> VR {
    if tag == tags::QUERY_RETRIEVE_LEVEL {
        return VR::CS;
    }
    StandardDataDictionary
        .by_tag(tag)
        .map_or(VR::LO, |entry| entry.vr().relaxed())
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Dimse(#[from] QrError),
    #[error(transparent)]
    Web(#[from] WebError),
    #[error("the archive capped its answer at {0} (more match); a query that must be whole")]
    Capped(usize),
    #[error("{0}")]
    Other(String),
}

enum Kind {
    Dimse {
        peer: Peer,
        timeouts: Timeouts,
        max_pdu_length: u32,
        retrieve: Retrieve,
    },
    Web(Arc<DicomWeb>),
}

/// Paces requests: one start every `interval` at most.
struct RateLimiter {
    interval: Option<Duration>,
    next: Mutex<Instant>,
}

impl RateLimiter {
    fn new(per_second: f64) -> RateLimiter {
        RateLimiter {
            interval: (per_second > 0.0).then(|| Duration::from_secs_f64(1.0 / per_second)),
            next: Mutex::new(Instant::now()),
        }
    }

    async fn acquire(&self) {
        let Some(interval) = self.interval else {
            return;
        };
        let wait = {
            let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let start = (*next).max(now);
            *next = start + interval;
            start - now
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

pub struct Archive {
    kind: Kind,
    spool: Arc<Spool>,
    scp: Option<StorageScp>,
    slots: Semaphore,
    limiter: RateLimiter,
    /// Microseconds spent in requests to the archive (summed over concurrent requests).
    waited_us: AtomicU64,
    /// Microseconds requests were held back by `mine.max_requests_per_second`.
    throttled_us: AtomicU64,
    requests: AtomicU64,
    /// Where this archive is, for logs and reports.
    pub describe: String,
}

impl Archive {
    /// Connects nothing yet; for C-MOVE it starts the Storage SCP that receives.
    pub async fn open(
        archive: &ArchiveConfig,
        mine: &MineConfig,
        spool: Arc<Spool>,
    ) -> Result<Archive, ArchiveError> {
        let timeouts = Timeouts {
            connect: Duration::from_secs(archive.connect_timeout_secs),
            dimse: Duration::from_secs(archive.dimse_timeout_secs),
        };
        let (kind, describe) = match archive.retrieve {
            Retrieve::Dicomweb => (
                Kind::Web(Arc::new(DicomWeb::new(
                    &archive.dicomweb_url,
                    timeouts.connect,
                    timeouts.dimse,
                    super::web::Limits {
                        search_mb: archive.dicomweb_max_search_mb,
                        instance_mb: archive.dicomweb_max_instance_mb,
                    },
                    archive.web_security().map_err(ArchiveError::Other)?,
                ))),
                format!("DICOMweb {}", archive.dicomweb_url),
            ),
            retrieve => (
                Kind::Dimse {
                    peer: Peer {
                        ae_title: archive.ae_title.clone(),
                        host: archive.host.clone(),
                        port: archive.port,
                        calling_ae_title: archive.calling_ae_title.clone(),
                        tls: std::sync::Arc::new(archive.tls.clone()),
                    },
                    timeouts,
                    max_pdu_length: archive.max_pdu_length,
                    retrieve,
                },
                format!(
                    "{}@{}:{} (C-FIND, {})",
                    archive.ae_title,
                    archive.host,
                    archive.port,
                    if retrieve == Retrieve::Move {
                        "C-MOVE"
                    } else {
                        "C-GET"
                    }
                ),
            ),
        };
        let scp = if archive.retrieve == Retrieve::Move {
            let bind = SocketAddr::new(archive.move_bind, archive.move_port);
            let tls = archive
                .move_tls
                .load("archive.move_tls")
                .map_err(ArchiveError::Other)?;
            let scp = StorageScp::start(
                bind,
                archive.calling_ae_title.clone(),
                archive.max_pdu_length,
                timeouts.dimse,
                spool.clone(),
                tls.map(std::sync::Arc::new),
            )
            .await
            .map_err(|e| {
                ArchiveError::Other(format!(
                    "cannot listen on {bind} for C-MOVE (archive.move_bind, archive.move_port): {e}"
                ))
            })?;
            tracing::info!(addr = %scp.addr, ae_title = %archive.calling_ae_title, "C-MOVE destination listening");
            Some(scp)
        } else {
            None
        };
        Ok(Archive {
            kind,
            spool,
            scp,
            slots: Semaphore::new(mine.max_concurrent_retrieves),
            limiter: RateLimiter::new(mine.max_requests_per_second),
            waited_us: AtomicU64::new(0),
            throttled_us: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            describe,
        })
    }

    pub async fn close(self) {
        if let Some(scp) = self.scp {
            scp.stop().await;
        }
    }

    /// Seconds spent waiting on the archive so far, the number of requests, and the
    /// seconds requests were held back by the rate limit.
    pub fn waited(&self) -> (f64, u64, f64) {
        (
            self.waited_us.load(Ordering::Relaxed) as f64 / 1e6,
            self.requests.load(Ordering::Relaxed),
            self.throttled_us.load(Ordering::Relaxed) as f64 / 1e6,
        )
    }

    /// A paced request in one of the `mine.max_concurrent_retrieves` slots.
    async fn timed<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        let _slot = self.slots.acquire().await;
        self.limiter_slot().await;
        self.count(f).await
    }

    /// A request, its time and itself counted.
    async fn count<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        let started = Instant::now();
        let out = f.await;
        self.waited_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        out
    }

    /// A query whose answer must be whole: an answer the archive capped is an error.
    pub async fn find(&self, query: &Query) -> Result<Vec<Answer>, ArchiveError> {
        let (answers, capped) = {
            let _slot = self.slots.acquire().await;
            self.limiter_slot().await;
            self.find_unpaced(query).await?
        };
        if capped {
            return Err(ArchiveError::Capped(answers.len()));
        }
        Ok(answers)
    }

    /// A study query of the date walk ([`super::range`]): the answer, and whether the
    /// archive capped it (a C-FIND Cancel or warning status, `limit` answers or more where
    /// `limit` is not 0, or more than one query may hold). Only a query that found studies
    /// counts against `mine.max_requests_per_second`: an empty range costs no wait.
    pub async fn find_studies(&self, query: &Query, limit: usize) -> Result<Found, ArchiveError> {
        let answer = {
            let _slot = self.slots.acquire().await;
            self.find_unpaced(query).await
        };
        let found = match answer {
            Ok((answers, capped)) => Found {
                capped: capped || (limit > 0 && answers.len() >= limit),
                answers,
            },
            Err(ArchiveError::Dimse(QrError::TooManyAnswers))
            | Err(ArchiveError::Web(WebError::TooManyAnswers { .. })) => Found {
                answers: Vec::new(),
                capped: true,
            },
            Err(e) => return Err(e),
        };
        if !found.answers.is_empty() || found.capped {
            self.limiter_slot().await;
        }
        Ok(found)
    }

    /// Wait for the rate limit, counting the wait.
    async fn limiter_slot(&self) {
        let throttled = Instant::now();
        self.limiter.acquire().await;
        self.throttled_us
            .fetch_add(throttled.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    /// A query, unpaced: the answers and whether the archive capped them.
    async fn find_unpaced(&self, query: &Query) -> Result<(Vec<Answer>, bool), ArchiveError> {
        match &self.kind {
            Kind::Dimse {
                peer,
                timeouts,
                max_pdu_length,
                ..
            } => {
                let identifier = query.identifier();
                self.count(async {
                    let mut assoc =
                        QrAssociation::open(peer, Service::Find, *max_pdu_length, *timeouts)
                            .await?;
                    match assoc.find(&identifier).await {
                        Ok((answers, capped)) => {
                            assoc.release().await;
                            Ok((answers.iter().map(Answer::from_dicom).collect(), capped))
                        }
                        Err(e) => {
                            assoc.abort().await;
                            Err(e.into())
                        }
                    }
                })
                .await
            }
            Kind::Web(web) => {
                let web = web.clone();
                let (path, params, fields) = query.qido();
                self.count(async move {
                    tokio::task::spawn_blocking(move || {
                        web.search(&path, &params, &fields, MAX_ANSWERS)
                    })
                    .await
                    .map_err(|e| ArchiveError::Other(format!("QIDO-RS task: {e}")))?
                    .map(|answers| (answers, false))
                    .map_err(ArchiveError::from)
                })
                .await
            }
        }
    }

    /// Retrieve instances of one series into the spool: what arrived, by SOP Instance UID
    /// (an instance the archive did not send is absent; the caller counts it), and the
    /// error that stopped the retrieval, if one did (what arrived before it is kept).
    ///
    /// An archive may refuse a whole list for one instance it cannot send (Orthanc answers
    /// a C-GET naming a deleted instance with C000): a list refused with a failure status is
    /// asked for again one instance at a time, and an instance refused alone is left out
    /// (not sent) while the others come. When none comes, or the connection is lost or
    /// times out, the retrieval fails (and the study is tried again by a later run).
    pub async fn retrieve(
        &self,
        study: &str,
        series: &str,
        sops: &[String],
    ) -> (HashMap<String, PathBuf>, Option<ArchiveError>) {
        let mut got = HashMap::new();
        for chunk in sops.chunks(UIDS_PER_REQUEST) {
            let (arrived, result) = self.retrieve_list(study, series, chunk).await;
            got.extend(arrived);
            match result {
                Ok(()) => {}
                Err(first @ ArchiveError::Dimse(QrError::Status { .. })) if chunk.len() > 1 => {
                    let missing: Vec<String> = chunk
                        .iter()
                        .filter(|u| !got.contains_key(*u))
                        .cloned()
                        .collect();
                    let mut came = chunk.len() - missing.len();
                    let mut refused = Vec::new();
                    for uid in missing {
                        let (arrived, result) = self
                            .retrieve_list(study, series, std::slice::from_ref(&uid))
                            .await;
                        came += arrived.len();
                        got.extend(arrived);
                        match result {
                            Ok(()) => {}
                            Err(e @ ArchiveError::Dimse(QrError::Status { .. })) => {
                                refused.push((uid, e));
                            }
                            Err(e) => return (got, Some(e)),
                        }
                    }
                    // Nothing came at all: the retrieval itself fails (a C-MOVE destination
                    // the archive cannot reach, say), and the study is tried again later.
                    if came == 0 {
                        return (got, Some(first));
                    }
                    for (uid, e) in refused {
                        tracing::warn!(study, series, sop_instance_uid = %uid, error = %e, "the archive refused one instance");
                    }
                }
                Err(e) => return (got, Some(e)),
            }
        }
        (got, None)
    }

    /// One request for `uids`: what arrived, and how the request ended.
    async fn retrieve_list(
        &self,
        study: &str,
        series: &str,
        uids: &[String],
    ) -> (HashMap<String, PathBuf>, Result<(), ArchiveError>) {
        self.spool.expect(uids);
        let result = self.retrieve_chunk(study, series, uids).await;
        // C-MOVE: wait (a little) for what the archive says it sent; C-GET and WADO-RS
        // bring everything back before they return.
        let (need, wait) = match (&result, &self.kind) {
            (
                Ok(Some(counts)),
                Kind::Dimse {
                    retrieve: Retrieve::Move,
                    ..
                },
            ) => (
                usize::from(counts.completed) + usize::from(counts.warning),
                MOVE_GRACE,
            ),
            _ => (0, Duration::ZERO),
        };
        let arrived = self.spool.take(uids, need, wait).await;
        (arrived, result.map(|_| ()))
    }

    async fn retrieve_chunk(
        &self,
        study: &str,
        series: &str,
        sops: &[String],
    ) -> Result<Option<dimse::SubOperations>, ArchiveError> {
        match &self.kind {
            Kind::Dimse {
                peer,
                timeouts,
                max_pdu_length,
                retrieve,
            } => {
                let identifier = Query::new(Level::Image)
                    .in_study(study)
                    .in_series(series)
                    .key(tags::SOP_INSTANCE_UID, sops.join("\\"))
                    .identifier();
                let service = if *retrieve == Retrieve::Move {
                    Service::Move
                } else {
                    Service::Get
                };
                self.timed(async {
                    let mut assoc =
                        QrAssociation::open(peer, service, *max_pdu_length, *timeouts).await?;
                    let result = match service {
                        Service::Move => assoc.move_to(&identifier, &peer.calling_ae_title).await,
                        _ => assoc.get(&identifier, &self.spool).await,
                    };
                    match result {
                        Ok(counts) => {
                            assoc.release().await;
                            if counts.failed > 0 {
                                tracing::warn!(
                                    study,
                                    series,
                                    failed = counts.failed,
                                    status = format!("{:04X}", counts.status),
                                    "the archive could not send some instances"
                                );
                            }
                            Ok(Some(counts))
                        }
                        Err(e) => {
                            assoc.abort().await;
                            Err(e.into())
                        }
                    }
                })
                .await
            }
            Kind::Web(web) => {
                for sop in sops {
                    let (web, spool) = (web.clone(), self.spool.clone());
                    let (st, se, sop) = (study.to_string(), series.to_string(), sop.clone());
                    self.timed(async move {
                        tokio::task::spawn_blocking(move || {
                            web.retrieve_instance(&st, &se, &sop, &spool)
                        })
                        .await
                        .map_err(|e| ArchiveError::Other(format!("WADO-RS task: {e}")))?
                        .map_err(ArchiveError::from)
                    })
                    .await?;
                }
                Ok(None)
            }
        }
    }
}

/// The identifier a C-FIND of `query` sends, for tests and debugging.
pub fn identifier_bytes(query: &Query) -> Result<Vec<u8>, QrError> {
    dimse::encode(&query.identifier(), crate::forward::scu::EXPLICIT_VR_LE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_hold_level_keys_and_returns() {
        let q = Query::new(Level::Image)
            .in_study("1.2")
            .in_series("1.2.3")
            .key(tags::SOP_INSTANCE_UID, "1.2.3.4\\1.2.3.5")
            .returns(&[tags::IMAGE_POSITION_PATIENT]);
        let obj = q.identifier();
        let text = |t| obj.element(t).unwrap().to_str().unwrap().to_string();
        assert_eq!(text(tags::QUERY_RETRIEVE_LEVEL), "IMAGE");
        assert_eq!(text(tags::SERIES_INSTANCE_UID), "1.2.3");
        assert_eq!(obj.element(tags::SOP_INSTANCE_UID).unwrap().vr(), VR::UI);
        assert!(obj
            .element(tags::IMAGE_POSITION_PATIENT)
            .unwrap()
            .to_str()
            .unwrap()
            .is_empty());
        let (path, params, fields) = q.qido();
        assert_eq!(path, "studies/1.2/series/1.2.3/instances");
        assert_eq!(params[0].1, "1.2.3.4,1.2.3.5");
        assert_eq!(fields, vec![tags::IMAGE_POSITION_PATIENT]);
        assert!(identifier_bytes(&q).is_ok());
    }

    #[tokio::test]
    async fn the_rate_limiter_paces_requests() {
        let limiter = RateLimiter::new(20.0);
        let started = Instant::now();
        for _ in 0..5 {
            limiter.acquire().await;
        }
        // The first goes at once, the next four 50 ms apart.
        assert!(
            started.elapsed() >= Duration::from_millis(190),
            "{:?}",
            started.elapsed()
        );
        let free = RateLimiter::new(0.0);
        let started = Instant::now();
        for _ in 0..100 {
            free.acquire().await;
        }
        assert!(started.elapsed() < Duration::from_millis(50));
    }
}
