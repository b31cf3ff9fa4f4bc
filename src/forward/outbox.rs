//! The durable outbox (`forward_jobs`, migrations/*/0004_forward.sql): routing label results
//! into jobs, claiming batches per destination, recording outcomes, and what
//! `forward status` / `forward retry` read and change. Safe with several nodes on one
//! PostgreSQL: rows are claimed with `FOR UPDATE SKIP LOCKED`, an outcome is stored only
//! while the job is still the node's, and the unique key (SOP Instance UID, destination,
//! generation) forbids doubles.
//!
//! Every transaction starts with a write, so SQLite takes its write lock first instead of
//! failing to upgrade a read snapshot.

use std::collections::BTreeMap;

use sqlx::Row;

use super::kos;
use super::routes::{Route, SeriesFacts};
use super::tagging::{KeyImageColumns, LabelColumns, Labels};
use crate::index::{Backend, Index, IndexError};

pub const KIND_INSTANCE: &str = "instance";
pub const KIND_KOS: &str = "kos";

/// Rows per multi-row INSERT (10 parameters each).
const INSERT_CHUNK: usize = 50;

/// What routing one label result did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    pub label_ref: i64,
    pub series_uid: String,
    pub generation: i64,
    /// Jobs created per destination.
    pub jobs: BTreeMap<String, usize>,
    /// Names of the routes that matched.
    pub routes: Vec<String>,
}

/// The stored instance a job sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredInstance {
    /// Relative to storage.path.
    pub file_path: String,
    pub sop_class_uid: String,
    pub transfer_syntax_uid: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Instance,
    Kos,
}

/// A claimed job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: i64,
    pub kind: JobKind,
    pub series_ref: i64,
    pub generation: i64,
    pub label_ref: i64,
    pub sop_instance_uid: String,
    /// Attempts including this one.
    pub attempts: i64,
    /// `None` for a KOS, or when the instance is no longer in the index.
    pub instance: Option<StoredInstance>,
    pub series_uid: String,
    pub study_uid: String,
}

/// How an attempt ended, to be recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored by the destination (success or a warning status).
    Done {
        id: i64,
        status: u16,
        warning: Option<String>,
    },
    /// Try again at `available_at` (ms).
    Retry {
        id: i64,
        available_at: i64,
        status: Option<u16>,
        error: String,
    },
    /// Given up.
    Dead {
        id: i64,
        status: Option<u16>,
        error: String,
    },
    /// Not attempted after all (shutdown): back to pending, the attempt not counted.
    Release { id: i64 },
}

impl Outcome {
    pub fn id(&self) -> i64 {
        match self {
            Outcome::Done { id, .. }
            | Outcome::Retry { id, .. }
            | Outcome::Dead { id, .. }
            | Outcome::Release { id } => *id,
        }
    }
}

/// One row of `forward status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateCount {
    pub destination: String,
    pub state: String,
    pub count: i64,
}

/// A dead-lettered job, for `forward status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub destination: String,
    pub kind: String,
    pub sop_instance_uid: String,
    pub series_uid: String,
    pub attempts: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub finished_at: Option<i64>,
}

/// A key-image instance as the index knows it (for the KOS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesInstance {
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub file_path: String,
}

fn skip_locked(index: &Index) -> &'static str {
    match index.backend() {
        Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        Backend::Sqlite => "",
    }
}

