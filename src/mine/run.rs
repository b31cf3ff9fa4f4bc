//! One run of `anatomy-node mine`, study by study (see the module documentation).
//!
//! [`start`]: dates, lock, dataset folder, archive; then, per page of Study Dates and
//! per study ([`study`]): what the label sources say ([`claims`]), retrieval and
//! conversion of what got a label ([`convert`]), the study's commit; at the end the
//! dataset's files, the report and the exit code ([`summary`]).

mod claims;
mod convert;
mod start;
mod study;
mod summary;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use chrono::{Local, NaiveDate, Timelike};
use dicom_dictionary_std::tags;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::answer::Answer;
use super::archive::{Archive, ArchiveError, Level, Query};
use super::exit;
use super::labels::{Claim, RisLabels};
use super::output::Keyer;
use super::settings::TimeWindow;
use super::state::State;
use super::MineArgs;
use crate::config::Config;
use crate::index::Index;
use summary::{add, Progress, Stats};

/// SOP Instance UIDs per C-FIND that locates RIS rows or a study's images.
const LOCATE_CHUNK: usize = 100;
/// Errors kept in the report, at most.
const MAX_ERRORS: usize = 50;

/// The patient's keyed key and split.
type Patient = (String, &'static str);

/// What stops a study (or, before the first study and between pages, the run). The text
/// is what the report, the log and the index's record of a failed study say.
#[derive(Debug, thiserror::Error)]
enum MineError {
    #[error("querying studies of {page}: {error}")]
    QueryStudies { page: String, error: ArchiveError },
    #[error("locating RIS rows in the archive: {0}")]
    LocateRis(ArchiveError),
    #[error("reading the node's predictions: {0}")]
    Predictions(sqlx::Error),
    #[error("querying document series: {0}")]
    DocumentSeries(ArchiveError),
    #[error("querying documents of series {series}: {error}")]
    Documents { series: String, error: ArchiveError },
    #[error("retrieving documents of series {series}: {error}")]
    RetrieveDocuments { series: String, error: ArchiveError },
    #[error("querying the series of study {study} (accession {accession}): {error}")]
    AccessionSeries {
        study: String,
        accession: crate::phi::Phi,
        error: ArchiveError,
    },
    #[error("querying the images of series {series}: {error}")]
    SeriesImages { series: String, error: ArchiveError },
    #[error("retrieving series {series} to choose its key-images: {error}")]
    RetrieveForSelection { series: String, error: ArchiveError },
    #[error("locating key-images: {0}")]
    LocateKeyImages(ArchiveError),
    #[error("retrieving series {series}: {error}")]
    Retrieve { series: String, error: ArchiveError },
    /// SIGTERM/SIGINT or the end of `mine.window` came before the study's next series.
    #[error("stopped before this series")]
    Stopped,
    #[error("recording the study in the index: {0}")]
    Commit(sqlx::Error),
    /// Reading mine's state from the index.
    #[error(transparent)]
    Index(#[from] sqlx::Error),
}

struct Miner {
    config: Arc<Config>,
    archive: Archive,
    index: Index,
    state: State,
    output: super::output::Output,
    keyer: Keyer,
    ris: RisLabels,
    /// RIS image rows found in the archive, by study.
    ris_by_study: HashMap<String, Vec<Claim>>,
    stats: Mutex<Stats>,
    stop: CancellationToken,
    stop_reason: Mutex<Option<String>>,
    window: Option<TimeWindow>,
    run_id: i64,
    rules_hash: String,
    /// The spool folder, removed at the end of the run.
    spool_dir: PathBuf,
    decode_us: AtomicU64,
    write_us: AtomicU64,
    commit_us: AtomicU64,
    progress: Progress,
}

/// A fatal error and its exit code.
struct Fatal(u8, String);

impl<E: std::fmt::Display> From<(u8, E)> for Fatal {
    fn from((code, e): (u8, E)) -> Self {
        Fatal(code, e.to_string())
    }
}

pub fn main(args: MineArgs, config: Config) -> u8 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("anatomy-node mine: error: starting the async runtime: {e}");
            return exit::FAILED;
        }
    };
    match runtime.block_on(mine(args, config)) {
        Ok(code) => code,
        Err(Fatal(code, message)) => {
            error!(exit_code = code, "{message}");
            eprintln!("anatomy-node mine: error: {message}");
            code
        }
    }
}

