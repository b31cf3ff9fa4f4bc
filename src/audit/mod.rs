//! The audit trail: who did what, durable and queryable, in the index (`audit_events`,
//! migration 0006), listed by `anatomy-node audit` ([`cli`]).
//!
//! Events come from the hot paths (associations, C-STORE, C-FIND, HTTP requests), so they
//! are never written there: [`AuditLog::record`] puts the event on a bounded channel and
//! returns at once; one writer task commits them in batches (one transaction for many
//! events, like the index's group commit). When the channel is full the event is dropped,
//! counted in `anatomy_audit_events_dropped_total` and logged: an audit write never holds
//! back a C-STORE.
//!
//! Events carry UIDs, AE titles, token names and addresses, never patient names or IDs:
//! the audit table must not become a second PHI store.

pub mod atna;
pub mod cli;
pub mod syslog;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::Row;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{error, warn};

use crate::index::Index;
use crate::metrics::Metrics;
use crate::store::now_millis;

/// Events waiting for the writer; past this, new ones are dropped (and counted).
const QUEUE: usize = 8192;
/// Events committed in one transaction at most.
const BATCH: usize = 512;
/// How often old events are pruned when `audit.retention_days` is set.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Text fields are cut to this many characters (a peer controls some of them).
const MAX_FIELD: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    NodeStart,
    NodeStop,
    AssociationAccepted,
    AssociationRefused,
    InstancesReceived,
    CFind,
    Forward,
    HttpRequest,
    AuthFailure,
    /// Certificates or other settings reloaded while running (SIGHUP).
    ConfigReload,
}

impl EventType {
    pub const ALL: [EventType; 10] = [
        EventType::NodeStart,
        EventType::NodeStop,
        EventType::AssociationAccepted,
        EventType::AssociationRefused,
        EventType::InstancesReceived,
        EventType::CFind,
        EventType::Forward,
        EventType::HttpRequest,
        EventType::AuthFailure,
        EventType::ConfigReload,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::NodeStart => "node_start",
            EventType::NodeStop => "node_stop",
            EventType::AssociationAccepted => "association_accepted",
            EventType::AssociationRefused => "association_refused",
            EventType::InstancesReceived => "instances_received",
            EventType::CFind => "c_find",
            EventType::Forward => "forward",
            EventType::HttpRequest => "http_request",
            EventType::AuthFailure => "auth_failure",
            EventType::ConfigReload => "config_reload",
        }
    }

    pub fn parse(text: &str) -> Option<EventType> {
        let t = text.trim().to_ascii_lowercase().replace('-', "_");
        EventType::ALL.into_iter().find(|e| e.as_str() == t)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Tried and failed (an error, invalid credentials, a destination that refused).
    Failure,
    /// Not allowed (an unknown AE title, a missing role).
    Refused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Refused => "refused",
        }
    }

    pub fn parse(text: &str) -> Option<Outcome> {
        match text.trim().to_ascii_lowercase().as_str() {
            "success" => Some(Outcome::Success),
            "failure" => Some(Outcome::Failure),
            "refused" => Some(Outcome::Refused),
            _ => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One audit event. Only UIDs, AE titles, principal names and addresses: no PHI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// Milliseconds since 1970-01-01 UTC.
    pub occurred_at: i64,
    pub event_type: EventType,
    pub outcome: Outcome,
    pub actor: String,
    pub peer: Option<String>,
    pub cert_subject: Option<String>,
    pub studies: Option<String>,
    pub series: Option<String>,
    pub object: Option<String>,
    pub detail: Option<String>,
}

impl AuditEvent {
    pub fn new(event_type: EventType, outcome: Outcome, actor: impl Into<String>) -> AuditEvent {
        AuditEvent {
            occurred_at: now_millis(),
            event_type,
            outcome,
            actor: clip(actor.into()),
            peer: None,
            cert_subject: None,
            studies: None,
            series: None,
            object: None,
            detail: None,
        }
    }

    pub fn peer(mut self, peer: impl fmt::Display) -> Self {
        self.peer = Some(clip(peer.to_string()));
        self
    }

    /// The subject of the peer's TLS client certificate, when it showed one.
    pub fn certificate(mut self, cert: Option<&crate::net::CertificateIdentity>) -> Self {
        self.cert_subject = cert.map(|c| clip(c.subject.clone()));
        self
    }

    pub fn object(mut self, object: impl Into<String>) -> Self {
        self.object = Some(clip(object.into()));
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(clip(detail.into()));
        self
    }

    /// Study and Series Instance UIDs (comma-separated when several).
    pub fn uids(mut self, studies: &[String], series: &[String]) -> Self {
        let join = |v: &[String]| (!v.is_empty()).then(|| clip(v.join(",")));
        self.studies = join(studies);
        self.series = join(series);
        self
    }
}

/// Peers choose AE titles, paths and reasons: no control characters, bounded length.
fn clip(text: String) -> String {
    let clean = |c: char| !c.is_control();
    if text.len() <= MAX_FIELD && text.chars().all(clean) {
        return text;
    }
    text.chars()
        .map(|c| if clean(c) { c } else { '?' })
        .take(MAX_FIELD)
        .collect()
}

enum Message {
    Event(AuditEvent),
    Flush(oneshot::Sender<()>),
}

/// The recorder: cheap to clone, never blocks. [`AuditLog::disabled`] records nothing.
#[derive(Clone)]
pub struct AuditLog {
    tx: Option<mpsc::Sender<Message>>,
    /// `[audit.syslog]`: each event also goes to the syslog collector.
    syslog: Option<syslog::SyslogSender>,
    metrics: Option<Arc<Metrics>>,
    dropped: Arc<AtomicU64>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("enabled", &self.tx.is_some())
            .finish()
    }
}

