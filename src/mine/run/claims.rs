//! What each label source says about a study's images: RIS CSV rows (image, series,
//! accession), Key Object Selection and SR documents, and the node's own predictions as
//! pseudo labels. Each gives [`Claim`]s; `labels::resolve` decides between them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dicom_dictionary_std::{tags, uids};
use tracing::warn;

use super::convert::instance_from_file;
use super::summary::add;
use super::{MineError, Miner, LOCATE_CHUNK};
use crate::anatomy::select::{self, Instance, KeyImage, KeyImageCount, Selection, SelectionRules};
use crate::mine::answer::Answer;
use crate::mine::archive::{Level, Query};
use crate::mine::labels::{self, dataset_label, Claim, Document, PseudoCheck, RisImage, Source};

const SR_CLASSES: &[&str] = &[
    uids::BASIC_TEXT_SR_STORAGE,
    uids::ENHANCED_SR_STORAGE,
    uids::COMPREHENSIVE_SR_STORAGE,
    uids::COMPREHENSIVE3_DSR_STORAGE,
];

/// A label as a source gives it: a dataset label, or why there is none.
type Label = Result<String, String>;

fn ris_claim(row: &RisImage, series: String) -> Claim {
    Claim {
        sop_instance_uid: row.sop_instance_uid.clone(),
        frame: None,
        series_uid: Some(series),
        label: row.label.clone(),
        source: Source::Ris,
    }
}

impl Miner {
    /// Find the RIS image rows in the archive: their study and series (rows that name them
    /// need no query; rows already mined are not looked for).
    pub(super) async fn locate_ris(&self) -> Result<HashMap<String, Vec<Claim>>, MineError> {
        let mut by_study: HashMap<String, Vec<Claim>> = HashMap::new();
        {
            let mut stats = self.stats();
            add(&mut stats.ris, "rows", self.ris.rows);
            add(&mut stats.ris, "rows refused", self.ris.refused.len());
        }
        for refused in &self.ris.refused {
            warn!(row = %refused, "mine.ris_csv row refused");
        }
        if self.ris.images.is_empty() {
            return Ok(by_study);
        }
        let mined = self.state.mined_uids().await?;
        let mut unknown: Vec<&RisImage> = Vec::new();
        let mut already = 0;
        for r in &self.ris.images {
            if mined.contains(&r.sop_instance_uid) {
                already += 1;
                continue;
            }
            match (&r.study_uid, &r.series_uid) {
                (Some(study), Some(series)) => by_study
                    .entry(study.clone())
                    .or_default()
                    .push(ris_claim(r, series.clone())),
                _ => unknown.push(r),
            }
        }
        add(&mut self.stats().ris, "rows mined before", already);
        let mut not_found = 0;
        for chunk in unknown.chunks(LOCATE_CHUNK) {
            let found = self.study_and_series_of(chunk).await?;
            for r in chunk {
                match found.get(&r.sop_instance_uid) {
                    Some((study, series)) => by_study
                        .entry(study.clone())
                        .or_default()
                        .push(ris_claim(r, series.clone())),
                    None => not_found += 1,
                }
            }
        }
        add(&mut self.stats().ris, "rows not in the archive", not_found);
        Ok(by_study)
    }

    /// Study and series of the RIS rows' images that the archive holds, by SOP Instance UID.
    async fn study_and_series_of(
        &self,
        rows: &[&RisImage],
    ) -> Result<HashMap<String, (String, String)>, MineError> {
        let list: Vec<&str> = rows.iter().map(|r| r.sop_instance_uid.as_str()).collect();
        let query = Query::new(Level::Image)
            .key(tags::SOP_INSTANCE_UID, list.join("\\"))
            .returns(&[tags::STUDY_INSTANCE_UID, tags::SERIES_INSTANCE_UID]);
        let answers = self
            .archive
            .find(&query)
            .await
            .map_err(MineError::LocateRis)?;
        Ok(answers
            .iter()
            .filter_map(|a| {
                Some((
                    a.get(tags::SOP_INSTANCE_UID)?.to_string(),
                    (
                        a.get(tags::STUDY_INSTANCE_UID)?.to_string(),
                        a.get(tags::SERIES_INSTANCE_UID)?.to_string(),
                    ),
                ))
            })
            .collect())
    }