fn local_minute() -> u32 {
    let now = Local::now();
    now.hour() * 60 + now.minute()
}

async fn mine(args: MineArgs, config: Config) -> Result<u8, Fatal> {
    let started = Instant::now();
    let Some(plan) = start::plan(&args, &config)? else {
        return Ok(exit::STOPPED);
    };
    let index = crate::node::open_index(&config)
        .await
        .map_err(|e| Fatal(exit::FAILED, format!("{e:#}")))?;
    let url = config.database_url();
    let Some(lock) = start::lock(&index, &url, &config).await? else {
        return Ok(exit::LOCKED);
    };
    let keyer = Keyer::new(&config.mine.patient_key_secret, plan.ratios)
        .map_err(|e| Fatal(exit::USAGE, e))?;
    let output = start::open_output(&args.out, &config, &keyer)?;
    let state = State::new(index.clone(), &output.json.dataset_id);
    start::register_dataset(&state, &output, &args.out, &url).await?;
    let since = plan.since.format("%Y%m%d").to_string();
    let until = plan.until.format("%Y%m%d").to_string();
    let run_id = state
        .start_run(&since, &until)
        .await
        .map_err(|e| (exit::FAILED, e))?;
    let (archive, spool_dir) = start::open_archive(&config).await?;
    info!(
        run = run_id,
        archive = %archive.describe,
        since = %since,
        until = %until,
        out = %output.dir.display(),
        "mining"
    );
    let pages = date_pages(plan.since, plan.until, config.archive.query_page_days);
    let miner = Miner {
        progress: Progress::new(pages.len() as u64),
        rules_hash: rules_hash(&config),
        config: Arc::new(config),
        archive,
        index: index.clone(),
        state,
        output,
        keyer,
        ris: plan.ris,
        ris_by_study: HashMap::new(),
        stats: Mutex::new(Stats::default()),
        stop: CancellationToken::new(),
        stop_reason: Mutex::new(None),
        window: plan.window,
        run_id,
        spool_dir,
        decode_us: AtomicU64::new(0),
        write_us: AtomicU64::new(0),
        commit_us: AtomicU64::new(0),
    };
    let code = miner.mine_all(&pages, started, &since, &until).await?;
    lock.release().await;
    index.close().await;
    Ok(code)
}

fn spawn_signal_watch(miner: Arc<Miner>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = term.recv() => miner.halt("SIGTERM"),
            _ = tokio::signal::ctrl_c() => miner.halt("SIGINT"),
        }
    })
}

/// `YYYYMMDD` or `YYYYMMDD-YYYYMMDD` ranges covering `since..=until`, `days` at a time.
fn date_pages(since: NaiveDate, until: NaiveDate, days: u32) -> Vec<String> {
    let mut pages = Vec::new();
    let mut start = since;
    while start <= until {
        let end = (start + chrono::Duration::days(i64::from(days.max(1)) - 1)).min(until);
        pages.push(if start == end {
            start.format("%Y%m%d").to_string()
        } else {
            format!("{}-{}", start.format("%Y%m%d"), end.format("%Y%m%d"))
        });
        start = end + chrono::Duration::days(1);
    }
    pages
}

/// What decides which images get which labels: when it changes, studies are looked at again.
fn rules_hash(config: &Config) -> String {
    let m = &config.mine;
    let text = format!(
        "{}|{}|{:?}|{}|{}|{}|{}|{}",
        m.kos,
        m.sr,
        m.kos_labels,
        m.pseudo_labels,
        m.pseudo_label_min_probability,
        m.series_key_images,
        m.modality,
        config.classifier.axial_tolerance_deg
    );
    hex::encode(&Sha256::digest(text.as_bytes())[..8])
}

impl Miner {
    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn halt(&self, why: &str) {
        let mut reason = self
            .stop_reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if reason.is_none() {
            warn!(reason = why, "stopping after the studies in progress");
            *reason = Some(why.to_string());
        }
        self.stop.cancel();
    }

    fn error(&self, message: String) {
        warn!("{message}");
        let mut stats = self.stats();
        if stats.errors.len() < MAX_ERRORS {
            stats.errors.push(message);
        }
    }

