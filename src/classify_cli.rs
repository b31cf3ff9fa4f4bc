//! `anatomy-node classify`: label the CT images of files and folders on disk, without a
//! server, through the code the node runs: [`select`] (every axial CT image, no key-image
//! sampling), [`label_images`], then [`coverage::coverage`] per series.
//!
//! Files that cannot be used (not DICOM, not CT, not axial, localizers, undecodable pixel
//! data, unsupported transfer syntax) are reported with the reason and the rest go on; only
//! model problems stop the command. [`classify_paths`] does the work and returns a
//! [`Report`]; [`run`] prints it as tables or JSON lines.

use std::collections::{HashMap, HashSet};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use dicom_core::VR;
use dicom_dictionary_std::tags;
use dicom_object::{InMemDicomObject, OpenFileOptions};
use rayon::prelude::*;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::anatomy::classify::{label_images, ClassifyError, LabelOptions, LabelledImage, Timings};
use crate::anatomy::coverage::{self, argmax, Coverage, CoverageRules, Labelled, Range, Region};
use crate::anatomy::model::{init_runtime, Model, ModelError};
use crate::anatomy::pixels::PixelError;
use crate::anatomy::select::{
    self, is_ct_image_class, Instance, KeyImage, KeyImageCount, Selection, SelectionRules,
};
use crate::config::{ClassifierConfig, Config};

/// Command-line arguments of `anatomy-node classify`.
#[derive(Debug, Clone, clap::Args)]
pub struct ClassifyArgs {
    /// Configuration file (TOML); its [classifier] section names the model, the ONNX
    /// Runtime library, the device and the coverage rules. Without it the defaults apply.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// One JSON object per line: each image, each series, each file that cannot be used.
    #[arg(long)]
    pub json: bool,
    /// DICOM files, or folders searched recursively.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

/// Why a file (or a frame of it) is not labelled.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Unusable {
    pub file: PathBuf,
    pub sop_instance_uid: Option<String>,
    pub series_uid: Option<String>,
    /// The frame, where the reason concerns one frame only.
    pub frame: Option<u32>,
    pub reason: String,
}

/// A labelled image with its own label (the model's most probable class) and the label
/// decoded along z in the body's order (what the series' ranges are made of).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageReport {
    pub image: LabelledImage,
    pub label: String,
    pub decoded_label: String,
}

/// One series: its labelled images head to foot and their coverage, or why none was
/// labelled.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesReport {
    pub series_uid: String,
    pub images: Vec<ImageReport>,
    /// `None` when no image of the series was labelled.
    pub coverage: Option<Coverage>,
    /// Why no image was labelled.
    pub not_labelled: Option<String>,
}

/// What [`classify_paths`] found.
#[derive(Debug, Clone)]
pub struct Report {
    pub classes: Vec<String>,
    /// Files found under the paths given.
    pub files: usize,
    /// Series in the order their first file was found.
    pub series: Vec<SeriesReport>,
    pub unusable: Vec<Unusable>,
    pub timings: Timings,
}

impl Report {
    pub fn labelled_images(&self) -> usize {
        self.series.iter().map(|s| s.images.len()).sum()
    }
}

/// A file that is a CT instance, read the way the index sees it (attributes as stored).
#[derive(Debug, Clone)]
pub struct FileInstance {
    pub instance: Instance,
    pub series_uid: String,
}

/// Why a file is not a CT instance at all.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read: {0}")]
    Io(String),
    #[error("not a DICOM file: {0}")]
    NotDicom(String),
    /// A DICOM file whose data set this build cannot even parse (unknown syntax, Deflate
    /// without support, ...).
    #[error("transfer syntax {uid} cannot be read: {reason}")]
    UnsupportedTransferSyntax { uid: String, reason: String },
    #[error("not a CT image (SOP Class {sop_class}, Modality {modality})")]
    NotCt { sop_class: String, modality: String },
    #[error("missing {0}")]
    MissingAttribute(&'static str),
}

