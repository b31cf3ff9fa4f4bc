//! Prometheus metrics of forwarding, registered into the node's registry
//! (`anatomy_forwarded_total`, `anatomy_forward_failures_total`,
//! `anatomy_forward_dead_letters_total`, `anatomy_forwarded_bytes_total`,
//! `anatomy_forward_queue_depth`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabel {
    pub destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub destination: String,
    pub state: String,
}

#[derive(Clone, Debug, Default)]
pub struct ForwardMetrics {
    pub forwarded: Family<DestinationLabel, Counter>,
    pub bytes: Family<DestinationLabel, Counter>,
    pub failures: Family<DestinationLabel, Counter>,
    pub dead_letters: Family<DestinationLabel, Counter>,
    pub queue_depth: Family<QueueLabels, Gauge>,
}

impl ForwardMetrics {
    pub fn register(registry: &mut Registry) -> ForwardMetrics {
        let m = ForwardMetrics::default();
        registry.register(
            "forwarded",
            "Instances (and KOS documents) stored by a destination, by destination",
            m.forwarded.clone(),
        );
        registry.register(
            "forwarded_bytes",
            "Data set bytes sent in C-STORE requests that the destination stored",
            m.bytes.clone(),
        );
        registry.register(
            "forward_failures",
            "Failed forwarding attempts (connection, association or a C-STORE failure status), by destination",
            m.failures.clone(),
        );
        registry.register(
            "forward_dead_letters",
            "Jobs given up (dead-lettered), by destination",
            m.dead_letters.clone(),
        );
        registry.register(
            "forward_queue_depth",
            "Outbox jobs by destination and state (pending, sending, dead), refreshed every few seconds",
            m.queue_depth.clone(),
        );
        m
    }

    fn label(destination: &str) -> DestinationLabel {
        DestinationLabel {
            destination: destination.to_string(),
        }
    }

    pub fn forwarded(&self, destination: &str, bytes: u64) {
        self.forwarded
            .get_or_create(&Self::label(destination))
            .inc();
        self.bytes
            .get_or_create(&Self::label(destination))
            .inc_by(bytes);
    }

    pub fn failed(&self, destination: &str, dead: bool) {
        self.failures.get_or_create(&Self::label(destination)).inc();
        if dead {
            self.dead_letters
                .get_or_create(&Self::label(destination))
                .inc();
        }
    }

    pub fn set_depth(&self, destination: &str, state: &str, count: i64) {
        self.queue_depth
            .get_or_create(&QueueLabels {
                destination: destination.to_string(),
                state: state.to_string(),
            })
            .set(count);
    }
}