    /// Key Object Selection documents (and SR) of the study: what they reference, with the
    /// label their content maps to.
    /// The claims, and the number of documents found.
    pub(super) async fn document_claims(
        &self,
        uid: &str,
    ) -> Result<(Vec<Claim>, usize), MineError> {
        let mut claims = Vec::new();
        let mut documents = 0;
        for series_uid in self.document_series(uid).await? {
            let wanted = self.documents_in_series(uid, &series_uid).await?;
            if wanted.is_empty() {
                continue;
            }
            documents += wanted.len();
            let (files, error) = self.archive.retrieve(uid, &series_uid, &wanted).await;
            for (_, path) in files {
                claims.extend(self.claims_of_document(uid, &series_uid, &path));
            }
            if let Some(error) = error {
                return Err(MineError::RetrieveDocuments {
                    series: series_uid,
                    error,
                });
            }
        }
        Ok((claims, documents))
    }

    /// The study's series that may hold the documents mine reads (KO, SR or both).
    async fn document_series(&self, uid: &str) -> Result<Vec<String>, MineError> {
        let m = &self.config.mine;
        let modalities = match (m.kos, m.sr) {
            (true, true) => "KO\\SR",
            (true, false) => "KO",
            _ => "SR",
        };
        let series = self
            .archive
            .find(
                &Query::new(Level::Series)
                    .in_study(uid)
                    .key(tags::MODALITY, modalities)
                    .returns(&[tags::SERIES_INSTANCE_UID]),
            )
            .await
            .map_err(MineError::DocumentSeries)?;
        Ok(series
            .iter()
            .filter_map(|s| s.get(tags::SERIES_INSTANCE_UID).map(str::to_string))
            .collect())
    }

    /// The documents of a series that mine reads, by their SOP Class.
    async fn documents_in_series(
        &self,
        uid: &str,
        series_uid: &str,
    ) -> Result<Vec<String>, MineError> {
        let m = &self.config.mine;
        let instances = self
            .archive
            .find(
                &Query::new(Level::Image)
                    .in_study(uid)
                    .in_series(series_uid)
                    .returns(&[tags::SOP_INSTANCE_UID, tags::SOP_CLASS_UID]),
            )
            .await
            .map_err(|error| MineError::Documents {
                series: series_uid.to_string(),
                error,
            })?;
        Ok(instances
            .iter()
            .filter(|a| {
                let class = a.text(tags::SOP_CLASS_UID);
                (m.kos && class == uids::KEY_OBJECT_SELECTION_DOCUMENT_STORAGE)
                    || (m.sr && SR_CLASSES.contains(&class.as_str()))
            })
            .filter_map(|a| a.get(tags::SOP_INSTANCE_UID).map(str::to_string))
            .collect())
    }

    /// What one retrieved document says (the spool file is removed); an unreadable
    /// document is counted and reported, and says nothing.
    fn claims_of_document(&self, uid: &str, series_uid: &str, path: &Path) -> Vec<Claim> {
        let read = Document::read(path);
        let _ = std::fs::remove_file(path);
        let doc = match read {
            Ok(d) => d,
            Err(e) => {
                add(&mut self.stats().documents, "unreadable", 1);
                self.error(format!(
                    "study {uid}: a document of series {series_uid}: {e}"
                ));
                return Vec::new();
            }
        };
        if doc.is_own() {
            // The node's own output: machine labels, never read as human ones.
            add(
                &mut self.stats().documents,
                "written by anatomy-node (ignored)",
                1,
            );
            return Vec::new();
        }
        let (source, kind) = if doc.sop_class_uid == uids::KEY_OBJECT_SELECTION_DOCUMENT_STORAGE {
            (Source::Kos, "key object selection")
        } else {
            (Source::Sr, "structured report")
        };
        add(&mut self.stats().documents, kind, 1);
        let label = doc.label(&self.config.mine.kos_labels);
        let mut claims = Vec::new();
        for r in &doc.references {
            if r.study_uid.as_deref().is_some_and(|s| s != uid) {
                add(
                    &mut self.stats().unlabelled,
                    "document references an image of another study",
                    1,
                );
                continue;
            }
            // Referenced Frame Number counts from 1; frames here count from 0.
            let frames: Vec<Option<u32>> = if r.frames.is_empty() {
                vec![None]
            } else {
                r.frames.iter().map(|f| Some(f - 1)).collect()
            };
            claims.extend(frames.into_iter().map(|frame| Claim {
                sop_instance_uid: r.sop_instance_uid.clone(),
                frame,
                series_uid: r.series_uid.clone(),
                label: label.clone(),
                source: source.clone(),
            }));
        }
        claims
    }

