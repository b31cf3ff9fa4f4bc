//! The classification stage of the node: workers take `series-complete` jobs from the
//! durable work queue, choose the key-images, run the model, and record per-image
//! probabilities and the series' coverage in the index.
//!
//! Failures are sorted on purpose: a series with nothing to classify is recorded as
//! skipped with the reason; images that cannot be decoded are noted and the rest used;
//! errors that may pass (database, model runtime) are retried with backoff and recorded as
//! failed after `classifier.max_attempts`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, warn, Instrument};

use super::classify::{label_images, LabelOptions, LabelledImage};
use super::coverage::{self, Coverage, CoverageRules, Labelled};
use super::model::Model;
use super::select::{self, Instance, KeyImageCount, Selection, SelectionRules};
use crate::config::{ClassifierConfig, KeyImages};
use crate::index::{Index, IndexedImage, Job, KeyImageRow, LabelRecord, LabelStatus};
use crate::metrics::Metrics;
use crate::store::now_millis;

/// How often an idle worker looks at the queue even without a wake-up (jobs released for
/// retry, jobs of crashed nodes, jobs completed by other nodes).
const POLL: Duration = Duration::from_secs(2);

/// Everything a worker needs, shared by all workers.
pub struct Classifier {
    pub model: Arc<Model>,
    pub index: Index,
    pub metrics: Arc<Metrics>,
    pub storage_root: PathBuf,
    pub config: ClassifierConfig,
    /// Identifies this node in `work_queue.claimed_by`.
    pub node_id: String,
    /// Notified after a result is stored: forwarding routes it (`forward::worker`).
    pub labelled: Option<Arc<Notify>>,
}

/// Why a classification did not produce a record this time.
#[derive(Debug)]
enum Attempt {
    /// Worth another try later (database or model runtime trouble).
    Transient(String),
}

