//! The dataset folder `mine` writes (docs/contracts.md "Dataset folder"): images through
//! `dataset::write` (16-bit PNG, HU + 32768, from `anatomy::pixels`), `manifest.csv` and
//! `dataset.json` rewritten atomically from the index at the end of every run, and
//! `mine.json`, which ties the folder to its rows in the index.
//!
//! Patients are pseudonymous: `patient_key` is an HMAC-SHA-256 of Issuer of Patient ID and
//! Patient ID under `mine.patient_key_secret`, and the split comes from the same keyed hash,
//! so a patient keeps its key and its split in every run, whoever else is added. No name,
//! Patient ID or birth date is written anywhere in the folder; the UIDs are kept, so every
//! row traces back to the archive.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::anatomy::pixels::{self, Framing};
use crate::dataset::{self, ManifestRow, SplitRatios, HU_OFFSET, SPLITS};
use crate::store::layout::path_component;

pub const MINE_FORMAT: &str = "anatomy-node-mine/1";

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{0}")]
    Refused(String),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> OutputError {
    let path = path.to_path_buf();
    move |source| OutputError::Io { what, path, source }
}

/// `<out>/mine.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MineJson {
    pub format: String,
    pub dataset_id: String,
    pub key_check: String,
    pub image_size: usize,
    /// `mine.field_of_view_mm` when the folder was made (absent: images fitted whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_of_view_mm: Option<f64>,
    /// `mine.framing` when the folder was made (absent: whole, as before the key existed).
    #[serde(default)]
    pub framing: Framing,
    pub split: String,
    pub created_at: i64,
}

/// Patient keys and splits from the site's secret.
#[derive(Clone)]
pub struct Keyer {
    /// HMAC-SHA-256 keyed with the secret, cloned for every message.
    keyed: HmacSha256,
    shares: [f64; 3],
}

impl Keyer {
    pub fn new(secret: &str, ratios: SplitRatios) -> Result<Keyer, String> {
        let keyed = HmacSha256::new_from_slice(secret.as_bytes())
            .map_err(|e| format!("mine.patient_key_secret cannot key HMAC-SHA-256: {e}"))?;
        Ok(Keyer {
            keyed,
            shares: ratios.shares(),
        })
    }

