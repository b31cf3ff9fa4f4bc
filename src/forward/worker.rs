//! The forwarding tasks of a node: the router (label results → outbox jobs), one worker per
//! destination (claim a batch, one association, tagged copies, outcomes recorded), and the
//! queue depth gauges.
//!
//! A worker owns its destination alone, so a destination that is down, refuses, or answers
//! slowly holds up nobody else. While its batch is on the wire the next copies are prepared
//! on the blocking pool.
//!
//! Exactly once, as far as it can be: the outcome of each C-STORE the destination answered is
//! committed before the next copy can be stored there, so a crash of the node sends again at
//! most the one copy that was on the wire. That commit waits for the operating system, not
//! the disk (`forward.sync_outcomes` makes it wait for the disk), and it runs while the next
//! copy's data goes out: only that copy's last fragment waits for it. Outcomes of copies that
//! never reached the destination (refused before sending, released on shutdown) go to a
//! recorder task in group commits.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dicom_encoding::TransferSyntaxIndex;
use dicom_object::OpenFileOptions;
use dicom_pixeldata::Transcode;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::kos;
use super::outbox::{self, Job, JobKind, Outcome, StoredInstance};
use super::routes::Route;
use super::scu::{
    self, Association, FileTail, Payload, Peer, Timeouts, Verdict, DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_LE, IMPLICIT_VR_LE,
};
use super::tagging::{self, Encoding, Labels};
use super::ForwardConfig;
use crate::config::Config;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::store::now_millis;

/// How often idle tasks look at the outbox without a wake-up (jobs due for retry, jobs of
/// crashed nodes, dead letters put back by `forward retry`, results of other nodes).
const POLL: Duration = Duration::from_secs(2);
/// Copies prepared ahead of the one being sent.
const PREPARE_AHEAD: usize = 4;
/// Files up to this size are read whole; larger ones are streamed from disk while sent.
const READ_WHOLE: u64 = 8 * 1024 * 1024;
/// Bytes read first from a larger file to find where the tagged part ends.
const PREFIX: usize = 1024 * 1024;
/// On shutdown, how long a C-STORE on the wire may still take to be answered.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long the recorder gathers outcomes of copies not delivered before a commit (only
/// delays: nothing the destination stored waits for it).
const COMMIT_GATHER: Duration = Duration::from_millis(50);
/// How often a worker sending a long batch marks its other claimed jobs as still its own.
const TOUCH_CLAIMS: Duration = Duration::from_secs(1);
/// Label results cached per worker.
const LABEL_CACHE: usize = 64;

/// The running forwarding tasks.
pub struct Forwarding {
    /// Notify when a series has been labelled: the router routes new results at once.
    pub labelled: Arc<Notify>,
    tasks: Vec<JoinHandle<()>>,
}

