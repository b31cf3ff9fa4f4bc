//! Series completion: a series whose last instance arrived more than
//! `series.stable_after_secs` ago is marked complete, exactly once per generation, and a
//! `series-complete` job is queued for the stages that follow.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span};

use crate::config::SeriesConfig;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::store::now_millis;

/// Series completed per database round trip.
const BATCH: i64 = 100;

/// `wake` is notified whenever series complete, so classification starts at once.
pub async fn run_completion(
    config: SeriesConfig,
    index: Index,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let interval = Duration::from_millis(config.check_interval_ms.max(50));
    let stable_ms =
        i64::try_from(config.stable_after_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        loop {
            let now = now_millis();
            match index
                .complete_stable_series(now.saturating_sub(stable_ms), now, BATCH)
                .await
            {
                Ok(done) => {
                    for series in &done {
                        let _span = info_span!("series", series_uid = %series.series_uid).entered();
                        info!(
                            generation = series.generation,
                            instances = series.instances,
                            "series complete"
                        );
                        metrics.series_completed.inc();
                    }
                    // notify_one keeps a permit for a worker that is not waiting yet.
                    for _ in 0..done.len().min(8) {
                        wake.notify_one();
                    }

                    if (done.len() as i64) < BATCH {
                        break;
                    }
                }
                Err(e) => {
                    error!(error = %e, "series completion check failed; retrying");
                    break;
                }
            }
        }
    }
}
