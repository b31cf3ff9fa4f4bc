//! The index: patients, studies, series and instances in SQLite (embedded default) or
//! PostgreSQL, through one code path (sqlx's `Any` driver) and per-database migrations.
//!
//! Writes of received instances go through one group-commit writer task per node (see
//! [`writer`]), so concurrent associations share transactions instead of fighting over
//! SQLite's single write lock.

mod labels;
mod writer;

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor, Row};

use crate::store::inspect::DatasetSummary;

pub use labels::{IndexedImage, Job, KeyImageRow, LabelRecord, LabelStatus, SERIES_COMPLETE};
pub use writer::IndexWriter;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("the index writer has stopped")]
    WriterGone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn of_url(url: &str) -> Backend {
        if url.starts_with("postgres") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }
}

/// Everything the index keeps about one received instance.
#[derive(Debug, Clone)]
pub struct InstanceRecord {
    pub summary: DatasetSummary,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_uid: String,
    pub series_uid: String,
    pub transfer_syntax_uid: String,
    pub file_path: String,
    pub file_size: i64,
    pub calling_ae: String,
    pub received_at: i64,
}

/// An instance already in the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedInstance {
    pub file_path: String,
    pub series_uid: String,
}

/// A series that just became complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedSeries {
    pub series_uid: String,
    pub generation: i64,
    pub instances: i64,
}

#[derive(Clone)]
pub struct Index {
    pool: AnyPool,
    backend: Backend,
}

impl Index {
    /// Connect (creating an SQLite file if needed). Does not migrate. With `durable`,
    /// every commit is on disk before it returns; without it (storage.fsync = false) a
    /// commit survives a crash of the node but not of the machine.
    pub async fn connect(
        url: &str,
        max_connections: u32,
        durable: bool,
    ) -> Result<Index, IndexError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of_url(url);
        let options = AnyConnectOptions::from_str(url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    match backend {
                        Backend::Sqlite => {
                            // WAL lets readers run beside the writer; FULL makes each commit
                            // durable before a C-STORE success is sent.
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            let sync = if durable { "FULL" } else { "NORMAL" };
                            conn.execute(format!("PRAGMA synchronous = {sync}").as_str())
                                .await?;
                            conn.execute("PRAGMA busy_timeout = 10000").await?;
                            conn.execute("PRAGMA foreign_keys = ON").await?;
                        }
                        Backend::Postgres if !durable => {
                            conn.execute("SET synchronous_commit = off").await?;
                        }
                        Backend::Postgres => {}
                    }
                    Ok(())
                })
            })
            .after_release(|conn, _meta| {
                Box::pin(async move {
                    // A transaction dropped after an error (a full disk: SQLITE_FULL) is
                    // rolled back by a queued ROLLBACK; the ping waits for it. If SQLite had
                    // already rolled back by itself, that ROLLBACK fails and the connection
                    // still counts itself inside a transaction: its next `begin` would open a
                    // SAVEPOINT, whose rollback keeps the write lock, and every later write
                    // would wait out the busy timeout. Such a connection is closed instead.
                    sqlx::Connection::ping(&mut *conn).await?;
                    Ok(!sqlx::Connection::is_in_transaction(&*conn))
                })
            })
            .connect_with(options)
            .await?;
        Ok(Index { pool, backend })
    }

    pub async fn migrate(&self) -> Result<(), IndexError> {
        let migrator = match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator.run(&self.pool).await?;
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn ping(&self) -> Result<(), IndexError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn find_instance(
        &self,
        sop_instance_uid: &str,
    ) -> Result<Option<IndexedInstance>, IndexError> {
        let row = sqlx::query(
            "SELECT i.file_path, s.series_uid FROM instances i \
             JOIN series s ON s.id = i.series_ref WHERE i.sop_instance_uid = $1",
        )
        .bind(sop_instance_uid)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| IndexedInstance {
            file_path: r.get(0),
            series_uid: r.get(1),
        }))
    }

    /// Mark every series that has been quiet since `cutoff` complete, exactly once per
    /// generation, and queue a `series-complete` job for it in the same transaction.
    /// Safe with several nodes on one PostgreSQL: rows another node is completing are
    /// skipped (`FOR UPDATE SKIP LOCKED`), and the queue's unique key forbids doubles.
    pub async fn complete_stable_series(
        &self,
        cutoff: i64,
        now: i64,
        limit: i64,
    ) -> Result<Vec<CompletedSeries>, IndexError> {
        let mut tx = self.pool.begin().await?;
        let lock = match self.backend {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let due = sqlx::query(&format!(
            "SELECT id, series_uid, generation FROM series \
             WHERE state = 'receiving' AND last_received_at <= $1 \
             ORDER BY last_received_at LIMIT $2{lock}"
        ))
        .bind(cutoff)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut completed = Vec::with_capacity(due.len());
        for row in due {
            let id: i64 = row.get(0);
            let series_uid: String = row.get(1);
            let generation: i64 = row.get(2);
            let updated = sqlx::query(
                "UPDATE series SET state = 'complete', completed_at = $1 \
                 WHERE id = $2 AND state = 'receiving' AND generation = $3",
            )
            .bind(now)
            .bind(id)
            .bind(generation)
            .execute(&mut *tx)
            .await?;
            if updated.rows_affected() != 1 {
                continue;
            }
            sqlx::query(
                "INSERT INTO work_queue (kind, series_ref, generation, created_at, available_at) \
                 VALUES ('series-complete', $1, $2, $3, $3) \
                 ON CONFLICT (kind, series_ref, generation) DO NOTHING",
            )
            .bind(id)
            .bind(generation)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            let instances: i64 =
                sqlx::query("SELECT COUNT(*) FROM instances WHERE series_ref = $1")
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await?
                    .get(0);
            completed.push(CompletedSeries {
                series_uid,
                generation,
                instances,
            });
        }
        tx.commit().await?;
        Ok(completed)
    }
}