/// Route the oldest label result not yet routed: create its jobs and mark it routed, in one
/// transaction. `Ok(None)` when every result is routed. Results other than `labelled` are
/// marked routed without jobs.
pub async fn route_next(
    index: &Index,
    routes: &[Route],
    key_object_selection: bool,
    now: i64,
) -> Result<Option<Routed>, IndexError> {
    let mut tx = index.pool().begin().await?;
    let claimed = sqlx::query(&format!(
        "UPDATE series_labels SET routed_at = $1 WHERE id = \
             (SELECT id FROM series_labels WHERE routed_at IS NULL ORDER BY id LIMIT 1{}) \
         RETURNING id, series_ref, generation, status",
        skip_locked(index)
    ))
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = claimed else {
        tx.commit().await?;
        return Ok(None);
    };
    let label_ref: i64 = row.get(0);
    let series_ref: i64 = row.get(1);
    let generation: i64 = row.get(2);
    let status: String = row.get(3);
    let series = sqlx::query("SELECT series_uid, modality FROM series WHERE id = $1")
        .bind(series_ref)
        .fetch_one(&mut *tx)
        .await?;
    let series_uid: String = series.get(0);
    let modality: Option<String> = series.get(1);
    let mut routed = Routed {
        label_ref,
        series_uid: series_uid.clone(),
        generation,
        jobs: BTreeMap::new(),
        routes: Vec::new(),
    };
    if status != "labelled" || routes.is_empty() {
        tx.commit().await?;
        return Ok(Some(routed));
    }
    let (columns, key_images) = read_label(&mut tx, label_ref).await?;
    let labels = Labels::from_columns(&columns, &key_images);
    let facts = SeriesFacts {
        modality,
        body_part: labels.body_part.clone(),
        region_terms: region_terms(columns.anatomic_regions.as_deref()),
        class_confidence: labels.class_confidence.clone(),
    };
    let matching: Vec<&Route> = routes.iter().filter(|r| r.matches_series(&facts)).collect();
    routed.routes = matching.iter().map(|r| r.name.clone()).collect();
    if matching.is_empty() {
        tx.commit().await?;
        return Ok(Some(routed));
    }
    let instances = sqlx::query(
        "SELECT id, sop_instance_uid, calling_ae FROM instances WHERE series_ref = $1 ORDER BY id",
    )
    .bind(series_ref)
    .fetch_all(&mut *tx)
    .await?;
    // (instance, destination) → the routes that send it there, in instance order.
    let mut rows: Vec<NewJob> = Vec::new();
    for inst in &instances {
        let id: i64 = inst.get(0);
        let uid: String = inst.get(1);
        let calling_ae: String = inst.get(2);
        let mut per_destination: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for route in matching.iter().filter(|r| r.matches_instance(&calling_ae)) {
            for d in &route.config.destinations {
                per_destination.entry(d).or_default().push(&route.name);
            }
        }
        for (destination, names) in per_destination {
            rows.push(NewJob {
                destination: destination.to_string(),
                kind: KIND_INSTANCE,
                instance_ref: Some(id),
                sop_instance_uid: uid.clone(),
                routes: names.join(","),
            });
        }
    }
    if key_object_selection && !labels.key_images.is_empty() {
        let kos_uid = kos::document_uid(&series_uid, generation);
        let mut kos_routes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for job in &rows {
            let names = kos_routes.entry(job.destination.clone()).or_default();
            for n in job.routes.split(',') {
                if !names.iter().any(|x| x == n) {
                    names.push(n.to_string());
                }
            }
        }
        for (destination, names) in kos_routes {
            rows.push(NewJob {
                destination,
                kind: KIND_KOS,
                instance_ref: None,
                sop_instance_uid: kos_uid.clone(),
                routes: names.join(","),
            });
        }
    }
    for chunk in rows.chunks(INSERT_CHUNK) {
        let values: Vec<String> = (0..chunk.len())
            .map(|i| {
                let b = i * 10;
                format!(
                    "(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5,
                    b + 6,
                    b + 7,
                    b + 8,
                    b + 9,
                    b + 10
                )
            })
            .collect();
        let sql = format!(
            "INSERT INTO forward_jobs (destination, kind, instance_ref, series_ref, generation, \
                 label_ref, sop_instance_uid, routes, created_at, available_at) VALUES {} \
             ON CONFLICT (sop_instance_uid, destination, generation) DO NOTHING",
            values.join(", ")
        );
        let mut q = sqlx::query(&sql);
        for job in chunk {
            q = q
                .bind(job.destination.clone())
                .bind(job.kind)
                .bind(job.instance_ref)
                .bind(series_ref)
                .bind(generation)
                .bind(label_ref)
                .bind(job.sop_instance_uid.clone())
                .bind(job.routes.clone())
                .bind(now)
                .bind(now);
        }
        q.execute(&mut *tx).await?;
    }
    // A newer generation replaces what an older one still had waiting.
    sqlx::query(
        "UPDATE forward_jobs SET state = 'superseded', finished_at = $1 \
         WHERE series_ref = $2 AND generation < $3 AND state = 'pending'",
    )
    .bind(now)
    .bind(series_ref)
    .bind(generation)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    for job in &rows {
        *routed.jobs.entry(job.destination.clone()).or_default() += 1;
    }
    Ok(Some(routed))
}

struct NewJob {
    destination: String,
    kind: &'static str,
    instance_ref: Option<i64>,
    sop_instance_uid: String,
    routes: String,
}

