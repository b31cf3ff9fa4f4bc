//! What a run did: the counters, the progress bar, and the end of the run (manifest.csv,
//! dataset.json, the report, the printed summary, the exit code).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde_json::json;
use tracing::{info, warn};

use super::{MineError, Miner};
use crate::dataset::ManifestRow;
use crate::mine::exit;

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
    /// Confident predictions left out because the image's own label is not its series'
    /// decoded (head-to-foot) label (`mine.pseudo_label_require_order`).
    pub pseudo_out_of_order: usize,
    pub errors: Vec<String>,
    /// The study queries of the date walk: how many, empty, capped and split, unresolved.
    pub queries: crate::mine::range::QueryCounts,
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

/// Count `n` more under `key`; a zero count adds no key, so the report lists only what
/// happened.
pub(super) fn add(map: &mut BTreeMap<String, usize>, key: impl Into<String>, n: usize) {
    if n > 0 {
        *map.entry(key.into()).or_default() += n;
    }
}

/// Progress: a bar on a terminal, structured log lines otherwise.
pub(super) struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// The bar counts studies: found so far (its length, which grows as ranges are
    /// answered) and done.
    pub(super) fn new() -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} studies  {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress { bar }
    }

    pub(super) fn update(&self, stats: &Stats) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "({} mined, {} unchanged, {} failed), key-images +{}",
                stats.studies_mined,
                stats.studies_unchanged,
                stats.studies_failed,
                stats.rows_added
            ));
        }
    }

    pub(super) fn found(&self, studies: u64) {
        if let Some(bar) = &self.bar {
            bar.inc_length(studies);
        }
    }

    pub(super) fn study_done(&self) {
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

impl Miner {
    /// manifest.csv, dataset.json and the report; the exit code.
    pub(super) async fn finish(
        self,
        outcome: Result<(), MineError>,
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
        let mut code = self.exit_code(&outcome, stop_reason.is_some());
        if let Err(e) = &outcome {
            self.error(format!("run stopped: {e}"));
        }
        self.stats().timing = self.timing(started);
        let rows = match self.state.rows().await {
            Ok(rows) => rows,
            Err(e) => {
                self.error(format!("reading the dataset's rows from the index: {e}"));
                code = exit::FAILED;
                Vec::new()
            }
        };
        self.stats().rows_total = rows.len();
        let report = self.report(code, &stop_reason, since, until);
        // A failed run that found no rows leaves the dataset's files as they were.
        let keeps_files = code == exit::FAILED && rows.is_empty();
        if !keeps_files && !self.write_index(&rows, report.clone()) {
            code = exit::FAILED;
        }
        let summary = json!({ "exit_code": code, "exit": exit::meaning(code), "report": report });
        let report_path = self.keep_report(code, &summary).await;
        {
            let stats = self.stats();
            print_summary(&stats, code, &self.output.dir, report_path.as_deref());
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

    /// The exit code the run earned before the dataset's files are written.
    fn exit_code(&self, outcome: &Result<(), MineError>, stopped: bool) -> u8 {
        let incomplete = {
            let stats = self.stats();
            stats.studies_failed > 0 || stats.queries.unresolved > 0
        };
        match (outcome, stopped) {
            (Err(_), _) => exit::FAILED,
            (Ok(()), true) => exit::STOPPED,
            (Ok(()), false) if incomplete => exit::PARTIAL,
            (Ok(()), false) => exit::OK,
        }
    }

    fn timing(&self, started: Instant) -> Timing {
        let (archive_s, requests, throttled_s) = self.archive.waited();
        let seconds = |us: &std::sync::atomic::AtomicU64| us.load(Ordering::Relaxed) as f64 / 1e6;
        Timing {
            wall_s: started.elapsed().as_secs_f64(),
            archive_s,
            archive_requests: requests,
            throttled_s,
            decode_s: seconds(&self.decode_us),
            write_s: seconds(&self.write_us),
            commit_s: seconds(&self.commit_us),
        }
    }

    /// The run's report, as dataset.json and the kept report hold it.
    fn report(
        &self,
        code: u8,
        stop_reason: &Option<String>,
        since: &str,
        until: &str,
    ) -> serde_json::Value {
        let stats = self.stats();
        json!({
            "run": self.run_id,
            "since": since,
            "until": until,
            "archive": self.archive.describe,
            "exit_code": code,
            "exit": exit::meaning(code),
            "stopped_by": stop_reason,
            "finished_at": crate::mine::state::now(),
            "stats": &*stats,
        })
    }

    /// Rewrite manifest.csv and dataset.json from the index; false when that failed.
    fn write_index(&self, rows: &[ManifestRow], report: serde_json::Value) -> bool {
        match self.output.write_index(rows, report) {
            Ok(strays) => {
                if strays > 0 {
                    info!(removed = strays, "images of uncommitted rows removed");
                }
                true
            }
            Err(e) => {
                self.error(format!("writing manifest.csv and dataset.json: {e}"));
                false
            }
        }
    }

    /// Keep the report in the dataset folder and in the index (neither changes the exit
    /// code: the dataset itself is complete); where the file went, if it did.
    async fn keep_report(
        &self,
        code: u8,
        summary: &serde_json::Value,
    ) -> Option<std::path::PathBuf> {
        let report_path = self.output.write_report(self.run_id, summary);
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
        report_path.ok()
    }
}

/// `key n, key n` or `none`.
fn list(counts: &BTreeMap<String, usize>) -> String {
    if counts.is_empty() {
        "none".to_string()
    } else {
        counts
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn print_summary(stats: &Stats, code: u8, out: &Path, report: Option<&Path>) {
    print_counts(stats);
    print_queries(&stats.queries);
    print_timing(&stats.timing);
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

fn print_counts(stats: &Stats) {
    println!(
        "studies: {} found, {} mined, {} unchanged, {} failed, {} given up, {} without Patient ID",
        stats.studies_found,
        stats.studies_mined,
        stats.studies_unchanged,
        stats.studies_failed,
        stats.studies_given_up,
        stats.studies_without_patient_id
    );
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
    if stats.pseudo_out_of_order > 0 {
        println!(
            "predictions out of their series' anatomical order (label != decoded label; mine.pseudo_label_require_order): {}",
            stats.pseudo_out_of_order
        );
    }
}

fn print_queries(q: &crate::mine::range::QueryCounts) {
    println!(
        "study queries: {} ({} empty, {} capped by the archive and split, {} days split by Study Time){}",
        q.queries,
        q.empty,
        q.capped,
        q.days_split_by_time,
        if q.unresolved > 0 {
            format!("; {} ranges still capped in one second: studies there may be missing", q.unresolved)
        } else {
            String::new()
        }
    );
}

fn print_timing(t: &Timing) {
    let busy = (t.archive_s + t.decode_s + t.write_s).max(1e-9);
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
}
