//! Reading a dataset folder (docs/contracts.md "Dataset folder") for evaluation:
//! `dataset.json`, `manifest.csv`, and the 16-bit PNGs turned into model input with the
//! model's own window ([`ModelInfo::to_input`], the code the node runs).

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};

use super::EvalError;
use crate::anatomy::model::ModelInfo;
use crate::anatomy::pixels::Framing;
use crate::dataset::{read_png_hu, FORMAT, SPLITS};

/// The label that is kept in the data and never scored.
pub const AMBIGUOUS: &str = "ambiguous";

/// Splits to evaluate: `all`, one of [`SPLITS`] or a comma list of them (kept in
/// [`SPLITS`] order, each once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitSelection(Vec<&'static str>);

impl SplitSelection {
    pub fn splits(&self) -> &[&'static str] {
        &self.0
    }

    pub fn contains(&self, split: &str) -> bool {
        self.0.contains(&split)
    }
}

impl Default for SplitSelection {
    fn default() -> Self {
        Self(vec!["test"])
    }
}

impl FromStr for SplitSelection {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut wanted = BTreeSet::new();
        for part in s.split(',').map(str::trim) {
            if part == "all" {
                wanted.extend(0..SPLITS.len());
                continue;
            }
            match SPLITS.iter().position(|split| *split == part) {
                Some(i) => {
                    wanted.insert(i);
                }
                None => {
                    return Err(format!(
                        "unknown split {part:?} (all, {}, or a comma list of them)",
                        SPLITS.join(", ")
                    ))
                }
            }
        }
        Ok(Self(wanted.into_iter().map(|i| SPLITS[i]).collect()))
    }
}

impl fmt::Display for SplitSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

/// What `dataset.json` says (the fields evaluation uses or reports).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DatasetJson {
    pub format: String,
    pub input_size: usize,
    /// Millimetres each image spans (`dataset build --field-of-view`); none: fitted whole.
    #[serde(default)]
    pub field_of_view_mm: Option<f64>,
    /// How the images were framed (`dataset build --framing`); absent or null: whole.
    #[serde(default, deserialize_with = "whole_when_null")]
    pub framing: Framing,
    #[serde(default)]
    pub images: Option<usize>,
    #[serde(default)]
    pub patients: Option<usize>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub split_ratios: Option<Vec<f64>>,
    #[serde(default)]
    pub labels_file: Option<String>,
}

fn whole_when_null<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Framing, D::Error> {
    Ok(Option::<Framing>::deserialize(deserializer)?.unwrap_or_default())
}

/// One row of `manifest.csv`: the dataset builder's own type.
pub type Row = crate::dataset::ManifestRow;

/// An opened dataset folder.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub dir: PathBuf,
    pub json: DatasetJson,
    pub rows: Vec<Row>,
    /// Hex SHA-256 of `manifest.csv` as stored.
    pub manifest_sha256: String,
}

fn invalid(path: &Path, problem: impl Into<String>) -> EvalError {
    EvalError::Dataset {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

impl Dataset {
    /// Reads and checks `dataset.json` and `manifest.csv` of `dir`.
    pub fn open(dir: &Path) -> Result<Dataset, EvalError> {
        if !dir.is_dir() {
            return Err(invalid(dir, "is not a folder"));
        }
        let json = read_dataset_json(&dir.join("dataset.json"))?;
        let manifest = dir.join("manifest.csv");
        let bytes = std::fs::read(&manifest).map_err(|e| {
            invalid(
                &manifest,
                format!("cannot be read ({e}); is this a dataset folder written by `anatomy-node dataset build`?"),
            )
        })?;
        let rows = parse_manifest(&manifest, &bytes)?;
        Ok(Dataset {
            dir: dir.to_path_buf(),
            json,
            rows,
            manifest_sha256: hex::encode(Sha256::digest(&bytes)),
        })
    }

    /// The rows of the selected splits, in manifest order.
    pub fn select(&self, splits: &SplitSelection) -> Vec<&Row> {
        self.rows
            .iter()
            .filter(|r| splits.contains(&r.split))
            .collect()
    }

    /// The model input of one image: its HU windowed as the model wants, `S×S` values.
    pub fn model_input(&self, row: &Row, info: &ModelInfo) -> Result<Vec<f32>, EvalError> {
        let path = self.dir.join(&row.image);
        let (rows, columns, hu) =
            read_png_hu(&path).map_err(|e| invalid(&path, format!("unreadable image: {e}")))?;
        let size = self.json.input_size;
        if (rows, columns) != (size, size) {
            return Err(invalid(
                &path,
                format!(
                    "is {columns}×{rows}, but dataset.json says input_size {size} ({size}×{size})"
                ),
            ));
        }
        let hu: Vec<f32> = hu.into_iter().map(|v| v as f32).collect();
        Ok(info.to_input(&hu))
    }
}

fn read_dataset_json(path: &Path) -> Result<DatasetJson, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        invalid(
            path,
            format!("cannot be read ({e}); a dataset folder has dataset.json (written last by `anatomy-node dataset build`)"),
        )
    })?;
    let json: DatasetJson =
        serde_json::from_str(&text).map_err(|e| invalid(path, format!("invalid: {e}")))?;
    if json.format != FORMAT {
        return Err(invalid(
            path,
            format!("field `format` is {:?}, expected {FORMAT:?}", json.format),
        ));
    }
    if json.input_size == 0 {
        return Err(invalid(path, "field `input_size` is 0"));
    }
    Ok(json)
}