fn region_terms(json: Option<&str>) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Region {
        body_part: Option<String>,
    }
    json.and_then(|j| serde_json::from_str::<Vec<Region>>(j).ok())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| r.body_part)
        .collect()
}

async fn read_label(
    conn: &mut sqlx::AnyConnection,
    label_ref: i64,
) -> Result<(LabelColumns, Vec<KeyImageColumns>), IndexError> {
    let row = sqlx::query(
        "SELECT body_part_examined, anatomic_regions, classes, dominant_class, model_version, \
             coverage, labelled_at FROM series_labels WHERE id = $1",
    )
    .bind(label_ref)
    .fetch_one(&mut *conn)
    .await?;
    let columns = LabelColumns {
        body_part_examined: row.get(0),
        anatomic_regions: row.get(1),
        classes: row.get(2),
        dominant_class: row.get(3),
        model_version: row.get(4),
        coverage: row.get(5),
        labelled_at: row.get(6),
    };
    let keys = sqlx::query(
        "SELECT sop_instance_uid, frame, z_mm, label, smoothed_label, probabilities \
         FROM key_images WHERE series_label_ref = $1 ORDER BY id",
    )
    .bind(label_ref)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| KeyImageColumns {
        sop_instance_uid: r.get(0),
        frame: r.get(1),
        z_mm: r.get(2),
        label: r.get(3),
        smoothed_label: r.get(4),
        probabilities: r.get(5),
    })
    .collect();
    Ok((columns, keys))
}

/// The label a job's copies carry.
pub async fn label(index: &Index, label_ref: i64) -> Result<Labels, IndexError> {
    let mut conn = index.pool().acquire().await?;
    let (columns, keys) = read_label(&mut conn, label_ref).await?;
    Ok(Labels::from_columns(&columns, &keys))
}

/// The instances of a series (for the KOS: SOP classes of the key-images, a file to copy the
/// patient and study attributes from).
pub async fn series_instances(
    index: &Index,
    series_ref: i64,
) -> Result<Vec<SeriesInstance>, IndexError> {
    Ok(sqlx::query(
        "SELECT sop_instance_uid, sop_class_uid, file_path FROM instances \
         WHERE series_ref = $1 ORDER BY id",
    )
    .bind(series_ref)
    .fetch_all(index.pool())
    .await?
    .iter()
    .map(|r| SeriesInstance {
        sop_instance_uid: r.get(0),
        sop_class_uid: r.get(1),
        file_path: r.get(2),
    })
    .collect())
}

/// Claim up to `limit` jobs of `destination` that are due, or whose owner went silent
/// before `stale_before` (it crashed: they are sent again).
pub async fn claim(
    index: &Index,
    destination: &str,
    node: &str,
    now: i64,
    stale_before: i64,
    limit: usize,
) -> Result<Vec<Job>, IndexError> {
    let mut tx = index.pool().begin().await?;
    let ids: Vec<i64> = sqlx::query(&format!(
        "UPDATE forward_jobs SET state = 'sending', claimed_by = $1, claimed_at = $2, \
             attempts = attempts + 1 \
         WHERE id IN (SELECT id FROM forward_jobs WHERE destination = $3 \
             AND ((state = 'pending' AND available_at <= $2) \
                  OR (state = 'sending' AND claimed_at < $4)) \
             ORDER BY available_at, id LIMIT $5{}) \
         RETURNING id",
        skip_locked(index)
    ))
    .bind(node)
    .bind(now)
    .bind(destination)
    .bind(stale_before)
    .bind(limit as i64)
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect();
    if ids.is_empty() {
        tx.commit().await?;
        return Ok(Vec::new());
    }
    let placeholders: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "SELECT j.id, j.kind, j.series_ref, j.generation, j.label_ref, j.sop_instance_uid, \
             j.attempts, i.file_path, i.sop_class_uid, i.transfer_syntax_uid, s.series_uid, \
             st.study_uid \
         FROM forward_jobs j \
         LEFT JOIN instances i ON i.id = j.instance_ref \
         JOIN series s ON s.id = j.series_ref \
         JOIN studies st ON st.id = s.study_ref \
         WHERE j.id IN ({}) ORDER BY j.id",
        placeholders.join(", ")
    );
    let mut q = sqlx::query(&sql);
    for id in &ids {
        q = q.bind(*id);
    }
    let rows = q.fetch_all(&mut *tx).await?;
    tx.commit().await?;
    Ok(rows
        .iter()
        .map(|r| {
            let kind: String = r.get(1);
            let file_path: Option<String> = r.get(7);
            let sop_class_uid: Option<String> = r.get(8);
            let transfer_syntax_uid: Option<String> = r.get(9);
            Job {
                id: r.get(0),
                kind: if kind == KIND_KOS {
                    JobKind::Kos
                } else {
                    JobKind::Instance
                },
                series_ref: r.get(2),
                generation: r.get(3),
                label_ref: r.get(4),
                sop_instance_uid: r.get(5),
                attempts: r.get(6),
                instance: match (file_path, sop_class_uid, transfer_syntax_uid) {
                    (Some(file_path), Some(sop_class_uid), Some(transfer_syntax_uid)) => {
                        Some(StoredInstance {
                            file_path,
                            sop_class_uid,
                            transfer_syntax_uid,
                        })
                    }
                    _ => None,
                },
                series_uid: r.get(10),
                study_uid: r.get(11),
            }
        })
        .collect())
}

