//! `anatomy-node eval`: scores a model on a dataset folder through the production inference
//! path — the PNGs' HU windowed by [`ModelInfo::to_input`], then [`Model::predict`] (ONNX
//! Runtime, CPU or CUDA), exactly what the node runs after `anatomy::pixels`.
//!
//! Images labelled `ambiguous`, and images whose label is not one of the model's classes,
//! are counted and never scored. The figures ([`metrics`]) match training/metrics.py; the
//! results go to stdout (a summary), `metrics.json` ([`report`], stable key names: a model
//! card is checked against it) and three PNG plots ([`plots`]).

pub mod data;
pub mod groups;
pub mod metrics;
pub mod plots;
pub mod report;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use crate::anatomy::model::{Device, Model, ModelError, ModelInfo, DEFAULT_MAX_BATCH};
pub use data::{Dataset, Row, SplitSelection, AMBIGUOUS};
pub use groups::{GroupOptions, Grouping};
pub use report::Report;

/// Files written to the output folder.
pub const METRICS_FILE: &str = "metrics.json";
pub const PREDICTIONS_FILE: &str = "predictions.csv";
pub const CONFUSION_PLOT: &str = "confusion.png";
pub const ROC_PLOT: &str = "roc.png";
pub const RELIABILITY_PLOT: &str = "reliability.png";
/// Per-group figures, written with `--groups`.
pub const GROUPS_FILE: &str = "groups.csv";

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file or folder of the dataset is missing or breaks the contract.
    #[error("{}: {problem}", .path.display())]
    Dataset { path: PathBuf, problem: String },
    /// The grouping file (`--groups`) is unreadable, malformed, or misses patients.
    #[error("{}: {problem}", .path.display())]
    Groups { path: PathBuf, problem: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Model and dataset do not fit together.
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    NothingToScore(String),
    #[error("{what} {}: {reason}", .path.display())]
    Output {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// What to evaluate, and where the results go.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub model: PathBuf,
    pub dataset: PathBuf,
    pub splits: SplitSelection,
    /// Which labels are scored: all, or the human ones only.
    pub labels: LabelSelection,
    /// Output folder; `<dataset>/eval-<model stem>/` when `None`.
    pub out: Option<PathBuf>,
    pub device: Device,
    /// ONNX Runtime intra-op threads (0: one per core).
    pub threads: usize,
    /// Images per inference call.
    pub batch: usize,
    /// Show a progress bar (only on a terminal).
    pub progress: bool,
    /// Figures per group of patients (`--groups`).
    pub groups: Option<GroupOptions>,
}

impl EvalOptions {
    pub fn out_dir(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            let stem = self
                .model
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into());
            self.dataset.join(format!("eval-{stem}"))
        })
    }
}

/// Command-line arguments of `anatomy-node eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// The ONNX model to score (docs/contracts.md "Model file").
    #[arg(long)]
    pub model: PathBuf,
    /// Dataset folder written by `anatomy-node dataset build`.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Splits to score: all, train, val, test, or a comma list (e.g. val,test).
    #[arg(long, default_value = "test")]
    pub split: SplitSelection,
    /// Labels to score: all, or human (rows whose label_source does not start with
    /// `pseudo:`, i.e. not the node's own predictions mined as pseudo labels).
    #[arg(long, value_enum, default_value_t = LabelSelection::All)]
    pub labels: LabelSelection,
    /// Folder for metrics.json and the plots [default: <dataset>/eval-<model stem>/].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where the model runs: cpu, cuda (never falls back to the CPU) or auto.
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// ONNX Runtime intra-op threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Images per inference call.
    #[arg(long, default_value_t = DEFAULT_MAX_BATCH)]
    pub batch: usize,
    /// CSV that puts every case in a group (e.g. ../shared/data/sources.csv): adds figures per
    /// group and per group and class, the mean and the worst group (metrics.json `groups`,
    /// groups.csv).
    #[arg(long, value_name = "FILE")]
    pub groups: Option<PathBuf>,
    /// Column of --groups holding the case id (the labels' case_id, which `dataset build`
    /// hashes into patient_key) or the manifest's patient_key itself.
    #[arg(long, value_name = "COLUMN", default_value = groups::DEFAULT_KEY, requires = "groups")]
    pub group_key: String,
    /// Column(s) of --groups naming the group; a comma list (e.g. manufacturer,model) joins
    /// their values with " / ".
    #[arg(long, value_name = "COLUMNS", default_value = groups::DEFAULT_GROUP_BY, requires = "groups")]
    pub group_by: String,
}