impl Forwarding {
    /// Wait for the tasks to stop (after the shutdown token is cancelled).
    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

struct Shared {
    index: Index,
    /// Where each delivery outcome is committed before the next copy is sent: the index,
    /// through connections whose commits wait for the operating system only, unless
    /// `forward.sync_outcomes` (see `start`).
    outcomes: Index,
    metrics: Arc<Metrics>,
    forward: ForwardConfig,
    storage_root: PathBuf,
    node_id: String,
    audit: crate::audit::AuditLog,
}

struct Destination {
    name: String,
    peer: Peer,
    wake: Arc<Notify>,
}

/// Start the router, one worker per `[[destinations]]` entry, and the depth gauges.
/// `outcomes` is the index opened for delivery outcomes (`node::open_outcomes`).
pub fn start(
    config: &Config,
    index: Index,
    outcomes: Index,
    metrics: Arc<Metrics>,
    node_id: String,
    audit: crate::audit::AuditLog,
    shutdown: CancellationToken,
) -> Forwarding {
    let shared = Arc::new(Shared {
        index,
        outcomes,
        metrics,
        forward: config.forward.clone(),
        storage_root: config.storage.path.clone(),
        node_id,
        audit,
    });
    let destinations: Vec<Arc<Destination>> = config
        .destinations
        .iter()
        .map(|d| {
            Arc::new(Destination {
                name: d.name.clone(),
                peer: Peer {
                    ae_title: d.ae_title.clone(),
                    host: d.host.clone(),
                    port: d.port,
                    calling_ae_title: d
                        .calling_ae_title
                        .clone()
                        .unwrap_or_else(|| config.dicom.ae_title.clone()),
                    tls: Arc::new(d.tls.clone()),
                },
                wake: Arc::new(Notify::new()),
            })
        })
        .collect();
    let routes = Route::all(&config.routes);
    if routes.is_empty() {
        info!("no [[routes]]: label results are recorded as routed, nothing is forwarded");
    } else {
        info!(
            routes = routes.len(),
            destinations = destinations.len(),
            "forwarding labelled series"
        );
    }
    let labelled = Arc::new(Notify::new());
    let mut tasks = vec![tokio::spawn(route_loop(
        shared.clone(),
        routes,
        destinations.clone(),
        labelled.clone(),
        shutdown.clone(),
    ))];
    for d in &destinations {
        let span = info_span!("forward", destination = %d.name);
        tasks.push(tokio::spawn(
            destination_loop(shared.clone(), d.clone(), shutdown.clone()).instrument(span),
        ));
    }
    tasks.push(tokio::spawn(depth_loop(
        shared.clone(),
        destinations.iter().map(|d| d.name.clone()).collect(),
        shutdown,
    )));
    Forwarding { labelled, tasks }
}

async fn route_loop(
    s: Arc<Shared>,
    routes: Vec<Route>,
    destinations: Vec<Arc<Destination>>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        while !shutdown.is_cancelled() {
            let routed = outbox::route_next(
                &s.index,
                &routes,
                s.forward.key_object_selection,
                now_millis(),
            )
            .await;
            match routed {
                Ok(Some(r)) => {
                    if r.jobs.is_empty() {
                        debug!(series_uid = %r.series_uid, generation = r.generation, "label result routed nowhere");
                        continue;
                    }
                    info!(series_uid = %r.series_uid, generation = r.generation, routes = %r.routes.join(","), jobs = ?r.jobs, "series routed");
                    for d in &destinations {
                        if r.jobs.contains_key(&d.name) {
                            d.wake.notify_one();
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(error = %e, "cannot route label results; retrying");
                    break;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

async fn depth_loop(s: Arc<Shared>, destinations: Vec<String>, shutdown: CancellationToken) {
    loop {
        match outbox::depth(&s.index).await {
            Ok(counts) => {
                for d in &destinations {
                    for state in ["pending", "sending", "dead"] {
                        let n = counts
                            .iter()
                            .find(|c| &c.destination == d && c.state == state)
                            .map_or(0, |c| c.count);
                        s.metrics.forward.set_depth(d, state, n);
                    }
                }
            }
            Err(e) => debug!(error = %e, "cannot read the outbox depth"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

async fn destination_loop(s: Arc<Shared>, d: Arc<Destination>, shutdown: CancellationToken) {
    let recorder = Recorder::spawn(s.clone(), d.name.clone());
    let mut labels: HashMap<i64, Arc<Labels>> = HashMap::new();
    while !shutdown.is_cancelled() {
        let now = now_millis();
        let stale = now - (s.forward.claim_timeout_secs as i64).saturating_mul(1000);
        let jobs = match outbox::claim(
            &s.index,
            &d.name,
            &s.node_id,
            now,
            stale,
            s.forward.batch_size,
        )
        .await
        {
            Ok(jobs) => jobs,
            Err(e) => {
                warn!(error = %e, "cannot claim jobs; retrying");
                Vec::new()
            }
        };
        if jobs.is_empty() {
            let due = outbox::next_due(&s.index, &d.name).await.ok().flatten();
            let wait = due
                .map(|at| Duration::from_millis((at - now_millis()).clamp(0, 60_000) as u64))
                .map_or(POLL, |w| w.min(POLL));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = d.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        let pause = send_batch(&s, &d, jobs, &mut labels, &recorder, &shutdown).await;
        recorder.flush().await;
        if let Some(pause) = pause {
            // The destination is unreachable: new jobs wait too, rather than each finding
            // out on its own.
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
    recorder.flush().await;
    if let Err(e) = outbox::release_all(&s.index, &d.name, &s.node_id).await {
        warn!(error = %e, "cannot release claimed jobs; another node takes them over after forward.claim_timeout_secs");
    }
}

/// A copy ready to send.
struct Prepared {
    context: u8,
    sop_class: String,
    payload: Payload,
}

/// A copy being prepared on the blocking pool, or why it cannot be.
type Preparing = Result<JoinHandle<Result<Prepared, Refusal>>, Refusal>;

/// Why a job could not be sent, decided before any byte went out.
#[derive(Debug)]
struct Refusal {
    permanent: bool,
    reason: String,
}

impl Refusal {
    fn permanent(reason: impl Into<String>) -> Refusal {
        Refusal {
            permanent: true,
            reason: reason.into(),
        }
    }
}

/// Send one batch on one association. Returns how long to leave the destination alone when
/// it could not be reached.
async fn send_batch(
    s: &Arc<Shared>,
    d: &Destination,
    jobs: Vec<Job>,
    labels: &mut HashMap<i64, Arc<Labels>>,
    recorder: &Recorder,
    shutdown: &CancellationToken,
) -> Option<Duration> {
    let started = Instant::now();
    let audit = BatchAudit::new(d, &jobs);
    let items: Vec<(String, String)> = jobs
        .iter()
        .filter_map(|j| match (&j.kind, &j.instance) {
            (JobKind::Kos, _) => Some((kos::KEY_OBJECT_SELECTION.into(), EXPLICIT_VR_LE.into())),
            (JobKind::Instance, Some(i)) => {
                Some((i.sop_class_uid.clone(), i.transfer_syntax_uid.clone()))
            }
            (JobKind::Instance, None) => None,
        })
        .collect();
    let proposals = scu::proposals(&items);
    let timeouts = Timeouts {
        connect: Duration::from_secs(s.forward.connect_timeout_secs),
        dimse: Duration::from_secs(s.forward.dimse_timeout_secs),
    };
    let opening = Association::open(&d.peer, &proposals, s.forward.max_pdu_length, timeouts);
    let opened = tokio::select! {
        r = opening => r,
        _ = shutdown.cancelled() => {
            for job in &jobs {
                recorder.send(Outcome::Release { id: job.id });
            }
            return None;
        }
    };
    let mut assoc = match opened {
        Ok(a) => a,
        Err(e) => {
            let permanent = e.is_permanent();
            let why = format!("{} ({}:{}): {e}", d.peer.ae_title, d.peer.host, d.peer.port);
            let max_attempts = jobs.iter().map(|j| j.attempts).max().unwrap_or(1);
            let mut dead = 0;
            for job in &jobs {
                let outcome = failure(s, d, job, None, &why, permanent);
                dead += usize::from(matches!(outcome, Outcome::Dead { .. }));
                recorder.send(outcome);
            }
            let pause = (!permanent).then(|| s.forward.backoff_secs(max_attempts));
            audit.record(
                s,
                false,
                format!(
                    "no association: {e}; {} jobs, {dead} dead-lettered",
                    jobs.len()
                ),
            );
            if dead > 0 {
                error!(error = %e, jobs = jobs.len(), dead, "no association: jobs dead-lettered");
            } else {
                warn!(error = %e, jobs = jobs.len(), retry_in_s = pause.unwrap_or(0), "no association: will retry");
            }
            return pause.map(Duration::from_secs);
        }
    };

    // Decide each job's context, then prepare copies ahead of the one on the wire.
    let mut queue: VecDeque<(Job, Preparing)> = VecDeque::new();
    let mut waiting = jobs.into_iter();
    let (mut sent, mut failed) = (0usize, 0usize);
    let mut touched = Instant::now();
    let mut committing = Committing::default();
    loop {
        while queue.len() < PREPARE_AHEAD {
            let Some(job) = waiting.next() else { break };
            let prepared = start_prepare(s, &assoc, &job, labels).await;
            queue.push_back((job, prepared));
        }
        let Some((job, prepared)) = queue.pop_front() else {
            break;
        };
        if shutdown.is_cancelled() {
            recorder.send(Outcome::Release { id: job.id });
            for (j, _) in queue.drain(..) {
                recorder.send(Outcome::Release { id: j.id });
            }
            for j in waiting.by_ref() {
                recorder.send(Outcome::Release { id: j.id });
            }
            break;
        }
        let prepared = match prepared {
            Ok(handle) => match handle.await {
                Ok(r) => r,
                Err(panic) => Err(Refusal {
                    permanent: false,
                    reason: format!("preparing the copy crashed: {panic}"),
                }),
            },
            Err(refusal) => Err(refusal),
        };
        let p = match prepared {
            Ok(p) => p,
            Err(refusal) => {
                let outcome = failure(s, d, &job, None, &refusal.reason, refusal.permanent);
                let dead = matches!(outcome, Outcome::Dead { .. });
                warn!(sop_instance_uid = %job.sop_instance_uid, reason = %refusal.reason, dead, "not sent");
                failed += 1;
                recorder.send(outcome);
                continue;
            }
        };
        let bytes = p.payload.len();
        let stored = {
            // The previous copy's outcome is committed while this one goes out, and before
            // its last fragment does.
            let storing = assoc.store_gated(
                p.context,
                &p.sop_class,
                &job.sop_instance_uid,
                p.payload,
                committing.settle(),
            );
            tokio::pin!(storing);
            tokio::select! {
                r = &mut storing => Some(r),
                // Shutting down: the copy on the wire gets a little time to be answered.
                _ = shutdown.cancelled() => tokio::time::timeout(SHUTDOWN_GRACE, &mut storing).await.ok(),
            }
        };
        let Some(stored) = stored else {
            // Not answered: sent again later (the destination may then see it twice).
            recorder.send(Outcome::Release { id: job.id });
            for (j, _) in queue.drain(..) {
                recorder.send(Outcome::Release { id: j.id });
            }
            for j in waiting.by_ref() {
                recorder.send(Outcome::Release { id: j.id });
            }
            assoc.abort().await;
            committing.finish().await;
            return None;
        };
        match stored {
            Ok(rsp) => {
                let outcome = response_outcome(s, d, &job, rsp.status, rsp.comment.as_deref());
                if matches!(outcome, Outcome::Done { .. }) {
                    sent += 1;
                    s.metrics.forward.forwarded(&d.name, bytes);
                } else {
                    failed += 1;
                }
                // Committed before the next copy can be stored by the destination (the gate
                // of its last fragment): a crash re-sends at most the copy on the wire.
                let touch = touched.elapsed() >= TOUCH_CLAIMS;
                if touch {
                    touched = Instant::now();
                }
                committing.start(s, &d.name, outcome, touch);
            }
            Err(e) => {
                // The association is gone: this job failed, the others were not tried.
                warn!(error = %e, sop_instance_uid = %job.sop_instance_uid, "C-STORE failed");
                failed += 1;
                recorder.send(failure(s, d, &job, None, &e.to_string(), false));
                for (j, _) in queue.drain(..) {
                    recorder.send(Outcome::Release { id: j.id });
                }
                for j in waiting.by_ref() {
                    recorder.send(Outcome::Release { id: j.id });
                }
                assoc.abort().await;
                committing.finish().await;
                audit.record(
                    s,
                    false,
                    format!("{sent} sent, {failed} failed; interrupted: {e}"),
                );
                info!(
                    sent,
                    failed,
                    ms = started.elapsed().as_millis() as u64,
                    "batch interrupted"
                );
                return Some(Duration::from_secs(s.forward.backoff_secs(job.attempts)));
            }
        }
    }
    // The last outcome is committed before the association is released and before the
    // next batch can start.
    committing.finish().await;
    assoc.release().await;
    audit.record(s, failed == 0, format!("{sent} sent, {failed} failed"));
    info!(
        sent,
        failed,
        ms = started.elapsed().as_millis() as u64,
        "batch forwarded"
    );
    None
}

/// One audit event per batch (an association to a destination): its series, how it went.
struct BatchAudit {
    destination: String,
    peer: String,
    calling_ae: String,
    studies: Vec<String>,
    series: Vec<String>,
}

impl BatchAudit {
    fn new(d: &Destination, jobs: &[Job]) -> BatchAudit {
        let mut studies: Vec<String> = Vec::new();
        let mut series: Vec<String> = Vec::new();
        for j in jobs {
            if !studies.contains(&j.study_uid) {
                studies.push(j.study_uid.clone());
            }
            if !series.contains(&j.series_uid) {
                series.push(j.series_uid.clone());
            }
        }
        BatchAudit {
            destination: format!("destination {} (AE {})", d.name, d.peer.ae_title),
            peer: format!("{}:{}", d.peer.host, d.peer.port),
            calling_ae: d.peer.calling_ae_title.clone(),
            studies,
            series,
        }
    }

    fn record(&self, s: &Shared, ok: bool, detail: String) {
        let outcome = if ok {
            crate::audit::Outcome::Success
        } else {
            crate::audit::Outcome::Failure
        };
        s.audit.record(
            crate::audit::AuditEvent::new(
                crate::audit::EventType::Forward,
                outcome,
                &self.calling_ae,
            )
            .peer(&self.peer)
            .object(self.destination.clone())
            .uids(&self.studies, &self.series)
            .detail(detail),
        );
    }
}

/// The outcome of a C-STORE-RSP.
fn response_outcome(
    s: &Shared,
    d: &Destination,
    job: &Job,
    status: u16,
    comment: Option<&str>,
) -> Outcome {
    let described = match comment {
        Some(c) => format!(
            "C-STORE status {status:04X} ({}): {c}",
            scu::status_name(status)
        ),
        None => format!("C-STORE status {status:04X} ({})", scu::status_name(status)),
    };
    match scu::verdict(status) {
        Verdict::Stored => Outcome::Done {
            id: job.id,
            status,
            warning: None,
        },
        Verdict::Warning => {
            info!(sop_instance_uid = %job.sop_instance_uid, status = %described, "stored with a warning");
            Outcome::Done {
                id: job.id,
                status,
                warning: Some(described),
            }
        }
        verdict => {
            let permanent = verdict == Verdict::Permanent;
            let outcome = failure(s, d, job, Some(status), &described, permanent);
            let dead = matches!(outcome, Outcome::Dead { .. });
            warn!(sop_instance_uid = %job.sop_instance_uid, status = %described, dead, "refused");
            outcome
        }
    }
}

/// A failed attempt: retried with backoff, or dead when permanent or out of attempts.
/// Counted in the metrics; the caller logs it.
fn failure(
    s: &Shared,
    d: &Destination,
    job: &Job,
    status: Option<u16>,
    why: &str,
    permanent: bool,
) -> Outcome {
    let dead = permanent || job.attempts >= i64::from(s.forward.max_attempts);
    s.metrics.forward.failed(&d.name, dead);
    if dead {
        let error = if permanent {
            why.to_string()
        } else {
            format!("after {} attempts: {why}", job.attempts)
        };
        Outcome::Dead {
            id: job.id,
            status,
            error,
        }
    } else {
        let wait = s.forward.backoff_secs(job.attempts);
        Outcome::Retry {
            id: job.id,
            available_at: now_millis() + (wait as i64) * 1000,
            status,
            error: why.to_string(),
        }
    }
}

/// Choose the job's context and start preparing its copy on the blocking pool.
async fn start_prepare(
    s: &Arc<Shared>,
    assoc: &Association,
    job: &Job,
    cache: &mut HashMap<i64, Arc<Labels>>,
) -> Result<JoinHandle<Result<Prepared, Refusal>>, Refusal> {
    let labels =
        match cache.get(&job.label_ref) {
            Some(l) => l.clone(),
            None => {
                let l = Arc::new(outbox::label(&s.index, job.label_ref).await.map_err(|e| {
                    Refusal {
                        permanent: false,
                        reason: format!("reading the label: {e}"),
                    }
                })?);
                if cache.len() >= LABEL_CACHE {
                    cache.clear();
                }
                cache.insert(job.label_ref, l.clone());
                l
            }
        };
    match job.kind {
        JobKind::Instance => {
            let Some(instance) = job.instance.clone() else {
                return Err(Refusal::permanent("the instance is no longer in the index"));
            };
            let accepted = assoc
                .choose(&instance.sop_class_uid, &instance.transfer_syntax_uid)
                .ok_or_else(|| {
                    Refusal::permanent(format!(
                        "the destination did not accept {} on any proposed transfer syntax (presentation context rejected)",
                        scu::sop_class_name(&instance.sop_class_uid)
                    ))
                })?
                .clone();
            let root = s.storage_root.clone();
            let uid = job.sop_instance_uid.clone();
            Ok(tokio::task::spawn_blocking(move || {
                let payload =
                    prepare_instance(&root, &instance, &accepted.transfer_syntax, &labels, &uid)?;
                Ok(Prepared {
                    context: accepted.id,
                    sop_class: instance.sop_class_uid,
                    payload,
                })
            }))
        }
        JobKind::Kos => {
            let accepted = assoc
                .choose(kos::KEY_OBJECT_SELECTION, EXPLICIT_VR_LE)
                .ok_or_else(|| {
                    Refusal::permanent(format!(
                        "the destination did not accept {} (presentation context rejected)",
                        scu::sop_class_name(kos::KEY_OBJECT_SELECTION)
                    ))
                })?
                .clone();
            let instances = outbox::series_instances(&s.index, job.series_ref)
                .await
                .map_err(|e| Refusal {
                    permanent: false,
                    reason: format!("reading the series: {e}"),
                })?;
            let root = s.storage_root.clone();
            let (series_uid, generation) = (job.series_uid.clone(), job.generation);
            Ok(tokio::task::spawn_blocking(move || {
                let payload = prepare_kos(
                    &root,
                    &instances,
                    &series_uid,
                    generation,
                    &labels,
                    &accepted.transfer_syntax,
                )?;
                Ok(Prepared {
                    context: accepted.id,
                    sop_class: kos::KEY_OBJECT_SELECTION.to_string(),
                    payload,
                })
            }))
        }
    }
}

fn prepare_kos(
    root: &Path,
    instances: &[outbox::SeriesInstance],
    series_uid: &str,
    generation: i64,
    labels: &Labels,
    ts: &str,
) -> Result<Payload, Refusal> {
    let mut references: Vec<kos::Reference> = Vec::new();
    for k in &labels.key_images {
        match references
            .iter_mut()
            .find(|r| r.sop_instance_uid == k.sop_instance_uid)
        {
            Some(r) => r.frames.push(k.frame),
            None => {
                let Some(i) = instances
                    .iter()
                    .find(|i| i.sop_instance_uid == k.sop_instance_uid)
                else {
                    continue;
                };
                references.push(kos::Reference {
                    sop_class_uid: i.sop_class_uid.clone(),
                    sop_instance_uid: k.sop_instance_uid.clone(),
                    frames: vec![k.frame],
                });
            }
        }
    }
    for r in &mut references {
        if r.frames == [0] {
            r.frames.clear(); // a single-frame image
        }
    }
    let source = references
        .first()
        .and_then(|r| {
            instances
                .iter()
                .find(|i| i.sop_instance_uid == r.sop_instance_uid)
        })
        .ok_or_else(|| Refusal::permanent("no key-image of the label is in the index"))?;
    let doc = kos::build(
        &root.join(&source.file_path),
        series_uid,
        generation,
        labels,
        &references,
        labels.labelled_at,
    )
    .map_err(|e| Refusal::permanent(e.to_string()))?;
    let head = kos::encode(&doc, ts).map_err(|e| Refusal::permanent(e.to_string()))?;
    Ok(Payload { head, tail: None })
}

fn encoding_of(ts: &str) -> Encoding {
    if ts == IMPLICIT_VR_LE {
        Encoding::ImplicitLe
    } else {
        Encoding::ExplicitLe
    }
}

fn io_refusal(path: &Path, e: std::io::Error) -> Refusal {
    Refusal {
        permanent: e.kind() == std::io::ErrorKind::NotFound,
        reason: format!("reading the stored file {}: {e}", path.display()),
    }
}

/// The tagged copy of a stored instance in `target_ts`.
fn prepare_instance(
    root: &Path,
    instance: &StoredInstance,
    target_ts: &str,
    labels: &Labels,
    sop_instance_uid: &str,
) -> Result<Payload, Refusal> {
    let path = root.join(&instance.file_path);
    let stored_ts = instance.transfer_syntax_uid.as_str();
    if target_ts != stored_ts {
        return convert(&path, target_ts, labels, sop_instance_uid);
    }
    let mut file = std::fs::File::open(&path).map_err(|e| io_refusal(&path, e))?;
    let size = file.metadata().map_err(|e| io_refusal(&path, e))?.len();
    let offset = dataset_offset(&mut file).map_err(|e| io_refusal(&path, e))?;
    let tag_error = |e: tagging::TagError| Refusal::permanent(format!("tagging: {e}"));
    if stored_ts == DEFLATED_EXPLICIT_VR_LE {
        let mut deflated = Vec::new();
        file.read_to_end(&mut deflated)
            .map_err(|e| io_refusal(&path, e))?;
        let mut data = Vec::new();
        flate2::read::DeflateDecoder::new(&deflated[..])
            .read_to_end(&mut data)
            .map_err(|e| Refusal::permanent(format!("inflating the stored data set: {e}")))?;
        let (head, consumed) =
            tagging::tag(&data, true, Encoding::ExplicitLe, labels, sop_instance_uid)
                .map_err(tag_error)?
                .ok_or_else(|| Refusal::permanent("tagging: the data set ended early"))?;
        let mut plain = head;
        plain.extend_from_slice(&data[consumed..]);
        let mut encoder = flate2::write::DeflateEncoder::new(
            Vec::with_capacity(plain.len() / 2),
            flate2::Compression::default(),
        );
        std::io::Write::write_all(&mut encoder, &plain)
            .map_err(|e| Refusal::permanent(format!("deflating the copy: {e}")))?;
        let head = encoder
            .finish()
            .map_err(|e| Refusal::permanent(format!("deflating the copy: {e}")))?;
        return Ok(Payload { head, tail: None });
    }
    let encoding = encoding_of(stored_ts);
    let dataset_len = size.saturating_sub(offset);
    if dataset_len > READ_WHOLE {
        let mut prefix = vec![0u8; PREFIX];
        file.read_exact(&mut prefix)
            .map_err(|e| io_refusal(&path, e))?;
        if let Some((head, consumed)) =
            tagging::tag(&prefix, false, encoding, labels, sop_instance_uid).map_err(tag_error)?
        {
            return Ok(Payload {
                head,
                tail: Some(FileTail {
                    path,
                    offset: offset + consumed as u64,
                    len: dataset_len - consumed as u64,
                }),
            });
        }
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| io_refusal(&path, e))?;
    }
    let mut data = Vec::with_capacity(dataset_len as usize);
    file.read_to_end(&mut data)
        .map_err(|e| io_refusal(&path, e))?;
    let (mut head, consumed) = tagging::tag(&data, true, encoding, labels, sop_instance_uid)
        .map_err(tag_error)?
        .ok_or_else(|| Refusal::permanent("tagging: the data set ended early"))?;
    head.extend_from_slice(&data[consumed..]);
    Ok(Payload { head, tail: None })
}

/// Re-encode in another transfer syntax (decompressing the pixel data when the destination
/// accepts only uncompressed ones), then tag.
fn convert(
    path: &Path,
    target_ts: &str,
    labels: &Labels,
    sop_instance_uid: &str,
) -> Result<Payload, Refusal> {
    let ts = TransferSyntaxRegistry
        .get(target_ts)
        .ok_or_else(|| Refusal::permanent(format!("unknown transfer syntax {target_ts}")))?;
    let mut obj = OpenFileOptions::new()
        .open_file(path)
        .map_err(|e| Refusal::permanent(format!("reading {}: {e}", path.display())))?;
    let from = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_string();
    obj.transcode(ts).map_err(|e| {
        Refusal::permanent(format!(
            "the destination accepts only uncompressed transfer syntaxes and the stored {from} pixel data cannot be decompressed: {e}"
        ))
    })?;
    let mut data = Vec::new();
    obj.write_dataset_with_ts(&mut data, ts)
        .map_err(|e| Refusal::permanent(format!("re-encoding as {target_ts}: {e}")))?;
    let (mut head, consumed) = tagging::tag(
        &data,
        true,
        encoding_of(target_ts),
        labels,
        sop_instance_uid,
    )
    .map_err(|e| Refusal::permanent(format!("tagging: {e}")))?
    .ok_or_else(|| Refusal::permanent("tagging: the data set ended early"))?;
    head.extend_from_slice(&data[consumed..]);
    Ok(Payload { head, tail: None })
}

/// Byte offset of the data set in a Part-10 file written by the store: preamble, "DICM",
/// then group 0002, whose first element is its group length.
fn dataset_offset(file: &mut std::fs::File) -> std::io::Result<u64> {
    let mut head = [0u8; 144];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut head)?;
    if &head[128..132] != b"DICM" || head[132..136] != [2, 0, 0, 0] {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a Part-10 file",
        ));
    }
    let group_len = u32::from_le_bytes([head[140], head[141], head[142], head[143]]);
    let offset = 144 + u64::from(group_len);
    file.seek(SeekFrom::Start(offset))?;
    Ok(offset)
}

/// Outcomes go to the database in group commits, off the association's path.
struct Recorder {
    tx: mpsc::UnboundedSender<Message>,
}

enum Message {
    Outcome(Outcome),
    Flush(oneshot::Sender<()>),
}

impl Recorder {
    fn spawn(s: Arc<Shared>, destination: String) -> Recorder {
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut outcomes = Vec::new();
                let mut flushes = Vec::new();
                let mut take = |m: Message| match m {
                    Message::Outcome(o) => outcomes.push(o),
                    Message::Flush(ack) => flushes.push(ack),
                };
                let flushing = matches!(first, Message::Flush(_));
                take(first);
                if !flushing {
                    // Gather a little: one commit (one fsync) for many outcomes; a flush
                    // (end of a batch) commits at once.
                    let deadline = tokio::time::Instant::now() + COMMIT_GATHER;
                    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                        let flush = matches!(m, Message::Flush(_));
                        take(m);
                        if flush {
                            break;
                        }
                    }
                }
                while let Ok(m) = rx.try_recv() {
                    take(m);
                }
                if !outcomes.is_empty() {
                    record(&s, &destination, &outcomes).await;
                }
                for ack in flushes {
                    let _ = ack.send(());
                }
            }
        });
        Recorder { tx }
    }

    fn send(&self, outcome: Outcome) {
        let _ = self.tx.send(Message::Outcome(outcome));
    }

    /// Wait until everything sent so far is committed (or given up on).
    async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Message::Flush(ack)).is_ok() {
            let _ = done.await;
        }
    }
}

/// Commit outcomes of copies that did not reach the destination, retrying a failing
/// database for a while. Outcomes that cannot be committed leave their jobs claimed; they
/// are sent again after forward.claim_timeout_secs.
async fn record(s: &Shared, destination: &str, outcomes: &[Outcome]) {
    let committed = with_retries(|| async {
        let now = now_millis();
        let applied = outbox::record(&s.index, destination, &s.node_id, outcomes, now).await?;
        Ok(applied == outcomes.len())
    })
    .await;
    warn_unapplied(committed, outcomes.len());
}

/// The commit of the last answered copy's outcome, running while the next copy goes out.
#[derive(Default)]
struct Committing {
    running: Option<JoinHandle<(bool, OutcomeConnection)>>,
    conn: OutcomeConnection,
}

impl Committing {
    /// Commit `outcome` in the background.
    fn start(&mut self, s: &Arc<Shared>, destination: &str, outcome: Outcome, touch: bool) {
        let (s, destination) = (s.clone(), destination.to_string());
        let mut conn = self.conn.take();
        self.running = Some(tokio::spawn(async move {
            let committed = record_delivery(&s, &destination, &mut conn, &outcome, touch).await;
            (committed, conn)
        }));
    }

    /// Wait for the commit in flight, if any: `Err` when it could not be made (the next copy
    /// must not be delivered: it would widen the window of copies that may arrive twice).
    async fn settle(&mut self) -> Result<(), String> {
        let Some(running) = self.running.as_mut() else {
            return Ok(());
        };
        // Awaited in place, not taken: if the copy waiting on this gate is given up (the
        // shutdown grace ran out), `finish` still waits for the commit before the jobs
        // are released.
        let result = running.await;
        self.running = None;
        match result {
            Ok((true, conn)) => {
                self.conn = conn;
                Ok(())
            }
            Ok((false, _)) => Err("the index cannot record the previous copy's outcome".into()),
            Err(e) => Err(format!("recording the previous copy's outcome failed: {e}")),
        }
    }

    /// Wait for the commit in flight (its failure is logged by `record_delivery`).
    async fn finish(&mut self) {
        let _ = self.settle().await;
    }
}

/// The connection a worker commits delivery outcomes on, held for a whole batch: a copy
/// waits for its predecessor's commit, so that commit skips the pool (an acquire and a
/// ping on release per copy).
type OutcomeConnection = Option<sqlx::pool::PoolConnection<sqlx::Any>>;

/// Commit the outcome of a copy the destination answered before the next copy goes out;
/// `false` when it could not be committed (then the copy is sent again after
/// forward.claim_timeout_secs: the one copy that may arrive twice). With `touch`, also
/// mark the worker's other claimed jobs as still its own.
async fn record_delivery(
    s: &Shared,
    destination: &str,
    conn: &mut OutcomeConnection,
    outcome: &Outcome,
    touch: bool,
) -> bool {
    let mut wait = Duration::from_millis(100);
    for attempt in 1..=8 {
        match commit_delivery(s, destination, conn, outcome, touch).await {
            Ok(applied) => {
                warn_unapplied(Some(applied), 1);
                return true;
            }
            Err(e) => {
                // A connection that failed is not trusted again.
                *conn = None;
                if attempt == 8 {
                    error!(error = %e, "cannot record a forwarding outcome; the copy will be sent again after forward.claim_timeout_secs");
                    break;
                }
                warn!(error = %e, attempt, "cannot record a forwarding outcome; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
    false
}

async fn commit_delivery(
    s: &Shared,
    destination: &str,
    conn: &mut OutcomeConnection,
    outcome: &Outcome,
    touch: bool,
) -> Result<bool, crate::index::IndexError> {
    let c = match conn {
        Some(c) => c,
        None => conn.insert(s.outcomes.pool().acquire().await?),
    };
    let now = now_millis();
    if touch {
        outbox::touch_claims(c, destination, &s.node_id, now).await?;
    }
    outbox::record_one(c, &s.node_id, outcome, now).await
}

/// Run `commit` until it succeeds, for a while (8 attempts, backoff to 5 s): `Some(all
/// applied)`, or `None` when the database kept failing.
async fn with_retries<F, Fut>(mut commit: F) -> Option<bool>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, crate::index::IndexError>>,
{
    let mut wait = Duration::from_millis(100);
    for attempt in 1..=8 {
        match commit().await {
            Ok(applied) => return Some(applied),
            Err(e) if attempt < 8 => {
                warn!(error = %e, attempt, "cannot record forwarding outcomes; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                error!(error = %e, "cannot record forwarding outcomes; the jobs will be sent again after forward.claim_timeout_secs");
            }
        }
    }
    None
}

fn warn_unapplied(committed: Option<bool>, outcomes: usize) {
    if committed == Some(false) {
        warn!(
            outcomes,
            "some jobs were taken over by another node after forward.claim_timeout_secs"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::tagging::LabelColumns;
    use crate::synth::{self, SeriesSpec};
    use dicom_dictionary_std::tags;
    use dicom_object::InMemDicomObject;

    fn labels() -> Labels {
        Labels::from_columns(
            &LabelColumns {
                body_part_examined: Some("CHEST".into()),
                classes: Some(r#"["lungs"]"#.into()),
                model_version: Some("v1".into()),
                ..LabelColumns::default()
            },
            &[],
        )
    }

    /// A stored instance in `ts`, as the store would have it.
    fn stored(dir: &Path, size: u16, ts: &str) -> (StoredInstance, String) {
        let spec = SeriesSpec::new(1, 1, size);
        let mut obj = synth::ct_slice(&spec, 0);
        obj.update_meta(|meta| meta.set_transfer_syntax(TransferSyntaxRegistry.get(ts).unwrap()));
        let name = format!("{size}-{}.dcm", ts.replace('.', "_"));
        obj.write_to_file(dir.join(&name)).expect("write");
        (
            StoredInstance {
                file_path: name,
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
                transfer_syntax_uid: ts.into(),
            },
            spec.sop_uid(0),
        )
    }

    fn body_part(bytes: &[u8], ts: &str) -> String {
        let obj =
            InMemDicomObject::read_dataset_with_ts(bytes, TransferSyntaxRegistry.get(ts).unwrap())
                .expect("the copy parses");
        obj.element(tags::BODY_PART_EXAMINED)
            .unwrap()
            .to_str()
            .unwrap()
            .trim()
            .to_string()
    }

    #[test]
    fn copies_in_the_stored_syntax_and_converted() {
        let dir = tempfile::tempdir().unwrap();
        let (inst, uid) = stored(dir.path(), 32, EXPLICIT_VR_LE);
        let p = prepare_instance(dir.path(), &inst, EXPLICIT_VR_LE, &labels(), &uid).unwrap();
        assert!(p.tail.is_none());
        assert_eq!(body_part(&p.head, EXPLICIT_VR_LE), "CHEST");

        // Explicit stored, only Implicit accepted: re-encoded, then tagged.
        let p = prepare_instance(dir.path(), &inst, IMPLICIT_VR_LE, &labels(), &uid).unwrap();
        assert_eq!(body_part(&p.head, IMPLICIT_VR_LE), "CHEST");

        // Deflated: inflated, tagged, deflated again.
        let (inst, uid) = stored(dir.path(), 32, DEFLATED_EXPLICIT_VR_LE);
        let p =
            prepare_instance(dir.path(), &inst, DEFLATED_EXPLICIT_VR_LE, &labels(), &uid).unwrap();
        let mut plain = Vec::new();
        flate2::read::DeflateDecoder::new(&p.head[..])
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(body_part(&plain, EXPLICIT_VR_LE), "CHEST");
    }

    #[test]
    fn large_instances_are_streamed_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        // 2100 × 2100 × 2 bytes: over READ_WHOLE.
        let (inst, uid) = stored(dir.path(), 2100, EXPLICIT_VR_LE);
        let p = prepare_instance(dir.path(), &inst, EXPLICIT_VR_LE, &labels(), &uid).unwrap();
        let tail = p.tail.clone().expect("the pixel data stays on disk");
        assert!(p.head.len() < 4096, "only the header is in memory");
        let file = std::fs::read(&tail.path).unwrap();
        assert_eq!(tail.offset + tail.len, file.len() as u64);
        let mut whole = p.head.clone();
        whole.extend_from_slice(&file[tail.offset as usize..]);
        assert_eq!(whole.len() as u64, p.len());
        assert_eq!(body_part(&whole, EXPLICIT_VR_LE), "CHEST");
    }

    #[test]
    fn a_missing_file_is_permanent() {
        let dir = tempfile::tempdir().unwrap();
        let inst = StoredInstance {
            file_path: "gone.dcm".into(),
            sop_class_uid: "1.2".into(),
            transfer_syntax_uid: EXPLICIT_VR_LE.into(),
        };
        let refusal =
            prepare_instance(dir.path(), &inst, EXPLICIT_VR_LE, &labels(), "1.2.3").unwrap_err();
        assert!(refusal.permanent, "{refusal:?}");
        assert!(refusal.reason.contains("gone.dcm"), "{refusal:?}");
    }
}
