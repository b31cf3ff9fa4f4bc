//! Before the first study: the dates and the time window, the lock, the dataset folder
//! (checked against its record in the index), the spool and the archive.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{Local, NaiveDate};
use tracing::{info, warn};

use super::{local_minute, Fatal};
use crate::config::Config;
use crate::dataset::split::SplitRatios;
use crate::index::Index;
use crate::mine::archive::Archive;
use crate::mine::labels::RisLabels;
use crate::mine::output::{Keyer, Output, OutputError};
use crate::mine::settings::{self, TimeWindow};
use crate::mine::spool::{Spool, SPOOL_FOLDER};
use crate::mine::state::{LockError, MineLock, State};
use crate::mine::{exit, MineArgs};

/// What the arguments and the configuration ask of the run, checked.
pub(super) struct Plan {
    pub since: NaiveDate,
    pub until: NaiveDate,
    pub window: Option<TimeWindow>,
    pub ratios: SplitRatios,
    pub ris: RisLabels,
}

/// The run's plan; `None` when it is outside `mine.window` (said, nothing done).
pub(super) fn plan(args: &MineArgs, config: &Config) -> Result<Option<Plan>, Fatal> {
    settings::require_for_mining(&config.archive, &config.mine)
        .map_err(|e| Fatal(exit::USAGE, e))?;
    let window = config.mine.window().map_err(|e| Fatal(exit::USAGE, e))?;
    let (since, until) = dates(args, config)?;
    if let Some(w) = window {
        if !w.contains(local_minute()) {
            let message = format!(
                "outside mine.window {:?}: nothing done (exit {})",
                config.mine.window,
                exit::STOPPED
            );
            info!("{message}");
            eprintln!("anatomy-node mine: {message}");
            return Ok(None);
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
    Ok(Some(Plan {
        since,
        until,
        window,
        ratios,
        ris,
    }))
}

/// The Study Dates to mine: `--since`/`--until`, by default the last
/// `mine.lookback_days` up to today.
fn dates(args: &MineArgs, config: &Config) -> Result<(NaiveDate, NaiveDate), Fatal> {
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
    Ok((since, until))
}

/// The run's lock; `None` when another run holds it (said, and the index closed).
pub(super) async fn lock(
    index: &Index,
    url: &str,
    config: &Config,
) -> Result<Option<MineLock>, Fatal> {
    let wait = Duration::from_secs(config.mine.lock_wait_secs);
    match MineLock::acquire(index, url, wait).await {
        Ok(lock) => Ok(Some(lock)),
        Err(LockError::Busy(what)) => {
            let message = format!(
                "another `anatomy-node mine` is running ({what}); exit {}",
                exit::LOCKED
            );
            warn!("{message}");
            eprintln!("anatomy-node mine: {message}");
            index.close().await;
            Ok(None)
        }
        Err(e) => Err(Fatal(exit::FAILED, e.to_string())),
    }
}

/// The dataset folder; one this run may not write to is a usage error.
pub(super) fn open_output(out: &Path, config: &Config, keyer: &Keyer) -> Result<Output, Fatal> {
    Output::open(
        out,
        keyer,
        config.mine.image_size,
        config.mine.field_of_view_mm,
        config.mine.framing,
        &config.mine.split,
    )
    .map_err(|e| match e {
        OutputError::Refused(m) => Fatal(exit::USAGE, m),
        other => Fatal(exit::FAILED, other.to_string()),
    })
}

/// The dataset folder belongs to this index: its key, image size and split match the
/// record, or it has no record and was never mined elsewhere. Then it is registered.
pub(super) async fn register_dataset(
    state: &State,
    output: &Output,
    out: &Path,
    url: &str,
) -> Result<(), Fatal> {
    let json = &output.json;
    if let Some((check, size, split)) = state.dataset().await.map_err(|e| (exit::FAILED, e))? {
        if check != json.key_check || size != json.image_size as i64 || split != json.split {
            return Err(Fatal(
                exit::USAGE,
                format!("{} does not match its record in the index", out.display()),
            ));
        }
    } else if state.runs().await.map_err(|e| (exit::FAILED, e))? == 0
        && output.dir.join("manifest.csv").exists()
    {
        return Err(Fatal(
            exit::USAGE,
            format!(
                "{} was mined into another index database (its rows are not in {}); use a new --out",
                out.display(),
                crate::node::redact(url)
            ),
        ));
    }
    state
        .register_dataset(&output.dir, &json.key_check, json.image_size, &json.split)
        .await
        .map_err(|e| (exit::FAILED, e))?;
    Ok(())
}

/// The archive, and the spool folder its retrievals land in.
pub(super) async fn open_archive(config: &Config) -> Result<(Archive, PathBuf), Fatal> {
    // Retrieved DICOM files (patient data) never wait inside the dataset folder, so a
    // dataset copied after a crash holds none: they go to a folder of mine's own under
    // mine.spool (default: the storage directory, where the node keeps DICOM anyway).
    let spool_dir = config
        .mine
        .spool
        .clone()
        .unwrap_or_else(|| config.storage.path.clone())
        .join(SPOOL_FOLDER);
    let spool = Arc::new(
        Spool::open(&spool_dir)
            .map_err(|e| Fatal(exit::FAILED, format!("spool {}: {e}", spool_dir.display())))?,
    );
    let archive = Archive::open(&config.archive, &config.mine, spool)
        .await
        .map_err(|e| (exit::FAILED, e))?;
    Ok((archive, spool_dir))
}
