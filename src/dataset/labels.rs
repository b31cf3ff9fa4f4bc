//! The curated labels CSV (format of ../shared/data/ct/labels.csv): one row per file.

use std::path::{Component, Path};

use serde::Deserialize;

use super::DatasetError;

/// Labels a dataset may hold (docs/contracts.md); `ambiguous` is kept but never scored.
pub const LABELS: [&str; 7] = [
    "neck",
    "lungs",
    "liver",
    "pelvis",
    "legs",
    "other",
    "ambiguous",
];

/// One row of the labels CSV.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LabelRow {
    /// The subject (person); splits are by subject.
    pub case_id: String,
    pub study_uid: String,
    pub series_uid: String,
    pub sop_instance_uid: String,
    /// Path of the DICOM file, relative to the data folder.
    pub file: String,
    #[serde(default)]
    pub instance_number: String,
    #[serde(default)]
    pub z_mm: String,
    pub label: String,
    /// Where the label came from (`mask`, `visual-range`, ...): the manifest's label_source.
    pub label_basis: String,
}

/// Every row of the labels CSV at `path`; a malformed file is an error naming the line.
pub fn read_labels(path: &Path) -> Result<Vec<LabelRow>, DatasetError> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(|e| DatasetError::Labels {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    reader
        .deserialize()
        .map(|row| {
            row.map_err(|e| DatasetError::Labels {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Why a row cannot become an image before its file is even opened, if it cannot.
pub(crate) fn row_problem(row: &LabelRow) -> Option<String> {
    if !LABELS.contains(&row.label.as_str()) {
        return Some(format!(
            "unknown label {:?} (expected one of {})",
            row.label,
            LABELS.join(", ")
        ));
    }
    if row.case_id.is_empty() {
        return Some("empty case_id: the subject is needed to split by patient".into());
    }
    let escapes = Path::new(&row.file)
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
    if row.file.is_empty() || escapes {
        return Some(format!(
            "file {:?} must be a relative path inside --from",
            row.file
        ));
    }
    None
}
