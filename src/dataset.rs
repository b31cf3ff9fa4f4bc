//! `anatomy-node dataset build`: labelled DICOM files → the dataset folder that
//! `training/` reads (docs/contracts.md "Dataset folder").
//!
//! Every listed file goes through [`crate::anatomy::pixels`], the code the node runs, so a
//! model is trained on exactly the arrays it will see. Patients are split before any file
//! is converted, by subject and stratified by label ([`split`]); files that cannot be
//! converted are reported and skipped.

pub mod labels;
pub mod split;
pub mod write;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde_json::json;

use crate::anatomy::pixels::{self, Framing, Preprocessing};
pub use labels::{read_labels, LabelRow, LABELS};
pub use split::{assign_splits, patient_key, SplitRatios, SPLITS};
pub use write::{read_png_hu, ManifestRow, HU_OFFSET};

/// Identifies the folder layout; `training/` refuses formats it does not know.
pub const FORMAT: &str = "anatomy-node-dataset/1";
/// Sizes outside this range are mistakes, not models.
const SIZE_RANGE: std::ops::RangeInclusive<usize> = 8..=2048;
/// How often progress is reported on stderr.
const PROGRESS_EVERY: usize = 250;

#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Folder the `file` column of the labels is relative to.
    pub from: PathBuf,
    /// Labels CSV (format of ../shared/data/ct/labels.csv).
    pub labels: PathBuf,
    /// Dataset folder to create; must not exist or be empty.
    pub out: PathBuf,
    /// Side `S` of the square images.
    pub size: usize,
    /// See `pixels::Preprocessing::field_of_view_mm`.
    pub field_of_view_mm: Option<f64>,
    /// See `pixels::Preprocessing::framing`; `Body` is refused with `field_of_view_mm`.
    pub framing: Framing,
    pub ratios: SplitRatios,
    pub seed: u64,
    /// Conversion threads; all cores when `None`.
    pub threads: Option<usize>,
}

impl BuildOptions {
    fn preprocessing(&self) -> Preprocessing {
        Preprocessing::new(self.size)
            .with_field_of_view(self.field_of_view_mm)
            .with_framing(self.framing)
    }
}

/// A listed file that is not in the dataset, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    pub file: String,
    pub reason: String,
}

/// What a build wrote.
#[derive(Debug, Clone)]
pub struct BuildSummary {
    pub out: PathBuf,
    pub images: usize,
    pub patients: usize,
    /// Images per label.
    pub counts: BTreeMap<String, usize>,
    /// Images per split and label.
    pub splits: BTreeMap<String, BTreeMap<String, usize>>,
    /// Patients per split.
    pub split_patients: BTreeMap<String, usize>,
    pub skipped: Vec<Skipped>,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("labels {}: {reason}", path.display())]
    Labels { path: PathBuf, reason: String },
    #[error("invalid option: {0}")]
    InvalidOption(String),
    #[error("output folder {} is not empty; choose a new --out or remove it", .0.display())]
    OutNotEmpty(PathBuf),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DatasetError {
    let path = path.to_path_buf();
    move |source| DatasetError::Io { what, path, source }
}

/// A labelled file that can be attempted, with its place in the dataset.
struct Planned<'a> {
    row: &'a LabelRow,
    patient_key: String,
    split: &'static str,
    image: String,
}

/// Build the dataset folder. Files that cannot be converted are in the summary's
/// `skipped`; only problems with the labels, the options or the output folder are errors.
pub fn build(options: &BuildOptions) -> Result<BuildSummary, DatasetError> {
    let started = Instant::now();
    check_options(options)?;
    let rows = read_labels(&options.labels)?;
    prepare_out(&options.out)?;
    let (planned, mut skipped) = plan(&rows, options);
    let (manifest, failed) = convert_all(&planned, options)?;
    skipped.extend(failed);
    let summary = summarise(options, &manifest, skipped, started.elapsed());
    write::write_manifest(&options.out.join("manifest.csv"), &manifest)
        .map_err(io_error("writing", &options.out.join("manifest.csv")))?;
    let json = dataset_json(options, &summary);
    // dataset.json last: its presence says the folder is complete.
    write::write_json(&options.out.join("dataset.json"), &json)
        .map_err(io_error("writing", &options.out.join("dataset.json")))?;
    Ok(summary)
}