/// The command: load the model, classify, print; fails when the model cannot be used or
/// no image at all was labelled.
pub fn run(config: &Config, args: &ClassifyArgs) -> anyhow::Result<()> {
    let model = load_model(&config.classifier)?;
    let report = classify_paths(&model, &args.paths, &config.classifier)
        .context("classifying the images")?;
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    if args.json {
        write_json(&mut out, &report).context("writing to stdout")?;
    } else {
        report_unusable(&report);
        write_tables(&mut out, &report, &model).context("writing to stdout")?;
    }
    out.flush().context("writing to stdout")?;
    eprintln!("{}", summary_line(&report, &model));
    if report.labelled_images() == 0 {
        anyhow::bail!(
            "no image was labelled: none of the {} files found is an axial CT image that decodes \
             (reasons above)",
            report.files
        );
    }
    Ok(())
}

/// The model of `[classifier]`, on its ONNX Runtime library (`onnxruntime_library`, else
/// `ORT_DYLIB_PATH`, else the defaults of [`crate::anatomy::model::init_runtime`]).
pub fn load_model(settings: &ClassifierConfig) -> Result<Model, ModelError> {
    init_runtime(settings.onnxruntime_library.as_deref())?;
    Ok(
        Model::load(&settings.model, settings.device, settings.threads)?
            .with_max_batch(settings.max_batch),
    )
}

/// Labels every axial CT image (every frame) under `paths`, series by series, with the
/// selection and coverage rules of `settings`.
pub fn classify_paths(
    model: &Model,
    paths: &[PathBuf],
    settings: &ClassifierConfig,
) -> Result<Report, ClassifyError> {
    let (files, mut unusable) = find_files(paths);
    let (series, not_instances) = read_series(&files);
    unusable.extend(not_instances);
    let rules = SelectionRules {
        key_images: KeyImageCount::All,
        axial_tolerance_deg: settings.axial_tolerance_deg,
    };
    let plans: Vec<SeriesPlan> = series.iter().map(|s| plan_series(s, &rules)).collect();
    for plan in &plans {
        unusable.extend(plan.unused.iter().cloned());
    }
    let all: Vec<KeyImage> = plans.iter().flat_map(|p| p.key_images.clone()).collect();
    let options = LabelOptions {
        threads: settings.threads,
        axial_tolerance_deg: settings.axial_tolerance_deg,
    };
    let labelling = label_images(model, &all, &options)?;
    unusable.extend(undecodable(&plans, &labelling.failed));
    let classes = model.info().classes.clone();
    let coverage_rules = crate::anatomy::worker::coverage_rules(settings);
    let series = series_reports(&plans, labelling.labelled, &classes, &coverage_rules);
    Ok(Report {
        classes,
        files: files.len(),
        series,
        unusable,
        timings: labelling.timings,
    })
}

// ---------------------------------------------------------------------------------------
// Finding and reading files

/// Files named, and files in folders named (recursively, in name order). Links to files
/// are followed; links to folders are not (they could loop), and are reported.
fn find_files(paths: &[PathBuf]) -> (Vec<PathBuf>, Vec<Unusable>) {
    let mut files = Vec::new();
    let mut unusable = Vec::new();
    for path in paths {
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => walk(path, &mut files, &mut unusable),
            Ok(_) => files.push(path.clone()),
            Err(e) => unusable.push(file_problem(path, format!("cannot read: {e}"))),
        }
    }
    // The same file named twice (a folder and a file in it) is classified once.
    let mut seen = HashSet::new();
    files.retain(|f| seen.insert(f.canonicalize().unwrap_or_else(|_| f.clone())));
    (files, unusable)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>, unusable: &mut Vec<Unusable>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => return unusable.push(file_problem(dir, format!("cannot read folder: {e}"))),
    };
    let mut paths: Vec<(PathBuf, Option<std::fs::FileType>)> = entries
        .flatten()
        .map(|e| (e.path(), e.file_type().ok()))
        .collect();
    paths.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, kind) in paths {
        match kind {
            Some(k) if k.is_dir() => walk(&path, files, unusable),
            Some(k) if k.is_symlink() => match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() => unusable.push(file_problem(
                    &path,
                    "link to a folder, not followed (name the folder itself)".into(),
                )),
                Ok(_) => files.push(path),
                Err(e) => unusable.push(file_problem(&path, format!("broken link: {e}"))),
            },
            _ => files.push(path),
        }
    }
}

fn file_problem(path: &Path, reason: String) -> Unusable {
    Unusable {
        file: path.to_path_buf(),
        sop_instance_uid: None,
        series_uid: None,
        frame: None,
        reason,
    }
}

