//! Prometheus metrics, served as text on `GET /metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DimseLabels {
    pub command: String,
    pub status: String,
}

pub struct Metrics {
    registry: Registry,
    pub associations: Family<OutcomeLabel, Counter>,
    pub associations_active: Gauge,
    pub dimse_responses: Family<DimseLabels, Counter>,
    pub instances_stored: Counter,
    pub bytes_received: Counter,
    pub store_seconds: Histogram,
    pub duplicates: Family<OutcomeLabel, Counter>,
    pub series_completed: Counter,
    pub series_labels: Family<OutcomeLabel, Counter>,
    pub classification_seconds: Histogram,
    pub classifier_ready: Gauge,
    /// Routing and forwarding (`forward::metrics`).
    pub forward: crate::forward::metrics::ForwardMetrics,
    /// Audit events dropped because the audit writer could not keep up (`audit`).
    pub audit_dropped: Counter,
    /// Audit messages not sent to the syslog collector (`[audit.syslog]`): queue full.
    pub audit_syslog_dropped: Counter,
    /// Audit messages sent to the syslog collector.
    pub audit_syslog_sent: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("anatomy");
        let associations = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "associations",
            "DICOM associations requested, by outcome (accepted or the reject reason)",
            associations.clone(),
        );
        let associations_active = Gauge::default();
        registry.register(
            "associations_active",
            "DICOM associations open now",
            associations_active.clone(),
        );
        let dimse_responses = Family::<DimseLabels, Counter>::default();
        registry.register(
            "dimse_responses",
            "DIMSE responses sent, by command and status code (hex)",
            dimse_responses.clone(),
        );
        let instances_stored = Counter::default();
        registry.register(
            "instances_stored",
            "Instances durably stored and indexed (new or replaced)",
            instances_stored.clone(),
        );
        let bytes_received = Counter::default();
        registry.register(
            "received_bytes",
            "Data set bytes received in C-STORE requests",
            bytes_received.clone(),
        );
        let store_seconds = Histogram::new(exponential_buckets(0.000_5, 2.0, 16));
        registry.register(
            "store_duration_seconds",
            "Time from the last data fragment of a C-STORE to its response (fsync, rename, index)",
            store_seconds.clone(),
        );
        let duplicates = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "duplicate_instances",
            "Instances received again, by outcome (identical, kept_first, overwritten, rejected)",
            duplicates.clone(),
        );
        let series_completed = Counter::default();
        registry.register(
            "series_completed",
            "Series marked complete (no new instance for series.stable_after_secs)",
            series_completed.clone(),
        );
        let series_labels = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "series_labels",
            "Series classification results recorded, by outcome (labelled, skipped, failed)",
            series_labels.clone(),
        );
        let classification_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register(
            "classification_duration_seconds",
            "Time to classify one series (select, decode, infer), from claim to result",
            classification_seconds.clone(),
        );
        let classifier_ready = Gauge::default();
        registry.register(
            "classifier_ready",
            "1 when the model is loaded and series are being classified, 0 otherwise",
            classifier_ready.clone(),
        );
        let forward = crate::forward::metrics::ForwardMetrics::register(&mut registry);
        let audit_dropped = Counter::default();
        registry.register(
            "audit_events_dropped",
            "Audit events dropped because the audit writer's queue was full (never blocks a C-STORE)",
            audit_dropped.clone(),
        );
        let audit_syslog_dropped = Counter::default();
        registry.register(
            "audit_syslog_messages_dropped",
            "DICOM audit messages not sent to the syslog collector because its queue was full (collector down or slow)",
            audit_syslog_dropped.clone(),
        );
        let audit_syslog_sent = Counter::default();
        registry.register(
            "audit_syslog_messages_sent",
            "DICOM audit messages written to the syslog collector (UDP datagrams or TLS frames)",
            audit_syslog_sent.clone(),
        );
        Self {
            registry,
            audit_dropped,
            audit_syslog_dropped,
            audit_syslog_sent,
            forward,
            series_labels,
            classification_seconds,
            classifier_ready,
            associations,
            associations_active,
            dimse_responses,
            instances_stored,
            bytes_received,
            store_seconds,
            duplicates,
            series_completed,
        }
    }

    pub fn association(&self, outcome: &str) {
        self.associations
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn dimse_response(&self, command: &str, status: u16) {
        self.dimse_responses
            .get_or_create(&DimseLabels {
                command: command.to_string(),
                status: format!("{status:04X}"),
            })
            .inc();
    }

    pub fn duplicate(&self, outcome: &str) {
        self.duplicates
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn series_labelled(&self, outcome: &str) {
        self.series_labels
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