fn check_options(options: &BuildOptions) -> Result<(), DatasetError> {
    if !SIZE_RANGE.contains(&options.size) {
        return Err(DatasetError::InvalidOption(format!(
            "--size {} is outside {}..={}",
            options.size,
            SIZE_RANGE.start(),
            SIZE_RANGE.end()
        )));
    }
    if let Some(mm) = options
        .field_of_view_mm
        .filter(|mm| !(10.0..=2000.0).contains(mm))
    {
        return Err(DatasetError::InvalidOption(format!(
            "--field-of-view {mm} is outside 10..=2000 mm"
        )));
    }
    if let (Framing::Body, Some(mm)) = (options.framing, options.field_of_view_mm) {
        return Err(DatasetError::InvalidOption(format!(
            "--framing body and --field-of-view {mm} exclude each other: an image is framed \
             around the body or as a fixed field of view, not both"
        )));
    }
    if options.threads == Some(0) {
        return Err(DatasetError::InvalidOption("--threads 0".into()));
    }
    if !options.from.is_dir() {
        return Err(DatasetError::InvalidOption(format!(
            "--from {} is not a folder",
            options.from.display()
        )));
    }
    Ok(())
}

/// Create `<out>/images`; an existing non-empty `<out>` is refused so that images of two
/// builds can never mix.
fn prepare_out(out: &Path) -> Result<(), DatasetError> {
    if out.exists() {
        let mut entries = std::fs::read_dir(out).map_err(io_error("reading", out))?;
        if entries.next().is_some() {
            return Err(DatasetError::OutNotEmpty(out.to_path_buf()));
        }
    }
    let images = out.join("images");
    std::fs::create_dir_all(&images).map_err(io_error("creating", &images))
}

/// Rows that can be attempted (with patient key, split and image name), and rows refused
/// up front. Splits are decided here, from the labels alone, so a file that later fails
/// to convert does not move any patient to another split.
fn plan<'a>(rows: &'a [LabelRow], options: &BuildOptions) -> (Vec<Planned<'a>>, Vec<Skipped>) {
    let mut skipped = vec![];
    let mut names = HashSet::new();
    let mut usable = vec![];
    for row in rows {
        let problem = labels::row_problem(row).or_else(|| {
            let name = image_name(row);
            (!names.insert(name.clone()))
                .then(|| format!("duplicate image {name} (same SOP Instance UID listed twice)"))
        });
        match problem {
            Some(reason) => skipped.push(Skipped {
                file: row.file.clone(),
                reason,
            }),
            None => usable.push(row),
        }
    }
    let mut patients: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in &usable {
        patients
            .entry(patient_key(&row.case_id))
            .or_default()
            .insert(row.label.clone());
    }
    let splits = assign_splits(&patients, options.ratios, options.seed);
    let planned = usable
        .into_iter()
        .map(|row| {
            let key = patient_key(&row.case_id);
            let split = SPLITS[splits.get(&key).copied().unwrap_or(0)];
            Planned {
                row,
                patient_key: key,
                split,
                image: format!("images/{}.png", image_name(row)),
            }
        })
        .collect();
    (planned, skipped)
}

/// The file name of a row's image: its SOP Instance UID when that is a plain UID, else a
/// hash of the source path (names must be unique and safe on every file system).
fn image_name(row: &LabelRow) -> String {
    let uid = &row.sop_instance_uid;
    let plain =
        !uid.is_empty() && uid.len() <= 64 && uid.chars().all(|c| c.is_ascii_digit() || c == '.');
    if plain {
        uid.clone()
    } else {
        format!("file-{}", patient_key(&row.file))
    }
}