/// A series: its UID and its CT instances, in the order the files were found.
struct SeriesFiles {
    series_uid: String,
    instances: Vec<Instance>,
}

/// The CT instances of `files` by series (series in the order first found), and the files
/// that are not CT instances.
fn read_series(files: &[PathBuf]) -> (Vec<SeriesFiles>, Vec<Unusable>) {
    let read: Vec<Result<FileInstance, ReadError>> =
        files.par_iter().map(|f| read_instance(f)).collect();
    let mut series: Vec<SeriesFiles> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut unusable = Vec::new();
    for (file, result) in files.iter().zip(read) {
        match result {
            Ok(found) => {
                let at = *index.entry(found.series_uid.clone()).or_insert_with(|| {
                    series.push(SeriesFiles {
                        series_uid: found.series_uid.clone(),
                        instances: Vec::new(),
                    });
                    series.len() - 1
                });
                series[at].instances.push(found.instance);
            }
            Err(e) => unusable.push(file_problem(file, e.to_string())),
        }
    }
    (series, unusable)
}

/// Reads the attributes the selection needs from a file, without its pixel data.
pub fn read_instance(path: &Path) -> Result<FileInstance, ReadError> {
    let obj = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .map_err(|e| open_error(path, &e))?;
    let sop_class = text(&obj, tags::SOP_CLASS_UID)
        .unwrap_or_else(|| obj.meta().media_storage_sop_class_uid().to_string())
        .trim_end_matches(['\0', ' '])
        .to_string();
    if !is_ct_image_class(&sop_class) {
        return Err(ReadError::NotCt {
            sop_class,
            modality: text(&obj, tags::MODALITY).unwrap_or_else(|| "absent".into()),
        });
    }
    let required = |tag, name| text(&obj, tag).ok_or(ReadError::MissingAttribute(name));
    let instance = Instance {
        sop_instance_uid: required(tags::SOP_INSTANCE_UID, "SOP Instance UID")?,
        sop_class_uid: sop_class,
        path: path.to_path_buf(),
        image_type: text(&obj, tags::IMAGE_TYPE),
        image_position: text(&obj, tags::IMAGE_POSITION_PATIENT),
        image_orientation: text(&obj, tags::IMAGE_ORIENTATION_PATIENT),
        number_of_frames: integer(&obj, tags::NUMBER_OF_FRAMES),
        instance_number: integer(&obj, tags::INSTANCE_NUMBER),
    };
    Ok(FileInstance {
        series_uid: required(tags::SERIES_INSTANCE_UID, "Series Instance UID")?,
        instance,
    })
}