impl From<EvalArgs> for EvalOptions {
    fn from(args: EvalArgs) -> Self {
        Self {
            model: args.model,
            dataset: args.dataset,
            splits: args.split,
            labels: args.labels,
            out: args.out,
            device: args.device,
            threads: args.threads,
            batch: args.batch,
            progress: std::io::stdout().is_terminal(),
            groups: args.groups.map(|file| GroupOptions {
                file,
                key: args.group_key.trim().to_string(),
                by: args
                    .group_by
                    .split(',')
                    .map(|c| c.trim().to_string())
                    .filter(|c| !c.is_empty())
                    .collect(),
            }),
        }
    }
}

/// Which rows of the selected splits are scored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LabelSelection {
    /// Every row (pseudo labels included).
    #[default]
    All,
    /// Human labels only: a `label_source` that does not start with `pseudo:`, so a model is
    /// never judged by its agreement with the node's own predictions.
    Human,
}

/// How the manifest marks a pseudo label (`pseudo:<model version>`, written by `mine`).
pub const PSEUDO_SOURCE_PREFIX: &str = "pseudo:";

impl LabelSelection {
    pub fn keeps(self, row: &Row) -> bool {
        match self {
            LabelSelection::All => true,
            LabelSelection::Human => !row.label_source.starts_with(PSEUDO_SOURCE_PREFIX),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            LabelSelection::All => "",
            LabelSelection::Human => " with a human label (--labels human)",
        }
    }
}

/// The CLI command: evaluate, write the files, print the summary.
pub fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    let options = EvalOptions::from(args);
    let report = evaluate(&options)?;
    let out = options.out_dir();
    let written = write_outputs(&report, &out)?;
    print!("{}", report.summary());
    let names: Vec<String> = written
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    println!("wrote {} to {}", names.join(", "), out.display());
    Ok(())
}

/// Scores the model on the selected splits and returns the report (nothing is written).
pub fn evaluate(options: &EvalOptions) -> Result<Report, EvalError> {
    let dataset = Dataset::open(&options.dataset)?;
    let grouping = options.groups.as_ref().map(Grouping::read).transpose()?;
    let model =
        Model::load(&options.model, options.device, options.threads)?.with_max_batch(options.batch);
    check_sizes(&model, &dataset)?;
    let selected: Vec<&Row> = dataset
        .select(&options.splits)
        .into_iter()
        .filter(|r| options.labels.keeps(r))
        .collect();
    if selected.is_empty() {
        return Err(EvalError::NothingToScore(format!(
            "{}: no image{} in split {} of manifest.csv",
            dataset.dir.display(),
            options.labels.describe(),
            options.splits
        )));
    }
    if let Some(grouping) = &grouping {
        grouping.check_covers(&selected, &dataset.dir)?;
    }
    let classes = &model.info().classes;
    let scored: Vec<&Row> = selected
        .iter()
        .copied()
        .filter(|r| classes.contains(&r.label))
        .collect();
    if scored.is_empty() {
        return Err(EvalError::NothingToScore(format!(
            "{}: none of the {} images of split {} has a label among the model's classes {:?} \
             (`{AMBIGUOUS}` is never scored)",
            dataset.dir.display(),
            selected.len(),
            options.splits,
            classes
        )));
    }
    let (probabilities, timing) = predict_all(&model, &dataset, &scored, options.progress)?;
    Ok(Report::new(report::Inputs {
        model: &model,
        model_sha256: file_sha256(&options.model)?,
        dataset: &dataset,
        splits: &options.splits,
        selected: &selected,
        scored: &scored,
        probabilities: &probabilities,
        timing,
        grouping: grouping.as_ref(),
    }))
}

/// The model must take the dataset's image size, field of view and framing: images are
/// never resized here, as the node gives the model exactly `input_size` pixels of its field.
fn check_sizes(model: &Model, dataset: &Dataset) -> Result<(), EvalError> {
    let (model_size, data_size) = (model.info().input_size, dataset.json.input_size);
    let (model_framing, data_framing) = (model.info().framing, dataset.json.framing);
    if model_framing != data_framing {
        return Err(EvalError::Mismatch(format!(
            "model {} frames images {model_framing:?} (metadata framing), but dataset {} \
             holds images framed {data_framing:?} (dataset.json framing); build a dataset \
             with the model's `anatomy-node dataset build --framing {model_framing}`",
            model.path().display(),
            dataset.dir.display(),
            model_framing = model_framing.as_str(),
            data_framing = data_framing.as_str(),
        )));
    }
    let (model_fov, data_fov) = (model.info().field_of_view_mm, dataset.json.field_of_view_mm);
    if model_fov != data_fov {
        let shown =
            |mm: Option<f64>| mm.map_or("none (whole image)".into(), |mm| format!("{mm} mm"));
        return Err(EvalError::Mismatch(format!(
            "model {} sees a field of view of {} (metadata field_of_view_mm), but dataset {} \
             holds images of {} (dataset.json field_of_view_mm); build a dataset with the \
             model's `anatomy-node dataset build --field-of-view`",
            model.path().display(),
            shown(model_fov),
            dataset.dir.display(),
            shown(data_fov),
        )));
    }
    if model_size == data_size {
        return Ok(());
    }
    Err(EvalError::Mismatch(format!(
        "model {} takes {model_size}×{model_size} images (metadata input_size), but dataset {} \
         holds {data_size}×{data_size} images (dataset.json input_size); build a dataset with \
         `anatomy-node dataset build --size {model_size}`",
        model.path().display(),
        dataset.dir.display(),
    )))
}