/// Convert every planned row in parallel: manifest rows in label order, and the files
/// that could not be converted.
fn convert_all(
    planned: &[Planned],
    options: &BuildOptions,
) -> Result<(Vec<ManifestRow>, Vec<Skipped>), DatasetError> {
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(threads) = options.threads {
        pool = pool.num_threads(threads);
    }
    let pool = pool
        .build()
        .map_err(|e| DatasetError::InvalidOption(format!("thread pool: {e}")))?;
    let done = AtomicUsize::new(0);
    let results: Vec<Result<ManifestRow, Skipped>> = pool.install(|| {
        planned
            .par_iter()
            .map(|p| {
                let result = convert_one(p, options);
                report_progress(&done, planned.len());
                result
            })
            .collect::<Result<_, DatasetError>>()
    })?;
    let mut manifest = vec![];
    let mut skipped = vec![];
    for result in results {
        match result {
            Ok(row) => manifest.push(row),
            Err(s) => skipped.push(s),
        }
    }
    Ok((manifest, skipped))
}

fn report_progress(done: &AtomicUsize, total: usize) {
    let n = done.fetch_add(1, Ordering::Relaxed) + 1;
    if n % PROGRESS_EVERY == 0 || n == total {
        eprintln!("converted {n}/{total}");
    }
}

/// One file to one image. A file that cannot be decoded is skipped (inner `Err`); failing
/// to write the image is fatal (outer `Err`), as the disk problem would hit every file.
fn convert_one(
    planned: &Planned,
    options: &BuildOptions,
) -> Result<Result<ManifestRow, Skipped>, DatasetError> {
    let row = planned.row;
    let skip = |reason: String| {
        Ok(Err(Skipped {
            file: row.file.clone(),
            reason,
        }))
    };
    let frames = match pixels::hu_frames(&options.from.join(&row.file)) {
        Ok(frames) => frames,
        Err(e) => return skip(e.kind.to_string()),
    };
    let [frame] = frames.as_slice() else {
        // labels.csv labels files; which frame of a multi-frame file a label means is
        // unknown, and one label for every frame would be wrong for most of them.
        return skip(format!(
            "{} frames; labels name single-frame files",
            frames.len()
        ));
    };
    let hu = pixels::preprocess(frame, &options.preprocessing());
    let path = options.out.join(&planned.image);
    write::write_png(&path, options.size, &hu).map_err(io_error("writing", &path))?;
    Ok(Ok(ManifestRow {
        image: planned.image.clone(),
        patient_key: planned.patient_key.clone(),
        study_uid: row.study_uid.clone(),
        series_uid: row.series_uid.clone(),
        sop_instance_uid: row.sop_instance_uid.clone(),
        z_mm: row.z_mm.clone(),
        label: row.label.clone(),
        label_source: row.label_basis.clone(),
        split: planned.split.to_string(),
    }))
}

fn summarise(
    options: &BuildOptions,
    manifest: &[ManifestRow],
    skipped: Vec<Skipped>,
    elapsed: Duration,
) -> BuildSummary {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut splits: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut patients_per_split: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for row in manifest {
        *counts.entry(row.label.clone()).or_default() += 1;
        *splits
            .entry(row.split.clone())
            .or_default()
            .entry(row.label.clone())
            .or_default() += 1;
        patients_per_split
            .entry(row.split.clone())
            .or_default()
            .insert(&row.patient_key);
    }
    let patients: BTreeSet<&str> = manifest.iter().map(|r| r.patient_key.as_str()).collect();
    BuildSummary {
        out: options.out.clone(),
        images: manifest.len(),
        patients: patients.len(),
        counts,
        splits,
        split_patients: patients_per_split
            .into_iter()
            .map(|(split, p)| (split, p.len()))
            .collect(),
        skipped,
        elapsed,
    }
}