/// A file that does not open: gone or unreadable is an I/O problem, anything else means
/// the bytes are not DICOM.
fn open_error(path: &Path, e: &dicom_object::ReadError) -> ReadError {
    if let Err(io) = std::fs::File::open(path) {
        return ReadError::Io(io.to_string());
    }
    use dicom_object::ReadError as R;
    match e {
        R::ReadUnrecognizedTransferSyntax { uid, .. } => {
            return ReadError::UnsupportedTransferSyntax {
                uid: uid.trim_end_matches(['\0', ' ']).to_string(),
                reason: "unknown transfer syntax".into(),
            }
        }
        R::ReadUnsupportedTransferSyntax { uid, .. }
        | R::ReadUnsupportedTransferSyntaxWithSuggestion { uid, .. } => {
            return ReadError::UnsupportedTransferSyntax {
                uid: uid.to_string(),
                reason: e.to_string(),
            }
        }
        _ => {}
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    ReadError::NotDicom(text)
}

/// A value as stored (multiple values joined by `\`), without padding; `None` when absent
/// or empty. Every attribute read here has a text VR, so a value written as UN (an Explicit
/// VR file from a tool that did not know the tag) is its bytes read as text.
fn text(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<String> {
    let element = obj.element(tag).ok()?;
    let value = if element.vr() == VR::UN {
        String::from_utf8_lossy(&element.to_bytes().ok()?).into_owned()
    } else {
        element.to_str().ok()?.into_owned()
    };
    let value = value.trim_matches(['\0', ' ']);
    (!value.is_empty()).then(|| value.to_string())
}

fn integer(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<i64> {
    text(obj, tag)?.parse().ok()
}

// ---------------------------------------------------------------------------------------
// Selection per series

struct SeriesPlan {
    series_uid: String,
    /// Head to foot.
    key_images: Vec<KeyImage>,
    /// Why the selection is empty.
    skipped: Option<String>,
    unused: Vec<Unusable>,
}

/// The series' axial images (all of them), and why each other file is left out.
fn plan_series(series: &SeriesFiles, rules: &SelectionRules) -> SeriesPlan {
    let selection = select::select(&series.instances, rules);
    let (key_images, skipped) = match selection {
        Selection::Selected { key_images, .. } => (key_images, None),
        Selection::Skipped { reason } => (Vec::new(), Some(reason)),
    };
    let used: HashSet<&Path> = key_images.iter().map(|k| k.path.as_path()).collect();
    let unused = series
        .instances
        .iter()
        .filter(|i| !used.contains(i.path.as_path()))
        .map(|i| Unusable {
            file: i.path.clone(),
            sop_instance_uid: Some(i.sop_instance_uid.clone()),
            series_uid: Some(series.series_uid.clone()),
            frame: None,
            reason: why_not_selected(i, &key_images, rules),
        })
        .collect();
    SeriesPlan {
        series_uid: series.series_uid.clone(),
        key_images,
        skipped,
        unused,
    }
}

/// The selection's own reason for one instance: alone it is either refused (localizer, not
/// axial, ...), or usable and left out of the series because another image has its position
/// or because the series has ORIGINAL images and this one is DERIVED.
fn why_not_selected(instance: &Instance, kept: &[KeyImage], rules: &SelectionRules) -> String {
    match select::select(std::slice::from_ref(instance), rules) {
        Selection::Skipped { reason } => reason,
        Selection::Selected { key_images, .. } => {
            let twin = key_images.iter().find_map(|mine| {
                kept.iter()
                    .find(|k| (k.z_mm - mine.z_mm).abs() < 0.01)
                    .map(|k| (mine.z_mm, k))
            });
            match twin {
                Some((z, k)) => format!(
                    "same position (z = {z} mm) as SOP Instance {}{}, which is labelled instead",
                    k.sop_instance_uid,
                    frame_note(k)
                ),
                None => "DERIVED image: the series has ORIGINAL axial images and only those are \
                         labelled"
                    .into(),
            }
        }
    }
}

fn frame_note(k: &KeyImage) -> String {
    if k.frame == 0 {
        String::new()
    } else {
        format!(" frame {}", k.frame)
    }
}

/// One line per file that failed to decode (all its frames share the error).
fn undecodable(plans: &[SeriesPlan], failed: &[(KeyImage, PixelError)]) -> Vec<Unusable> {
    let series_of: HashMap<&Path, &str> = plans
        .iter()
        .flat_map(|p| {
            p.key_images
                .iter()
                .map(|k| (k.path.as_path(), p.series_uid.as_str()))
        })
        .collect();
    let mut seen = HashSet::new();
    failed
        .iter()
        .filter(|(k, _)| seen.insert(k.path.clone()))
        .map(|(k, e)| {
            let frames = failed.iter().filter(|(f, _)| f.path == k.path).count();
            Unusable {
                file: k.path.clone(),
                sop_instance_uid: Some(k.sop_instance_uid.clone()),
                series_uid: series_of.get(k.path.as_path()).map(|s| s.to_string()),
                frame: (frames == 1 && k.frame > 0).then_some(k.frame),
                reason: e.kind.to_string(),
            }
        })
        .collect()
}

/// Labelled images back to their series, with each series' coverage.
fn series_reports(
    plans: &[SeriesPlan],
    labelled: Vec<LabelledImage>,
    classes: &[String],
    rules: &CoverageRules,
) -> Vec<SeriesReport> {
    let series_of: HashMap<(&Path, u32), usize> = plans
        .iter()
        .enumerate()
        .flat_map(|(s, p)| {
            p.key_images
                .iter()
                .map(move |k| ((k.path.as_path(), k.frame), s))
        })
        .collect();
    let mut per_series: Vec<Vec<LabelledImage>> = vec![Vec::new(); plans.len()];
    for image in labelled {
        if let Some(&s) = series_of.get(&(image.path.as_path(), image.frame)) {
            per_series[s].push(image);
        }
    }
    plans
        .iter()
        .zip(per_series)
        .map(|(plan, images)| series_report(plan, images, classes, rules))
        .collect()
}

fn series_report(
    plan: &SeriesPlan,
    images: Vec<LabelledImage>,
    classes: &[String],
    rules: &CoverageRules,
) -> SeriesReport {
    if images.is_empty() {
        let reason = plan.skipped.clone().unwrap_or_else(|| {
            format!(
                "none of its {} axial images could be decoded",
                plan.key_images.len()
            )
        });
        return SeriesReport {
            series_uid: plan.series_uid.clone(),
            images: Vec::new(),
            coverage: None,
            not_labelled: Some(reason),
        };
    }
    // Images are in the selection's order, head to foot, as coverage needs.
    let along_z: Vec<Labelled> = images
        .iter()
        .map(|i| Labelled {
            z_mm: i.z_mm,
            probabilities: i.probabilities.clone(),
        })
        .collect();
    let cover = coverage::coverage(&along_z, classes, rules);
    let images = images
        .into_iter()
        .zip(&cover.labels)
        .map(|(image, decoded)| ImageReport {
            label: classes
                .get(argmax(&image.probabilities))
                .cloned()
                .unwrap_or_default(),
            decoded_label: decoded.clone(),
            image,
        })
        .collect();
    SeriesReport {
        series_uid: plan.series_uid.clone(),
        images,
        coverage: Some(cover),
        not_labelled: None,
    }
}

// ---------------------------------------------------------------------------------------
// Output

/// Class probabilities as a JSON object in the model's class order (f32 printed short).
struct ClassProbabilities<'a> {
    classes: &'a [String],
    values: &'a [f32],
}

impl Serialize for ClassProbabilities<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.values.len()))?;
        for (class, p) in self.classes.iter().zip(self.values) {
            map.serialize_entry(class, p)?;
        }
        map.end()
    }
}

