//! One run of `anatomy-node mine`, study by study (see the module documentation).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{Local, NaiveDate, Timelike};
use dicom_dictionary_std::{tags, uids};
use dicom_object::OpenFileOptions;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::answer::Answer;
use super::archive::{Archive, Level, Query};
use super::exit;
use super::labels::{self, dataset_label, Claim, Decision, Document, RisLabels, Source};
use super::output::{Keyer, Output};
use super::settings::{self, TimeWindow};
use super::spool::Spool;
use super::state::{MineLock, MinedRow, State};
use super::MineArgs;
use crate::anatomy::pixels::{self, Preprocessing};
use crate::anatomy::select::{self, Instance, KeyImageCount, Selection, SelectionRules};
use crate::config::Config;
use crate::dataset::ManifestRow;
use crate::index::Index;

/// SOP Instance UIDs per C-FIND that locates RIS rows or a study's images.
const LOCATE_CHUNK: usize = 100;
/// Errors kept in the report, at most.
const MAX_ERRORS: usize = 50;

const SR_CLASSES: &[&str] = &[
    uids::BASIC_TEXT_SR_STORAGE,
    uids::ENHANCED_SR_STORAGE,
    uids::COMPREHENSIVE_SR_STORAGE,
    uids::COMPREHENSIVE3_DSR_STORAGE,
];

/// What a run did, for the summary, the report and dataset.json.
#[derive(Debug, Default, Serialize)]
pub struct Stats {
    pub studies_found: usize,
    pub studies_mined: usize,
    pub studies_unchanged: usize,
    pub studies_failed: usize,
    pub studies_given_up: usize,
    pub studies_without_patient_id: usize,
    pub rows_added: usize,
    pub rows_total: usize,
    pub added_by_source: BTreeMap<String, usize>,
    pub added_by_label: BTreeMap<String, usize>,
    pub added_by_split: BTreeMap<String, usize>,
    /// Key-images with a label that an earlier run already mined.
    pub already_mined: usize,
    /// Images a source pointed at that got no usable label, by reason (never guessed).
    pub unlabelled: BTreeMap<String, usize>,
    /// Instances of the studies looked at this run that no source labelled (the Key
    /// Object Selection and SR documents that were read are not counted).
    pub instances_without_label: usize,
    /// Labelled images that did not become rows, by reason.
    pub images_skipped: BTreeMap<String, usize>,
    pub documents: BTreeMap<String, usize>,
    pub ris: BTreeMap<String, usize>,
    pub pseudo_below_threshold: usize,
    pub errors: Vec<String>,
    pub timing: Timing,
}

#[derive(Debug, Default, Serialize)]
pub struct Timing {
    pub wall_s: f64,
    /// Time in requests to the archive, summed over concurrent requests.
    pub archive_s: f64,
    pub archive_requests: u64,
    /// Requests held back by `mine.max_requests_per_second` (not part of `archive_s`).
    pub throttled_s: f64,
    /// Reading and decoding retrieved images, and preprocessing (summed over threads).
    pub decode_s: f64,
    /// Writing PNG files.
    pub write_s: f64,
    /// Index transactions.
    pub commit_s: f64,
}

fn add(map: &mut BTreeMap<String, usize>, key: impl Into<String>, n: usize) {
    if n > 0 {
        *map.entry(key.into()).or_default() += n;
    }
}