    /// RIS rows for a whole series, or a whole study by accession number: the series'
    /// key-images chosen as the node chooses them (`anatomy::select`).
    pub(super) async fn series_claims(
        &self,
        uid: &str,
        study: &Answer,
    ) -> Result<Vec<Claim>, MineError> {
        let mut targets = self.labelled_series(uid, study).await?;
        targets.sort_by(|a, b| a.0.cmp(&b.0));
        let mut claims = Vec::new();
        for (series, label, source) in targets {
            let key_images = match self.select_in_series(uid, &series).await? {
                Ok(k) => k,
                Err(reason) => {
                    add(
                        &mut self.stats().unlabelled,
                        format!("series without key-images: {reason}"),
                        1,
                    );
                    continue;
                }
            };
            claims.extend(key_images.into_iter().map(|k| Claim {
                sop_instance_uid: k.sop_instance_uid,
                frame: Some(k.frame),
                series_uid: Some(series.clone()),
                label: label.clone(),
                source: source.clone(),
            }));
        }
        Ok(claims)
    }

    /// The series of the study that a RIS row labels as a whole: named by a series row,
    /// or every series of `mine.modality` under an accession row.
    async fn labelled_series(
        &self,
        uid: &str,
        study: &Answer,
    ) -> Result<Vec<(String, Label, Source)>, MineError> {
        let mut targets: Vec<(String, Label, Source)> = self
            .ris
            .series
            .iter()
            .filter(|((st, _), _)| st == uid)
            .map(|((_, se), label)| (se.clone(), label.clone(), Source::RisSeries))
            .collect();
        let accession = study.text(tags::ACCESSION_NUMBER);
        let Some(label) = self
            .ris
            .accessions
            .get(&accession)
            .filter(|_| !accession.is_empty())
        else {
            return Ok(targets);
        };
        let series = self
            .archive
            .find(
                &Query::new(Level::Series)
                    .in_study(uid)
                    .key(tags::MODALITY, self.config.mine.modality.clone())
                    .returns(&[tags::SERIES_INSTANCE_UID]),
            )
            .await
            .map_err(|error| MineError::AccessionSeries {
                study: uid.to_string(),
                accession: crate::phi::Phi(accession.clone()),
                error,
            })?;
        targets.extend(series.iter().filter_map(|s| {
            Some((
                s.get(tags::SERIES_INSTANCE_UID)?.to_string(),
                label.clone(),
                Source::RisAccession,
            ))
        }));
        Ok(targets)
    }

    /// `mine.series_key_images` key-images of a series: chosen from the query answers when
    /// the archive returns positions and orientations, else from the retrieved files.
    /// The outer error is the study's failure; the inner one why the series has no
    /// key-images.
    async fn select_in_series(
        &self,
        uid: &str,
        series: &str,
    ) -> Result<Result<Vec<KeyImage>, String>, MineError> {
        let rules = SelectionRules {
            key_images: KeyImageCount::Count(self.config.mine.series_key_images),
            axial_tolerance_deg: self.config.classifier.axial_tolerance_deg,
        };
        let instances = self.images_of_series(uid, series).await?;
        let selection = if instances.iter().all(has_geometry) {
            select::select(&instances, &rules)
        } else {
            // The answers lack geometry (or hold multi-frame images): read the files.
            self.select_from_files(uid, series, &instances, &rules)
                .await?
        };
        Ok(match selection {
            Selection::Selected { key_images, .. } => Ok(key_images),
            Selection::Skipped { reason } => Err(reason),
        })
    }

