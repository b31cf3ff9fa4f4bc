//! The results of one evaluation: `metrics.json` (serialised [`Report`], key names stable:
//! models/anatomy.metrics.json is a copy and tests/eval.rs checks the shipped model against
//! it) and the summary printed on stdout.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::path::Path;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use super::data::{Dataset, Row, SplitSelection, AMBIGUOUS};
use super::groups::{self, GroupSection, Grouping};
use super::metrics::{self, Bin, ECE_BINS};
use super::Timing;
use crate::anatomy::model::Model;
use crate::dataset::SPLITS;

/// Identifies the layout of `metrics.json`; bump it when a key changes meaning or goes.
pub const FORMAT: &str = "anatomy-node-eval/1";
/// How patients are scored (`patient.method`).
pub const PATIENT_METHOD: &str = "majority-vote";
const PATIENT_RULE: &str = "per patient, over its scored images: true class = most frequent \
     true label, predicted class = most frequent slice prediction (argmax); ties go to the \
     class that comes first in the model's class order; a patient is an error when the two \
     differ";
const BINNING: &str = "15 equal-width bins of the confidence (largest probability), bin i \
     holding (i/15, (i+1)/15]; ECE = sum over bins of (images in bin / scored images) * \
     |accuracy - mean confidence|";
const AUC_DEFINITION: &str = "one-vs-rest ROC AUC per class: Mann-Whitney U with mid-ranks for \
     ties (= trapezoid area, a tie counting 1/2); null for a class without positives or \
     without negatives, and left out of mean_auc";

/// A JSON object whose keys keep the order they were inserted in (class order, split
/// order), unlike a `BTreeMap`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Ordered<T>(pub Vec<(String, T)>);

impl<T> Ordered<T> {
    pub fn get(&self, key: &str) -> Option<&T> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

impl<T: Serialize> Serialize for Ordered<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in &self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub format: &'static str,
    pub created_by: &'static str,
    pub model: ModelSection,
    pub dataset: DatasetSection,
    /// The splits scored, in train, val, test order.
    pub splits: Vec<String>,
    pub counts: Counts,
    pub slice: SliceSection,
    pub calibration: CalibrationSection,
    pub patient: PatientSection,
    pub timing: TimingSection,
    /// Figures per group of patients (`--groups`); absent without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<GroupSection>,
    /// ROC points (false positive rate, true positive rate) per class, for the plot.
    #[serde(skip)]
    pub roc: Vec<Option<Vec<(f64, f64)>>>,
    /// Every scored image with its probabilities (`predictions.csv`).
    #[serde(skip)]
    pub predictions: Vec<Prediction>,
}

/// One scored image.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub image: String,
    pub patient_key: String,
    pub split: String,
    pub label: String,
    /// One per class, in the model's class order.
    pub probabilities: Vec<f32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelSection {
    /// The path given on the command line.
    pub file: String,
    pub sha256: String,
    pub version: String,
    pub classes: Vec<String>,
    pub input_size: usize,
    pub hu_window: [f64; 2],
    pub normalization: String,
    pub temperature: Option<f64>,
    pub trained_on: String,
    /// Execution provider the evaluation ran on.
    pub provider: String,
}

/// The dataset, with what rebuilds it: `anatomy-node dataset build --size <size> --seed
/// <seed> --split <split_ratios> --labels <data>/<labels>`.
#[derive(Debug, Clone, Serialize)]
pub struct DatasetSection {
    pub path: String,
    pub format: String,
    pub size: usize,
    pub seed: Option<u64>,
    pub split_ratios: Option<Vec<f64>>,
    pub labels: Option<String>,
    /// Every image and patient of the manifest, all splits.
    pub images: usize,
    pub patients: usize,
    pub manifest_sha256: String,
}

