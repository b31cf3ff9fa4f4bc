//! From labelled images to dataset rows: retrieve them series by series, decode them to HU,
//! preprocess them as the classifier does, and write the PNG files.
//!
//! An image that does not become a row is counted under a reason (a `String`: the key of
//! `Stats::images_skipped`, worded for people); a study's retrieval failure is a
//! [`MineError`], after which what arrived is still kept.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dicom_dictionary_std::{tags, uids};
use dicom_object::OpenFileOptions;

use super::summary::add;
use super::{MineError, Miner, Patient, LOCATE_CHUNK};
use crate::anatomy::pixels::{self, Framing, Preprocessing};
use crate::anatomy::select::{self, Instance, KeyImageCount, Selection, SelectionRules};
use crate::dataset::ManifestRow;
use crate::mine::archive::{Level, Query};
use crate::mine::labels::Decision;
use crate::mine::output::{self, Output};
use crate::mine::state::MinedRow;

/// Why an image did not become a row (a key of `Stats::images_skipped`).
type SkipReason = String;

/// A decoded frame: HU pixels at the dataset's size, its z (mm), and whether it came from
/// a multi-frame image (which names the PNG file).
type Converted = Result<(Vec<f32>, Option<f64>, bool), SkipReason>;

impl Miner {
    /// Retrieve the labelled images series by series and write them into the dataset:
    /// the rows made, and the first failure (what arrived before it is kept).
    pub(super) async fn retrieve_and_convert(
        &self,
        uid: &str,
        patient: &Patient,
        todo: Vec<Decision>,
    ) -> Result<(Vec<MinedRow>, Option<MineError>), MineError> {
        let todo = self.locate_series(uid, todo).await?;
        let mut rows = Vec::new();
        let mut failure = None;
        for (series, decisions) in by_series(todo) {
            if self.stop.is_cancelled() && failure.is_none() {
                failure = Some(MineError::Stopped);
                break;
            }
            let sops: Vec<String> = decisions
                .iter()
                .map(|d| d.sop_instance_uid.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let (files, error) = self.archive.retrieve(uid, &series, &sops).await;
            if let Some(error) = error {
                failure.get_or_insert(MineError::Retrieve {
                    series: series.clone(),
                    error,
                });
            } else {
                // After a failed retrieval the missing images are the failure's, not the
                // archive's choice.
                let missing = decisions
                    .iter()
                    .filter(|d| !files.contains_key(&d.sop_instance_uid))
                    .count();
                add(
                    &mut self.stats().images_skipped,
                    "not sent by the archive",
                    missing,
                );
            }
            let converted = self.convert(uid, &series, patient, decisions, files).await;
            for item in converted {
                match item {
                    Ok(row) => rows.push(row),
                    Err(reason) => add(&mut self.stats().images_skipped, reason, 1),
                }
            }
        }
        Ok((rows, failure))
    }

    /// Fill in the series of images whose series no source named, asking the archive;
    /// images it does not know are dropped (and counted).
    async fn locate_series(
        &self,
        uid: &str,
        mut todo: Vec<Decision>,
    ) -> Result<Vec<Decision>, MineError> {
        let unknown: Vec<String> = todo
            .iter()
            .filter(|d| d.series_uid.is_none())
            .map(|d| d.sop_instance_uid.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if unknown.is_empty() {
            return Ok(todo);
        }
        let mut series_of: HashMap<String, String> = HashMap::new();
        for chunk in unknown.chunks(LOCATE_CHUNK) {
            let answers = self
                .archive
                .find(
                    &Query::new(Level::Image)
                        .in_study(uid)
                        .key(tags::SOP_INSTANCE_UID, chunk.join("\\"))
                        .returns(&[tags::SERIES_INSTANCE_UID]),
                )
                .await
                .map_err(MineError::LocateKeyImages)?;
            series_of.extend(answers.iter().filter_map(|a| {
                Some((
                    a.get(tags::SOP_INSTANCE_UID)?.to_string(),
                    a.get(tags::SERIES_INSTANCE_UID)?.to_string(),
                ))
            }));
        }
        let before = todo.len();
        todo.retain_mut(|d| {
            if d.series_uid.is_none() {
                d.series_uid = series_of.get(&d.sop_instance_uid).cloned();
            }
            d.series_uid.is_some()
        });
        add(
            &mut self.stats().images_skipped,
            "not in the archive",
            before - todo.len(),
        );
        Ok(todo)
    }

    /// Decode, preprocess and write the retrieved images of one series (on the blocking
    /// pool); the spool files are removed after.
    async fn convert(
        &self,
        study_uid: &str,
        series_uid: &str,
        patient: &Patient,
        decisions: Vec<Decision>,
        files: HashMap<String, PathBuf>,
    ) -> Vec<Result<MinedRow, SkipReason>> {
        let job = SeriesJob {
            size: self.output.json.image_size,
            field_of_view_mm: self.output.json.field_of_view_mm,
            framing: self.output.json.framing,
            dir: self.output.dir.clone(),
            tolerance: self.config.classifier.axial_tolerance_deg,
            study_uid: study_uid.to_string(),
            series_uid: series_uid.to_string(),
            patient_key: patient.0.clone(),
            split: patient.1,
            decode_us: Arc::new(AtomicU64::new(0)),
            write_us: Arc::new(AtomicU64::new(0)),
        };
        let (decode_us, write_us) = (job.decode_us.clone(), job.write_us.clone());
        let result = tokio::task::spawn_blocking(move || job.run(decisions, &files)).await;
        self.decode_us
            .fetch_add(decode_us.load(Ordering::Relaxed), Ordering::Relaxed);
        self.write_us
            .fetch_add(write_us.load(Ordering::Relaxed), Ordering::Relaxed);
        match result {
            Ok(rows) => rows,
            Err(e) => vec![Err(format!("conversion task failed: {e}"))],
        }
    }
}

/// The decisions grouped by series (every one has a series by now).
fn by_series(todo: Vec<Decision>) -> BTreeMap<String, Vec<Decision>> {
    let mut by_series: BTreeMap<String, Vec<Decision>> = BTreeMap::new();
    for d in todo {
        by_series
            .entry(d.series_uid.clone().unwrap_or_default())
            .or_default()
            .push(d);
    }
    by_series
}

/// One series' conversion, owned so that it runs on the blocking pool.
struct SeriesJob {
    size: usize,
    field_of_view_mm: Option<f64>,
    framing: Framing,
    dir: PathBuf,
    tolerance: f64,
    study_uid: String,
    series_uid: String,
    patient_key: String,
    split: &'static str,
    decode_us: Arc<AtomicU64>,
    write_us: Arc<AtomicU64>,
}

impl SeriesJob {
    fn preprocessing(&self) -> Preprocessing {
        Preprocessing {
            size: self.size,
            axial_tolerance_deg: self.tolerance,
            field_of_view_mm: self.field_of_view_mm,
            framing: self.framing,
        }
    }

    fn run(
        &self,
        decisions: Vec<Decision>,
        files: &HashMap<String, PathBuf>,
    ) -> Vec<Result<MinedRow, SkipReason>> {
        let mut by_file: BTreeMap<String, Vec<Decision>> = BTreeMap::new();
        for d in decisions {
            by_file
                .entry(d.sop_instance_uid.clone())
                .or_default()
                .push(d);
        }
        let mut out = Vec::new();
        for (sop, decisions) in by_file {
            // Not sent: already counted by the caller.
            let Some(path) = files.get(&sop) else {
                continue;
            };
            let images = Miner::timed(&self.decode_us, || {
                decode_file(path, &decisions, &self.preprocessing())
            });
            let _ = std::fs::remove_file(path);
            match images {
                Ok(images) => {
                    for (decision, image) in decisions.iter().zip(images) {
                        out.push(image.and_then(|image| self.write(&sop, decision, image)));
                    }
                }
                Err(reason) => out.extend(decisions.iter().map(|_| Err(reason.clone()))),
            }
        }
        out
    }

    /// Write one decoded frame as PNG: its manifest row.
    fn write(
        &self,
        sop: &str,
        decision: &Decision,
        (hu, z, multi_frame): (Vec<f32>, Option<f64>, bool),
    ) -> Result<MinedRow, SkipReason> {
        let name = Output::image_name(sop, decision.frame, multi_frame);
        Miner::timed(&self.write_us, || {
            output::write_image(&self.dir, &name, self.size, &hu)
        })
        .map_err(|e| format!("writing the image failed: {e}"))?;
        Ok(MinedRow {
            row: ManifestRow {
                image: name,
                patient_key: self.patient_key.clone(),
                study_uid: self.study_uid.clone(),
                series_uid: self.series_uid.clone(),
                sop_instance_uid: sop.to_string(),
                z_mm: z.map(|z| format!("{z:.2}")).unwrap_or_default(),
                label: decision.label.clone(),
                label_source: decision.label_source.clone(),
                split: self.split.to_string(),
            },
            frame: decision.frame,
        })
    }
}

/// `anatomy::select`'s view of a retrieved file (header only).
pub(super) fn instance_from_file(sop: &str, path: &Path) -> Option<Instance> {
    header(sop, path).map(|(instance, _)| instance)
}

/// A retrieved file's header: `anatomy::select`'s view of it, and whether it says the
/// pixels carry burned-in annotation (Burned In Annotation (0028,0301) YES).
fn header(sop: &str, path: &Path) -> Option<(Instance, bool)> {
    let obj = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .ok()?;
    let text = |tag| {
        obj.element(tag)
            .ok()
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_matches(['\0', ' ']).to_string())
            .filter(|s| !s.is_empty())
    };
    let burned_in = text(tags::BURNED_IN_ANNOTATION).is_some_and(|v| v.eq_ignore_ascii_case("YES"));
    let instance = Instance {
        sop_instance_uid: sop.to_string(),
        sop_class_uid: text(tags::SOP_CLASS_UID).unwrap_or_default(),
        path: path.to_path_buf(),
        image_type: text(tags::IMAGE_TYPE),
        image_position: text(tags::IMAGE_POSITION_PATIENT),
        image_orientation: text(tags::IMAGE_ORIENTATION_PATIENT),
        number_of_frames: text(tags::NUMBER_OF_FRAMES).and_then(|v| v.parse().ok()),
        instance_number: text(tags::INSTANCE_NUMBER).and_then(|v| v.parse().ok()),
    };
    Some((instance, burned_in))
}

/// The labelled frames of one retrieved file, in HU at the dataset's size, with their z.
fn decode_file(
    path: &Path,
    decisions: &[Decision],
    preprocessing: &Preprocessing,
) -> Result<Vec<Converted>, SkipReason> {
    let sop = decisions
        .first()
        .map(|d| d.sop_instance_uid.clone())
        .unwrap_or_default();
    let (instance, burned_in) = header(&sop, path).ok_or("not a readable DICOM file")?;
    if !select::is_ct_image_class(&instance.sop_class_uid) {
        return Err(format!(
            "not a CT image ({})",
            crate::forward::scu::sop_class_name(&instance.sop_class_uid)
        ));
    }
    if burned_in {
        // Text in the pixels may name the patient: such an image never enters a dataset.
        return Err("burned-in annotation (0028,0301) YES".into());
    }
    let frames = u32::try_from(instance.number_of_frames.unwrap_or(1).max(1)).unwrap_or(1);
    let multi_frame = frames > 1 || instance.sop_class_uid != uids::CT_IMAGE_STORAGE;
    let z = z_of_frames(instance);
    // A single-frame file is decoded once, whatever the number of decisions on it.
    let single = if frames == 1 {
        Some(pixels::hu_frames(path).map_err(|e| e.kind.to_string())?)
    } else {
        None
    };
    Ok(decisions
        .iter()
        .map(|d| {
            check_frame(d, frames)?;
            let image = match &single {
                Some(all) => all
                    .first()
                    .cloned()
                    .ok_or_else(|| "no pixel data".to_string())?,
                None => pixels::hu_frame(path, d.frame).map_err(|e| e.kind.to_string())?,
            };
            Ok((
                pixels::preprocess(&image, preprocessing),
                z.get(&d.frame).copied(),
                multi_frame,
            ))
        })
        .collect())
}

/// z of every frame, whatever its orientation (90°: every plane counts here).
fn z_of_frames(instance: Instance) -> HashMap<u32, f64> {
    let every_frame = SelectionRules {
        key_images: KeyImageCount::All,
        axial_tolerance_deg: 90.0,
    };
    match select::select(&[instance], &every_frame) {
        Selection::Selected { key_images, .. } => {
            key_images.into_iter().map(|k| (k.frame, k.z_mm)).collect()
        }
        Selection::Skipped { .. } => HashMap::new(),
    }
}

/// The frame a decision names exists in an image of `frames` frames.
fn check_frame(decision: &Decision, frames: u32) -> Result<(), SkipReason> {
    if decision.whole_image && frames > 1 {
        return Err("a multi-frame image named without a frame number".to_string());
    }
    if decision.frame >= frames {
        return Err(format!(
            "frame {} named, the image has {frames}",
            decision.frame + 1
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A RIS label "lungs" on the whole single-frame image `sop`.
    fn decision(sop: String) -> Decision {
        Decision {
            sop_instance_uid: sop,
            frame: 0,
            whole_image: true,
            series_uid: None,
            label: "lungs".into(),
            label_source: "mined:ris".into(),
        }
    }

    #[test]
    fn images_with_burned_in_annotation_are_refused() {
        use dicom_core::{DataElement, PrimitiveValue, VR};
        let dir = tempfile::tempdir().unwrap();
        let spec = crate::synth::SeriesSpec::new(1, 2, 32);
        let mut converted = Vec::new();
        for (slice, burned) in [(0, "NO"), (1, "YES")] {
            let mut obj = crate::synth::ct_slice(&spec, slice);
            obj.put(DataElement::new(
                tags::BURNED_IN_ANNOTATION,
                VR::CS,
                PrimitiveValue::from(burned),
            ));
            let path = dir.path().join(format!("{slice}.dcm"));
            obj.write_to_file(&path).unwrap();
            let images = decode_file(
                &path,
                &[decision(spec.sop_uid(slice))],
                &Preprocessing::new(16),
            );
            converted.push(images.map(|i| i.len()));
        }
        assert_eq!(converted[0], Ok(1));
        assert_eq!(
            converted[1],
            Err("burned-in annotation (0028,0301) YES".to_string())
        );
    }

    #[test]
    fn a_body_framed_folder_gets_body_framed_images() {
        let dir = tempfile::tempdir().unwrap();
        let spec = crate::synth::SeriesSpec::new(1, 2, 64);
        let path = dir.path().join("0.dcm");
        crate::synth::ct_slice(&spec, 1)
            .write_to_file(&path)
            .unwrap();
        let decision = decision(spec.sop_uid(1));
        let converted = |framing| {
            let job = Preprocessing {
                framing,
                ..Preprocessing::new(32)
            };
            let mut images = decode_file(&path, std::slice::from_ref(&decision), &job).unwrap();
            assert_eq!(images.len(), 1);
            (images.remove(0).unwrap().0, job)
        };
        let (whole, _) = converted(Framing::Whole);
        let (body, job) = converted(Framing::Body);
        let image = pixels::hu_frames(&path).unwrap().remove(0);
        assert_eq!(body, pixels::preprocess(&image, &job));
        // the phantom's body (a lower slice: no lungs), an ellipse over 80 % of the width, is 38 %
        // of the whole image and 49 % of the square around it with its margin
        let body_share =
            |hu: &[f32]| hu.iter().filter(|&&v| v > -300.0).count() as f64 / hu.len() as f64;
        assert!(
            (0.36..0.40).contains(&body_share(&whole)),
            "{}",
            body_share(&whole)
        );
        assert!(
            (0.46..0.52).contains(&body_share(&body)),
            "{}",
            body_share(&body)
        );
    }
}