/// Progress: a bar on a terminal, structured log lines otherwise.
struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new(pages: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(pages), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} date pages  {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress { bar }
    }

    fn update(&self, stats: &Stats) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "studies {} ({} mined, {} unchanged, {} failed), key-images +{}",
                stats.studies_found,
                stats.studies_mined,
                stats.studies_unchanged,
                stats.studies_failed,
                stats.rows_added
            ));
        }
    }

    fn page_done(&self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

struct Miner {
    config: Arc<Config>,
    archive: Archive,
    index: Index,
    state: State,
    output: Output,
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
    settings::require_for_mining(&config.archive, &config.mine)
        .map_err(|e| Fatal(exit::USAGE, e))?;
    let window = config.mine.window().map_err(|e| Fatal(exit::USAGE, e))?;
    let today = Local::now().date_naive();
    let until = args.until.unwrap_or(today);
    let since = args
        .since
        .unwrap_or_else(|| today - chrono::Duration::days(i64::from(config.mine.lookback_days)));
    if since > until {
        return Err(Fatal(
            exit::USAGE,
            format!(
                "--since {} is after --until {}",
                since.format("%Y%m%d"),
                until.format("%Y%m%d")
            ),
        ));
    }
    if let Some(w) = window {
        if !w.contains(local_minute()) {
            let message = format!(
                "outside mine.window {:?}: nothing done (exit {})",
                config.mine.window,
                exit::STOPPED
            );
            info!("{message}");
            eprintln!("anatomy-node mine: {message}");
            return Ok(exit::STOPPED);
        }
    }
    let ratios = config
        .mine
        .split_ratios()
        .map_err(|e| Fatal(exit::USAGE, e))?;
    let ris = match &config.mine.ris_csv {
        Some(path) => RisLabels::load(path).map_err(|e| Fatal(exit::USAGE, e))?,
        None => RisLabels::default(),
    };

    let index = crate::node::open_index(&config)
        .await
        .map_err(|e| Fatal(exit::FAILED, format!("{e:#}")))?;
    let url = config.database_url();
    let lock = match MineLock::acquire(
        &index,
        &url,
        Duration::from_secs(config.mine.lock_wait_secs),
    )
    .await
    {
        Ok(lock) => lock,
        Err(super::state::LockError::Busy(what)) => {
            let message = format!(
                "another `anatomy-node mine` is running ({what}); exit {}",
                exit::LOCKED
            );
            warn!("{message}");
            eprintln!("anatomy-node mine: {message}");
            index.close().await;
            return Ok(exit::LOCKED);
        }
        Err(e) => return Err(Fatal(exit::FAILED, e.to_string())),
    };

    let keyer =
        Keyer::new(&config.mine.patient_key_secret, ratios).map_err(|e| Fatal(exit::USAGE, e))?;
    let output = Output::open(
        &args.out,
        &keyer,
        config.mine.image_size,
        &config.mine.split,
    )
    .map_err(|e| match e {
        super::output::OutputError::Refused(m) => Fatal(exit::USAGE, m),
        other => Fatal(exit::FAILED, other.to_string()),
    })?;
    let state = State::new(index.clone(), &output.json.dataset_id);
    if let Some((check, size, split)) = state.dataset().await.map_err(|e| (exit::FAILED, e))? {
        if check != output.json.key_check
            || size != output.json.image_size as i64
            || split != output.json.split
        {
            return Err(Fatal(
                exit::USAGE,
                format!(
                    "{} does not match its record in the index",
                    args.out.display()
                ),
            ));
        }
    } else if state.runs().await.map_err(|e| (exit::FAILED, e))? == 0
        && output.dir.join("manifest.csv").exists()
    {
        return Err(Fatal(
            exit::USAGE,
            format!(
                "{} was mined into another index database (its rows are not in {}); use a new --out",
                args.out.display(),
                crate::node::redact(&url)
            ),
        ));
    }
    state
        .register_dataset(
            &output.dir,
            &output.json.key_check,
            output.json.image_size,
            &output.json.split,
        )
        .await
        .map_err(|e| (exit::FAILED, e))?;
    let since_text = since.format("%Y%m%d").to_string();
    let until_text = until.format("%Y%m%d").to_string();
    let run_id = state
        .start_run(&since_text, &until_text)
        .await
        .map_err(|e| (exit::FAILED, e))?;

    // Retrieved DICOM files (patient data) never wait inside the dataset folder, so a
    // dataset copied after a crash holds none: they go to a folder of mine's own under
    // mine.spool (default: the storage directory, where the node keeps DICOM anyway).
    let spool_dir = config
        .mine
        .spool
        .clone()
        .unwrap_or_else(|| config.storage.path.clone())
        .join(super::spool::SPOOL_FOLDER);
    let spool = Arc::new(
        Spool::open(&spool_dir)
            .map_err(|e| Fatal(exit::FAILED, format!("spool {}: {e}", spool_dir.display())))?,
    );
    let archive = Archive::open(&config.archive, &config.mine, spool)
        .await
        .map_err(|e| (exit::FAILED, e))?;
    info!(
        run = run_id,
        archive = %archive.describe,
        since = %since_text,
        until = %until_text,
        out = %output.dir.display(),
        "mining"
    );
    let pages = date_pages(since, until, config.archive.query_page_days);
    let rules_hash = rules_hash(&config);
    let mut miner = Miner {
        progress: Progress::new(pages.len() as u64),
        config: Arc::new(config),
        archive,
        index: index.clone(),
        state,
        output,
        keyer,
        ris,
        ris_by_study: HashMap::new(),
        stats: Mutex::new(Stats::default()),
        stop: CancellationToken::new(),
        stop_reason: Mutex::new(None),
        window,
        run_id,
        rules_hash,
        spool_dir,
        decode_us: AtomicU64::new(0),
        write_us: AtomicU64::new(0),
        commit_us: AtomicU64::new(0),
    };
    let outcome = match miner.locate_ris().await {
        Ok(located) => {
            miner.ris_by_study = located;
            let miner = Arc::new(miner);
            let signals = spawn_signal_watch(miner.clone());
            let outcome = miner.clone().run(&pages).await;
            signals.abort();
            let _ = signals.await;
            (Arc::try_unwrap(miner).ok(), outcome)
        }
        Err(e) => (Some(miner), Err(e)),
    };
    let (miner, outcome) = outcome;
    let Some(miner) = miner else {
        return Err(Fatal(
            exit::FAILED,
            "internal: the run is still shared".into(),
        ));
    };
    let code = miner
        .finish(outcome, started, &since_text, &until_text)
        .await;
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

fn sha(text: &str) -> String {
    hex::encode(&Sha256::digest(text.as_bytes())[..12])
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

    /// The run proper: every page of dates. `Err` is fatal.
    async fn run(self: Arc<Self>, pages: &[String]) -> Result<(), String> {
        let this = self;
        let mut seen_studies: BTreeSet<String> = BTreeSet::new();
        for page in pages {
            if this.stop.is_cancelled() {
                break;
            }
            let query = Query::new(Level::Study)
                .key(tags::STUDY_DATE, page.clone())
                .key(tags::MODALITIES_IN_STUDY, this.config.mine.modality.clone())
                .returns(&[
                    tags::STUDY_INSTANCE_UID,
                    tags::PATIENT_ID,
                    tags::ISSUER_OF_PATIENT_ID,
                    tags::ACCESSION_NUMBER,
                    tags::NUMBER_OF_STUDY_RELATED_INSTANCES,
                    tags::NUMBER_OF_STUDY_RELATED_SERIES,
                ]);
            let studies = this
                .archive
                .find(&query)
                .await
                .map_err(|e| format!("querying studies of {page}: {e}"))?;
            let studies: Vec<Answer> = studies
                .into_iter()
                .filter(|a| {
                    a.get(tags::STUDY_INSTANCE_UID)
                        .is_some_and(|uid| seen_studies.insert(uid.to_string()))
                })
                .collect();
            this.stats().studies_found += studies.len();
            info!(page = %page, studies = studies.len(), "study date page");
            let concurrency = this.config.mine.max_concurrent_retrieves;
            futures_util::stream::iter(studies)
                .for_each_concurrent(concurrency, |study| {
                    let this = this.clone();
                    async move {
                        if this.stop.is_cancelled() {
                            return;
                        }
                        if let Some(w) = this.window {
                            if !w.contains(local_minute()) {
                                this.halt("the time window mine.window closed");
                                return;
                            }
                        }
                        this.study(study).await;
                        this.progress.update(&this.stats());
                    }
                })
                .await;
            this.progress.page_done();
        }
        let outside = this
            .ris_by_study
            .keys()
            .filter(|s| !seen_studies.contains(*s))
            .map(|s| this.ris_by_study[s].len())
            .sum::<usize>();
        add(
            &mut this.stats().ris,
            "rows in studies outside the date window",
            outside,
        );
        Ok(())
    }

    /// Find the RIS image rows in the archive: their study and series (rows that name them
    /// need no query; rows already mined are not looked for).
    async fn locate_ris(&self) -> Result<HashMap<String, Vec<Claim>>, String> {
        let mut by_study: HashMap<String, Vec<Claim>> = HashMap::new();
        {
            let mut stats = self.stats();
            add(&mut stats.ris, "rows", self.ris.rows);
            add(&mut stats.ris, "rows refused", self.ris.refused.len());
        }
        for refused in &self.ris.refused {
            warn!(row = %refused, "mine.ris_csv row refused");
        }
        if self.ris.images.is_empty() {
            return Ok(by_study);
        }
        let mined = self.state.mined_uids().await.map_err(|e| e.to_string())?;
        let mut unknown: Vec<&labels::RisImage> = Vec::new();
        let claim = |r: &labels::RisImage, series: Option<String>| Claim {
            sop_instance_uid: r.sop_instance_uid.clone(),
            frame: None,
            series_uid: series,
            label: r.label.clone(),
            source: Source::Ris,
        };
        let mut already = 0;
        for r in &self.ris.images {
            if mined.contains(&r.sop_instance_uid) {
                already += 1;
                continue;
            }
            match (&r.study_uid, &r.series_uid) {
                (Some(study), Some(series)) => by_study
                    .entry(study.clone())
                    .or_default()
                    .push(claim(r, Some(series.clone()))),
                _ => unknown.push(r),
            }
        }
        add(&mut self.stats().ris, "rows mined before", already);
        let mut not_found = 0;
        for chunk in unknown.chunks(LOCATE_CHUNK) {
            let list: Vec<&str> = chunk.iter().map(|r| r.sop_instance_uid.as_str()).collect();
            let query = Query::new(Level::Image)
                .key(tags::SOP_INSTANCE_UID, list.join("\\"))
                .returns(&[tags::STUDY_INSTANCE_UID, tags::SERIES_INSTANCE_UID]);
            let answers = self
                .archive
                .find(&query)
                .await
                .map_err(|e| format!("locating RIS rows in the archive: {e}"))?;
            let found: HashMap<String, (String, String)> = answers
                .iter()
                .filter_map(|a| {
                    Some((
                        a.get(tags::SOP_INSTANCE_UID)?.to_string(),
                        (
                            a.get(tags::STUDY_INSTANCE_UID)?.to_string(),
                            a.get(tags::SERIES_INSTANCE_UID)?.to_string(),
                        ),
                    ))
                })
                .collect();
            for r in chunk {
                match found.get(&r.sop_instance_uid) {
                    Some((study, series)) => by_study
                        .entry(study.clone())
                        .or_default()
                        .push(claim(r, Some(series.clone()))),
                    None => not_found += 1,
                }
            }
        }
        add(&mut self.stats().ris, "rows not in the archive", not_found);
        Ok(by_study)
    }

    /// Mine one study; every outcome is recorded (a failure too, for the next run).
    async fn study(&self, study: Answer) {
        let uid = study.text(tags::STUDY_INSTANCE_UID);
        let result = self.mine_study(&uid, &study).await;
        if let Err(e) = result {
            self.error(format!("study {uid}: {e}"));
            self.stats().studies_failed += 1;
        }
    }

    async fn mine_study(&self, uid: &str, study: &Answer) -> Result<(), String> {
        let predictions = if self.config.mine.pseudo_labels {
            labels::predictions(&self.index, uid)
                .await
                .map_err(|e| format!("reading the node's predictions: {e}"))?
        } else {
            Vec::new()
        };
        let patient_id = study.text(tags::PATIENT_ID);
        let patient = (!patient_id.is_empty()).then(|| {
            self.keyer
                .patient(&patient_id, &study.text(tags::ISSUER_OF_PATIENT_ID))
        });
        let fingerprint = self.fingerprint(uid, study, patient.as_ref(), &predictions);
        let before = self.state.study(uid).await.map_err(|e| e.to_string())?;
        if let Some(before) = &before {
            if before.fingerprint == fingerprint {
                if before.state == "done" {
                    self.stats().studies_unchanged += 1;
                    return Ok(());
                }
                if before.attempts >= i64::from(self.config.mine.max_attempts) {
                    self.stats().studies_given_up += 1;
                    return Ok(());
                }
            }
        }
        let instances = study
            .get(tags::NUMBER_OF_STUDY_RELATED_INSTANCES)
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        let Some(patient) = patient else {
            // Without a patient the split by patient is impossible: nothing is mined.
            {
                let mut stats = self.stats();
                stats.studies_without_patient_id += 1;
                stats.instances_without_label += instances;
            }
            return self.commit(uid, &fingerprint, None, Vec::new()).await;
        };

        let mut failures: Vec<String> = Vec::new();
        let mut claims: Vec<Claim> = self.ris_by_study.get(uid).cloned().unwrap_or_default();
        let mut documents = 0;
        if self.config.mine.kos || self.config.mine.sr {
            match self.document_claims(uid).await {
                Ok((c, n)) => {
                    claims.extend(c);
                    documents = n;
                }
                Err(e) => failures.push(e),
            }
        }
        match self.series_claims(uid, study).await {
            Ok(c) => claims.extend(c),
            Err(e) => failures.push(e),
        }
        claims.extend(self.pseudo_claims(predictions));

        let (decisions, unlabelled) = labels::resolve(claims);
        let mined = self
            .state
            .mined_in_study(uid)
            .await
            .map_err(|e| e.to_string())?;
        let (todo, done): (Vec<Decision>, Vec<Decision>) = decisions
            .into_iter()
            .partition(|d| !mined.contains(&(d.sop_instance_uid.clone(), d.frame)));
        {
            let labelled: BTreeSet<&str> = todo
                .iter()
                .chain(&done)
                .map(|d| d.sop_instance_uid.as_str())
                .collect();
            let mut stats = self.stats();
            for (reason, n) in unlabelled {
                add(&mut stats.unlabelled, reason, n);
            }
            stats.already_mined += done.len();
            stats.instances_without_label += instances.saturating_sub(documents + labelled.len());
        }
        let mut rows = Vec::new();
        if !todo.is_empty() {
            match self.retrieve_and_convert(uid, &patient, todo).await {
                Ok((r, failure)) => {
                    rows = r;
                    failures.extend(failure);
                }
                Err(e) => failures.push(e),
            }
        }
        let failed = failures.first().cloned();
        for f in &failures {
            self.error(format!("study {uid}: {f}"));
        }
        self.commit(uid, &fingerprint, failed.as_deref(), rows)
            .await?;
        let mut stats = self.stats();
        if failed.is_some() {
            stats.studies_failed += 1;
        } else {
            stats.studies_mined += 1;
        }
        Ok(())
    }

    async fn commit(
        &self,
        uid: &str,
        fingerprint: &str,
        failed: Option<&str>,
        rows: Vec<MinedRow>,
    ) -> Result<(), String> {
        let started = Instant::now();
        let added = self
            .state
            .commit_study(self.run_id, uid, fingerprint, failed, &rows)
            .await
            .map_err(|e| format!("recording the study in the index: {e}"))?;
        self.commit_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        let mut stats = self.stats();
        stats.rows_added += added;
        for r in &rows {
            add(&mut stats.added_by_source, r.row.label_source.clone(), 1);
            add(&mut stats.added_by_label, r.row.label.clone(), 1);
            add(&mut stats.added_by_split, r.row.split.clone(), 1);
        }
        if !rows.is_empty() {
            info!(study = uid, rows = added, "study mined");
        }
        Ok(())
    }

    /// The study as this run sees it: a change in any part makes the next run look again.
    fn fingerprint(
        &self,
        uid: &str,
        study: &Answer,
        patient: Option<&(String, &'static str)>,
        predictions: &[labels::Prediction],
    ) -> String {
        // The patient enters as its keyed key: the index never holds an unkeyed hash of
        // a Patient ID, which a dictionary of IDs would reverse.
        let mut parts = vec![
            self.rules_hash.clone(),
            study.text(tags::NUMBER_OF_STUDY_RELATED_INSTANCES),
            study.text(tags::NUMBER_OF_STUDY_RELATED_SERIES),
            study.text(tags::ACCESSION_NUMBER),
            patient.map(|p| p.0.clone()).unwrap_or_default(),
        ];
        let mut ris: Vec<String> = self
            .ris_by_study
            .get(uid)
            .map(|c| {
                c.iter()
                    .map(|c| format!("{}={:?}", c.sop_instance_uid, c.label))
                    .collect()
            })
            .unwrap_or_default();
        ris.extend(
            self.ris
                .series
                .iter()
                .filter(|((st, _), _)| st == uid)
                .map(|((_, se), l)| format!("{se}={l:?}")),
        );
        if let Some(label) = self.ris.accessions.get(&study.text(tags::ACCESSION_NUMBER)) {
            ris.push(format!("accession={label:?}"));
        }
        ris.sort();
        parts.push(sha(&ris.join(",")));
        let min_p = self.config.mine.pseudo_label_min_probability;
        let pseudo: Vec<String> = predictions
            .iter()
            .filter(|p| p.probability >= min_p)
            .map(|p| {
                format!(
                    "{}:{}:{}:{}",
                    p.sop_instance_uid, p.frame, p.label, p.model_version
                )
            })
            .collect();
        parts.push(sha(&pseudo.join(",")));
        sha(&parts.join("|"))
    }

    /// Key Object Selection documents (and SR) of the study: what they reference, with the
    /// label their content maps to.
    /// The claims, and the number of documents found.
    async fn document_claims(&self, uid: &str) -> Result<(Vec<Claim>, usize), String> {
        let m = &self.config.mine;
        let modalities = match (m.kos, m.sr) {
            (true, true) => "KO\\SR",
            (true, false) => "KO",
            _ => "SR",
        };
        let series = self
            .archive
            .find(
                &Query::new(Level::Series)
                    .in_study(uid)
                    .key(tags::MODALITY, modalities)
                    .returns(&[tags::SERIES_INSTANCE_UID]),
            )
            .await
            .map_err(|e| format!("querying document series: {e}"))?;
        let mut claims = Vec::new();
        let mut documents = 0;
        for s in series {
            let Some(series_uid) = s.get(tags::SERIES_INSTANCE_UID).map(str::to_string) else {
                continue;
            };
            let instances = self
                .archive
                .find(
                    &Query::new(Level::Image)
                        .in_study(uid)
                        .in_series(&series_uid)
                        .returns(&[tags::SOP_INSTANCE_UID, tags::SOP_CLASS_UID]),
                )
                .await
                .map_err(|e| format!("querying documents of series {series_uid}: {e}"))?;
            let wanted: Vec<String> = instances
                .iter()
                .filter(|a| {
                    let class = a.text(tags::SOP_CLASS_UID);
                    (m.kos && class == uids::KEY_OBJECT_SELECTION_DOCUMENT_STORAGE)
                        || (m.sr && SR_CLASSES.contains(&class.as_str()))
                })
                .filter_map(|a| a.get(tags::SOP_INSTANCE_UID).map(str::to_string))
                .collect();
            if wanted.is_empty() {
                continue;
            }
            documents += wanted.len();
            let (files, error) = self.archive.retrieve(uid, &series_uid, &wanted).await;
            for (_, path) in files {
                let read = Document::read(&path);
                let _ = std::fs::remove_file(&path);
                let doc = match read {
                    Ok(d) => d,
                    Err(e) => {
                        add(&mut self.stats().documents, "unreadable", 1);
                        self.error(format!(
                            "study {uid}: a document of series {series_uid}: {e}"
                        ));
                        continue;
                    }
                };
                let source = if doc.sop_class_uid == uids::KEY_OBJECT_SELECTION_DOCUMENT_STORAGE {
                    Source::Kos
                } else {
                    Source::Sr
                };
                if doc.is_own() {
                    // The node's own output: machine labels, never read as human ones.
                    add(
                        &mut self.stats().documents,
                        "written by anatomy-node (ignored)",
                        1,
                    );
                    continue;
                }
                add(
                    &mut self.stats().documents,
                    if source == Source::Kos {
                        "key object selection"
                    } else {
                        "structured report"
                    },
                    1,
                );
                let label = doc.label(&m.kos_labels);
                for r in &doc.references {
                    if r.study_uid.as_deref().is_some_and(|s| s != uid) {
                        add(
                            &mut self.stats().unlabelled,
                            "document references an image of another study",
                            1,
                        );
                        continue;
                    }
                    let frames: Vec<Option<u32>> = if r.frames.is_empty() {
                        vec![None]
                    } else {
                        r.frames.iter().map(|f| Some(f - 1)).collect()
                    };
                    for frame in frames {
                        claims.push(Claim {
                            sop_instance_uid: r.sop_instance_uid.clone(),
                            frame,
                            series_uid: r.series_uid.clone(),
                            label: label.clone(),
                            source: source.clone(),
                        });
                    }
                }
            }
            if let Some(e) = error {
                return Err(format!("retrieving documents of series {series_uid}: {e}"));
            }
        }
        Ok((claims, documents))
    }

    /// RIS rows for a whole series, or a whole study by accession number: the series'
    /// key-images chosen as the node chooses them (`anatomy::select`).
    async fn series_claims(&self, uid: &str, study: &Answer) -> Result<Vec<Claim>, String> {
        let mut targets: Vec<(String, Result<String, String>, Source)> = self
            .ris
            .series
            .iter()
            .filter(|((st, _), _)| st == uid)
            .map(|((_, se), label)| (se.clone(), label.clone(), Source::RisSeries))
            .collect();
        let accession = study.text(tags::ACCESSION_NUMBER);
        if let Some(label) = self
            .ris
            .accessions
            .get(&accession)
            .filter(|_| !accession.is_empty())
        {
            let series = self
                .archive
                .find(
                    &Query::new(Level::Series)
                        .in_study(uid)
                        .key(tags::MODALITY, self.config.mine.modality.clone())
                        .returns(&[tags::SERIES_INSTANCE_UID]),
                )
                .await
                .map_err(|e| format!("querying the series of accession {accession}: {e}"))?;
            targets.extend(series.iter().filter_map(|s| {
                Some((
                    s.get(tags::SERIES_INSTANCE_UID)?.to_string(),
                    label.clone(),
                    Source::RisAccession,
                ))
            }));
        }
        targets.sort_by(|a, b| a.0.cmp(&b.0));
        let mut claims = Vec::new();
        for (series, label, source) in targets {
            let key_images = match self.select_in_series(uid, &series).await? {
                Ok(k) => k,
                Err(reason) => {
                    add(
                        &mut self.stats().unlabelled,
                        format!("series without key-images: {reason}"),
                        1,
                    );
                    continue;
                }
            };
            claims.extend(key_images.into_iter().map(|k| Claim {
                sop_instance_uid: k.sop_instance_uid,
                frame: Some(k.frame),
                series_uid: Some(series.clone()),
                label: label.clone(),
                source: source.clone(),
            }));
        }
        Ok(claims)
    }

    /// `mine.series_key_images` key-images of a series: chosen from the query answers when
    /// the archive returns positions and orientations, else from the retrieved files.
    async fn select_in_series(
        &self,
        uid: &str,
        series: &str,
    ) -> Result<Result<Vec<select::KeyImage>, String>, String> {
        let rules = SelectionRules {
            key_images: KeyImageCount::Count(self.config.mine.series_key_images),
            axial_tolerance_deg: self.config.classifier.axial_tolerance_deg,
        };
        let answers = self
            .archive
            .find(
                &Query::new(Level::Image)
                    .in_study(uid)
                    .in_series(series)
                    .returns(&[
                        tags::SOP_INSTANCE_UID,
                        tags::SOP_CLASS_UID,
                        tags::IMAGE_TYPE,
                        tags::IMAGE_POSITION_PATIENT,
                        tags::IMAGE_ORIENTATION_PATIENT,
                        tags::NUMBER_OF_FRAMES,
                        tags::INSTANCE_NUMBER,
                    ]),
            )
            .await
            .map_err(|e| format!("querying the images of series {series}: {e}"))?;
        let instances: Vec<Instance> = answers
            .iter()
            .filter_map(|a| {
                Some(Instance {
                    sop_instance_uid: a.get(tags::SOP_INSTANCE_UID)?.to_string(),
                    sop_class_uid: a.text(tags::SOP_CLASS_UID),
                    path: PathBuf::new(),
                    image_type: a.joined(tags::IMAGE_TYPE),
                    image_position: a.joined(tags::IMAGE_POSITION_PATIENT),
                    image_orientation: a.joined(tags::IMAGE_ORIENTATION_PATIENT),
                    number_of_frames: a.get(tags::NUMBER_OF_FRAMES).and_then(|v| v.parse().ok()),
                    instance_number: a.get(tags::INSTANCE_NUMBER).and_then(|v| v.parse().ok()),
                })
            })
            .collect();
        let complete = instances.iter().all(|i| {
            !select::is_ct_image_class(&i.sop_class_uid)
                || (i.sop_class_uid == uids::CT_IMAGE_STORAGE
                    && i.number_of_frames.unwrap_or(1) <= 1
                    && i.image_position.is_some()
                    && i.image_orientation.is_some())
        });
        let selection = if complete {
            select::select(&instances, &rules)
        } else {
            // The answers lack geometry (or hold multi-frame images): read the files.
            let wanted: Vec<String> = instances
                .iter()
                .filter(|i| {
                    select::is_ct_image_class(&i.sop_class_uid) || i.sop_class_uid.is_empty()
                })
                .map(|i| i.sop_instance_uid.clone())
                .collect();
            let (files, error) = self.archive.retrieve(uid, series, &wanted).await;
            if let Some(e) = error {
                for p in files.values() {
                    let _ = std::fs::remove_file(p);
                }
                return Err(format!(
                    "retrieving series {series} to choose its key-images: {e}"
                ));
            }
            let from_files: Vec<Instance> = files
                .iter()
                .filter_map(|(uid, path)| instance_from_file(uid, path))
                .collect();
            let selection = select::select(&from_files, &rules);
            for p in files.values() {
                let _ = std::fs::remove_file(p);
            }
            selection
        };
        Ok(match selection {
            Selection::Selected { key_images, .. } => Ok(key_images),
            Selection::Skipped { reason } => Err(reason),
        })
    }

    fn pseudo_claims(&self, predictions: Vec<labels::Prediction>) -> Vec<Claim> {
        let min_p = self.config.mine.pseudo_label_min_probability;
        let mut below = 0;
        let claims = predictions
            .into_iter()
            .filter(|p| {
                let keep = p.probability >= min_p;
                below += usize::from(!keep);
                keep
            })
            .map(|p| Claim {
                label: dataset_label(&p.label)
                    .ok_or_else(|| format!("predicted class {:?} is not a dataset label", p.label)),
                sop_instance_uid: p.sop_instance_uid,
                frame: Some(p.frame),
                series_uid: Some(p.series_uid),
                source: Source::Pseudo(p.model_version),
            })
            .collect();
        self.stats().pseudo_below_threshold += below;
        claims
    }

    /// Retrieve the labelled images series by series and write them into the dataset:
    /// the rows made, and the first failure (what arrived before it is kept).
    async fn retrieve_and_convert(
        &self,
        uid: &str,
        patient: &(String, &'static str),
        todo: Vec<Decision>,
    ) -> Result<(Vec<MinedRow>, Option<String>), String> {
        let mut todo = todo;
        // Images whose series no source named: ask the archive.
        let unknown: Vec<String> = todo
            .iter()
            .filter(|d| d.series_uid.is_none())
            .map(|d| d.sop_instance_uid.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if !unknown.is_empty() {
            let mut where_: HashMap<String, String> = HashMap::new();
            for chunk in unknown.chunks(LOCATE_CHUNK) {
                let answers = self
                    .archive
                    .find(
                        &Query::new(Level::Image)
                            .in_study(uid)
                            .key(tags::SOP_INSTANCE_UID, chunk.join("\\"))
                            .returns(&[tags::SERIES_INSTANCE_UID]),
                    )
                    .await
                    .map_err(|e| format!("locating key-images: {e}"))?;
                where_.extend(answers.iter().filter_map(|a| {
                    Some((
                        a.get(tags::SOP_INSTANCE_UID)?.to_string(),
                        a.get(tags::SERIES_INSTANCE_UID)?.to_string(),
                    ))
                }));
            }
            let before = todo.len();
            todo.retain_mut(|d| {
                if d.series_uid.is_none() {
                    d.series_uid = where_.get(&d.sop_instance_uid).cloned();
                }
                d.series_uid.is_some()
            });
            add(
                &mut self.stats().images_skipped,
                "not in the archive",
                before - todo.len(),
            );
        }
        let mut by_series: BTreeMap<String, Vec<Decision>> = BTreeMap::new();
        for d in todo {
            by_series
                .entry(d.series_uid.clone().unwrap_or_default())
                .or_default()
                .push(d);
        }
        let mut rows = Vec::new();
        let mut failure = None;
        for (series, decisions) in by_series {
            if self.stop.is_cancelled() && failure.is_none() {
                failure = Some("stopped before this series".to_string());
                break;
            }
            let sops: Vec<String> = decisions
                .iter()
                .map(|d| d.sop_instance_uid.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let (files, error) = self.archive.retrieve(uid, &series, &sops).await;
            let missing = decisions
                .iter()
                .filter(|d| !files.contains_key(&d.sop_instance_uid))
                .count();
            if let Some(e) = error {
                failure.get_or_insert(format!("retrieving series {series}: {e}"));
            } else {
                add(
                    &mut self.stats().images_skipped,
                    "not sent by the archive",
                    missing,
                );
            }
            let converted = self.convert(uid, &series, patient, decisions, files).await;
            for item in converted {
                match item {
                    Ok(row) => rows.push(row),
                    Err(reason) => add(&mut self.stats().images_skipped, reason, 1),
                }
            }
        }
        Ok((rows, failure))
    }

    /// Decode, preprocess and write the retrieved images of one series (on the blocking
    /// pool); the spool files are removed after.
    async fn convert(
        &self,
        study_uid: &str,
        series_uid: &str,
        patient: &(String, &'static str),
        decisions: Vec<Decision>,
        files: HashMap<String, PathBuf>,
    ) -> Vec<Result<MinedRow, String>> {
        let size = self.output.json.image_size;
        let dir = self.output.dir.clone();
        let tolerance = self.config.classifier.axial_tolerance_deg;
        let (study_uid, series_uid) = (study_uid.to_string(), series_uid.to_string());
        let (patient_key, split) = (patient.0.clone(), patient.1);
        let decode_us = Arc::new(AtomicU64::new(0));
        let write_us = Arc::new(AtomicU64::new(0));
        let (d_us, w_us) = (decode_us.clone(), write_us.clone());
        let result = tokio::task::spawn_blocking(move || {
            let mut by_file: BTreeMap<String, Vec<Decision>> = BTreeMap::new();
            for d in decisions {
                by_file
                    .entry(d.sop_instance_uid.clone())
                    .or_default()
                    .push(d);
            }
            let mut out = Vec::new();
            for (sop, decisions) in by_file {
                let Some(path) = files.get(&sop) else {
                    continue;
                };
                let images = Miner::timed(&d_us, || decode_file(path, &decisions, size, tolerance));
                let _ = std::fs::remove_file(path);
                let images = match images {
                    Ok(images) => images,
                    Err(reason) => {
                        out.extend(decisions.iter().map(|_| Err(reason.clone())));
                        continue;
                    }
                };
                for (decision, image) in decisions.iter().zip(images) {
                    let (hu, z, multi_frame) = match image {
                        Ok(x) => x,
                        Err(reason) => {
                            out.push(Err(reason));
                            continue;
                        }
                    };
                    let name = Output::image_name(&sop, decision.frame, multi_frame);
                    let written =
                        Miner::timed(&w_us, || super::output::write_image(&dir, &name, size, &hu));
                    match written {
                        Ok(()) => out.push(Ok(MinedRow {
                            row: ManifestRow {
                                image: name,
                                patient_key: patient_key.clone(),
                                study_uid: study_uid.clone(),
                                series_uid: series_uid.clone(),
                                sop_instance_uid: sop.clone(),
                                z_mm: z.map(|z| format!("{z:.2}")).unwrap_or_default(),
                                label: decision.label.clone(),
                                label_source: decision.label_source.clone(),
                                split: split.to_string(),
                            },
                            frame: decision.frame,
                        })),
                        Err(e) => out.push(Err(format!("writing the image failed: {e}"))),
                    }
                }
            }
            out
        })
        .await;
        self.decode_us
            .fetch_add(decode_us.load(Ordering::Relaxed), Ordering::Relaxed);
        self.write_us
            .fetch_add(write_us.load(Ordering::Relaxed), Ordering::Relaxed);
        match result {
            Ok(rows) => rows,
            Err(e) => vec![Err(format!("conversion task failed: {e}"))],
        }
    }

    /// manifest.csv, dataset.json and the report; the exit code.
    async fn finish(
        self,
        outcome: Result<(), String>,
        started: Instant,
        since: &str,
        until: &str,
    ) -> u8 {
        self.progress.finish();
        let stop_reason = self
            .stop_reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut code = match (&outcome, &stop_reason) {
            (Err(_), _) => exit::FAILED,
            (Ok(()), Some(_)) => exit::STOPPED,
            (Ok(()), None) if self.stats().studies_failed > 0 => exit::PARTIAL,
            (Ok(()), None) => exit::OK,
        };
        if let Err(e) = &outcome {
            self.error(format!("run stopped: {e}"));
        }
        let (archive_s, requests, throttled_s) = self.archive.waited();
        {
            let mut stats = self.stats();
            stats.timing = Timing {
                wall_s: started.elapsed().as_secs_f64(),
                archive_s,
                archive_requests: requests,
                throttled_s,
                decode_s: self.decode_us.load(Ordering::Relaxed) as f64 / 1e6,
                write_s: self.write_us.load(Ordering::Relaxed) as f64 / 1e6,
                commit_s: self.commit_us.load(Ordering::Relaxed) as f64 / 1e6,
            };
        }
        let rows = match self.state.rows().await {
            Ok(rows) => rows,
            Err(e) => {
                self.error(format!("reading the dataset's rows from the index: {e}"));
                code = exit::FAILED;
                Vec::new()
            }
        };
        self.stats().rows_total = rows.len();
        let summary = {
            let stats = self.stats();
            json!({
                "run": self.run_id,
                "since": since,
                "until": until,
                "archive": self.archive.describe,
                "exit_code": code,
                "exit": exit::meaning(code),
                "stopped_by": stop_reason,
                "finished_at": super::state::now(),
                "stats": &*stats,
            })
        };
        if code != exit::FAILED || !rows.is_empty() {
            match self.output.write_index(&rows, summary.clone()) {
                Ok(strays) if strays > 0 => {
                    info!(removed = strays, "images of uncommitted rows removed")
                }
                Ok(_) => {}
                Err(e) => {
                    self.error(format!("writing manifest.csv and dataset.json: {e}"));
                    code = exit::FAILED;
                }
            }
        }
        let summary = json!({ "exit_code": code, "exit": exit::meaning(code), "report": summary });
        let report_path = self.output.write_report(self.run_id, &summary);
        if let Err(e) = &report_path {
            warn!(error = %e, "cannot keep the run's report");
        }
        if let Err(e) = self
            .state
            .finish_run(self.run_id, code, &summary.to_string())
            .await
        {
            warn!(error = %e, "cannot record the end of the run");
        }
        {
            let stats = self.stats();
            print_summary(&stats, code, &self.output.dir, report_path.ok().as_deref());
            info!(
                exit_code = code,
                rows_added = stats.rows_added,
                rows_total = stats.rows_total,
                studies = stats.studies_found,
                "mine finished"
            );
        }
        self.archive.close().await;
        let _ = std::fs::remove_dir_all(&self.spool_dir);
        code
    }
}

fn print_summary(stats: &Stats, code: u8, out: &Path, report: Option<&Path>) {
    let t = &stats.timing;
    let busy = (t.archive_s + t.decode_s + t.write_s).max(1e-9);
    println!(
        "studies: {} found, {} mined, {} unchanged, {} failed, {} given up, {} without Patient ID",
        stats.studies_found,
        stats.studies_mined,
        stats.studies_unchanged,
        stats.studies_failed,
        stats.studies_given_up,
        stats.studies_without_patient_id
    );
    let list = |m: &BTreeMap<String, usize>| {
        if m.is_empty() {
            "none".to_string()
        } else {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    println!(
        "key-images: {} added ({}), {} in the dataset, {} mined before",
        stats.rows_added,
        list(&stats.added_by_source),
        stats.rows_total,
        stats.already_mined
    );
    println!(
        "  labels: {}; splits: {}",
        list(&stats.added_by_label),
        list(&stats.added_by_split)
    );
    println!(
        "unlabelled (not guessed): {} instances without a label; pointed at without a usable label: {}",
        stats.instances_without_label,
        list(&stats.unlabelled)
    );
    println!("skipped images: {}", list(&stats.images_skipped));
    if !stats.ris.is_empty() {
        println!("RIS CSV: {}", list(&stats.ris));
    }
    if !stats.documents.is_empty() {
        println!("documents: {}", list(&stats.documents));
    }
    if stats.pseudo_below_threshold > 0 {
        println!(
            "predictions below mine.pseudo_label_min_probability: {}",
            stats.pseudo_below_threshold
        );
    }
    println!(
        "time: {:.1} s; archive {:.1} s ({} requests, {:.0} %), decoding {:.1} s ({:.0} %), writing {:.1} s ({:.0} %); held back by mine.max_requests_per_second {:.1} s",
        t.wall_s,
        t.archive_s,
        t.archive_requests,
        100.0 * t.archive_s / busy,
        t.decode_s,
        100.0 * t.decode_s / busy,
        t.write_s,
        100.0 * t.write_s / busy,
        t.throttled_s
    );
    for e in stats.errors.iter().take(10) {
        println!("error: {e}");
    }
    println!(
        "exit {code}: {}; dataset {}{}",
        exit::meaning(code),
        out.display(),
        report
            .map(|p| format!("; report {}", p.display()))
            .unwrap_or_default()
    );
}

/// `anatomy::select`'s view of a retrieved file (header only).
fn instance_from_file(sop: &str, path: &Path) -> Option<Instance> {
    header(sop, path).map(|(instance, _)| instance)
}

/// A retrieved file's header: `anatomy::select`'s view of it, and whether it says the
/// pixels carry burned-in annotation (Burned In Annotation (0028,0301) YES).
fn header(sop: &str, path: &Path) -> Option<(Instance, bool)> {
    let obj = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .ok()?;
    let text = |tag| {
        obj.element(tag)
            .ok()
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_matches(['\0', ' ']).to_string())
            .filter(|s| !s.is_empty())
    };
    let burned_in = text(tags::BURNED_IN_ANNOTATION).is_some_and(|v| v.eq_ignore_ascii_case("YES"));
    let instance = Instance {
        sop_instance_uid: sop.to_string(),
        sop_class_uid: text(tags::SOP_CLASS_UID).unwrap_or_default(),
        path: path.to_path_buf(),
        image_type: text(tags::IMAGE_TYPE),
        image_position: text(tags::IMAGE_POSITION_PATIENT),
        image_orientation: text(tags::IMAGE_ORIENTATION_PATIENT),
        number_of_frames: text(tags::NUMBER_OF_FRAMES).and_then(|v| v.parse().ok()),
        instance_number: text(tags::INSTANCE_NUMBER).and_then(|v| v.parse().ok()),
    };
    Some((instance, burned_in))
}

type Converted = Result<(Vec<f32>, Option<f64>, bool), String>;

/// The labelled frames of one retrieved file, in HU at the dataset's size, with their z.
fn decode_file(
    path: &Path,
    decisions: &[Decision],
    size: usize,
    tolerance: f64,
) -> Result<Vec<Converted>, String> {
    let sop = decisions
        .first()
        .map(|d| d.sop_instance_uid.clone())
        .unwrap_or_default();
    let (instance, burned_in) = header(&sop, path).ok_or("not a readable DICOM file")?;
    if !select::is_ct_image_class(&instance.sop_class_uid) {
        return Err(format!(
            "not a CT image ({})",
            crate::forward::scu::sop_class_name(&instance.sop_class_uid)
        ));
    }
    if burned_in {
        // Text in the pixels may name the patient: such an image never enters a dataset.
        return Err("burned-in annotation (0028,0301) YES".into());
    }
    let frames = u32::try_from(instance.number_of_frames.unwrap_or(1).max(1)).unwrap_or(1);
    let multi_frame = frames > 1 || instance.sop_class_uid != uids::CT_IMAGE_STORAGE;
    // z of every frame, whatever its orientation (90°: every plane counts here).
    let z: HashMap<u32, f64> = match select::select(
        &[instance],
        &SelectionRules {
            key_images: KeyImageCount::All,
            axial_tolerance_deg: 90.0,
        },
    ) {
        Selection::Selected { key_images, .. } => {
            key_images.into_iter().map(|k| (k.frame, k.z_mm)).collect()
        }
        Selection::Skipped { .. } => HashMap::new(),
    };
    let preprocessing = Preprocessing {
        size,
        axial_tolerance_deg: tolerance,
    };
    let all = if frames == 1 {
        Some(pixels::hu_frames(path).map_err(|e| e.kind.to_string())?)
    } else {
        None
    };
    Ok(decisions
        .iter()
        .map(|d| {
            if d.whole_image && frames > 1 {
                return Err("a multi-frame image named without a frame number".to_string());
            }
            if d.frame >= frames {
                return Err(format!(
                    "frame {} named, the image has {frames}",
                    d.frame + 1
                ));
            }
            let image = match &all {
                Some(all) => all
                    .first()
                    .cloned()
                    .ok_or_else(|| "no pixel data".to_string())?,
                None => pixels::hu_frame(path, d.frame).map_err(|e| e.kind.to_string())?,
            };
            Ok((
                pixels::preprocess(&image, &preprocessing),
                z.get(&d.frame).copied(),
                multi_frame,
            ))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_with_burned_in_annotation_are_refused() {
        use dicom_core::{DataElement, PrimitiveValue, VR};
        let dir = tempfile::tempdir().unwrap();
        let spec = crate::synth::SeriesSpec::new(1, 2, 32);
        let decision = |sop: String| Decision {
            sop_instance_uid: sop,
            frame: 0,
            whole_image: true,
            series_uid: None,
            label: "lungs".into(),
            label_source: "mined:ris".into(),
        };
        let mut converted = Vec::new();
        for (slice, burned) in [(0, "NO"), (1, "YES")] {
            let mut obj = crate::synth::ct_slice(&spec, slice);
            obj.put(DataElement::new(
                tags::BURNED_IN_ANNOTATION,
                VR::CS,
                PrimitiveValue::from(burned),
            ));
            let path = dir.path().join(format!("{slice}.dcm"));
            obj.write_to_file(&path).unwrap();
            let images = decode_file(&path, &[decision(spec.sop_uid(slice))], 16, 35.0);
            converted.push(images.map(|i| i.len()));
        }
        assert_eq!(converted[0], Ok(1));
        assert_eq!(
            converted[1],
            Err("burned-in annotation (0028,0301) YES".to_string())
        );
    }

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
