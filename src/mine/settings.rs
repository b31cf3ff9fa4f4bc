//! `[archive]` and `[mine]`: where `anatomy-node mine` queries and retrieves, where labels
//! come from, and how hard it may push the archive. config.toml documents every key.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::anatomy::pixels::Framing;
use crate::dataset::{SplitRatios, LABELS};

/// How instances come back from the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Retrieve {
    /// C-MOVE to our own AE: `mine` runs a temporary Storage SCP on `archive.move_port`.
    Move,
    /// C-GET: the instances come back on the query association (no inbound port).
    Get,
    /// QIDO-RS queries and WADO-RS retrieves at `archive.dicomweb_url`.
    Dicomweb,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    /// The archive's AE title (called AE title of C-FIND, C-MOVE and C-GET).
    pub ae_title: String,
    pub host: String,
    pub port: u16,
    /// Our AE title on associations with the archive, and the C-MOVE destination.
    pub calling_ae_title: String,
    pub retrieve: Retrieve,
    /// QIDO-RS / WADO-RS base URL (`http://host:port/dicom-web` or `https://...`).
    pub dicomweb_url: String,
    /// A bearer token sent with every DICOMweb request (or read from `dicomweb_token_file`).
    pub dicomweb_token: String,
    pub dicomweb_token_file: Option<PathBuf>,
    /// HTTPS `dicomweb_url`: the CA bundle (PEM) the archive's certificate must chain to.
    pub dicomweb_ca_file: Option<PathBuf>,
    /// C-MOVE: the temporary Storage SCP listens here while `mine` runs.
    pub move_bind: IpAddr,
    pub move_port: u16,
    pub connect_timeout_secs: u64,
    /// Silence allowed while waiting for a response (or a sub-operation) from the archive.
    pub dimse_timeout_secs: u64,
    pub max_pdu_length: u32,
    /// The window is first queried in pages of this many days of Study Date (0: the whole
    /// window at once); a page the archive caps is split (see `mine::range`).
    pub query_page_days: u32,
    /// The most answers the archive gives one C-FIND or QIDO-RS search, where it stops
    /// there without saying so (0: it says so with a Cancel or warning status, or has no
    /// cap). An answer this long counts as capped and its range is split.
    pub find_answer_limit: usize,
    /// `[archive.tls]`: DICOM TLS to the archive (C-FIND, C-MOVE, C-GET associations).
    pub tls: crate::net::ClientTlsConfig,
    /// `[archive.move_tls]`: DICOM TLS on the temporary C-MOVE destination.
    pub move_tls: crate::net::ServerTlsConfig,
    /// The largest QIDO-RS response page read (MB): a longer body is refused with an error
    /// naming this key, so an archive that answers without end cannot exhaust memory.
    pub dicomweb_max_search_mb: u64,
    /// The largest instance a WADO-RS retrieve writes to the spool (MB): a longer one is
    /// refused, its partial file removed, so an archive cannot fill the disk.
    pub dicomweb_max_instance_mb: u64,
}

impl ArchiveConfig {
    /// The bearer token and TLS trust of the DICOMweb client (files read now).
    pub fn web_security(&self) -> Result<super::web::WebSecurity, String> {
        let token = match &self.dicomweb_token_file {
            Some(file) => std::fs::read_to_string(file)
                .map_err(|e| format!("archive.dicomweb_token_file {}: {e}", file.display()))?,
            None => self.dicomweb_token.clone(),
        };
        let token = token.trim();
        if token.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err("archive.dicomweb_token holds spaces or control characters".into());
        }
        let tls = match &self.dicomweb_ca_file {
            Some(ca) => Some(
                crate::net::tls::https_client(ca)
                    .map_err(|e| format!("archive.dicomweb_ca_file: {e}"))?,
            ),
            None => None,
        };
        Ok(super::web::WebSecurity {
            token: (!token.is_empty()).then(|| token.to_string()),
            tls,
        })
    }

    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        self.tls.resolve_paths(base);
        self.move_tls.resolve_paths(base);
        crate::net::tls::resolve(
            base,
            [&mut self.dicomweb_token_file, &mut self.dicomweb_ca_file],
        );
    }
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        Self {
            ae_title: String::new(),
            host: String::new(),
            port: 104,
            calling_ae_title: "ANATOMY_MINE".into(),
            retrieve: Retrieve::Move,
            dicomweb_url: String::new(),
            dicomweb_token: String::new(),
            dicomweb_token_file: None,
            dicomweb_ca_file: None,
            move_bind: IpAddr::from([0, 0, 0, 0]),
            move_port: 11113,
            connect_timeout_secs: 10,
            dimse_timeout_secs: 120,
            max_pdu_length: 262_144,
            query_page_days: 0,
            find_answer_limit: 0,
            tls: Default::default(),
            move_tls: Default::default(),
            dicomweb_max_search_mb: 64,
            dicomweb_max_instance_mb: 2048,
        }
    }
}

