//! The classification side of the index: claiming `series-complete` jobs from the work
//! queue, reading a series' images, and recording what the classifier found — all safe
//! with several nodes on one PostgreSQL (`FOR UPDATE SKIP LOCKED`, ownership checked at
//! commit, one result per series generation).

use sqlx::Row;

use super::{Backend, Index, IndexError};

pub const SERIES_COMPLETE: &str = "series-complete";

/// A claimed job: classify one generation of one series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: i64,
    pub series_ref: i64,
    pub series_uid: String,
    pub generation: i64,
    /// Attempts including this one.
    pub attempts: i64,
}

/// An image of a series, as the index knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexedImage {
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    /// Relative to storage.path.
    pub file_path: String,
    pub image_type: Option<String>,
    pub image_position: Option<String>,
    pub image_orientation: Option<String>,
    pub number_of_frames: Option<i64>,
    pub instance_number: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelStatus {
    Labelled,
    Skipped,
    Failed,
}

impl LabelStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            LabelStatus::Labelled => "labelled",
            LabelStatus::Skipped => "skipped",
            LabelStatus::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct KeyImageRow {
    pub sop_instance_uid: String,
    pub frame: i64,
    pub z_mm: f64,
    /// The model's most probable class for this image alone.
    pub label: String,
    /// The label decoded along z in the body's order (`anatomy::order`), what the series'
    /// coverage is read from; the column keeps its older name (it held a moving average).
    pub smoothed_label: String,
    /// JSON object {class: probability}.
    pub probabilities: String,
}

/// The result of one classification, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelRecord {
    pub status: LabelStatus,
    pub reason: Option<String>,
    /// JSON list of problems that did not stop the classification.
    pub notes: Option<String>,
    pub dominant_class: Option<String>,
    pub body_part_examined: Option<String>,
    /// JSON (see migrations/*/0002_labels.sql).
    pub anatomic_regions: Option<String>,
    pub coverage: Option<String>,
    pub classes: Option<String>,
    pub model_version: Option<String>,
    pub provider: Option<String>,
    pub candidate_images: i64,
    pub select_ms: Option<i64>,
    pub decode_ms: Option<i64>,
    pub infer_ms: Option<i64>,
    pub total_ms: Option<i64>,
    pub key_images: Vec<KeyImageRow>,
}

impl LabelRecord {
    /// A result with nothing but a status and a reason (skipped or failed).
    pub fn without_labels(status: LabelStatus, reason: impl Into<String>) -> LabelRecord {
        LabelRecord {
            status,
            reason: Some(reason.into()),
            notes: None,
            dominant_class: None,
            body_part_examined: None,
            anatomic_regions: None,
            coverage: None,
            classes: None,
            model_version: None,
            provider: None,
            candidate_images: 0,
            select_ms: None,
            decode_ms: None,
            infer_ms: None,
            total_ms: None,
            key_images: Vec::new(),
        }
    }
}