    /// The images of a series as the archive's query answers describe them.
    async fn images_of_series(&self, uid: &str, series: &str) -> Result<Vec<Instance>, MineError> {
        let answers = self
            .archive
            .find(
                &Query::new(Level::Image)
                    .in_study(uid)
                    .in_series(series)
                    .returns(&[
                        tags::SOP_INSTANCE_UID,
                        tags::SOP_CLASS_UID,
                        tags::IMAGE_TYPE,
                        tags::IMAGE_POSITION_PATIENT,
                        tags::IMAGE_ORIENTATION_PATIENT,
                        tags::NUMBER_OF_FRAMES,
                        tags::INSTANCE_NUMBER,
                    ]),
            )
            .await
            .map_err(|error| MineError::SeriesImages {
                series: series.to_string(),
                error,
            })?;
        Ok(answers
            .iter()
            .filter_map(|a| {
                Some(Instance {
                    sop_instance_uid: a.get(tags::SOP_INSTANCE_UID)?.to_string(),
                    sop_class_uid: a.text(tags::SOP_CLASS_UID),
                    path: PathBuf::new(),
                    image_type: a.joined(tags::IMAGE_TYPE),
                    image_position: a.joined(tags::IMAGE_POSITION_PATIENT),
                    image_orientation: a.joined(tags::IMAGE_ORIENTATION_PATIENT),
                    number_of_frames: a.get(tags::NUMBER_OF_FRAMES).and_then(|v| v.parse().ok()),
                    instance_number: a.get(tags::INSTANCE_NUMBER).and_then(|v| v.parse().ok()),
                })
            })
            .collect())
    }

    /// Choose from the retrieved files' headers (the spool files are removed after).
    async fn select_from_files(
        &self,
        uid: &str,
        series: &str,
        instances: &[Instance],
        rules: &SelectionRules,
    ) -> Result<Selection, MineError> {
        let wanted: Vec<String> = instances
            .iter()
            .filter(|i| select::is_ct_image_class(&i.sop_class_uid) || i.sop_class_uid.is_empty())
            .map(|i| i.sop_instance_uid.clone())
            .collect();
        let (files, error) = self.archive.retrieve(uid, series, &wanted).await;
        if let Some(error) = error {
            remove_spooled(&files);
            return Err(MineError::RetrieveForSelection {
                series: series.to_string(),
                error,
            });
        }
        let from_files: Vec<Instance> = files
            .iter()
            .filter_map(|(uid, path)| instance_from_file(uid, path))
            .collect();
        let selection = select::select(&from_files, rules);
        remove_spooled(&files);
        Ok(selection)
    }

    pub(super) fn pseudo_claims(&self, predictions: Vec<labels::Prediction>) -> Vec<Claim> {
        let mine = &self.config.mine;
        let (mut below, mut out_of_order) = (0, 0);
        let claims = predictions
            .into_iter()
            .filter(|p| {
                match p.pseudo_check(
                    mine.pseudo_label_min_probability,
                    mine.pseudo_label_require_order,
                ) {
                    PseudoCheck::Keep => return true,
                    PseudoCheck::BelowThreshold => below += 1,
                    PseudoCheck::OutOfOrder => out_of_order += 1,
                }
                false
            })
            .map(|p| Claim {
                label: dataset_label(&p.label)
                    .ok_or_else(|| format!("predicted class {:?} is not a dataset label", p.label)),
                sop_instance_uid: p.sop_instance_uid,
                frame: Some(p.frame),
                series_uid: Some(p.series_uid),
                source: Source::Pseudo(p.model_version),
            })
            .collect();
        let mut stats = self.stats();
        stats.pseudo_below_threshold += below;
        stats.pseudo_out_of_order += out_of_order;
        claims
    }
}

fn remove_spooled(files: &HashMap<String, PathBuf>) {
    for p in files.values() {
        let _ = std::fs::remove_file(p);
    }
}

/// Whether a query answer says enough to choose key-images without the file: a
/// single-frame CT Image with position and orientation (images of other classes are not
/// chosen from and need nothing).
fn has_geometry(i: &Instance) -> bool {
    !select::is_ct_image_class(&i.sop_class_uid)
        || (i.sop_class_uid == uids::CT_IMAGE_STORAGE
            && i.number_of_frames.unwrap_or(1) <= 1
            && i.image_position.is_some()
            && i.image_orientation.is_some())
}
