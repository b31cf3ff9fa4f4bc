//! One run of `anatomy-node mine`, study by study (see the module documentation).
//!
//! [`start`]: dates, lock, dataset folder, archive; then, per range of Study Dates the
//! archive answers whole ([`super::range`]) and per study ([`study`]): what the label sources say ([`claims`]), retrieval and
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

use chrono::{Local, Timelike};
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
use super::range::{FindStudies, Found, Span, Walk};
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
    let walk = Walk::new(plan.since, plan.until, config.archive.query_page_days);
    if walk.pending() > 100 {
        warn!(
            pages = walk.pending(),
            query_page_days = config.archive.query_page_days,
            "archive.query_page_days cuts the window into many pages, one study query each \
             (set 0 to query the whole window and split only what the archive caps)"
        );
    }
    let miner = Miner {
        progress: Progress::new(),
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
    let code = miner.mine_all(walk, started, &since, &until).await?;
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
        walk: Walk,
        started: Instant,
        since: &str,
        until: &str,
    ) -> Result<u8, Fatal> {
        let (miner, outcome) = match self.locate_ris().await {
            Ok(located) => {
                self.ris_by_study = located;
                let miner = Arc::new(self);
                let signals = spawn_signal_watch(miner.clone());
                let outcome = miner.clone().run(walk).await;
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

    /// The run proper: every range of dates the walk asks for, the studies of each mined
    /// before the next is asked for. `Err` is fatal.
    async fn run(self: Arc<Self>, mut walk: Walk) -> Result<(), MineError> {
        let mut seen_studies: BTreeSet<String> = BTreeSet::new();
        let finder = StudyFinder { miner: &self };
        let outcome = loop {
            if self.stop.is_cancelled() {
                break Ok(());
            }
            let step = match walk.next(&finder).await {
                None => break Ok(()),
                Some(Ok(step)) => step,
                Some(Err((span, error))) => {
                    break Err(MineError::QueryStudies {
                        page: span.to_string(),
                        error,
                    })
                }
            };
            if step.unresolved {
                self.error(format!(
                    "the archive caps its answer for studies of {} even in one second of Study Time: \
                     only {} of them were found (studies there may be missing; raise the archive's \
                     answer limit)",
                    step.span,
                    step.answers.len()
                ));
            }
            let studies: Vec<Answer> = step
                .answers
                .into_iter()
                .filter(|a| {
                    a.get(tags::STUDY_INSTANCE_UID)
                        .is_some_and(|uid| seen_studies.insert(uid.to_string()))
                })
                .collect();
            if studies.is_empty() {
                continue;
            }
            self.stats().studies_found += studies.len();
            self.progress.found(studies.len() as u64);
            info!(range = %step.span, studies = studies.len(), "studies found");
            let concurrency = self.config.mine.max_concurrent_retrieves;
            futures_util::stream::iter(studies)
                .for_each_concurrent(concurrency, |study| self.clone().study_in_time(study))
                .await;
        };
        info!(
            queries = walk.counts.queries,
            empty = walk.counts.empty,
            capped = walk.counts.capped,
            unresolved = walk.counts.unresolved,
            "study queries"
        );
        self.stats().queries = walk.counts.clone();
        outcome?;
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
        self.progress.study_done();
    }
}

/// The study queries of the walk, as the archive answers them.
struct StudyFinder<'a> {
    miner: &'a Miner,
}

impl FindStudies for StudyFinder<'_> {
    async fn find_studies(&self, span: &Span) -> Result<Found, ArchiveError> {
        let mut query = Query::new(Level::Study)
            .key(tags::STUDY_DATE, span.study_date())
            .key(
                tags::MODALITIES_IN_STUDY,
                self.miner.config.mine.modality.clone(),
            )
            .returns(&[
                tags::STUDY_INSTANCE_UID,
                tags::PATIENT_ID,
                tags::ISSUER_OF_PATIENT_ID,
                tags::ACCESSION_NUMBER,
                tags::NUMBER_OF_STUDY_RELATED_INSTANCES,
                tags::NUMBER_OF_STUDY_RELATED_SERIES,
            ]);
        if let Some(time) = span.study_time() {
            query = query.key(tags::STUDY_TIME, time);
        }
        let found = self
            .miner
            .archive
            .find_studies(&query, self.miner.config.archive.find_answer_limit)
            .await?;
        if found.capped {
            info!(range = %span, answers = found.answers.len(), "the archive capped its answer; splitting the range");
        }
        Ok(found)
    }
}