impl Index {
    /// Claim the oldest ready job, or a running one whose owner went silent before
    /// `stale_before` (it crashed: its work is done again).
    pub async fn claim_job(
        &self,
        node: &str,
        now: i64,
        stale_before: i64,
    ) -> Result<Option<Job>, IndexError> {
        let lock = match self.backend() {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let mut tx = self.pool().begin().await?;
        let claimed = sqlx::query(&format!(
            "UPDATE work_queue SET state = 'running', claimed_by = $1, claimed_at = $2, attempts = attempts + 1 \
             WHERE id = (SELECT id FROM work_queue WHERE kind = '{SERIES_COMPLETE}' \
                 AND ((state = 'pending' AND available_at <= $2) OR (state = 'running' AND claimed_at < $3)) \
                 ORDER BY available_at, id LIMIT 1{lock}) \
             RETURNING id, series_ref, generation, attempts"
        ))
        .bind(node)
        .bind(now)
        .bind(stale_before)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = claimed else {
            tx.commit().await?;
            return Ok(None);
        };
        let series_ref: i64 = row.get(1);
        let series_uid: String = sqlx::query("SELECT series_uid FROM series WHERE id = $1")
            .bind(series_ref)
            .fetch_one(&mut *tx)
            .await?
            .get(0);
        tx.commit().await?;
        Ok(Some(Job {
            id: row.get(0),
            series_ref,
            series_uid,
            generation: row.get(2),
            attempts: row.get(3),
        }))
    }

    /// The generation a series is at now (a late instance bumps it).
    pub async fn series_generation(&self, series_ref: i64) -> Result<i64, IndexError> {
        Ok(sqlx::query("SELECT generation FROM series WHERE id = $1")
            .bind(series_ref)
            .fetch_one(self.pool())
            .await?
            .get(0))
    }

    pub async fn series_images(&self, series_ref: i64) -> Result<Vec<IndexedImage>, IndexError> {
        let rows = sqlx::query(
            "SELECT sop_instance_uid, sop_class_uid, file_path, image_type, image_position, \
                 image_orientation, number_of_frames, instance_number \
             FROM instances WHERE series_ref = $1 ORDER BY id",
        )
        .bind(series_ref)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| IndexedImage {
                sop_instance_uid: r.get(0),
                sop_class_uid: r.get(1),
                file_path: r.get(2),
                image_type: r.get(3),
                image_position: r.get(4),
                image_orientation: r.get(5),
                number_of_frames: r.get(6),
                instance_number: r.get(7),
            })
            .collect())
    }

    /// Store the result and close the job in one transaction. Returns false (and stores
    /// nothing) when the job is no longer this node's: it was taken over after a
    /// claim timeout, and the other node's result counts.
    pub async fn finish_job(
        &self,
        job: &Job,
        node: &str,
        record: &LabelRecord,
        now: i64,
    ) -> Result<bool, IndexError> {
        let mut tx = self.pool().begin().await?;
        let closed = sqlx::query(
            "UPDATE work_queue SET state = 'done', finished_at = $1, last_error = $2 \
             WHERE id = $3 AND claimed_by = $4 AND state = 'running'",
        )
        .bind(now)
        .bind(record.reason.clone())
        .bind(job.id)
        .bind(node)
        .execute(&mut *tx)
        .await?;
        if closed.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        let label_ref: i64 = sqlx::query(
            "INSERT INTO series_labels (series_ref, generation, status, reason, notes, dominant_class, \
                 body_part_examined, anatomic_regions, coverage, classes, model_version, provider, \
                 key_images, candidate_images, select_ms, decode_ms, infer_ms, total_ms, labelled_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19) \
             ON CONFLICT (series_ref, generation) DO UPDATE SET \
                 status = excluded.status, reason = excluded.reason, notes = excluded.notes, \
                 dominant_class = excluded.dominant_class, body_part_examined = excluded.body_part_examined, \
                 anatomic_regions = excluded.anatomic_regions, coverage = excluded.coverage, \
                 classes = excluded.classes, model_version = excluded.model_version, \
                 provider = excluded.provider, key_images = excluded.key_images, \
                 candidate_images = excluded.candidate_images, select_ms = excluded.select_ms, \
                 decode_ms = excluded.decode_ms, infer_ms = excluded.infer_ms, \
                 total_ms = excluded.total_ms, labelled_at = excluded.labelled_at \
             RETURNING id",
        )
        .bind(job.series_ref)
        .bind(job.generation)
        .bind(record.status.as_str())
        .bind(record.reason.clone())
        .bind(record.notes.clone())
        .bind(record.dominant_class.clone())
        .bind(record.body_part_examined.clone())
        .bind(record.anatomic_regions.clone())
        .bind(record.coverage.clone())
        .bind(record.classes.clone())
        .bind(record.model_version.clone())
        .bind(record.provider.clone())
        .bind(record.key_images.len() as i64)
        .bind(record.candidate_images)
        .bind(record.select_ms)
        .bind(record.decode_ms)
        .bind(record.infer_ms)
        .bind(record.total_ms)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?
        .get(0);
        sqlx::query("DELETE FROM key_images WHERE series_label_ref = $1")
            .bind(label_ref)
            .execute(&mut *tx)
            .await?;
        for k in &record.key_images {
            sqlx::query(
                "INSERT INTO key_images (series_label_ref, sop_instance_uid, frame, z_mm, label, \
                     smoothed_label, probabilities) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(label_ref)
            .bind(k.sop_instance_uid.clone())
            .bind(k.frame)
            .bind(k.z_mm)
            .bind(k.label.clone())
            .bind(k.smoothed_label.clone())
            .bind(k.probabilities.clone())
            .execute(&mut *tx)
            .await?;
        }
        // The series row carries the latest result, unless a newer generation is labelled.
        let latest = sqlx::query(
            "UPDATE series SET label_status = $1, label_generation = $2, predicted_class = $3, \
                 predicted_body_part = $4 \
             WHERE id = $5 AND (label_generation IS NULL OR label_generation <= $2)",
        )
        .bind(record.status.as_str())
        .bind(job.generation)
        .bind(record.dominant_class.clone())
        .bind(record.body_part_examined.clone())
        .bind(job.series_ref)
        .execute(&mut *tx)
        .await?;
        if latest.rows_affected() == 1 {
            replace_series_regions(&mut tx, job.series_ref, record.anatomic_regions.as_deref())
                .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Close a job without a result: its series has moved on to a newer generation, whose
    /// own job will label it.
    pub async fn supersede_job(&self, job: &Job, node: &str, now: i64) -> Result<(), IndexError> {
        sqlx::query(
            "UPDATE work_queue SET state = 'superseded', finished_at = $1 \
             WHERE id = $2 AND claimed_by = $3 AND state = 'running'",
        )
        .bind(now)
        .bind(job.id)
        .bind(node)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Give a job back for another attempt at `available_at`.
    pub async fn retry_job(
        &self,
        job: &Job,
        node: &str,
        error: &str,
        available_at: i64,
    ) -> Result<(), IndexError> {
        sqlx::query(
            "UPDATE work_queue SET state = 'pending', available_at = $1, last_error = $2, \
                 claimed_by = NULL, claimed_at = NULL \
             WHERE id = $3 AND claimed_by = $4 AND state = 'running'",
        )
        .bind(available_at)
        .bind(error)
        .bind(job.id)
        .bind(node)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}

/// The regions of the series' latest label, one row each, for C-FIND sequence matching on
/// the Anatomic Region Sequence (`series_regions`, migrations/*/0003_find.sql). `regions` is
/// the JSON of `series_labels.anatomic_regions`; none (skipped, failed) clears them.
async fn replace_series_regions(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    series_ref: i64,
    regions: Option<&str>,
) -> Result<(), sqlx::Error> {
    #[derive(serde::Deserialize)]
    struct Region {
        body_part: Option<String>,
        code_value: String,
        coding_scheme: String,
        code_meaning: Option<String>,
    }
    sqlx::query("DELETE FROM series_regions WHERE series_ref = $1")
        .bind(series_ref)
        .execute(&mut **tx)
        .await?;
    // Written by anatomy::worker from anatomy::coverage::Region, so it parses; anything else
    // leaves the series without coded regions rather than failing the job.
    let regions: Vec<Region> = regions
        .and_then(|json| serde_json::from_str(json).ok())
        .unwrap_or_default();
    for (position, r) in regions.into_iter().enumerate() {
        sqlx::query(
            "INSERT INTO series_regions (series_ref, position, body_part, code_value, \
                 coding_scheme, code_meaning) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(series_ref)
        .bind(position as i64)
        .bind(r.body_part)
        .bind(r.code_value)
        .bind(r.coding_scheme)
        .bind(r.code_meaning)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}