fn dataset_json(options: &BuildOptions, summary: &BuildSummary) -> serde_json::Value {
    json!({
        "format": FORMAT,
        "input_size": options.size,
        "field_of_view_mm": options.field_of_view_mm,
        "framing": options.framing,
        "hu_offset": HU_OFFSET,
        "images": summary.images,
        "patients": summary.patients,
        "counts": summary.counts,
        "splits": summary.splits,
        "split_patients": summary.split_patients,
        "split_ratios": options.ratios.shares(),
        "seed": options.seed,
        "skipped": summary.skipped.len(),
        "labels_file": options.labels.file_name().map(|n| n.to_string_lossy().into_owned()),
        "preprocessing": {
            "implementation": "anatomy::pixels",
            "axial_tolerance_deg": options.preprocessing().axial_tolerance_deg,
            "pad_hu": pixels::AIR_HU,
        },
        "created_by": concat!("anatomy-node ", env!("CARGO_PKG_VERSION")),
    })
}

impl fmt::Display for BuildSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.skipped {
            writeln!(f, "skipped {}: {}", s.file, s.reason)?;
        }
        writeln!(
            f,
            "wrote {} images of {} patients to {} in {:.1} s ({} files skipped)",
            self.images,
            self.patients,
            self.out.display(),
            self.elapsed.as_secs_f64(),
            self.skipped.len()
        )?;
        for split in SPLITS {
            let per_label = self.splits.get(split).cloned().unwrap_or_default();
            let labels: Vec<String> = LABELS
                .iter()
                .filter_map(|l| per_label.get(*l).map(|n| format!("{l} {n}")))
                .collect();
            writeln!(
                f,
                "  {split:5}: {} patients, {} images ({})",
                self.split_patients.get(split).copied().unwrap_or(0),
                per_label.values().sum::<usize>(),
                labels.join(", ")
            )?;
        }
        Ok(())
    }
}

/// The CLI command: build, print the summary, fail only when nothing was written.
pub fn run_build(options: &BuildOptions) -> anyhow::Result<()> {
    let summary = build(options)?;
    print!("{summary}");
    if summary.images == 0 {
        anyhow::bail!(
            "no image written: all {} listed files were skipped",
            summary.skipped.len()
        );
    }
    Ok(())
}

/// Command-line arguments of `anatomy-node dataset build`.
#[derive(Debug, Clone, clap::Args)]
pub struct BuildArgs {
    /// Folder the `file` column of the labels CSV is relative to.
    #[arg(long)]
    pub from: PathBuf,
    /// Labels CSV with the columns of ../shared/data/ct/labels.csv (case_id, ..., file, ...).
    #[arg(long)]
    pub labels: PathBuf,
    /// Dataset folder to create (must not exist, or be empty).
    #[arg(long)]
    pub out: PathBuf,
    /// Side of the square images, the model's input size.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Millimetres the image spans around its centre, whatever the scanner's field of view
    /// (the model then records it as `field_of_view_mm`). Not given: each image is framed
    /// as --framing says (default: fitted whole, as the shipped model's first release was
    /// trained).
    #[arg(long = "field-of-view", value_name = "MM")]
    pub field_of_view_mm: Option<f64>,
    /// `body`: each image is the square around the patient's body plus a margin, so every
    /// body fills the image whatever the scanner's field of view (the model then records
    /// `framing` = `body`). `whole`: the whole image. Not with --field-of-view.
    #[arg(long, value_name = "whole|body", default_value_t = Framing::Whole)]
    pub framing: Framing,
    /// Shares of patients for train,val,test.
    #[arg(long, default_value = "70,15,15")]
    pub split: SplitRatios,
    /// Seed of the patient split; the same seed gives the same split.
    #[arg(long, default_value_t = 2015)]
    pub seed: u64,
    /// Conversion threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl From<BuildArgs> for BuildOptions {
    fn from(args: BuildArgs) -> Self {
        Self {
            from: args.from,
            labels: args.labels,
            out: args.out,
            size: args.size,
            field_of_view_mm: args.field_of_view_mm,
            framing: args.framing,
            ratios: args.split,
            seed: args.seed,
            threads: args.threads,
        }
    }
}