    fn timed<T>(counter: &AtomicU64, f: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = f();
        counter.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        out
    }

    /// Locate the RIS rows, mine every page (watching for SIGTERM/SIGINT meanwhile), and
    /// finish the run: its exit code.
    async fn mine_all(
        mut self,
        pages: &[String],
        started: Instant,
        since: &str,
        until: &str,
    ) -> Result<u8, Fatal> {
        let (miner, outcome) = match self.locate_ris().await {
            Ok(located) => {
                self.ris_by_study = located;
                let miner = Arc::new(self);
                let signals = spawn_signal_watch(miner.clone());
                let outcome = miner.clone().run(pages).await;
                signals.abort();
                let _ = signals.await;
                (Arc::try_unwrap(miner).ok(), outcome)
            }
            Err(e) => (Some(self), Err(e)),
        };
        let Some(miner) = miner else {
            return Err(Fatal(
                exit::FAILED,
                "internal: the run is still shared".into(),
            ));
        };
        Ok(miner.finish(outcome, started, since, until).await)
    }

    /// The run proper: every page of dates. `Err` is fatal.
    async fn run(self: Arc<Self>, pages: &[String]) -> Result<(), MineError> {
        let mut seen_studies: BTreeSet<String> = BTreeSet::new();
        for page in pages {
            if self.stop.is_cancelled() {
                break;
            }
            let studies = self.studies_of(page, &mut seen_studies).await?;
            self.stats().studies_found += studies.len();
            info!(page = %page, studies = studies.len(), "study date page");
            let concurrency = self.config.mine.max_concurrent_retrieves;
            futures_util::stream::iter(studies)
                .for_each_concurrent(concurrency, |study| self.clone().study_in_time(study))
                .await;
            self.progress.page_done();
        }
        let outside = self
            .ris_by_study
            .iter()
            .filter(|(study, _)| !seen_studies.contains(*study))
            .map(|(_, rows)| rows.len())
            .sum::<usize>();
        add(
            &mut self.stats().ris,
            "rows in studies outside the date window",
            outside,
        );
        Ok(())
    }

    /// The studies of a page of dates not seen on an earlier page (a study whose date
    /// the archive answers loosely may come twice).
    async fn studies_of(
        &self,
        page: &str,
        seen_studies: &mut BTreeSet<String>,
    ) -> Result<Vec<Answer>, MineError> {
        let query = Query::new(Level::Study)
            .key(tags::STUDY_DATE, page)
            .key(tags::MODALITIES_IN_STUDY, self.config.mine.modality.clone())
            .returns(&[
                tags::STUDY_INSTANCE_UID,
                tags::PATIENT_ID,
                tags::ISSUER_OF_PATIENT_ID,
                tags::ACCESSION_NUMBER,
                tags::NUMBER_OF_STUDY_RELATED_INSTANCES,
                tags::NUMBER_OF_STUDY_RELATED_SERIES,
            ]);
        let studies = self
            .archive
            .find(&query)
            .await
            .map_err(|error| MineError::QueryStudies {
                page: page.to_string(),
                error,
            })?;
        Ok(studies
            .into_iter()
            .filter(|a| {
                a.get(tags::STUDY_INSTANCE_UID)
                    .is_some_and(|uid| seen_studies.insert(uid.to_string()))
            })
            .collect())
    }

    /// Mine a study unless the run is stopping or its time window has closed.
    async fn study_in_time(self: Arc<Self>, study: Answer) {
        if self.stop.is_cancelled() {
            return;
        }
        if let Some(w) = self.window {
            if !w.contains(local_minute()) {
                self.halt("the time window mine.window closed");
                return;
            }
        }
        self.study(study).await;
        self.progress.update(&self.stats());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_pages_cover_the_window() {
        let d = |s: &str| NaiveDate::parse_from_str(s, "%Y%m%d").unwrap();
        assert_eq!(
            date_pages(d("20240130"), d("20240202"), 1),
            ["20240130", "20240131", "20240201", "20240202"]
        );
        assert_eq!(
            date_pages(d("20240101"), d("20240110"), 7),
            ["20240101-20240107", "20240108-20240110"]
        );
        assert_eq!(date_pages(d("20240101"), d("20240101"), 30), ["20240101"]);
    }
}
