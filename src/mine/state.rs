//! What `mine` remembers, in the index database (migration 0005_mine): datasets, runs,
//! studies seen, and every manifest row; and the lock that keeps two runs apart.
//!
//! A study's rows and its state are committed in one transaction, after its images are
//! written: a run killed half way leaves either a study's rows or none of them, never a
//! part, and the unique (dataset, SOP Instance UID, frame) key forbids a row twice.

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{Any, Row};

use crate::dataset::ManifestRow;
use crate::index::{Backend, Index};

/// The PostgreSQL advisory lock key of `mine` ("anatomy" in ASCII, as a number).
const ADVISORY_KEY: i64 = 0x0061_6e61_746f_6d79;

/// A manifest row and the frame it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct MinedRow {
    pub row: ManifestRow,
    pub frame: u32,
}

/// A study as the last run left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StudyState {
    pub fingerprint: String,
    pub state: String,
    pub attempts: i64,
}

pub struct State {
    index: Index,
    dataset_id: String,
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl State {
    pub fn new(index: Index, dataset_id: &str) -> State {
        State {
            index,
            dataset_id: dataset_id.to_string(),
        }
    }

    /// The dataset's key check, image size and split as recorded, if it is known.
    pub async fn dataset(&self) -> Result<Option<(String, i64, String)>, sqlx::Error> {
        let row =
            sqlx::query("SELECT key_check, image_size, split FROM mine_datasets WHERE id = $1")
                .bind(&self.dataset_id)
                .fetch_optional(self.index.pool())
                .await?;
        Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
    }

    pub async fn register_dataset(
        &self,
        out: &Path,
        key_check: &str,
        image_size: usize,
        split: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO mine_datasets (id, out_path, key_check, image_size, split, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (id) DO UPDATE SET out_path = excluded.out_path",
        )
        .bind(&self.dataset_id)
        .bind(out.display().to_string())
        .bind(key_check)
        .bind(image_size as i64)
        .bind(split)
        .bind(now())
        .execute(self.index.pool())
        .await?;
        Ok(())
    }

    pub async fn start_run(&self, since: &str, until: &str) -> Result<i64, sqlx::Error> {
        let row = sqlx::query(
            "INSERT INTO mine_runs (dataset_id, started_at, since_date, until_date) \
             VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(&self.dataset_id)
        .bind(now())
        .bind(since)
        .bind(until)
        .fetch_one(self.index.pool())
        .await?;
        Ok(row.get(0))
    }

    pub async fn finish_run(
        &self,
        run: i64,
        exit_code: u8,
        report: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE mine_runs SET finished_at = $1, exit_code = $2, report = $3 WHERE id = $4",
        )
        .bind(now())
        .bind(i64::from(exit_code))
        .bind(report)
        .bind(run)
        .execute(self.index.pool())
        .await?;
        Ok(())
    }

    pub async fn study(&self, study_uid: &str) -> Result<Option<StudyState>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT fingerprint, state, attempts FROM mine_studies \
             WHERE dataset_id = $1 AND study_uid = $2",
        )
        .bind(&self.dataset_id)
        .bind(study_uid)
        .fetch_optional(self.index.pool())
        .await?;
        Ok(row.map(|r| StudyState {
            fingerprint: r.get(0),
            state: r.get(1),
            attempts: r.get(2),
        }))
    }

    /// (SOP Instance UID, frame) of the rows a study already has in this dataset.
    pub async fn mined_in_study(
        &self,
        study_uid: &str,
    ) -> Result<HashSet<(String, u32)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT sop_instance_uid, frame FROM mine_images WHERE dataset_id = $1 AND study_uid = $2",
        )
        .bind(&self.dataset_id)
        .bind(study_uid)
        .fetch_all(self.index.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), u32::try_from(r.get::<i64, _>(1)).unwrap_or(0)))
            .collect())
    }

    /// Every SOP Instance UID with a row in this dataset.
    pub async fn mined_uids(&self) -> Result<HashSet<String>, sqlx::Error> {
        let rows =
            sqlx::query("SELECT DISTINCT sop_instance_uid FROM mine_images WHERE dataset_id = $1")
                .bind(&self.dataset_id)
                .fetch_all(self.index.pool())
                .await?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    /// A study's new rows and its state, in one transaction. Rows already present (the same
    /// image mined by a run that was killed after committing) are left as they are.
    pub async fn commit_study(
        &self,
        run: i64,
        study_uid: &str,
        fingerprint: &str,
        failed: Option<&str>,
        rows: &[MinedRow],
    ) -> Result<usize, sqlx::Error> {
        let now = now();
        let mut tx = self.index.pool().begin().await?;
        let mut added = 0;
        for r in rows {
            let m = &r.row;
            let done = sqlx::query(
                "INSERT INTO mine_images (dataset_id, run_ref, image, patient_key, study_uid, \
                     series_uid, sop_instance_uid, frame, z_mm, label, label_source, split, mined_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
                 ON CONFLICT (dataset_id, sop_instance_uid, frame) DO NOTHING",
            )
            .bind(&self.dataset_id)
            .bind(run)
            .bind(&m.image)
            .bind(&m.patient_key)
            .bind(&m.study_uid)
            .bind(&m.series_uid)
            .bind(&m.sop_instance_uid)
            .bind(i64::from(r.frame))
            .bind(&m.z_mm)
            .bind(&m.label)
            .bind(&m.label_source)
            .bind(&m.split)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            added += done.rows_affected() as usize;
        }
        let state = if failed.is_some() { "failed" } else { "done" };
        sqlx::query(
            "INSERT INTO mine_studies (dataset_id, study_uid, fingerprint, state, attempts, last_error, images, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (dataset_id, study_uid) DO UPDATE SET \
                 fingerprint = excluded.fingerprint, state = excluded.state, \
                 attempts = CASE WHEN excluded.state = 'failed' THEN mine_studies.attempts + 1 ELSE 0 END, \
                 last_error = excluded.last_error, images = mine_studies.images + excluded.images, \
                 updated_at = excluded.updated_at",
        )
        .bind(&self.dataset_id)
        .bind(study_uid)
        .bind(fingerprint)
        .bind(state)
        .bind(i64::from(failed.is_some()))
        .bind(failed.map(str::to_string))
        .bind(added as i64)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(added)
    }

    /// Every row of the dataset, in manifest order.
    pub async fn rows(&self) -> Result<Vec<ManifestRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT image, patient_key, study_uid, series_uid, sop_instance_uid, z_mm, label, \
                    label_source, split \
             FROM mine_images WHERE dataset_id = $1 ORDER BY id",
        )
        .bind(&self.dataset_id)
        .fetch_all(self.index.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| ManifestRow {
                image: r.get(0),
                patient_key: r.get(1),
                study_uid: r.get(2),
                series_uid: r.get(3),
                sop_instance_uid: r.get(4),
                z_mm: r.get(5),
                label: r.get(6),
                label_source: r.get(7),
                split: r.get(8),
            })
            .collect())
    }

    pub async fn runs(&self) -> Result<i64, sqlx::Error> {
        let row = sqlx::query("SELECT COUNT(*) FROM mine_runs WHERE dataset_id = $1")
            .bind(&self.dataset_id)
            .fetch_one(self.index.pool())
            .await?;
        Ok(row.get(0))
    }
}