/// Run `config.workers` workers until shutdown; `wake` is notified when series complete.
pub async fn run(classifier: Arc<Classifier>, wake: Arc<Notify>, shutdown: CancellationToken) {
    let workers: Vec<_> = (0..classifier.config.workers)
        .map(|n| {
            let classifier = classifier.clone();
            let wake = wake.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { work(n, classifier, wake, shutdown).await })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
}

async fn work(n: usize, c: Arc<Classifier>, wake: Arc<Notify>, shutdown: CancellationToken) {
    loop {
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let now = now_millis();
            let stale = now - (c.config.claim_timeout_secs as i64).saturating_mul(1000);
            match c.index.claim_job(&c.node_id, now, stale).await {
                Ok(Some(job)) => {
                    let span = info_span!("series", series_uid = %job.series_uid, generation = job.generation, worker = n);
                    process(&c, job).instrument(span).await;
                }
                Ok(None) => break,
                Err(e) => {
                    error!(error = %e, "cannot read the work queue; retrying");
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

async fn process(c: &Arc<Classifier>, job: Job) {
    match c.index.series_generation(job.series_ref).await {
        Ok(current) if current > job.generation => {
            info!(
                current,
                "series re-opened since; the newer generation will be labelled"
            );
            if let Err(e) = c.index.supersede_job(&job, &c.node_id, now_millis()).await {
                warn!(error = %e, "cannot close the superseded job");
            }
            return;
        }
        Ok(_) => {}
        Err(e) => return retry_or_fail(c, &job, format!("reading the series: {e}")).await,
    }
    let images = match c.index.series_images(job.series_ref).await {
        Ok(images) => images,
        Err(e) => {
            return retry_or_fail(c, &job, format!("reading the series' instances: {e}")).await
        }
    };
    let started = Instant::now();
    let worker = c.clone();
    let outcome = tokio::task::spawn_blocking(move || classify_series(&worker, &images)).await;
    let record = match outcome {
        Ok(Ok(record)) => record,
        Ok(Err(Attempt::Transient(why))) => return retry_or_fail(c, &job, why).await,
        Err(panic) => {
            return retry_or_fail(c, &job, format!("classification crashed: {panic}")).await
        }
    };
    c.metrics
        .classification_seconds
        .observe(started.elapsed().as_secs_f64());
    store(c, &job, record).await;
}

async fn store(c: &Classifier, job: &Job, record: LabelRecord) {
    let status = record.status;
    let summary = (
        record.body_part_examined.clone(),
        record.dominant_class.clone(),
        record.reason.clone(),
    );
    match c
        .index
        .finish_job(job, &c.node_id, &record, now_millis())
        .await
    {
        Ok(true) => {
            c.metrics.series_labelled(status.as_str());
            if let Some(labelled) = &c.labelled {
                labelled.notify_one();
            }
            info!(
                status = status.as_str(),
                body_part = summary.0.as_deref().unwrap_or("-"),
                dominant = summary.1.as_deref().unwrap_or("-"),
                key_images = record.key_images.len(),
                reason = summary.2.as_deref().unwrap_or(""),
                ms = record.total_ms.unwrap_or(0),
                "series labelled"
            );
        }
        Ok(false) => warn!(
            "the job was taken over by another node after claim_timeout_secs; its result counts"
        ),
        Err(e) => {
            let why = format!("storing the result: {e}");
            retry_or_fail(c, job, why).await;
        }
    }
}

/// Retry with exponential backoff (5 s, 10 s, 20 s, ... capped at 5 min), or record the
/// series as failed once `max_attempts` is reached.
async fn retry_or_fail(c: &Classifier, job: &Job, why: String) {
    if job.attempts >= i64::from(c.config.max_attempts) {
        error!(attempts = job.attempts, error = %why, "classification failed for good");
        let record = LabelRecord::without_labels(
            LabelStatus::Failed,
            format!("after {} attempts: {why}", job.attempts),
        );
        match c
            .index
            .finish_job(job, &c.node_id, &record, now_millis())
            .await
        {
            Ok(_) => c.metrics.series_labelled("failed"),
            Err(e) => {
                error!(error = %e, "cannot record the failure; the job will be taken over later")
            }
        }
        return;
    }
    let backoff_s = (5u64 << (job.attempts.clamp(1, 7) - 1) as u32).min(300);
    warn!(attempts = job.attempts, retry_in_s = backoff_s, error = %why, "classification will be retried");
    let at = now_millis() + (backoff_s as i64) * 1000;
    if let Err(e) = c.index.retry_job(job, &c.node_id, &why, at).await {
        error!(error = %e, "cannot release the job; it will be taken over after claim_timeout_secs");
    }
}

pub fn selection_rules(config: &ClassifierConfig) -> SelectionRules {
    SelectionRules {
        key_images: match config.key_images {
            KeyImages::Count(n) => KeyImageCount::Count(n),
            KeyImages::All => KeyImageCount::All,
        },
        axial_tolerance_deg: config.axial_tolerance_deg,
    }
}

pub fn coverage_rules(config: &ClassifierConfig) -> CoverageRules {
    CoverageRules {
        decoding: config.decoding,
        order: crate::anatomy::order::OrderRules {
            switch_penalty: config.switch_penalty,
            skip_penalty: config.skip_penalty,
        },
        min_region_fraction: config.min_region_fraction,
        min_region_images: config.min_region_images,
    }
}

fn to_instance(root: &Path, image: &IndexedImage) -> Instance {
    Instance {
        sop_instance_uid: image.sop_instance_uid.clone(),
        sop_class_uid: image.sop_class_uid.clone(),
        path: root.join(&image.file_path),
        image_type: image.image_type.clone(),
        image_position: image.image_position.clone(),
        image_orientation: image.image_orientation.clone(),
        number_of_frames: image.number_of_frames,
        instance_number: image.instance_number,
    }
}

/// Select, decode, infer and summarise one series (blocking: runs on the blocking pool).
fn classify_series(c: &Classifier, images: &[IndexedImage]) -> Result<LabelRecord, Attempt> {
    let started = Instant::now();
    let instances: Vec<Instance> = images
        .iter()
        .map(|i| to_instance(&c.storage_root, i))
        .collect();
    let (key_images, candidates, derived_only) =
        match select::select(&instances, &selection_rules(&c.config)) {
            Selection::Skipped { reason } => {
                return Ok(LabelRecord::without_labels(LabelStatus::Skipped, reason))
            }
            Selection::Selected {
                key_images,
                candidates,
                derived_only,
            } => (key_images, candidates, derived_only),
        };
    let select_ms = started.elapsed().as_millis() as i64;
    let options = LabelOptions {
        threads: 0,
        axial_tolerance_deg: c.config.axial_tolerance_deg,
    };
    let labelling = label_images(&c.model, &key_images, &options)
        .map_err(|e| Attempt::Transient(format!("running the model: {e}")))?;
    let mut notes: Vec<String> = labelling
        .failed
        .iter()
        .map(|(image, err)| format!("{} frame {}: {err}", image.sop_instance_uid, image.frame))
        .collect();
    if derived_only {
        notes.push("no ORIGINAL axial image: DERIVED images were used".into());
    }
    if labelling.labelled.is_empty() {
        let first = notes.first().cloned().unwrap_or_default();
        let reason = format!(
            "none of the {} key-images could be decoded; the first: {first}",
            key_images.len()
        );

        return Ok(LabelRecord::without_labels(LabelStatus::Failed, reason));
    }
    let classes = c.model.info().classes.clone();
    let cov = coverage::coverage(
        &to_labelled(&labelling.labelled),
        &classes,
        &coverage_rules(&c.config),
    );
    notes.extend(cov.decoding_note.clone());
    Ok(record(
        c,
        &labelling.labelled,
        &cov,
        notes,
        candidates,
        [
            select_ms,
            labelling.timings.decode_ms.round() as i64,
            labelling.timings.infer_ms.round() as i64,
            started.elapsed().as_millis() as i64,
        ],
    ))
}

fn to_labelled(images: &[LabelledImage]) -> Vec<Labelled> {
    images
        .iter()
        .map(|i| Labelled {
            z_mm: i.z_mm,
            probabilities: i.probabilities.clone(),
        })
        .collect()
}

/// The index record of a labelled series. `ms` = select, decode, infer, total.
fn record(
    c: &Classifier,
    images: &[LabelledImage],
    cov: &Coverage,
    notes: Vec<String>,
    candidates: usize,
    ms: [i64; 4],
) -> LabelRecord {
    let info = c.model.info();
    let key_images = images
        .iter()
        .zip(&cov.labels)
        .map(|(img, decoded)| KeyImageRow {
            sop_instance_uid: img.sop_instance_uid.clone(),
            frame: i64::from(img.frame),
            z_mm: img.z_mm,
            label: info
                .classes
                .get(coverage::argmax(&img.probabilities))
                .cloned()
                .unwrap_or_default(),
            // The column keeps its name: it holds the label decoded along z.
            smoothed_label: decoded.clone(),
            probabilities: probabilities_json(&info.classes, &img.probabilities),
        })
        .collect();
    LabelRecord {
        status: LabelStatus::Labelled,
        reason: None,
        notes: (!notes.is_empty()).then(|| serde_json::to_string(&notes).unwrap_or_default()),
        dominant_class: cov.dominant_class.clone(),
        body_part_examined: cov.body_part_examined.map(|r| r.body_part.to_string()),
        anatomic_regions: serde_json::to_string(&cov.regions).ok(),
        coverage: serde_json::to_string(&cov.ranges).ok(),
        classes: serde_json::to_string(&info.classes).ok(),
        model_version: Some(info.model_version.clone()),
        provider: Some(c.model.provider().to_string()),
        candidate_images: candidates as i64,
        select_ms: Some(ms[0]),
        decode_ms: Some(ms[1]),
        infer_ms: Some(ms[2]),
        total_ms: Some(ms[3]),
        key_images,
    }
}

pub fn probabilities_json(classes: &[String], probabilities: &[f32]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = classes
        .iter()
        .zip(probabilities)
        .map(|(c, p)| {
            (
                c.clone(),
                serde_json::json!((f64::from(*p) * 1e6).round() / 1e6),
            )
        })
        .collect();
    serde_json::Value::Object(map).to_string()
}