/// One row of the mapping table from what a Key Object Selection document (or SR) says to a
/// dataset label: a coded concept (`code`, optionally `scheme`) or a text pattern (`text`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LabelRule {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
    pub label: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MineConfig {
    /// Key of the keyed hash (HMAC-SHA-256) that makes patient keys and splits.
    pub patient_key_secret: String,
    /// RIS export: `sop_instance_uid,label`, `study_uid,series_uid,label` or
    /// `accession_number,label` (empty: none).
    pub ris_csv: Option<PathBuf>,
    /// Key Object Selection documents in the archive.
    pub kos: bool,
    /// SR documents (Basic Text, Enhanced, Comprehensive) that reference images.
    pub sr: bool,
    /// What the documents say → label.
    pub kos_labels: Vec<LabelRule>,
    /// The node's own predictions (its index), kept apart as `pseudo:<model>` labels.
    pub pseudo_labels: bool,
    pub pseudo_label_min_probability: f64,
    /// A prediction becomes a pseudo label only when the image's own label equals the label
    /// its series' decoding in head-to-foot order gave it (`key_images.smoothed_label`).
    pub pseudo_label_require_order: bool,
    /// Studies of this modality are mined (Modalities in Study).
    pub modality: String,
    /// Side of the square images (the model's input size).
    pub image_size: usize,
    /// Millimetres each image spans (the model's `field_of_view_mm`); none: fitted whole.
    pub field_of_view_mm: Option<f64>,
    /// How each image is framed without a field of view (the model's `framing`): the whole
    /// image, or the square around the body. `body` excludes `field_of_view_mm`.
    pub framing: Framing,
    /// Shares of patients for train, val, test.
    pub split: String,
    /// Key-images per series for labels given to a whole series or study.
    pub series_key_images: usize,
    /// Without --since: studies from this many days before today.
    pub lookback_days: u32,
    pub max_concurrent_retrieves: usize,
    /// Requests to the archive per second at most (0: no limit).
    pub max_requests_per_second: f64,
    /// "HH:MM-HH:MM" (local time) when `mine` may run; empty: any time.
    pub window: String,
    /// Another run holds the lock: wait this long for it, then exit 75.
    pub lock_wait_secs: u64,
    /// A study that fails this many runs in a row is left alone until it changes.
    pub max_attempts: u32,
    /// Retrieved instances wait in `<this>/anatomy-node-mine-spool` (default: under
    /// `storage.path`; never the dataset folder, as they hold patient data).
    pub spool: Option<PathBuf>,
}

impl Default for MineConfig {
    fn default() -> Self {
        Self {
            patient_key_secret: String::new(),
            ris_csv: None,
            kos: true,
            sr: false,
            kos_labels: Vec::new(),
            pseudo_labels: false,
            pseudo_label_min_probability: 0.98,
            pseudo_label_require_order: true,
            modality: "CT".into(),
            image_size: 192,
            field_of_view_mm: None,
            framing: Framing::Whole,
            split: "70,15,15".into(),
            series_key_images: 8,
            lookback_days: 7,
            max_concurrent_retrieves: 2,
            max_requests_per_second: 10.0,
            window: String::new(),
            lock_wait_secs: 0,
            max_attempts: 5,
            spool: None,
        }
    }
}