pub(crate) fn parse_manifest(path: &Path, bytes: &[u8]) -> Result<Vec<Row>, EvalError> {
    let mut reader = csv::Reader::from_reader(bytes);
    let mut rows = Vec::new();
    for (i, record) in reader.deserialize::<Row>().enumerate() {
        // line 1 is the header
        let line = i + 2;
        let row = record.map_err(|e| invalid(path, format!("line {line}: {}", csv_problem(&e))))?;
        check_row(&row).map_err(|problem| invalid(path, format!("line {line}: {problem}")))?;
        rows.push(row);
    }
    Ok(rows)
}

fn csv_problem(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::Deserialize { err, .. } => err.to_string(),
        _ => e.to_string(),
    }
}

fn check_row(row: &Row) -> Result<(), String> {
    if !SPLITS.contains(&row.split.as_str()) {
        return Err(format!(
            "column `split` is {:?}, expected one of {}",
            row.split,
            SPLITS.join(", ")
        ));
    }
    for (column, value) in [
        ("image", &row.image),
        ("patient_key", &row.patient_key),
        ("label", &row.label),
    ] {
        if value.trim().is_empty() {
            return Err(format!("column `{column}` is empty"));
        }
    }
    if Path::new(&row.image).is_absolute() || row.image.split('/').any(|part| part == "..") {
        return Err(format!(
            "column `image` is {:?}; it must be a path inside the dataset folder",
            row.image
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_selections() {
        let parse = |s: &str| s.parse::<SplitSelection>().map(|s| s.to_string());
        assert_eq!(parse("test"), Ok("test".into()));
        assert_eq!(parse("all"), Ok("train,val,test".into()));
        assert_eq!(parse("test, train,test"), Ok("train,test".into()));
        let err = parse("tset").expect_err("unknown");
        assert!(err.contains("\"tset\""), "{err}");
        assert!(parse("").is_err());
        assert_eq!(SplitSelection::default().splits(), ["test"]);
    }

    #[test]
    fn manifest_problems_name_the_line_and_column() {
        let path = Path::new("m.csv");
        let header =
            "image,patient_key,study_uid,series_uid,sop_instance_uid,z_mm,label,label_source,split\n";
        let good = format!("{header}images/a.png,k1,1,2,3,0.5,neck,mask,test\n");
        let rows = parse_manifest(path, good.as_bytes()).expect("valid");
        assert_eq!(rows[0].label, "neck");

        let bad_split = format!("{header}images/a.png,k1,1,2,3,0.5,neck,mask,holdout\n");
        let err = parse_manifest(path, bad_split.as_bytes()).expect_err("split");
        assert!(err.to_string().contains("line 2: column `split`"), "{err}");

        let missing = "image,patient_key,label,split\nimages/a.png,k1,neck,test\n";
        let err = parse_manifest(path, missing.as_bytes()).expect_err("columns");
        assert!(err.to_string().contains("study_uid"), "{err}");

        let escape = format!("{header}../x.png,k1,1,2,3,0.5,neck,mask,test\n");
        let err = parse_manifest(path, escape.as_bytes()).expect_err("path");
        assert!(err.to_string().contains("column `image`"), "{err}");
    }
}