/// How long prediction took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    pub images: usize,
    /// Reading PNGs, windowing and inference.
    pub total: Duration,
    /// Inference calls alone.
    pub inference: Duration,
    pub batch: usize,
}

/// Probabilities of every row, batch by batch: PNGs read and windowed in parallel, then one
/// `predict` call per batch.
fn predict_all(
    model: &Model,
    dataset: &Dataset,
    rows: &[&Row],
    progress: bool,
) -> Result<(Vec<Vec<f32>>, Timing), EvalError> {
    let bar = progress_bar(rows.len() as u64, progress);
    let started = Instant::now();
    let mut inference = Duration::ZERO;
    let mut probabilities = Vec::with_capacity(rows.len());
    for batch in rows.chunks(model.max_batch()) {
        let inputs = batch_input(model.info(), dataset, batch)?;
        let before = Instant::now();
        probabilities.extend(model.predict(&inputs, batch.len())?);
        inference += before.elapsed();
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    let timing = Timing {
        images: rows.len(),
        total: started.elapsed(),
        inference,
        batch: model.max_batch(),
    };
    Ok((probabilities, timing))
}

fn batch_input(info: &ModelInfo, dataset: &Dataset, batch: &[&Row]) -> Result<Vec<f32>, EvalError> {
    let images: Vec<Vec<f32>> = batch
        .par_iter()
        .map(|row| dataset.model_input(row, info))
        .collect::<Result<_, _>>()?;
    Ok(images.concat())
}

/// A progress bar on stderr while stdout is a terminal; hidden otherwise.
fn progress_bar(len: u64, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} images  {per_sec}  eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

fn file_sha256(path: &Path) -> Result<String, EvalError> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).map_err(|e| EvalError::Output {
        what: "reading",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// Writes `metrics.json` and the plots to `out` (created if needed); returns their paths.
pub fn write_outputs(report: &Report, out: &Path) -> Result<Vec<PathBuf>, EvalError> {
    std::fs::create_dir_all(out).map_err(|e| EvalError::Output {
        what: "creating",
        path: out.to_path_buf(),
        reason: e.to_string(),
    })?;
    let metrics = out.join(METRICS_FILE);
    report.write_json(&metrics).map_err(|e| EvalError::Output {
        what: "writing",
        path: metrics.clone(),
        reason: e.to_string(),
    })?;
    let predictions = out.join(PREDICTIONS_FILE);
    report
        .write_predictions(&predictions)
        .map_err(|e| EvalError::Output {
            what: "writing",
            path: predictions.clone(),
            reason: e.to_string(),
        })?;
    let mut written = vec![metrics, predictions];
    if let Some(groups) = &report.groups {
        let path = out.join(GROUPS_FILE);
        groups.write_csv(&path).map_err(|e| EvalError::Output {
            what: "writing",
            path: path.clone(),
            reason: e.to_string(),
        })?;
        written.push(path);
    }
    for (name, draw) in [
        (CONFUSION_PLOT, plots::confusion as plots::Plot),
        (ROC_PLOT, plots::roc),
        (RELIABILITY_PLOT, plots::reliability),
    ] {
        let path = out.join(name);
        draw(report, &path).map_err(|reason| EvalError::Output {
            what: "plotting",
            path: path.clone(),
            reason,
        })?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod label_selection_tests {
    use super::*;

    #[test]
    fn human_labels_leave_pseudo_labels_out() {
        let row = |source: &str| Row {
            image: "images/a.png".into(),
            patient_key: "k".into(),
            study_uid: "1".into(),
            series_uid: "2".into(),
            sop_instance_uid: "3".into(),
            z_mm: "0".into(),
            label: "lungs".into(),
            label_source: source.into(),
            split: "test".into(),
        };
        for source in ["mined:ris", "mined:kos+ris", "mask", "single-slice-visual"] {
            assert!(LabelSelection::Human.keeps(&row(source)), "{source}");
        }
        assert!(!LabelSelection::Human.keeps(&row("pseudo:anatomy-convnet-1")));
        assert!(LabelSelection::All.keeps(&row("pseudo:anatomy-convnet-1")));
        assert_eq!(LabelSelection::default(), LabelSelection::All);
    }
}