    fn mac(&self, text: &str) -> [u8; 32] {
        let mut mac = self.keyed.clone();
        mac.update(text.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Whether a dataset was made with this secret, without storing the secret.
    pub fn key_check(&self) -> String {
        hex::encode(&self.mac("anatomy-node key check")[..8])
    }

    /// (patient_key, split) of a patient.
    pub fn patient(&self, patient_id: &str, issuer: &str) -> (String, &'static str) {
        let mac = self.mac(&format!("anatomy-node patient\0{issuer}\0{patient_id}"));
        let key = hex::encode(&mac[..8]);
        let mut draw = [0u8; 8];
        draw.copy_from_slice(&mac[8..16]);
        let u = u64::from_be_bytes(draw) as f64 / (u64::MAX as f64 + 1.0);
        let split = if u < self.shares[0] {
            SPLITS[0]
        } else if u < self.shares[0] + self.shares[1] {
            SPLITS[1]
        } else {
            SPLITS[2]
        };
        (key, split)
    }
}

pub struct Output {
    pub dir: PathBuf,
    pub json: MineJson,
}

impl Output {
    /// Open the dataset folder `dir`, or create it when it does not exist or is empty. A
    /// folder written by something else, with another secret, image size or split, is
    /// refused: its rows would not mix.
    pub fn open(
        dir: &Path,
        keyer: &Keyer,
        image_size: usize,
        field_of_view_mm: Option<f64>,
        framing: Framing,
        split: &str,
    ) -> Result<Output, OutputError> {
        let marker = dir.join("mine.json");
        let empty = !dir.exists()
            || std::fs::read_dir(dir)
                .map_err(io_error("reading", dir))?
                .next()
                .is_none();
        let json = if marker.is_file() {
            let text = std::fs::read_to_string(&marker).map_err(io_error("reading", &marker))?;
            let json: MineJson = serde_json::from_str(&text).map_err(|e| {
                OutputError::Refused(format!("{}: not a mine.json: {e}", marker.display()))
            })?;
            if json.format != MINE_FORMAT {
                return Err(OutputError::Refused(format!(
                    "{}: format {:?}, expected {MINE_FORMAT:?}",
                    marker.display(),
                    json.format
                )));
            }
            if json.key_check != keyer.key_check() {
                return Err(OutputError::Refused(format!(
                    "{} was mined with another mine.patient_key_secret: its patient keys and splits would not match; use a new --out",
                    dir.display()
                )));
            }
            if json.image_size != image_size {
                return Err(OutputError::Refused(format!(
                    "{} holds {size}×{size} images, mine.image_size is {image_size}; use a new --out",
                    dir.display(),
                    size = json.image_size
                )));
            }
            if json.field_of_view_mm != field_of_view_mm {
                let shown = |mm: Option<f64>| {
                    mm.map_or("none (fitted whole)".into(), |mm| format!("{mm} mm"))
                };
                return Err(OutputError::Refused(format!(
                    "{} holds images of field of view {}, mine.field_of_view_mm is {}; use a new --out",
                    dir.display(),
                    shown(json.field_of_view_mm),
                    shown(field_of_view_mm)
                )));
            }
            if json.framing != framing {
                return Err(OutputError::Refused(format!(
                    "{} holds images framed {:?}, mine.framing is {:?}; use a new --out",
                    dir.display(),
                    json.framing.as_str(),
                    framing.as_str()
                )));
            }
            if json.split != split {
                return Err(OutputError::Refused(format!(
                    "{} was split {}, mine.split is {split}: patients would change splits; use a new --out",
                    dir.display(),
                    json.split
                )));
            }
            json
        } else if empty {
            std::fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
            let json = MineJson {
                format: MINE_FORMAT.into(),
                dataset_id: new_id(dir),
                key_check: keyer.key_check(),
                image_size,
                field_of_view_mm,
                framing,
                split: split.to_string(),
                created_at: super::state::now(),
            };
            let text = serde_json::to_vec_pretty(&json)
                .map_err(io::Error::other)
                .map_err(io_error("writing", &marker))?;
            write_atomically(&marker, &text).map_err(io_error("writing", &marker))?;
            json
        } else {
            return Err(OutputError::Refused(format!(
                "{} is not empty and has no mine.json: it is not a folder `anatomy-node mine` wrote; choose a new --out",
                dir.display()
            )));
        };
        for sub in ["images", "reports"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(io_error("creating", &path))?;
        }
        Ok(Output {
            dir: dir.to_path_buf(),
            json,
        })
    }

    /// `images/<SOP Instance UID>.png`, or `…_<frame number>.png` for a frame of a
    /// multi-frame image.
    pub fn image_name(sop_instance_uid: &str, frame: u32, multi_frame: bool) -> String {
        let base = path_component(sop_instance_uid);
        if multi_frame {
            format!("images/{base}_{}.png", frame + 1)
        } else {
            format!("images/{base}.png")
        }
    }

    /// Rewrite manifest.csv and dataset.json from every row, each atomically (dataset.json
    /// last), and remove images no row names (left by a run killed before its commit).
    pub fn write_index(&self, rows: &[ManifestRow], extra: serde_json::Value) -> io::Result<usize> {
        let manifest = self.dir.join("manifest.csv");
        let mut bytes = Vec::new();
        {
            let mut writer = csv::Writer::from_writer(&mut bytes);
            if rows.is_empty() {
                writer.write_record([
                    "image",
                    "patient_key",
                    "study_uid",
                    "series_uid",
                    "sop_instance_uid",
                    "z_mm",
                    "label",
                    "label_source",
                    "split",
                ])?;
            }
            for row in rows {
                writer.serialize(row).map_err(io::Error::other)?;
            }
            writer.flush()?;
        }
        write_atomically(&manifest, &bytes)?;
        let json = dataset_json(&self.json, rows, &bytes, extra);
        let mut text = serde_json::to_vec_pretty(&json).map_err(io::Error::other)?;
        text.push(b'\n');
        write_atomically(&self.dir.join("dataset.json"), &text)?;
        self.remove_strays(rows)
    }

    fn remove_strays(&self, rows: &[ManifestRow]) -> io::Result<usize> {
        let named: HashSet<&str> = rows.iter().map(|r| r.image.as_str()).collect();
        let mut removed = 0;
        for entry in std::fs::read_dir(self.dir.join("images"))?.flatten() {
            let name = format!("images/{}", entry.file_name().to_string_lossy());
            if entry.file_type().is_ok_and(|t| t.is_file()) && !named.contains(name.as_str()) {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Keep a run's report: `reports/mine-<run>.json`.
    pub fn write_report(&self, run: i64, report: &serde_json::Value) -> io::Result<PathBuf> {
        let path = self.dir.join("reports").join(format!("mine-{run:06}.json"));
        let mut text = serde_json::to_vec_pretty(report).map_err(io::Error::other)?;
        text.push(b'\n');
        write_atomically(&path, &text)?;
        Ok(path)
    }
}

/// Write one image (HU, `size × size`) under its manifest name in `dir`, atomically.
pub fn write_image(dir: &Path, name: &str, size: usize, hu: &[f32]) -> io::Result<()> {
    let path = dir.join(name);
    let tmp = path.with_extension("png.part");
    dataset::write::write_png(&tmp, size, hu)?;
    std::fs::rename(&tmp, &path)
}

/// Write to a temporary file, fsync, rename over `path`, fsync the folder: readers see the
/// old file or the new one, never a part.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("part");
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        if let Ok(dir) = std::fs::File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// A dataset id: unique enough (time, process, folder), and no secret.
fn new_id(dir: &Path) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let digest = Sha256::digest(format!("{nanos} {} {}", std::process::id(), dir.display()));
    hex::encode(&digest[..12])
}

fn dataset_json(
    mine: &MineJson,
    rows: &[ManifestRow],
    manifest: &[u8],
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut sources: BTreeMap<&str, usize> = BTreeMap::new();
    let mut splits: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
    let mut split_patients: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for r in rows {
        *counts.entry(&r.label).or_default() += 1;
        let kind = if r.label_source.starts_with("pseudo:") {
            "pseudo"
        } else {
            "human"
        };
        *sources.entry(kind).or_default() += 1;
        *splits
            .entry(&r.split)
            .or_default()
            .entry(&r.label)
            .or_default() += 1;
        split_patients
            .entry(&r.split)
            .or_default()
            .insert(&r.patient_key);
    }
    let by_source: BTreeMap<&str, usize> = rows.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.label_source.as_str()).or_default() += 1;
        m
    });
    let patients: BTreeSet<&str> = rows.iter().map(|r| r.patient_key.as_str()).collect();
    let ratios: Vec<f64> = mine
        .split
        .parse::<SplitRatios>()
        .map(|r| r.shares().to_vec())
        .unwrap_or_default();
    json!({
        "format": dataset::FORMAT,
        "input_size": mine.image_size,
        "field_of_view_mm": mine.field_of_view_mm,
        "framing": mine.framing,
        "hu_offset": HU_OFFSET,
        "images": rows.len(),
        "patients": patients.len(),
        "counts": counts,
        "splits": splits,
        "split_patients": split_patients.iter().map(|(k, v)| (*k, v.len())).collect::<BTreeMap<_, _>>(),
        "split_ratios": ratios,
        "label_kinds": sources,
        "label_sources": by_source,
        "manifest_sha256": hex::encode(Sha256::digest(manifest)),
        "mined": {
            "dataset_id": mine.dataset_id,
            "split_rule": "keyed hash (HMAC-SHA-256) of the patient, stable across runs",
            "patient_key": "HMAC-SHA-256 of Issuer of Patient ID and Patient ID under mine.patient_key_secret, first 8 bytes in hex",
            "run": extra,
        },
        "preprocessing": {
            "implementation": "anatomy::pixels",
            "axial_tolerance_deg": pixels::DEFAULT_AXIAL_TOLERANCE_DEG,
            "pad_hu": pixels::AIR_HU,
        },
        "created_by": concat!("anatomy-node ", env!("CARGO_PKG_VERSION"), " mine"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patient_keys_are_keyed_and_splits_stable() {
        let ratios = SplitRatios::new(70.0, 15.0, 15.0).unwrap();
        let a = Keyer::new("site secret number one", ratios).unwrap();
        let b = Keyer::new("site secret number two", ratios).unwrap();
        let (key, split) = a.patient("PAT-1", "");
        assert_eq!(key.len(), 16);
        assert_eq!(a.patient("PAT-1", ""), (key.clone(), split));
        assert_ne!(b.patient("PAT-1", "").0, key, "another secret, another key");
        assert_ne!(a.patient("PAT-1", "HOSP2").0, key, "the issuer counts");
        assert_ne!(key, crate::dataset::patient_key("PAT-1"));
        let mut per_split: BTreeMap<&str, usize> = BTreeMap::new();
        for i in 0..2000 {
            *per_split
                .entry(a.patient(&format!("P{i}"), "").1)
                .or_default() += 1;
        }
        assert!((1300..1500).contains(&per_split["train"]), "{per_split:?}");
        assert!((220..380).contains(&per_split["test"]), "{per_split:?}");
        assert_ne!(a.key_check(), b.key_check());
    }

    #[test]
    fn folders_of_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let keyer = Keyer::new("0123456789abcdef", SplitRatios::default()).unwrap();
        let out = dir.path().join("ds");
        let first = Output::open(&out, &keyer, 64, None, Framing::Whole, "70,15,15").unwrap();
        let again = Output::open(&out, &keyer, 64, None, Framing::Whole, "70,15,15").unwrap();
        assert_eq!(first.json, again.json);
        let other = Keyer::new("another secret!!", SplitRatios::default()).unwrap();
        assert!(Output::open(&out, &other, 64, None, Framing::Whole, "70,15,15").is_err());
        assert!(Output::open(&out, &keyer, 128, None, Framing::Whole, "70,15,15").is_err());
        assert!(Output::open(&out, &keyer, 64, Some(500.0), Framing::Whole, "70,15,15").is_err());
        assert!(Output::open(&out, &keyer, 64, None, Framing::Whole, "60,20,20").is_err());
        let framed = Output::open(&out, &keyer, 64, None, Framing::Body, "70,15,15");
        match framed {
            Err(OutputError::Refused(m)) => {
                assert!(
                    m.contains("framed \"whole\"") && m.contains("\"body\""),
                    "{m}"
                )
            }
            other => panic!("body framing into a whole-image folder: {:?}", other.err()),
        }
        // a folder made with body framing says so, and takes only body-framed images
        let body = dir.path().join("body");
        let made = Output::open(&body, &keyer, 64, None, Framing::Body, "70,15,15").unwrap();
        assert_eq!(made.json.framing, Framing::Body);
        let text = std::fs::read_to_string(body.join("mine.json")).unwrap();
        assert!(text.contains("\"framing\": \"body\""), "{text}");
        assert!(Output::open(&body, &keyer, 64, None, Framing::Body, "70,15,15").is_ok());
        assert!(Output::open(&body, &keyer, 64, None, Framing::Whole, "70,15,15").is_err());
        // a mine.json written before `framing` existed holds whole images
        let old: MineJson = serde_json::from_str(
            r#"{"format":"anatomy-node-mine/1","dataset_id":"x","key_check":"y",
                "image_size":64,"split":"70,15,15","created_at":0}"#,
        )
        .unwrap();
        assert_eq!(old.framing, Framing::Whole);
        std::fs::write(dir.path().join("x.txt"), "x").unwrap();
        assert!(Output::open(dir.path(), &keyer, 64, None, Framing::Whole, "70,15,15").is_err());
    }

    #[test]
    fn the_index_is_rewritten_and_strays_removed() {
        let dir = tempfile::tempdir().unwrap();
        let keyer = Keyer::new("0123456789abcdef", SplitRatios::default()).unwrap();
        let out = Output::open(dir.path(), &keyer, 8, None, Framing::Whole, "70,15,15").unwrap();
        let name = Output::image_name("1.2.3", 0, false);
        write_image(dir.path(), &name, 8, &[0.0; 64]).unwrap();
        write_image(dir.path(), "images/stray.png", 8, &[0.0; 64]).unwrap();
        let row = ManifestRow {
            image: name.clone(),
            patient_key: "k".into(),
            study_uid: "1".into(),
            series_uid: "1.2".into(),
            sop_instance_uid: "1.2.3".into(),
            z_mm: "".into(),
            label: "lungs".into(),
            label_source: "mined:ris".into(),
            split: "train".into(),
        };
        assert_eq!(out.write_index(&[row], json!({})).unwrap(), 1);
        assert!(dir.path().join(&name).is_file());
        assert!(!dir.path().join("images/stray.png").exists());
        let manifest = std::fs::read_to_string(dir.path().join("manifest.csv")).unwrap();
        assert!(manifest.starts_with("image,patient_key,study_uid,series_uid,sop_instance_uid,z_mm,label,label_source,split\n"));
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("dataset.json")).unwrap())
                .unwrap();
        assert_eq!(json["images"], 1);
        assert_eq!(json["framing"], "whole");
        assert_eq!(json["format"], dataset::FORMAT);
        assert_eq!(Output::image_name("1.2.3", 4, true), "images/1.2.3_5.png");
    }
}