#[derive(Serialize)]
struct ImageLine<'a> {
    record: &'static str,
    series_uid: &'a str,
    sop_instance_uid: &'a str,
    file: String,
    frame: u32,
    z_mm: f64,
    label: &'a str,
    decoded_label: &'a str,
    probabilities: ClassProbabilities<'a>,
}

#[derive(Serialize)]
struct SeriesLine<'a> {
    record: &'static str,
    series_uid: &'a str,
    images: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    coverage: Option<&'a [Range]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    decoding: Option<coverage::Decoding>,
    #[serde(skip_serializing_if = "Option::is_none")]
    decoding_note: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dominant_class: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_part_examined: Option<Option<&'static str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    anatomic_regions: Option<&'a [Region]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

#[derive(Serialize)]
struct ErrorLine<'a> {
    record: &'static str,
    file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    series_uid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sop_instance_uid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frame: Option<u32>,
    error: &'a str,
}

fn write_line(out: &mut impl Write, line: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *out, line)?;
    out.write_all(b"\n")
}

/// JSON lines: files outside any series first, then per series its unusable files, its
/// images head to foot and the series line.
fn write_json(out: &mut impl Write, report: &Report) -> io::Result<()> {
    for u in report.unusable.iter().filter(|u| u.series_uid.is_none()) {
        write_line(out, &error_line(u))?;
    }
    for series in &report.series {
        let mine = |u: &&Unusable| u.series_uid.as_deref() == Some(series.series_uid.as_str());
        for u in report.unusable.iter().filter(mine) {
            write_line(out, &error_line(u))?;
        }
        for image in &series.images {
            write_line(out, &image_line(&series.series_uid, image, &report.classes))?;
        }
        write_line(out, &series_line(series))?;
    }
    Ok(())
}

fn error_line(u: &Unusable) -> ErrorLine<'_> {
    ErrorLine {
        record: "error",
        file: u.file.display().to_string(),
        series_uid: u.series_uid.as_deref(),
        sop_instance_uid: u.sop_instance_uid.as_deref(),
        frame: u.frame,
        error: &u.reason,
    }
}

