//! Routing and forwarding: labelled series → tagged copies → C-STORE to CAD modules.
//!
//! The stages, in the order an instance goes through them:
//! * [`routes`]: `[[destinations]]` and `[[routes]]` (validated at start-up) and matching;
//! * [`outbox`]: the durable outbox in the index. The router turns each new label result
//!   into jobs, one per (instance, destination, series generation), in one transaction that
//!   also marks the label routed, so a crash loses no job and a retry makes no duplicate.
//!   Destination workers claim jobs (`FOR UPDATE SKIP LOCKED` on PostgreSQL), record each
//!   outcome, retry with exponential backoff, and dead-letter after `forward.max_attempts`
//!   (at once for a permanent refusal: unknown AE title, SOP class not accepted, ...);
//! * [`tagging`]: the tagged copy (Body Part Examined, Anatomic Region Sequence, a private
//!   block with the probabilities), spliced into the stored bytes, the original untouched;
//!   [`kos`]: the optional Key Object Selection document flagging the key-images;
//! * [`scu`]: the C-STORE SCU on dicom-ul's async client (TCP_NODELAY, PDUs written
//!   directly), [`worker`]: one task per destination, so a dead or slow destination never
//!   delays another; one association per batch; decompression when a destination accepts
//!   only uncompressed transfer syntaxes;
//! * [`cli`]: `anatomy-node forward status` and `forward retry`; [`metrics`]: Prometheus.

pub mod cli;
pub mod kos;
pub mod metrics;
pub mod outbox;
pub mod routes;
pub mod scu;
pub mod tagging;
pub mod worker;

use serde::Deserialize;

pub use routes::{DestinationConfig, RouteConfig};
pub use worker::{start, Forwarding};

/// `[forward]`: how the outbox is worked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardConfig {
    /// Also send a Key Object Selection document per series and destination that flags the
    /// key-images with their labels.
    pub key_object_selection: bool,
    /// Attempts of a job before it is dead-lettered (transient failures: connection refused,
    /// timeouts, out-of-resources statuses). Permanent refusals are dead-lettered at once.
    pub max_attempts: u32,
    /// Backoff after the first failed attempt; doubled after each further one...
    pub retry_initial_secs: u64,
    /// ...up to this.
    pub retry_max_secs: u64,
    /// Instances sent on one association at most.
    pub batch_size: usize,
    /// TCP connect and association negotiation.
    pub connect_timeout_secs: u64,
    /// Waiting for a C-STORE-RSP (and for each write to the destination).
    pub dimse_timeout_secs: u64,
    /// A job claimed by a node that went silent this long is taken over (crash recovery).
    pub claim_timeout_secs: u64,
    /// Largest PDU we accept from destinations (their responses are small).
    pub max_pdu_length: u32,
    /// Each copy's outcome is committed before the next copy goes out on its association.
    /// `false` (default): that commit waits for the operating system, not the disk (SQLite
    /// `synchronous = NORMAL`, PostgreSQL `synchronous_commit = off`), so it survives a crash
    /// of the node but not of the machine. `true`: it waits for the disk too (one flush per
    /// copy), and the one-copy window holds across a power loss as well.
    pub sync_outcomes: bool,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            key_object_selection: false,
            max_attempts: 10,
            retry_initial_secs: 5,
            retry_max_secs: 300,
            batch_size: 100,
            connect_timeout_secs: 10,
            dimse_timeout_secs: 60,
            claim_timeout_secs: 300,
            max_pdu_length: 65_536,
            sync_outcomes: false,
        }
    }
}

impl ForwardConfig {
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("forward.max_attempts", u64::from(self.max_attempts)),
            ("forward.retry_initial_secs", self.retry_initial_secs),
            ("forward.batch_size", self.batch_size as u64),
            ("forward.connect_timeout_secs", self.connect_timeout_secs),
            ("forward.dimse_timeout_secs", self.dimse_timeout_secs),
            ("forward.claim_timeout_secs", self.claim_timeout_secs),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{key} must be at least 1"));
        }
        if self.retry_max_secs < self.retry_initial_secs {
            return Err(format!(
                "forward.retry_max_secs ({}) must be at least forward.retry_initial_secs ({})",
                self.retry_max_secs, self.retry_initial_secs
            ));
        }
        if self.batch_size > 10_000 {
            return Err("forward.batch_size must be at most 10000".into());
        }
        if !(4096..=16 * 1024 * 1024).contains(&self.max_pdu_length) {
            return Err("forward.max_pdu_length must be between 4096 and 16777216".into());
        }
        Ok(())
    }

    /// Backoff before attempt `attempts + 1`: initial × 2^(attempts − 1), capped.
    pub fn backoff_secs(&self, attempts: i64) -> u64 {
        let doublings = attempts.clamp(1, 32) as u32 - 1;
        self.retry_initial_secs
            .saturating_mul(1u64 << doublings.min(30))
            .min(self.retry_max_secs)
    }
}

/// Validate `[forward]`, `[[destinations]]` and `[[routes]]` together.
pub fn validate(
    forward: &ForwardConfig,
    destinations: &[DestinationConfig],
    routes: &[RouteConfig],
) -> Result<(), String> {
    forward.validate()?;
    routes::validate(destinations, routes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let c = ForwardConfig::default();
        let waits: Vec<u64> = (1..=9).map(|a| c.backoff_secs(a)).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(c.backoff_secs(1000), 300);
    }

    #[test]
    fn bad_values_are_named() {
        let c = ForwardConfig {
            max_attempts: 0,
            ..ForwardConfig::default()
        };
        assert_eq!(
            c.validate().unwrap_err(),
            "forward.max_attempts must be at least 1"
        );
        let c = ForwardConfig {
            retry_max_secs: 1,
            ..ForwardConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .starts_with("forward.retry_max_secs"));
    }
}