impl MineConfig {
    pub fn split_ratios(&self) -> Result<SplitRatios, String> {
        self.split
            .parse::<SplitRatios>()
            .map_err(|e| format!("mine.split {e}"))
    }

    pub fn window(&self) -> Result<Option<TimeWindow>, String> {
        TimeWindow::parse(&self.window).map_err(|e| format!("mine.window: {e}"))
    }

    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        // TOML has no null: 0 stands for "no fixed field of view".
        if self.field_of_view_mm == Some(0.0) {
            self.field_of_view_mm = None;
        }
        for path in [&mut self.ris_csv, &mut self.spool] {
            match path {
                Some(p) if p.as_os_str().is_empty() => *path = None,
                Some(p) if p.is_relative() => *p = base.join(&*p),
                _ => {}
            }
        }
    }
}

/// A daily time window in local time; it may wrap midnight ("20:00-06:00").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    /// Minutes after midnight.
    pub start: u32,
    pub end: u32,
}

impl TimeWindow {
    pub fn parse(text: &str) -> Result<Option<TimeWindow>, String> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        let minutes = |t: &str| -> Result<u32, String> {
            let (h, m) = t
                .trim()
                .split_once(':')
                .ok_or_else(|| format!("{t:?} is not HH:MM"))?;
            let (h, m): (u32, u32) = (
                h.parse().map_err(|_| format!("{t:?} is not HH:MM"))?,
                m.parse().map_err(|_| format!("{t:?} is not HH:MM"))?,
            );
            if h > 24 || m > 59 || (h == 24 && m > 0) {
                return Err(format!("{t:?} is not a time of day"));
            }
            Ok(h * 60 + m)
        };
        let (a, b) = text
            .split_once('-')
            .ok_or_else(|| format!("{text:?} is not HH:MM-HH:MM"))?;
        let window = TimeWindow {
            start: minutes(a)?,
            end: minutes(b)?,
        };
        if window.start == window.end {
            return Err(format!("{text:?} is empty (leave it empty for any time)"));
        }
        Ok(Some(window))
    }

    /// Whether `minute` (after local midnight) is inside the window.
    pub fn contains(&self, minute: u32) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

fn is_ae_title(t: &str) -> bool {
    !t.trim().is_empty()
        && t.len() <= 16
        && t.chars()
            .all(|c| c.is_ascii() && !c.is_ascii_control() && c != '\\')
}