/// Held while a run lasts; the operating system or the database frees it when the process
/// dies (kill -9 included), so a crash never leaves a stale lock.
pub enum MineLock {
    /// A session-level advisory lock on a connection of its own.
    Postgres(Option<sqlx::AnyConnection>),
    /// flock(2) on a file beside the SQLite database.
    File(File),
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another `anatomy-node mine` holds the lock ({0})")]
    Busy(String),
    #[error("taking the lock: {0}")]
    Failed(String),
}

impl MineLock {
    /// Take the lock, waiting up to `wait` for another run to let it go.
    pub async fn acquire(index: &Index, url: &str, wait: Duration) -> Result<MineLock, LockError> {
        let deadline = Instant::now() + wait;
        match index.backend() {
            Backend::Postgres => {
                let conn: PoolConnection<Any> = index
                    .pool()
                    .acquire()
                    .await
                    .map_err(|e| LockError::Failed(e.to_string()))?;
                // Detached: closing it (or the process dying) ends the session and its lock.
                let mut conn = conn.detach();
                loop {
                    let got: bool = sqlx::query("SELECT pg_try_advisory_lock($1)")
                        .bind(ADVISORY_KEY)
                        .fetch_one(&mut conn)
                        .await
                        .and_then(|r| r.try_get(0))
                        .map_err(|e| LockError::Failed(e.to_string()))?;
                    if got {
                        return Ok(MineLock::Postgres(Some(conn)));
                    }
                    if Instant::now() >= deadline {
                        return Err(LockError::Busy(format!(
                            "PostgreSQL advisory lock {ADVISORY_KEY}"
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            Backend::Sqlite => {
                let path = sqlite_lock_path(url);
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
                    .map_err(|e| LockError::Failed(format!("{}: {e}", path.display())))?;
                loop {
                    // SAFETY: flock on a file descriptor this function owns.
                    let rc =
                        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
                    if rc == 0 {
                        return Ok(MineLock::File(file));
                    }
                    let err = std::io::Error::last_os_error();
                    if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                        return Err(LockError::Failed(format!("{}: {err}", path.display())));
                    }
                    if Instant::now() >= deadline {
                        return Err(LockError::Busy(format!("file lock {}", path.display())));
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    pub async fn release(mut self) {
        if let MineLock::Postgres(conn) = &mut self {
            if let Some(mut conn) = conn.take() {
                let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(ADVISORY_KEY)
                    .execute(&mut conn)
                    .await;
                let _ = sqlx::Connection::close(conn).await;
            }
        }
        // The file lock goes with the file descriptor.
    }
}

/// `<database file>.mine-lock` for an SQLite URL (`sqlite://path?mode=rwc`).
fn sqlite_lock_path(url: &str) -> PathBuf {
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let path = path.split('?').next().unwrap_or(path);
    PathBuf::from(format!("{path}.mine-lock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_file_sits_beside_the_database() {
        assert_eq!(
            sqlite_lock_path("sqlite:///var/lib/a/index.sqlite3?mode=rwc"),
            PathBuf::from("/var/lib/a/index.sqlite3.mine-lock")
        );
        assert_eq!(
            sqlite_lock_path("sqlite:data/index.sqlite3"),
            PathBuf::from("data/index.sqlite3.mine-lock")
        );
    }
}