/// Images of the selected splits.
#[derive(Debug, Clone, Serialize)]
pub struct Counts {
    pub images: usize,
    pub patients: usize,
    pub scored: usize,
    pub ambiguous: usize,
    /// Images whose label is not one of the model's classes (and not `ambiguous`).
    pub not_in_model: usize,
    pub not_in_model_labels: Ordered<usize>,
    /// Images per label (every label, scored or not).
    pub per_class: Ordered<usize>,
    /// Images per split and label.
    pub per_split: Ordered<Ordered<usize>>,
    pub patients_per_split: Ordered<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SliceSection {
    pub images: usize,
    pub errors: usize,
    pub error: f64,
    pub accuracy: f64,
    pub nll: f64,
    pub auc_definition: &'static str,
    pub auc: Ordered<Option<f64>>,
    pub mean_auc: Option<f64>,
    /// The classes averaged in `mean_auc`.
    pub mean_auc_classes: Vec<String>,
    /// Classes whose AUC is null, and why.
    pub auc_undefined: Ordered<String>,
    /// 1 − recall; null for a class without scored images.
    pub per_class_error: Ordered<Option<f64>>,
    pub per_class_images: Ordered<usize>,
    pub confusion: Confusion,
}

#[derive(Debug, Clone, Serialize)]
pub struct Confusion {
    pub rows: &'static str,
    pub columns: &'static str,
    pub classes: Vec<String>,
    pub matrix: Vec<Vec<usize>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CalibrationSection {
    pub ece: f64,
    pub bins: usize,
    pub binning: &'static str,
    pub reliability: Vec<BinRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BinRow {
    pub lower: f64,
    pub upper: f64,
    pub images: usize,
    pub accuracy: Option<f64>,
    pub confidence: Option<f64>,
    /// accuracy − confidence.
    pub gap: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PatientSection {
    pub method: &'static str,
    pub rule: &'static str,
    pub patients: usize,
    pub errors: usize,
    pub error: f64,
    pub accuracy: f64,
    /// Patients with at least one wrong scored slice.
    pub with_slice_errors: usize,
    /// `with_slice_errors / patients`: the strictest patient figure.
    pub any_slice_error: f64,
    /// Mean over patients of their slice error (every patient weighs the same).
    pub mean_slice_error: f64,
    /// Patients in split order, then by key.
    pub per_patient: Vec<PatientRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PatientRow {
    pub patient_key: String,
    pub split: String,
    /// Scored images of the patient.
    pub images: usize,
    /// Slice errors among them.
    pub errors: usize,
    pub error: f64,
    pub true_class: String,
    pub predicted_class: String,
    pub correct: bool,
    /// Scored images per true label and per predicted class (classes with none left out).
    pub true_counts: Ordered<usize>,
    pub predicted_counts: Ordered<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimingSection {
    /// Images read and predicted (the scored ones).
    pub images: usize,
    /// Reading the PNGs, windowing and inference.
    pub seconds: f64,
    pub images_per_s: f64,
    pub inference_seconds: f64,
    pub inference_images_per_s: f64,
    pub batch: usize,
    pub provider: String,
}

/// Everything [`Report::new`] is computed from.
pub struct Inputs<'a> {
    pub model: &'a Model,
    pub model_sha256: String,
    pub dataset: &'a Dataset,
    pub splits: &'a SplitSelection,
    /// Rows of the selected splits.
    pub selected: &'a [&'a Row],
    /// The rows scored (label among the classes), in the order of `probabilities`.
    pub scored: &'a [&'a Row],
    pub probabilities: &'a [Vec<f32>],
    pub timing: Timing,
    /// The grouping file (`--groups`), already checked to cover every selected row.
    pub grouping: Option<&'a Grouping>,
}

impl Report {
    pub fn new(inputs: Inputs) -> Report {
        let classes = inputs.model.info().classes.clone();
        let targets: Vec<usize> = inputs
            .scored
            .iter()
            .map(|r| classes.iter().position(|c| *c == r.label).unwrap_or(0))
            .collect();
        let slice = metrics::slice_metrics(inputs.probabilities, &targets, classes.len());
        let calibration = metrics::calibration(inputs.probabilities, &targets, ECE_BINS);
        let roc = (0..classes.len())
            .map(|c| {
                let scores: Vec<f64> = inputs
                    .probabilities
                    .iter()
                    .map(|p| f64::from(p[c]))
                    .collect();
                let positive: Vec<bool> = targets.iter().map(|&t| t == c).collect();
                metrics::roc_curve(&scores, &positive)
            })
            .collect();
        Report {
            format: FORMAT,
            created_by: concat!("anatomy-node ", env!("CARGO_PKG_VERSION")),
            model: model_section(inputs.model, inputs.model_sha256.clone()),
            dataset: dataset_section(inputs.dataset),
            splits: inputs
                .splits
                .splits()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            counts: counts(inputs.selected, &classes),
            slice: slice_section(&slice, &classes),
            calibration: calibration_section(&calibration),
            patient: patient_section(&inputs, &targets, &classes),
            timing: timing_section(&inputs.timing, inputs.model),
            groups: inputs.grouping.map(|g| {
                groups::group_section(
                    g,
                    inputs.selected,
                    inputs.scored,
                    inputs.probabilities,
                    &classes,
                )
            }),
            roc,
            predictions: inputs
                .scored
                .iter()
                .zip(inputs.probabilities)
                .map(|(row, p)| Prediction {
                    image: row.image.clone(),
                    patient_key: row.patient_key.clone(),
                    split: row.split.clone(),
                    label: row.label.clone(),
                    probabilities: p.clone(),
                })
                .collect(),
        }
    }

    /// Writes `predictions.csv`: image, patient_key, split, label, predicted, confidence,
    /// then one probability column per class (`p_<class>`).
    pub fn write_predictions(&self, path: &Path) -> io::Result<()> {
        let classes = &self.model.classes;
        let mut writer = csv::Writer::from_writer(io::BufWriter::new(std::fs::File::create(path)?));
        let mut header: Vec<String> = [
            "image",
            "patient_key",
            "split",
            "label",
            "predicted",
            "confidence",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        header.extend(classes.iter().map(|c| format!("p_{c}")));
        writer.write_record(&header)?;
        for p in &self.predictions {
            let best = metrics::argmax(&p.probabilities);
            let mut record = vec![
                p.image.clone(),
                p.patient_key.clone(),
                p.split.clone(),
                p.label.clone(),
                classes.get(best).cloned().unwrap_or_default(),
                p.probabilities[best].to_string(),
            ];
            record.extend(p.probabilities.iter().map(f32::to_string));
            writer.write_record(&record)?;
        }
        writer.flush()
    }

    /// Writes `metrics.json`, keys in the order of this file (pretty, newline at the end).
    pub fn write_json(&self, path: &Path) -> io::Result<()> {
        let mut file = io::BufWriter::new(std::fs::File::create(path)?);
        serde_json::to_writer_pretty(&mut file, self).map_err(io::Error::other)?;
        file.write_all(b"\n")?;
        file.flush()
    }
}

fn model_section(model: &Model, sha256: String) -> ModelSection {
    let info = model.info();
    ModelSection {
        file: model.path().display().to_string(),
        sha256,
        version: info.model_version.clone(),
        classes: info.classes.clone(),
        input_size: info.input_size,
        hu_window: info.hu_window.map(f64::from),
        normalization: info.normalization.clone(),
        temperature: info.temperature,
        trained_on: info.trained_on.clone(),
        provider: model.provider().to_string(),
    }
}

fn dataset_section(dataset: &Dataset) -> DatasetSection {
    let patients: BTreeSet<&str> = dataset
        .rows
        .iter()
        .map(|r| r.patient_key.as_str())
        .collect();
    DatasetSection {
        path: dataset.dir.display().to_string(),
        format: dataset.json.format.clone(),
        size: dataset.json.input_size,
        seed: dataset.json.seed,
        split_ratios: dataset.json.split_ratios.clone(),
        labels: dataset.json.labels_file.clone(),
        images: dataset.rows.len(),
        patients: patients.len(),
        manifest_sha256: dataset.manifest_sha256.clone(),
    }
}

/// Labels in a stable order: the model's classes first, then `ambiguous`, then the rest
/// alphabetically.
fn label_order(labels: &BTreeSet<&str>, classes: &[String]) -> Vec<String> {
    let mut order: Vec<String> = classes
        .iter()
        .filter(|c| labels.contains(c.as_str()))
        .cloned()
        .collect();
    if labels.contains(AMBIGUOUS) {
        order.push(AMBIGUOUS.to_string());
    }
    order.extend(
        labels
            .iter()
            .filter(|l| **l != AMBIGUOUS && !classes.iter().any(|c| c == *l))
            .map(|l| l.to_string()),
    );
    order
}

fn count_labels(rows: &[&Row], order: &[String]) -> Ordered<usize> {
    Ordered(
        order
            .iter()
            .map(|l| (l.clone(), rows.iter().filter(|r| r.label == *l).count()))
            .filter(|(_, n)| *n > 0)
            .collect(),
    )
}

fn counts(selected: &[&Row], classes: &[String]) -> Counts {
    let labels: BTreeSet<&str> = selected.iter().map(|r| r.label.as_str()).collect();
    let order = label_order(&labels, classes);
    let in_split = |split: &str| -> Vec<&Row> {
        selected
            .iter()
            .copied()
            .filter(|r| r.split == split)
            .collect()
    };
    let present: Vec<&str> = SPLITS
        .iter()
        .copied()
        .filter(|s| selected.iter().any(|r| r.split == *s))
        .collect();
    let foreign: Vec<String> = order
        .iter()
        .filter(|l| *l != AMBIGUOUS && !classes.contains(l))
        .cloned()
        .collect();
    let patients = |rows: &[&Row]| -> usize {
        rows.iter()
            .map(|r| r.patient_key.as_str())
            .collect::<BTreeSet<_>>()
            .len()
    };
    let scored = selected
        .iter()
        .filter(|r| classes.contains(&r.label))
        .count();
    let ambiguous = selected.iter().filter(|r| r.label == AMBIGUOUS).count();
    Counts {
        images: selected.len(),
        patients: patients(selected),
        scored,
        ambiguous,
        not_in_model: selected.len() - scored - ambiguous,
        not_in_model_labels: count_labels(selected, &foreign),
        per_class: count_labels(selected, &order),
        per_split: Ordered(
            present
                .iter()
                .map(|s| (s.to_string(), count_labels(&in_split(s), &order)))
                .collect(),
        ),
        patients_per_split: Ordered(
            present
                .iter()
                .map(|s| (s.to_string(), patients(&in_split(s))))
                .collect(),
        ),
    }
}

fn by_class<T: Clone>(classes: &[String], values: &[T]) -> Ordered<T> {
    Ordered(
        classes
            .iter()
            .cloned()
            .zip(values.iter().cloned())
            .collect(),
    )
}

fn slice_section(m: &metrics::SliceMetrics, classes: &[String]) -> SliceSection {
    let per_class_images: Vec<usize> = m.confusion.iter().map(|row| row.iter().sum()).collect();
    let undefined = classes
        .iter()
        .zip(&m.auc)
        .zip(&per_class_images)
        .filter(|((_, auc), _)| auc.is_none())
        .map(|((c, _), &n)| {
            let why = if n == 0 {
                "no positives"
            } else {
                "no negatives"
            };
            (c.clone(), why.to_string())
        })
        .collect();
    SliceSection {
        images: m.images,
        errors: m.errors,
        error: m.error,
        accuracy: 1.0 - m.error,
        nll: m.nll,
        auc_definition: AUC_DEFINITION,
        auc: by_class(classes, &m.auc),
        mean_auc: m.mean_auc,
        mean_auc_classes: classes
            .iter()
            .zip(&m.auc)
            .filter(|(_, a)| a.is_some())
            .map(|(c, _)| c.clone())
            .collect(),
        auc_undefined: Ordered(undefined),
        per_class_error: by_class(classes, &m.per_class_error()),
        per_class_images: by_class(classes, &per_class_images),
        confusion: Confusion {
            rows: "true",
            columns: "predicted",
            classes: classes.to_vec(),
            matrix: m.confusion.clone(),
        },
    }
}

fn calibration_section(c: &metrics::Calibration) -> CalibrationSection {
    let row = |b: &Bin| BinRow {
        lower: b.lower,
        upper: b.upper,
        images: b.images,
        accuracy: b.accuracy,
        confidence: b.confidence,
        gap: b.accuracy.zip(b.confidence).map(|(a, c)| a - c),
    };
    CalibrationSection {
        ece: c.ece,
        bins: c.bins.len(),
        binning: BINNING,
        reliability: c.bins.iter().map(row).collect(),
    }
}

fn patient_section(inputs: &Inputs, targets: &[usize], classes: &[String]) -> PatientSection {
    // patients in split order, then by key
    let split_rank = |s: &str| SPLITS.iter().position(|x| *x == s).unwrap_or(SPLITS.len());
    let mut keys: BTreeMap<(usize, &str), &str> = BTreeMap::new();
    for row in inputs.scored {
        keys.entry((split_rank(&row.split), row.patient_key.as_str()))
            .or_insert(row.split.as_str());
    }
    let ordered: Vec<(&str, &str)> = keys
        .iter()
        .map(|((_, key), split)| (*key, *split))
        .collect();
    let index: BTreeMap<&str, usize> = ordered
        .iter()
        .enumerate()
        .map(|(i, (k, _))| (*k, i))
        .collect();
    let patient_of: Vec<usize> = inputs
        .scored
        .iter()
        .map(|r| index.get(r.patient_key.as_str()).copied().unwrap_or(0))
        .collect();
    let results = metrics::patients(inputs.probabilities, targets, &patient_of, classes.len());
    let nonzero = |counts: &[usize]| {
        Ordered(
            classes
                .iter()
                .zip(counts)
                .filter(|(_, n)| **n > 0)
                .map(|(c, n)| (c.clone(), *n))
                .collect(),
        )
    };
    let per_patient: Vec<PatientRow> = results
        .iter()
        .map(|p| PatientRow {
            patient_key: ordered[p.patient].0.to_string(),
            split: ordered[p.patient].1.to_string(),
            images: p.images,
            errors: p.errors,
            error: p.error(),
            true_class: classes[p.true_class].clone(),
            predicted_class: classes[p.predicted_class].clone(),
            correct: p.correct(),
            true_counts: nonzero(&p.true_counts),
            predicted_counts: nonzero(&p.predicted_counts),
        })
        .collect();
    let n = per_patient.len().max(1) as f64;
    let errors = per_patient.iter().filter(|p| !p.correct).count();
    let with_slice_errors = per_patient.iter().filter(|p| p.errors > 0).count();
    let error = errors as f64 / n;
    PatientSection {
        method: PATIENT_METHOD,
        rule: PATIENT_RULE,
        patients: per_patient.len(),
        errors,
        error,
        accuracy: 1.0 - error,
        with_slice_errors,
        any_slice_error: with_slice_errors as f64 / n,
        mean_slice_error: per_patient.iter().map(|p| p.error).sum::<f64>() / n,
        per_patient,
    }
}

fn rate(images: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        images as f64 / seconds
    } else {
        0.0
    }
}

fn timing_section(t: &Timing, model: &Model) -> TimingSection {
    let (seconds, inference) = (t.total.as_secs_f64(), t.inference.as_secs_f64());
    TimingSection {
        images: t.images,
        seconds,
        images_per_s: rate(t.images, seconds),
        inference_seconds: inference,
        inference_images_per_s: rate(t.images, inference),
        batch: t.batch,
        provider: model.provider().to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// The summary on stdout

fn percent(x: f64) -> String {
    format!("{:.2} %", 100.0 * x)
}

fn opt3(x: Option<f64>) -> String {
    x.map_or_else(|| "n/a".to_string(), |v| format!("{v:.4}"))
}

fn list(map: &Ordered<usize>) -> String {
    let parts: Vec<String> = map.0.iter().map(|(k, n)| format!("{k} {n}")).collect();
    parts.join(", ")
}

impl Report {
    /// The human-readable summary (what `anatomy-node eval` prints).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        self.write_header(&mut s);
        self.write_slices(&mut s);
        self.write_confusion(&mut s);
        self.write_calibration(&mut s);
        self.write_patients(&mut s);
        if let Some(groups) = &self.groups {
            s.push_str(&groups.summary());
        }
        let t = &self.timing;
        let _ = writeln!(
            s,
            "speed:    {} images in {:.2} s: {:.1} images/s (PNG, window, inference; inference alone {:.1} images/s, batch {}, {})",
            t.images, t.seconds, t.images_per_s, t.inference_images_per_s, t.batch, t.provider
        );
        s
    }

    fn write_header(&self, s: &mut String) {
        let m = &self.model;
        let temperature = m
            .temperature
            .map_or_else(|| "none".to_string(), |t| t.to_string());
        let _ = writeln!(
            s,
            "model:    {} (version {}, sha256 {}…)\n          classes {}; input {}×{}; window [{}, {}] HU; temperature {temperature}; {}",
            m.file,
            m.version,
            &m.sha256[..m.sha256.len().min(12)],
            m.classes.join(", "),
            m.input_size,
            m.input_size,
            m.hu_window[0],
            m.hu_window[1],
            m.provider
        );
        let c = &self.counts;
        let _ = writeln!(
            s,
            "dataset:  {} — split {}: {} images of {} patients; {} scored, {} ambiguous, {} not among the model's classes{}",
            self.dataset.path,
            self.splits.join(","),
            c.images,
            c.patients,
            c.scored,
            c.ambiguous,
            c.not_in_model,
            if c.not_in_model > 0 { format!(" ({})", list(&c.not_in_model_labels)) } else { String::new() }
        );
        for (split, labels) in &c.per_split.0 {
            let patients = c.patients_per_split.get(split).copied().unwrap_or(0);
            let _ = writeln!(
                s,
                "          {split:5}: patients {patients}; {}",
                list(labels)
            );
        }
    }

    fn write_slices(&self, s: &mut String) {
        let sl = &self.slice;
        let _ = writeln!(
            s,
            "slices:   {} scored: error {} ({} wrong), accuracy {}, NLL {:.4}",
            sl.images,
            percent(sl.error),
            sl.errors,
            percent(sl.accuracy),
            sl.nll
        );
        let aucs: Vec<String> = sl
            .auc
            .0
            .iter()
            .map(|(c, a)| format!("{c} {}", opt3(*a)))
            .collect();
        let _ = writeln!(
            s,
            "AUC:      {} (one-vs-rest, Mann-Whitney)",
            aucs.join("  ")
        );
        let left_out = if sl.auc_undefined.0.is_empty() {
            String::new()
        } else {
            let why: Vec<String> = sl
                .auc_undefined
                .0
                .iter()
                .map(|(c, w)| format!("{c}: {w}"))
                .collect();
            format!("; left out: {}", why.join(", "))
        };
        let _ = writeln!(
            s,
            "          mean {} over {} classes{left_out}",
            opt3(sl.mean_auc),
            sl.mean_auc_classes.len()
        );
    }

    fn write_confusion(&self, s: &mut String) {
        let classes = &self.slice.confusion.classes;
        let width = classes.iter().map(String::len).max().unwrap_or(4).max(7) + 1;
        let _ = write!(
            s,
            "confusion (rows true, columns predicted):\n{:>w$}",
            "",
            w = width + 2
        );
        for c in classes {
            let _ = write!(s, "{c:>width$}");
        }
        let _ = writeln!(s);
        for (c, row) in classes.iter().zip(&self.slice.confusion.matrix) {
            let _ = write!(s, "  {c:<width$}");
            for n in row {
                let _ = write!(s, "{n:>width$}");
            }
            let _ = writeln!(s);
        }
    }

    fn write_calibration(&self, s: &mut String) {
        let c = &self.calibration;
        let _ = writeln!(
            s,
            "calibration: ECE {:.4} ({} equal-width confidence bins, (i/15, (i+1)/15]); reliability:",
            c.ece, c.bins
        );
        let _ = writeln!(
            s,
            "  {:<14}  {:>6}  {:>8}  {:>10}  {:>7}",
            "bin", "images", "accuracy", "mean conf.", "gap"
        );
        for b in c.reliability.iter().filter(|b| b.images > 0) {
            let _ = writeln!(
                s,
                "  ({:.3}, {:.3}]  {:>6}  {:>8.4}  {:>10.4}  {:>+7.4}",
                b.lower,
                b.upper,
                b.images,
                b.accuracy.unwrap_or(0.0),
                b.confidence.unwrap_or(0.0),
                b.gap.unwrap_or(0.0)
            );
        }
    }

    fn write_patients(&self, s: &mut String) {
        let p = &self.patient;
        let _ = writeln!(
            s,
            "patients: {} scored: error {} ({} wrong), by majority vote of the slices; \
             {} with a wrong slice ({}), mean slice error per patient {}",
            p.patients,
            percent(p.error),
            p.errors,
            p.with_slice_errors,
            percent(p.any_slice_error),
            percent(p.mean_slice_error)
        );
        // with --groups, patients are named by their case id
        let name = |key: &str| -> String {
            self.groups
                .as_ref()
                .and_then(|g| g.case_of.get(key))
                .cloned()
                .unwrap_or_else(|| key.to_string())
        };
        let width = p
            .per_patient
            .iter()
            .map(|r| name(&r.patient_key).chars().count())
            .max()
            .unwrap_or(0)
            .max(16);
        let _ = writeln!(
            s,
            "  {:<width$}  {:<5}  {:>6}  {:>6}  {:>8}  {:<10}  predicted",
            "patient", "split", "images", "wrong", "error", "true"
        );
        let mut rows: Vec<&PatientRow> = p.per_patient.iter().collect();
        rows.sort_by(|a, b| {
            b.error
                .total_cmp(&a.error)
                .then(a.patient_key.cmp(&b.patient_key))
        });
        for r in rows {
            let line = format!(
                "  {:<width$}  {:<5}  {:>6}  {:>6}  {:>8}  {:<10}  {:<10}{}",
                name(&r.patient_key),
                r.split,
                r.images,
                r.errors,
                percent(r.error),
                r.true_class,
                r.predicted_class,
                if r.correct { "" } else { "  ✗" }
            );
            let _ = writeln!(s, "{}", line.trim_end());
        }
    }
}