/// Record outcomes in one transaction, each only if the job is still this node's, and keep
/// the node's other claimed jobs of `destination` from looking stale. Returns how many
/// outcomes were applied.
pub async fn record(
    index: &Index,
    destination: &str,
    node: &str,
    outcomes: &[Outcome],
    now: i64,
) -> Result<usize, IndexError> {
    let mut tx = index.pool().begin().await?;
    touch_query(destination, node, now)
        .execute(&mut *tx)
        .await?;
    let mut applied = 0;
    for outcome in outcomes {
        if outcome_query(outcome, node, now)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1
        {
            applied += 1;
        }
    }
    tx.commit().await?;
    Ok(applied)
}

/// Record one outcome as one statement (one commit, the cheapest there is: a worker waits
/// for it before its next copy goes out); `false` when the job is no longer this node's.
pub async fn record_one(
    conn: &mut sqlx::AnyConnection,
    node: &str,
    outcome: &Outcome,
    now: i64,
) -> Result<bool, IndexError> {
    Ok(outcome_query(outcome, node, now)
        .execute(conn)
        .await?
        .rows_affected()
        == 1)
}

/// Keep the node's claimed jobs of `destination` from looking stale to other nodes.
pub async fn touch_claims(
    conn: &mut sqlx::AnyConnection,
    destination: &str,
    node: &str,
    now: i64,
) -> Result<(), IndexError> {
    touch_query(destination, node, now).execute(conn).await?;
    Ok(())
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

fn touch_query<'q>(destination: &str, node: &str, now: i64) -> Query<'q> {
    sqlx::query(
        "UPDATE forward_jobs SET claimed_at = $1 \
         WHERE destination = $2 AND claimed_by = $3 AND state = 'sending'",
    )
    .bind(now)
    .bind(destination.to_string())
    .bind(node.to_string())
}

/// The statement that records `outcome`, only while the job is still `node`'s.
fn outcome_query<'q>(outcome: &Outcome, node: &str, now: i64) -> Query<'q> {
    let q = match outcome {
        Outcome::Done {
            id,
            status,
            warning,
        } => sqlx::query(
            "UPDATE forward_jobs SET state = 'done', finished_at = $1, last_status = $2, \
                 last_error = $3 \
             WHERE id = $4 AND claimed_by = $5 AND state = 'sending'",
        )
        .bind(now)
        .bind(i64::from(*status))
        .bind(warning.clone())
        .bind(*id),
        Outcome::Retry {
            id,
            available_at,
            status,
            error,
        } => sqlx::query(
            "UPDATE forward_jobs SET state = 'pending', available_at = $1, last_status = $2, \
                 last_error = $3, claimed_by = NULL, claimed_at = NULL \
             WHERE id = $4 AND claimed_by = $5 AND state = 'sending'",
        )
        .bind(*available_at)
        .bind(status.map(i64::from))
        .bind(error.clone())
        .bind(*id),
        Outcome::Dead { id, status, error } => sqlx::query(
            "UPDATE forward_jobs SET state = 'dead', finished_at = $1, last_status = $2, \
                 last_error = $3 \
             WHERE id = $4 AND claimed_by = $5 AND state = 'sending'",
        )
        .bind(now)
        .bind(status.map(i64::from))
        .bind(error.clone())
        .bind(*id),
        Outcome::Release { id } => sqlx::query(
            "UPDATE forward_jobs SET state = 'pending', attempts = attempts - 1, \
                 claimed_by = NULL, claimed_at = NULL \
             WHERE id = $1 AND claimed_by = $2 AND state = 'sending'",
        )
        .bind(*id),
    };
    q.bind(node.to_string())
}

/// When the next pending job of `destination` is due (ms), if any is waiting.
pub async fn next_due(index: &Index, destination: &str) -> Result<Option<i64>, IndexError> {
    Ok(sqlx::query(
        "SELECT MIN(available_at) FROM forward_jobs WHERE destination = $1 AND state = 'pending'",
    )
    .bind(destination)
    .fetch_one(index.pool())
    .await?
    .get(0))
}

/// Jobs per destination and state.
pub async fn counts(index: &Index) -> Result<Vec<StateCount>, IndexError> {
    Ok(sqlx::query(
        "SELECT destination, state, COUNT(*) FROM forward_jobs GROUP BY destination, state \
         ORDER BY destination, state",
    )
    .fetch_all(index.pool())
    .await?
    .iter()
    .map(|r| StateCount {
        destination: r.get(0),
        state: r.get(1),
        count: r.get(2),
    })
    .collect())
}

/// Jobs not finished (pending or sending) and dead letters, per destination and state; the
/// queue depth gauges.
pub async fn depth(index: &Index) -> Result<Vec<StateCount>, IndexError> {
    Ok(sqlx::query(
        "SELECT destination, state, COUNT(*) FROM forward_jobs \
         WHERE state IN ('pending', 'sending', 'dead') GROUP BY destination, state",
    )
    .fetch_all(index.pool())
    .await?
    .iter()
    .map(|r| StateCount {
        destination: r.get(0),
        state: r.get(1),
        count: r.get(2),
    })
    .collect())
}

/// The most recent dead letters (of one destination, or all).
pub async fn dead_letters(
    index: &Index,
    destination: Option<&str>,
    limit: i64,
) -> Result<Vec<DeadLetter>, IndexError> {
    let filter = if destination.is_some() {
        "AND j.destination = $2"
    } else {
        ""
    };
    let sql = format!(
        "SELECT j.destination, j.kind, j.sop_instance_uid, s.series_uid, j.attempts, \
             j.last_status, j.last_error, j.finished_at \
         FROM forward_jobs j JOIN series s ON s.id = j.series_ref \
         WHERE j.state = 'dead' {filter} ORDER BY j.finished_at DESC, j.id DESC LIMIT $1"
    );
    let mut q = sqlx::query(&sql).bind(limit);
    if let Some(d) = destination {
        q = q.bind(d.to_string());
    }
    Ok(q.fetch_all(index.pool())
        .await?
        .iter()
        .map(|r| DeadLetter {
            destination: r.get(0),
            kind: r.get(1),
            sop_instance_uid: r.get(2),
            series_uid: r.get(3),
            attempts: r.get(4),
            last_status: r.get(5),
            last_error: r.get(6),
            finished_at: r.get(7),
        })
        .collect())
}

/// Dead letters (of one destination, or all) back to pending, due now, attempts from zero.
/// The reason of the last failure stays until the next attempt. Returns how many.
pub async fn retry_dead(
    index: &Index,
    destination: Option<&str>,
    now: i64,
) -> Result<u64, IndexError> {
    let filter = if destination.is_some() {
        "AND destination = $2"
    } else {
        ""
    };
    let sql = format!(
        "UPDATE forward_jobs SET state = 'pending', attempts = 0, available_at = $1, \
             finished_at = NULL, claimed_by = NULL, claimed_at = NULL \
         WHERE state = 'dead' {filter}"
    );
    let mut q = sqlx::query(&sql).bind(now);
    if let Some(d) = destination {
        q = q.bind(d.to_string());
    }
    Ok(q.execute(index.pool()).await?.rows_affected())
}

/// Release the jobs of `destination` this node still holds (graceful shutdown), without
/// counting the attempt.
pub async fn release_all(index: &Index, destination: &str, node: &str) -> Result<u64, IndexError> {
    Ok(sqlx::query(
        "UPDATE forward_jobs SET state = 'pending', attempts = attempts - 1, claimed_by = NULL, \
             claimed_at = NULL WHERE destination = $1 AND claimed_by = $2 AND state = 'sending'",
    )
    .bind(destination)
    .bind(node)
    .execute(index.pool())
    .await?
    .rows_affected())
}