/// Insert or update the patient, study, series and instance rows of one received
/// instance inside `tx`. A late instance re-opens a complete series (new generation).
pub(crate) async fn record_instance(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    rec: &InstanceRecord,
) -> Result<(), sqlx::Error> {
    let s = &rec.summary;
    let patient_key = format!(
        "{}\\{}",
        s.patient_id.as_deref().unwrap_or(""),
        s.issuer_of_patient_id.as_deref().unwrap_or("")
    );
    let patient_ref: i64 = sqlx::query(
        "INSERT INTO patients (patient_key, patient_id, issuer_of_patient_id, patient_name, \
             patient_birth_date, patient_sex, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (patient_key) DO UPDATE SET \
             patient_name = COALESCE(excluded.patient_name, patients.patient_name), \
             patient_birth_date = COALESCE(excluded.patient_birth_date, patients.patient_birth_date), \
             patient_sex = COALESCE(excluded.patient_sex, patients.patient_sex), \
             updated_at = excluded.updated_at \
         RETURNING id",
    )
    .bind(patient_key)
    .bind(s.patient_id.clone())
    .bind(s.issuer_of_patient_id.clone())
    .bind(s.patient_name.clone())
    .bind(s.patient_birth_date.clone())
    .bind(s.patient_sex.clone())
    .bind(rec.received_at)
    .fetch_one(&mut **tx)
    .await?
    .get(0);

    let study_ref: i64 = sqlx::query(
        "INSERT INTO studies (study_uid, patient_ref, study_date, study_time, study_description, \
             accession_number, study_id, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (study_uid) DO UPDATE SET \
             patient_ref = excluded.patient_ref, \
             study_date = COALESCE(excluded.study_date, studies.study_date), \
             study_time = COALESCE(excluded.study_time, studies.study_time), \
             study_description = COALESCE(excluded.study_description, studies.study_description), \
             accession_number = COALESCE(excluded.accession_number, studies.accession_number), \
             study_id = COALESCE(excluded.study_id, studies.study_id), \
             updated_at = excluded.updated_at \
         RETURNING id",
    )
    .bind(rec.study_uid.clone())
    .bind(patient_ref)
    .bind(s.study_date.clone())
    .bind(s.study_time.clone())
    .bind(s.study_description.clone())
    .bind(s.accession_number.clone())
    .bind(s.study_id.clone())
    .bind(rec.received_at)
    .fetch_one(&mut **tx)
    .await?
    .get(0);

    let series_ref: i64 = sqlx::query(
        "INSERT INTO series (series_uid, study_ref, series_number, modality, series_description, \
             body_part_examined, first_received_at, last_received_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7) \
         ON CONFLICT (series_uid) DO UPDATE SET \
             study_ref = excluded.study_ref, \
             series_number = COALESCE(excluded.series_number, series.series_number), \
             modality = COALESCE(excluded.modality, series.modality), \
             series_description = COALESCE(excluded.series_description, series.series_description), \
             body_part_examined = COALESCE(excluded.body_part_examined, series.body_part_examined), \
             last_received_at = excluded.last_received_at, \
             generation = CASE WHEN series.state = 'complete' THEN series.generation + 1 ELSE series.generation END, \
             state = 'receiving', \
             completed_at = NULL \
         RETURNING id",
    )
    .bind(rec.series_uid.clone())
    .bind(study_ref)
    .bind(s.series_number)
    .bind(s.modality.clone())
    .bind(s.series_description.clone())
    .bind(s.body_part_examined.clone())
    .bind(rec.received_at)
    .fetch_one(&mut **tx)
    .await?
    .get(0);

    sqlx::query(
        "INSERT INTO instances (sop_instance_uid, series_ref, sop_class_uid, instance_number, \
             image_position, image_orientation, image_type, image_rows, image_columns, \
             number_of_frames, transfer_syntax_uid, file_path, file_size, calling_ae, received_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
         ON CONFLICT (sop_instance_uid) DO UPDATE SET \
             series_ref = excluded.series_ref, sop_class_uid = excluded.sop_class_uid, \
             instance_number = excluded.instance_number, image_position = excluded.image_position, \
             image_orientation = excluded.image_orientation, image_type = excluded.image_type, \
             image_rows = excluded.image_rows, image_columns = excluded.image_columns, \
             number_of_frames = excluded.number_of_frames, \
             transfer_syntax_uid = excluded.transfer_syntax_uid, file_path = excluded.file_path, \
             file_size = excluded.file_size, calling_ae = excluded.calling_ae, \
             received_at = excluded.received_at",
    )
    .bind(rec.sop_instance_uid.clone())
    .bind(series_ref)
    .bind(rec.sop_class_uid.clone())
    .bind(s.instance_number)
    .bind(s.image_position.clone())
    .bind(s.image_orientation.clone())
    .bind(s.image_type.clone())
    .bind(s.rows)
    .bind(s.columns)
    .bind(s.number_of_frames)
    .bind(rec.transfer_syntax_uid.clone())
    .bind(rec.file_path.clone())
    .bind(rec.file_size)
    .bind(rec.calling_ae.clone())
    .bind(rec.received_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