/// Checks that hold whatever the command (every key has a valid value). What only `mine`
/// needs (an archive, a secret) is checked by [`require_for_mining`].
pub fn validate(archive: &ArchiveConfig, mine: &MineConfig) -> Result<(), String> {
    archive.tls.check("archive")?;
    if !is_ae_title(&archive.calling_ae_title) {
        return Err(format!(
            "archive.calling_ae_title {:?} must be 1-16 printable ASCII characters without backslash",
            archive.calling_ae_title
        ));
    }
    if !archive.ae_title.is_empty() && !is_ae_title(&archive.ae_title) {
        return Err(format!(
            "archive.ae_title {:?} must be 1-16 printable ASCII characters without backslash",
            archive.ae_title
        ));
    }
    if !(4096..=16 * 1024 * 1024).contains(&archive.max_pdu_length) {
        return Err("archive.max_pdu_length must be between 4096 and 16777216".into());
    }
    if !(1..=1024 * 1024).contains(&archive.dicomweb_max_search_mb)
        || !(1..=1024 * 1024).contains(&archive.dicomweb_max_instance_mb)
    {
        return Err(
            "archive.dicomweb_max_search_mb and archive.dicomweb_max_instance_mb must be between 1 and 1048576"
                .into(),
        );
    }
    if archive.connect_timeout_secs == 0 || archive.dimse_timeout_secs == 0 {
        return Err(
            "archive.connect_timeout_secs and archive.dimse_timeout_secs must be at least 1".into(),
        );
    }
    let url = &archive.dicomweb_url;
    if url.starts_with("https://") && archive.dicomweb_ca_file.is_none() {
        return Err(format!(
            "archive.dicomweb_url {url:?} is https: set archive.dicomweb_ca_file (the CA bundle the archive's certificate chains to)"
        ));
    }
    if !url.is_empty() && !url.starts_with("http://") && !url.starts_with("https://") {
        return Err(format!(
            "archive.dicomweb_url {url:?} must start with http:// or https://"
        ));
    }
    if !archive.dicomweb_token.trim().is_empty() && archive.dicomweb_token_file.is_some() {
        return Err("archive.dicomweb_token and dicomweb_token_file: set one, not both".into());
    }
    for (i, rule) in mine.kos_labels.iter().enumerate() {
        let which = format!("mine.kos_labels[{i}]");
        if !LABELS.contains(&rule.label.as_str()) {
            return Err(format!(
                "{which}: label {:?} is not a dataset label ({})",
                rule.label,
                LABELS.join(", ")
            ));
        }
        match (&rule.code, &rule.text) {
            (Some(code), None) if !code.trim().is_empty() => {}
            (None, Some(text)) if !text.trim().is_empty() => {
                if rule.scheme.is_some() {
                    return Err(format!("{which}: `scheme` goes with `code`, not `text`"));
                }
            }
            _ => {
                return Err(format!(
                    "{which}: give either `code` (with an optional `scheme`) or `text`"
                ))
            }
        }
    }
    if !(0.0..=1.0).contains(&mine.pseudo_label_min_probability) {
        return Err("mine.pseudo_label_min_probability must be between 0 and 1".into());
    }
    if !(8..=2048).contains(&mine.image_size) {
        return Err("mine.image_size must be between 8 and 2048".into());
    }
    if mine
        .field_of_view_mm
        .is_some_and(|mm| !(10.0..=2000.0).contains(&mm))
    {
        return Err("mine.field_of_view_mm must be between 10 and 2000 (mm)".into());
    }
    if let (Framing::Body, Some(mm)) = (mine.framing, mine.field_of_view_mm) {
        return Err(format!(
            "mine.framing = \"body\" and mine.field_of_view_mm = {mm} exclude each other: \
             images are framed around the body or as a fixed field of view; set one of them \
             (field_of_view_mm = 0 or framing = \"whole\")"
        ));
    }
    mine.split_ratios()?;
    mine.window()?;
    if mine.series_key_images == 0 || mine.max_concurrent_retrieves == 0 || mine.max_attempts == 0 {
        return Err(
            "mine.series_key_images, mine.max_concurrent_retrieves and mine.max_attempts must be at least 1"
                .into(),
        );
    }
    if !(mine.max_requests_per_second >= 0.0 && mine.max_requests_per_second.is_finite()) {
        return Err("mine.max_requests_per_second must be 0 (no limit) or more".into());
    }
    if mine.modality.trim().is_empty() {
        return Err("mine.modality must not be empty".into());
    }
    Ok(())
}

