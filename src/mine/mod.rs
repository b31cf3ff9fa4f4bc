//! `anatomy-node mine`: the training job that mines labelled key-images from the archive.
//!
//! One run: take the lock (one run at a time per index database) → query the archive for
//! studies of `mine.modality` in a Study Date window, one page of dates at a time → per
//! study, gather what the label sources say about its images ([`labels`]: RIS CSV, Key
//! Object Selection documents and SR, the node's own predictions as pseudo labels) →
//! retrieve only the images that got a label ([`archive`]: C-MOVE to our own temporary
//! Storage SCP, C-GET, or WADO-RS) → convert them through `anatomy::pixels` into the dataset
//! folder ([`output`]) → commit the study's rows and state in one transaction ([`state`]).
//! At the end manifest.csv and dataset.json are rewritten from the index, and the run's
//! report is kept.
//!
//! Cron-safe: what was mined is in the index (a second run mines nothing new; a study is
//! looked at again only when its fingerprint changes); a run killed at any point resumes
//! without duplicates; a lock keeps runs apart; load on the archive is bounded; the run
//! keeps to a time window. Exit codes: [`exit`].

pub mod answer;
pub mod archive;
pub mod dimse;
pub mod labels;
pub mod output;
pub mod range;
mod run;
pub mod scp;
pub mod settings;
pub mod spool;
pub mod state;
pub mod web;

use std::path::PathBuf;

use chrono::NaiveDate;

pub use settings::{validate, ArchiveConfig, LabelRule, MineConfig, Retrieve, TimeWindow};

/// Exit codes of `anatomy-node mine`, for cron and the wrapper script.
pub mod exit {
    /// Every study in the window is mined (maybe nothing was new).
    pub const OK: u8 = 0;
    /// A fatal error (archive unreachable or refusing, database, disk): the run stopped;
    /// what was committed stays, the next run resumes.
    pub const FAILED: u8 = 1;
    /// Bad arguments or configuration, or an --out folder this run may not write to.
    pub const USAGE: u8 = 2;
    /// The run finished, but some studies could not be mined (retrieval failed); they are
    /// tried again by the next runs (at most `mine.max_attempts` times).
    pub const PARTIAL: u8 = 3;
    /// Outside `mine.window`, or the window closed (or SIGTERM/SIGINT came) during the run:
    /// it stopped cleanly after the studies in progress; the next run goes on.
    pub const STOPPED: u8 = 4;
    /// Another run holds the lock (after waiting `mine.lock_wait_secs`). EX_TEMPFAIL.
    pub const LOCKED: u8 = 75;

    pub fn meaning(code: u8) -> &'static str {
        match code {
            OK => "complete",
            FAILED => "failed",
            USAGE => "usage or configuration error",
            PARTIAL => {
                "complete except some studies (retried next run, or in a range the archive caps)"
            }
            STOPPED => "stopped early (time window or signal); resumes next run",
            LOCKED => "another run holds the lock",
            _ => "unknown",
        }
    }
}

/// Command-line arguments of `anatomy-node mine`.
#[derive(Debug, Clone, clap::Args)]
pub struct MineArgs {
    /// Configuration file ([archive], [mine], [database], [classifier]).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The dataset folder: created on the first run, appended to by later runs.
    #[arg(long)]
    pub out: PathBuf,
    /// First Study Date to mine (YYYYMMDD); default: today minus mine.lookback_days.
    #[arg(long, value_parser = parse_date)]
    pub since: Option<NaiveDate>,
    /// Last Study Date to mine (YYYYMMDD); default: today.
    #[arg(long, value_parser = parse_date)]
    pub until: Option<NaiveDate>,
}

fn parse_date(text: &str) -> Result<NaiveDate, String> {
    NaiveDate::parse_from_str(text.trim(), "%Y%m%d")
        .map_err(|_| format!("{text:?} is not a date YYYYMMDD"))
}

/// Run the command; the value is the process exit code ([`exit`]).
pub fn run(args: MineArgs, config: crate::config::Config) -> u8 {
    run::main(args, config)
}