impl AuditLog {
    pub fn disabled() -> AuditLog {
        AuditLog {
            tx: None,
            syslog: None,
            metrics: None,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Start the writer task on `index`. With `retention_days` > 0, events older than that
    /// are deleted once an hour. The task ends when every clone of the log is dropped.
    pub fn spawn(
        index: Index,
        metrics: Arc<Metrics>,
        retention_days: u32,
    ) -> (AuditLog, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(write_loop(index, rx, retention_days));
        (
            AuditLog {
                tx: Some(tx),
                syslog: None,
                metrics: Some(metrics),
                dropped: Arc::new(AtomicU64::new(0)),
            },
            task,
        )
    }

    /// Every event recorded from now on also goes to the syslog collector (ATNA).
    pub fn with_syslog(mut self, sender: syslog::SyslogSender) -> AuditLog {
        self.syslog = Some(sender);
        self
    }

    /// Queue an event; never waits. A full queue drops it (counted, logged).
    pub fn record(&self, event: AuditEvent) {
        if let Some(syslog) = &self.syslog {
            syslog.send(&event);
        }
        let Some(tx) = &self.tx else { return };
        match tx.try_send(Message::Event(event)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.count_drop("queue full"),
            Err(mpsc::error::TrySendError::Closed(_)) => self.count_drop("writer stopped"),
        }
    }

    fn count_drop(&self, why: &str) {
        if let Some(m) = &self.metrics {
            m.audit_dropped.inc();
        }
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        // The first drop, then one line per thousand: a flood must not flood the log too.
        if n == 1 || n % 1000 == 0 {
            warn!(
                dropped = n,
                reason = why,
                "audit events dropped (the audit writer cannot keep up)"
            );
        }
    }

    /// Wait until everything queued so far is committed (or given up on).
    pub async fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (done, wait) = oneshot::channel();
        if tx.send(Message::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// A recorder for one accepted association (see [`AssociationAudit`]).
    pub fn association(
        &self,
        peer: std::net::SocketAddr,
        calling_ae: &str,
        contexts: usize,
        client_cert: Option<&crate::net::CertificateIdentity>,
    ) -> AssociationAudit {
        let cert = client_cert.map_or_else(String::new, |c| format!("; client certificate {c}"));
        self.record(
            AuditEvent::new(
                EventType::AssociationAccepted,
                Outcome::Success,
                calling_ae.trim(),
            )
            .peer(peer)
            .certificate(client_cert)
            .detail(format!("{contexts} presentation contexts accepted{cert}")),
        );
        AssociationAudit {
            log: self.clone(),
            peer,
            calling_ae: calling_ae.trim().to_string(),
            cert: client_cert.cloned(),
            received: Arc::new(ReceivedTally::default()),
        }
    }
}

/// One association's audit: its C-FINDs, and at its end one `instances_received` event
/// with the number of instances stored and their study and series UIDs (one row per
/// association, not per instance: at hundreds of images a second, per-instance rows would
/// double the index's write load; the instances table already records each instance with
/// its calling AE and time).
#[derive(Clone)]
pub struct AssociationAudit {
    log: AuditLog,
    peer: std::net::SocketAddr,
    calling_ae: String,
    /// The TLS client certificate of the association, for every event it records.
    cert: Option<crate::net::CertificateIdentity>,
    received: Arc<ReceivedTally>,
}

impl AssociationAudit {
    /// What the store adds each committed instance to.
    pub fn tally(&self) -> Arc<ReceivedTally> {
        self.received.clone()
    }

    /// A C-FIND answered (or refused) on this association.
    pub fn find(&self, level: &str, matches: u64, status: u16) {
        let outcome = if status == 0 || status == 0xFE00 {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        self.log.record(
            AuditEvent::new(EventType::CFind, outcome, &self.calling_ae)
                .peer(self.peer)
                .certificate(self.cert.as_ref())
                .object(if level.is_empty() { "?" } else { level })
                .detail(format!("{matches} matches, status {status:04X}")),
        );
    }

    /// The status a C-STORE was answered with: failures are counted (successes are counted
    /// by the store, which knows their UIDs).
    pub fn store_status(&self, code: u16) {
        if matches!(code & 0xF000, 0xA000 | 0xC000) {
            self.received.failed();
        }
    }

    /// The association ended: the instances received on it, if any.
    pub fn finish(&self) {
        let Some(summary) = self.received.take() else {
            return;
        };
        let outcome = if summary.stored == 0 {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        self.log.record(
            AuditEvent::new(EventType::InstancesReceived, outcome, &self.calling_ae)
                .peer(self.peer)
                .certificate(self.cert.as_ref())
                .uids(&summary.studies, &summary.series)
                .detail(format!(
                    "{} stored, {} failed",
                    summary.stored, summary.failed
                )),
        );
    }
}

/// Instances received on one association.
#[derive(Debug, Default)]
pub struct ReceivedTally {
    inner: Mutex<Received>,
}

#[derive(Debug, Default)]
struct Received {
    stored: u64,
    failed: u64,
    studies: Vec<String>,
    series: Vec<String>,
}

/// Several thousand series on one association are possible in theory: the UID lists stop
/// growing here (the count still counts).
const MAX_UIDS: usize = 64;

impl ReceivedTally {
    pub fn stored(&self, study_uid: &str, series_uid: &str) {
        let Ok(mut r) = self.inner.lock() else { return };
        r.stored += 1;
        let r = &mut *r;
        for (list, uid) in [(&mut r.studies, study_uid), (&mut r.series, series_uid)] {
            if list.len() < MAX_UIDS && !list.iter().any(|u| u == uid) {
                list.push(uid.to_string());
            }
        }
    }

    pub fn failed(&self) {
        if let Ok(mut r) = self.inner.lock() {
            r.failed += 1;
        }
    }

    fn take(&self) -> Option<Received> {
        let mut r = self.inner.lock().ok()?;
        let taken = std::mem::take(&mut *r);
        (taken.stored + taken.failed > 0).then_some(taken)
    }
}

async fn write_loop(index: Index, mut rx: mpsc::Receiver<Message>, retention_days: u32) {
    let mut messages = Vec::with_capacity(BATCH);
    let mut last_prune: Option<tokio::time::Instant> = None;
    loop {
        if retention_days > 0 && last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            last_prune = Some(tokio::time::Instant::now());
            let cutoff = now_millis() - i64::from(retention_days) * 86_400_000;
            match prune(&index, cutoff).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    deleted = n,
                    retention_days,
                    "audit events past audit.retention_days deleted"
                ),
                Err(e) => warn!(error = %e, "cannot prune the audit trail"),
            }
        }
        let received = tokio::select! {
            n = rx.recv_many(&mut messages, BATCH) => n,
            _ = tokio::time::sleep(PRUNE_EVERY), if retention_days > 0 => continue,
        };
        if received == 0 {
            return;
        }
        let mut flushes = Vec::new();
        let mut events = Vec::with_capacity(messages.len());
        for m in messages.drain(..) {
            match m {
                Message::Event(e) => events.push(e),
                Message::Flush(done) => flushes.push(done),
            }
        }
        if !events.is_empty() {
            write_with_retries(&index, &events).await;
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

async fn write_with_retries(index: &Index, events: &[AuditEvent]) {
    for attempt in 1..=5u32 {
        match insert(index, events).await {
            Ok(()) => return,
            Err(e) if attempt < 5 => {
                warn!(error = %e, attempt, "cannot write audit events; retrying");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            Err(e) => {
                error!(error = %e, events = events.len(), "audit events lost: the index does not take them");
            }
        }
    }
}

/// Commit `events` in one transaction.
pub async fn insert(index: &Index, events: &[AuditEvent]) -> Result<(), AuditError> {
    let mut tx = index.pool().begin().await?;
    for e in events {
        sqlx::query(
            "INSERT INTO audit_events (occurred_at, event_type, outcome, actor, peer, \
             cert_subject, studies, series, object, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(e.occurred_at)
        .bind(e.event_type.as_str())
        .bind(e.outcome.as_str())
        .bind(&e.actor)
        .bind(&e.peer)
        .bind(&e.cert_subject)
        .bind(&e.studies)
        .bind(&e.series)
        .bind(&e.object)
        .bind(&e.detail)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Delete events older than `cutoff` (ms since the epoch). Returns how many.
pub async fn prune(index: &Index, cutoff: i64) -> Result<u64, AuditError> {
    let done = sqlx::query("DELETE FROM audit_events WHERE occurred_at < $1")
        .bind(cutoff)
        .execute(index.pool())
        .await?;
    Ok(done.rows_affected())
}

/// Which events to list.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub event_type: Option<EventType>,
    pub actor: Option<String>,
    pub outcome: Option<Outcome>,
    pub limit: i64,
}

/// An event as stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoredEvent {
    pub id: i64,
    /// RFC 3339, UTC.
    pub time: String,
    pub occurred_at: i64,
    pub event_type: String,
    pub outcome: String,
    pub actor: String,
    pub peer: Option<String>,
    pub cert_subject: Option<String>,
    pub studies: Option<String>,
    pub series: Option<String>,
    pub object: Option<String>,
    pub detail: Option<String>,
}

/// Events matching `filter`, newest first.
pub async fn list(index: &Index, filter: &Filter) -> Result<Vec<StoredEvent>, AuditError> {
    let mut conditions = Vec::new();
    let mut n = 0;
    let mut param = || {
        n += 1;
        format!("${n}")
    };
    if filter.since.is_some() {
        conditions.push(format!("occurred_at >= {}", param()));
    }
    if filter.until.is_some() {
        conditions.push(format!("occurred_at <= {}", param()));
    }
    if filter.event_type.is_some() {
        conditions.push(format!("event_type = {}", param()));
    }
    if filter.actor.is_some() {
        conditions.push(format!("actor = {}", param()));
    }
    if filter.outcome.is_some() {
        conditions.push(format!("outcome = {}", param()));
    }
    let limit = param();
    let where_clause = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    let sql = format!(
        "SELECT id, occurred_at, event_type, outcome, actor, peer, cert_subject, studies, \
         series, object, detail FROM audit_events{where_clause} \
         ORDER BY occurred_at DESC, id DESC LIMIT {limit}"
    );
    let mut query = sqlx::query(&sql);
    if let Some(v) = filter.since {
        query = query.bind(v);
    }
    if let Some(v) = filter.until {
        query = query.bind(v);
    }
    if let Some(v) = filter.event_type {
        query = query.bind(v.as_str());
    }
    if let Some(v) = &filter.actor {
        query = query.bind(v.clone());
    }
    if let Some(v) = filter.outcome {
        query = query.bind(v.as_str());
    }
    query = query.bind(filter.limit);
    let rows = query.fetch_all(index.pool()).await?;
    rows.iter()
        .map(|r| {
            let occurred_at: i64 = r.try_get(1)?;
            Ok(StoredEvent {
                id: r.try_get(0)?,
                time: format_time(occurred_at),
                occurred_at,
                event_type: r.try_get(2)?,
                outcome: r.try_get(3)?,
                actor: r.try_get(4)?,
                peer: r.try_get(5)?,
                cert_subject: r.try_get(6)?,
                studies: r.try_get(7)?,
                series: r.try_get(8)?,
                object: r.try_get(9)?,
                detail: r.try_get(10)?,
            })
        })
        .collect()
}

/// RFC 3339 with milliseconds, UTC.
pub fn format_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
        assert_eq!(
            EventType::parse("auth-failure"),
            Some(EventType::AuthFailure)
        );
        assert_eq!(EventType::parse("login"), None);
        assert_eq!(Outcome::parse("Refused"), Some(Outcome::Refused));
        assert_eq!(Outcome::parse("ok"), None);
    }

    #[test]
    fn peer_text_is_cleaned_and_bounded() {
        let e = AuditEvent::new(EventType::CFind, Outcome::Success, "A\nB\u{7}");
        assert_eq!(e.actor, "A?B?");
        let long = "x".repeat(5000);
        assert_eq!(
            AuditEvent::new(EventType::CFind, Outcome::Success, long)
                .actor
                .len(),
            MAX_FIELD
        );
    }

    #[test]
    fn tally_counts_and_keeps_distinct_uids() {
        let t = ReceivedTally::default();
        assert!(t.take().is_none());
        t.stored("1.1", "1.1.1");
        t.stored("1.1", "1.1.1");
        t.stored("1.1", "1.1.2");
        t.failed();
        let r = t.take().expect("counted");
        assert_eq!((r.stored, r.failed), (3, 1));
        assert_eq!(r.studies, vec!["1.1"]);
        assert_eq!(r.series, vec!["1.1.1", "1.1.2"]);
        assert!(t.take().is_none());
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let metrics = Arc::new(Metrics::new());
        let (tx, mut rx) = mpsc::channel(2);
        let log = AuditLog {
            tx: Some(tx),
            syslog: None,
            metrics: Some(metrics.clone()),
            dropped: Arc::new(AtomicU64::new(0)),
        };
        for _ in 0..5 {
            // Returns at once although nobody reads the queue.
            log.record(AuditEvent::new(EventType::CFind, Outcome::Success, "PACS"));
        }
        assert_eq!(metrics.audit_dropped.get(), 3);
        assert!(metrics
            .render()
            .contains("anatomy_audit_events_dropped_total 3"));
        let mut kept = Vec::new();
        assert_eq!(rx.recv_many(&mut kept, 10).await, 2);
        AuditLog::disabled().record(AuditEvent::new(
            EventType::NodeStart,
            Outcome::Success,
            "node",
        ));
    }

    #[test]
    fn times_are_utc_rfc3339() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000Z");
    }
}