/// What `anatomy-node mine` needs beyond valid values: an archive to talk to and a secret.
pub fn require_for_mining(archive: &ArchiveConfig, mine: &MineConfig) -> Result<(), String> {
    if mine.patient_key_secret.len() < 16 {
        return Err(
            "mine.patient_key_secret must be set, at least 16 characters (better: ANATOMY_MINE__PATIENT_KEY_SECRET in the environment); \
             it keys the patient keys and the split, so keep it, and keep it secret"
                .into(),
        );
    }
    match archive.retrieve {
        Retrieve::Dicomweb => {
            if archive.dicomweb_url.is_empty() {
                return Err("archive.retrieve = \"dicomweb\" needs archive.dicomweb_url".into());
            }
        }
        Retrieve::Move | Retrieve::Get => {
            if archive.ae_title.is_empty() || archive.host.trim().is_empty() {
                return Err(format!(
                    "archive.retrieve = \"{}\" needs archive.ae_title, archive.host and archive.port",
                    if archive.retrieve == Retrieve::Move { "move" } else { "get" }
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn windows_parse_and_wrap_midnight() {
        assert_eq!(TimeWindow::parse("").unwrap(), None);
        let night = TimeWindow::parse("20:00-06:30").unwrap().unwrap();
        assert!(night.contains(20 * 60));
        assert!(night.contains(23 * 60 + 59));
        assert!(night.contains(0));
        assert!(night.contains(6 * 60 + 29));
        assert!(!night.contains(6 * 60 + 30));
        assert!(!night.contains(12 * 60));
        let day = TimeWindow::parse("08:00-17:00").unwrap().unwrap();
        assert!(day.contains(8 * 60) && !day.contains(17 * 60) && !day.contains(7 * 60));
        for bad in ["8-17", "25:00-01:00", "10:00-10:00", "10:61-11:00", "x"] {
            assert!(TimeWindow::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn label_rules_are_checked() {
        let archive = ArchiveConfig::default();
        let mut mine = MineConfig::default();
        assert!(validate(&archive, &mine).is_ok());
        mine.kos_labels = vec![LabelRule {
            code: Some("39607008".into()),
            scheme: Some("SCT".into()),
            text: None,
            label: "lungs".into(),
        }];
        assert!(validate(&archive, &mine).is_ok());
        mine.kos_labels[0].label = "thorax".into();
        assert!(validate(&archive, &mine)
            .unwrap_err()
            .contains("kos_labels[0]"));
        mine.kos_labels[0].label = "lungs".into();
        mine.kos_labels[0].text = Some("*lung*".into());
        assert!(validate(&archive, &mine).is_err());
    }

    /// config.toml documents every key of [archive] and [mine], each with its default, and
    /// `serve` loads it as it is.
    #[test]
    fn config_toml_documents_every_key_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let config = crate::config::Config::load(Some(&path)).unwrap();
        assert_eq!(config.archive, ArchiveConfig::default());
        assert_eq!(config.mine, MineConfig::default());
        for (section, keys) in [
            (
                "archive",
                serde_json::to_value(ArchiveConfig::default()).unwrap(),
            ),
            ("mine", serde_json::to_value(MineConfig::default()).unwrap()),
        ] {
            let header = format!("[{section}]");
            let body = text
                .split_once(&header)
                .map(|(_, rest)| rest.split("\n[").next().unwrap_or(rest))
                .unwrap_or_else(|| panic!("config.toml has no {header}"));
            let documented: BTreeSet<&str> = body
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
                .collect();
            let fields: BTreeSet<&str> = keys
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(documented, fields, "{header} in config.toml");
        }
    }

    #[test]
    fn body_framing_excludes_a_field_of_view() {
        let archive = ArchiveConfig::default();
        let mut mine = MineConfig {
            framing: Framing::Body,
            ..MineConfig::default()
        };
        assert!(validate(&archive, &mine).is_ok());
        mine.field_of_view_mm = Some(500.0);
        let err = validate(&archive, &mine).unwrap_err();
        assert!(
            err.contains("mine.framing") && err.contains("mine.field_of_view_mm = 500"),
            "{err}"
        );
        mine.framing = Framing::Whole;
        assert!(validate(&archive, &mine).is_ok());
        // TOML and environment variables give it as text
        let parsed: MineConfig = serde_json::from_str(r#"{"framing": "body"}"#).unwrap();
        assert_eq!(parsed.framing, Framing::Body);
        assert!(serde_json::from_str::<MineConfig>(r#"{"framing": "tight"}"#).is_err());
    }

    #[test]
    fn mining_needs_an_archive_and_a_secret() {
        let mut archive = ArchiveConfig::default();
        let mut mine = MineConfig::default();
        assert!(require_for_mining(&archive, &mine)
            .unwrap_err()
            .contains("patient_key_secret"));
        mine.patient_key_secret = "0123456789abcdef".into();
        assert!(require_for_mining(&archive, &mine)
            .unwrap_err()
            .contains("archive.ae_title"));
        archive.ae_title = "PACS".into();
        archive.host = "pacs".into();
        assert!(require_for_mining(&archive, &mine).is_ok());
        archive.retrieve = Retrieve::Dicomweb;
        assert!(require_for_mining(&archive, &mine).is_err());
    }
}