fn image_line<'a>(series_uid: &'a str, i: &'a ImageReport, classes: &'a [String]) -> ImageLine<'a> {
    ImageLine {
        record: "image",
        series_uid,
        sop_instance_uid: &i.image.sop_instance_uid,
        file: i.image.path.display().to_string(),
        frame: i.image.frame,
        z_mm: i.image.z_mm,
        label: &i.label,
        decoded_label: &i.decoded_label,
        probabilities: ClassProbabilities {
            classes,
            values: &i.image.probabilities,
        },
    }
}

fn series_line(series: &SeriesReport) -> SeriesLine<'_> {
    let cover = series.coverage.as_ref();
    SeriesLine {
        record: "series",
        series_uid: &series.series_uid,
        images: series.images.len(),
        coverage: cover.map(|c| c.ranges.as_slice()),
        decoding: cover.map(|c| c.decoding),
        decoding_note: cover.and_then(|c| c.decoding_note.as_deref()),
        dominant_class: cover.and_then(|c| c.dominant_class.as_deref()),
        body_part_examined: cover.map(|c| c.body_part_examined.map(|r| r.body_part)),
        anatomic_regions: cover.map(|c| c.regions.as_slice()),
        error: series.not_labelled.as_deref(),
    }
}

/// Unusable files on stderr, one line each.
fn report_unusable(report: &Report) {
    for u in &report.unusable {
        let frame = u.frame.map(|f| format!(" frame {f}")).unwrap_or_default();
        eprintln!("not labelled: {}{frame}: {}", u.file.display(), u.reason);
    }
}

/// A table of z-ranges per series, then its dominant class and DICOM terms.
fn write_tables(out: &mut impl Write, report: &Report, model: &Model) -> io::Result<()> {
    let info = model.info();
    writeln!(
        out,
        "model {} ({}; classes {})",
        info.model_version,
        model.provider(),
        report.classes.join(", ")
    )?;
    for series in &report.series {
        writeln!(out)?;
        writeln!(out, "series {}", series.series_uid)?;
        let Some(cover) = &series.coverage else {
            writeln!(
                out,
                "  not labelled: {}",
                series.not_labelled.as_deref().unwrap_or("no image")
            )?;
            continue;
        };
        let n = count(series.images.len(), "image");
        let how = match cover.decoding {
            coverage::Decoding::Order => "labels decoded in the body's order along z",
            coverage::Decoding::None => "each image's own label",
        };
        writeln!(out, "  {n} labelled, head to foot ({how})")?;
        if let Some(note) = &cover.decoding_note {
            writeln!(out, "  {note}")?;
        }
        writeln!(
            out,
            "  {:>11}  {:>11}  {:>6}  class",
            "z from (mm)", "z to (mm)", "images"
        )?;
        for r in &cover.ranges {
            writeln!(
                out,
                "  {:>11.1}  {:>11.1}  {:>6}  {}",
                r.z_from_mm, r.z_to_mm, r.images, r.class
            )?;
        }
        writeln!(
            out,
            "  dominant class: {}",
            cover.dominant_class.as_deref().unwrap_or("-")
        )?;
        let term = cover
            .body_part_examined
            .map_or("(none: no region of the five classes)", |r| r.body_part);
        writeln!(out, "  Body Part Examined: {term}")?;
        let regions: Vec<String> = cover
            .regions
            .iter()
            .map(|r| {
                format!(
                    "({}, {}, \"{}\")",
                    r.code_value, r.coding_scheme, r.code_meaning
                )
            })
            .collect();
        if !regions.is_empty() {
            writeln!(out, "  Anatomic Region Sequence: {}", regions.join(", "))?;
        }
    }
    Ok(())
}

fn summary_line(report: &Report, model: &Model) -> String {
    let t = &report.timings;
    let labelled_series = report
        .series
        .iter()
        .filter(|s| s.coverage.is_some())
        .count();
    format!(
        "labelled {} of {labelled_series} series from {} files ({} not used) in {:.2} s: \
         decoding {:.0} ms and preparing {:.0} ms (summed over threads), inference {:.0} ms on {}",
        count(report.labelled_images(), "image"),
        report.files,
        report.unusable.len(),
        t.total_ms / 1000.0,
        t.decode_ms,
        t.preprocess_ms,
        t.infer_ms,
        model.provider()
    )
}

/// `1 image`, `2 images`.
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}
