//! Where labels come from, and how several sources for one image are reconciled.
//!
//! * **RIS CSV** (`mine.ris_csv`): a row per image (`sop_instance_uid,label`, optionally with
//!   `study_uid` and `series_uid`), per series (`study_uid,series_uid,label`) or per study
//!   (`accession_number,label`). Labels are dataset labels (`neck` … `ambiguous`).
//! * **Key Object Selection documents and SR** in the archive: the images they reference are
//!   the key-images; the label comes from the document title, its coded concepts and its
//!   text, through `mine.kos_labels`. Documents written by anatomy-node itself (Manufacturer
//!   `anatomy-node`) are machine output and never read as human labels.
//! * **Pseudo labels**: the node's own predictions in its index, where the probability of
//!   the predicted class reaches `mine.pseudo_label_min_probability` and (with
//!   `mine.pseudo_label_require_order`, the default) the image's own label equals the label
//!   its series' decoding in head-to-foot order gave it (`key_images.smoothed_label`): a
//!   confident prediction out of anatomical order is not taken as a label.
//!
//! Reconciliation ([`resolve`]): a label given for the image itself (RIS row, document)
//! beats one given for its whole series or study; two different labels at the same level
//! are a conflict and the image is left out (counted, never guessed); a pseudo label is used
//! only where no human label exists and is marked `pseudo:<model version>`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::{InMemDicomObject, OpenFileOptions};
use sqlx::Row;

use super::settings::LabelRule;
use crate::dataset::LABELS;
use crate::index::Index;

/// Where a label came from: the manifest's `label_source` is built from these.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    Ris,
    Kos,
    Sr,
    RisSeries,
    RisAccession,
    Pseudo(String),
}

impl Source {
    pub fn name(&self) -> String {
        match self {
            Source::Ris => "ris".into(),
            Source::Kos => "kos".into(),
            Source::Sr => "sr".into(),
            Source::RisSeries => "ris-series".into(),
            Source::RisAccession => "ris-accession".into(),
            Source::Pseudo(model) => format!("pseudo:{}", clean(model)),
        }
    }

    fn image_level(&self) -> bool {
        matches!(self, Source::Ris | Source::Kos | Source::Sr)
    }

    fn series_level(&self) -> bool {
        matches!(self, Source::RisSeries | Source::RisAccession)
    }
}

/// Text safe in a CSV field and a file name: no commas, quotes or control characters.
fn clean(text: &str) -> String {
    let t: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-+:".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if t.is_empty() {
        "unknown".into()
    } else {
        t
    }
}

/// One source's statement about one image (or frame).
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub sop_instance_uid: String,
    /// 0-based frame; `None`: the image as a whole (it must then have one frame).
    pub frame: Option<u32>,
    /// The series, when the source knows it.
    pub series_uid: Option<String>,
    /// `Err(reason)`: the source points at the image but gives no usable label.
    pub label: Result<String, String>,
    pub source: Source,
}

/// What an image ends up with.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub sop_instance_uid: String,
    /// 0-based frame.
    pub frame: u32,
    /// Every source named the image without a frame: it must have exactly one.
    pub whole_image: bool,
    pub series_uid: Option<String>,
    pub label: String,
    /// `mined:kos`, `mined:kos+ris`, `mined:ris-series`, `pseudo:<model>`, ...
    pub label_source: String,
}

/// Images a source pointed at that get no label, by reason.
pub type Unlabelled = BTreeMap<String, usize>;

/// Reconcile every claim about a study's images.
pub fn resolve(claims: Vec<Claim>) -> (Vec<Decision>, Unlabelled) {
    let mut by_image: BTreeMap<(String, u32), Vec<Claim>> = BTreeMap::new();
    for claim in claims {
        by_image
            .entry((claim.sop_instance_uid.clone(), claim.frame.unwrap_or(0)))
            .or_default()
            .push(claim);
    }
    let mut decisions = Vec::new();
    let mut unlabelled = Unlabelled::new();
    for ((sop, frame), claims) in by_image {
        let series_uid = claims.iter().find_map(|c| c.series_uid.clone());
        let whole_image = claims.iter().all(|c| c.frame.is_none());
        let labelled = |level: fn(&Source) -> bool| {
            let mut labels: BTreeMap<String, BTreeSet<Source>> = BTreeMap::new();
            for c in claims.iter().filter(|c| level(&c.source)) {
                if let Ok(label) = &c.label {
                    labels
                        .entry(label.clone())
                        .or_default()
                        .insert(c.source.clone());
                }
            }
            labels
        };
        let image = labelled(Source::image_level);
        let series = labelled(Source::series_level);
        let (chosen, what) = if image.is_empty() {
            (series, "series")
        } else {
            (image, "image")
        };
        let decided = match chosen.len() {
            1 => chosen.into_iter().next().map(|(label, sources)| {
                let names: Vec<String> = sources.iter().map(Source::name).collect();
                (label, format!("mined:{}", names.join("+")))
            }),
            0 => {
                let pseudo = claims.iter().find_map(|c| match (&c.source, &c.label) {
                    (Source::Pseudo(_), Ok(label)) => Some((label.clone(), c.source.name())),
                    _ => None,
                });
                if pseudo.is_none() {
                    let reason = claims
                        .iter()
                        .find_map(|c| c.label.as_ref().err().cloned())
                        .unwrap_or_else(|| "no label".into());
                    *unlabelled.entry(reason).or_default() += 1;
                }
                pseudo
            }
            // Two human labels that disagree: not settled by guessing, nor by a pseudo label.
            _ => {
                *unlabelled
                    .entry(format!("conflicting {what} labels"))
                    .or_default() += 1;
                None
            }
        };
        if let Some((label, label_source)) = decided {
            decisions.push(Decision {
                sop_instance_uid: sop,
                frame,
                whole_image,
                series_uid,
                label,
                label_source,
            });
        }
    }
    (decisions, unlabelled)
}

/// A dataset label from free text (`Lungs ` → `lungs`), if it is one.
pub fn dataset_label(text: &str) -> Option<String> {
    let t = text.trim().to_ascii_lowercase();
    LABELS.contains(&t.as_str()).then_some(t)
}

// ---------------------------------------------------------------------------------------
// RIS CSV

/// One image row of the RIS CSV.
#[derive(Debug, Clone, PartialEq)]
pub struct RisImage {
    pub sop_instance_uid: String,
    pub study_uid: Option<String>,
    pub series_uid: Option<String>,
    pub label: Result<String, String>,
}

#[derive(Debug, Default)]
pub struct RisLabels {
    pub images: Vec<RisImage>,
    /// (study, series) → label.
    pub series: HashMap<(String, String), Result<String, String>>,
    /// accession number → label.
    pub accessions: HashMap<String, Result<String, String>>,
    /// Rows refused whole (nothing to point at), with their line.
    pub refused: Vec<String>,
    pub rows: usize,
}

impl RisLabels {
    pub fn load(path: &Path) -> Result<RisLabels, String> {
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .flexible(false)
            .from_path(path)
            .map_err(|e| format!("mine.ris_csv {}: {e}", path.display()))?;
        let headers: Vec<String> = reader
            .headers()
            .map_err(|e| format!("mine.ris_csv {}: {e}", path.display()))?
            .iter()
            .map(|h| h.trim().trim_start_matches('\u{feff}').to_ascii_lowercase())
            .collect();
        let column = |name: &str| headers.iter().position(|h| h == name);
        let label_col = column("label").ok_or_else(|| {
            format!(
                "mine.ris_csv {}: no `label` column (header: sop_instance_uid,label or study_uid,series_uid,label or accession_number,label)",
                path.display()
            )
        })?;
        let (sop, study, series, accession) = (
            column("sop_instance_uid"),
            column("study_uid"),
            column("series_uid"),
            column("accession_number"),
        );
        if sop.is_none() && series.is_none() && accession.is_none() {
            return Err(format!(
                "mine.ris_csv {}: needs a sop_instance_uid, study_uid + series_uid or accession_number column",
                path.display()
            ));
        }
        if series.is_some() && study.is_none() {
            return Err(format!(
                "mine.ris_csv {}: a series_uid column needs a study_uid column",
                path.display()
            ));
        }
        let mut out = RisLabels::default();
        let mut series_seen: HashMap<(String, String), String> = HashMap::new();
        let mut accession_seen: HashMap<String, String> = HashMap::new();
        let mut image_seen: HashMap<String, String> = HashMap::new();
        for (i, record) in reader.records().enumerate() {
            let line = i + 2;
            let record = record.map_err(|e| format!("mine.ris_csv {}: {e}", path.display()))?;
            out.rows += 1;
            let get = |c: Option<usize>| {
                c.and_then(|c| record.get(c))
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(str::to_string)
            };
            let raw_label = get(Some(label_col)).unwrap_or_default();
            let label = dataset_label(&raw_label)
                .ok_or_else(|| format!("RIS label {raw_label:?} is not a dataset label"));
            if let Some(sop) = get(sop) {
                // The same image twice with two labels is a conflict, settled by nobody.
                let key = raw_label.to_ascii_lowercase();
                if let Some(earlier) = image_seen.insert(sop.clone(), key.clone()) {
                    if earlier != key {
                        out.images.retain(|r| r.sop_instance_uid != sop);
                        out.refused.push(format!(
                            "line {line}: {sop} listed again with another label"
                        ));
                    }
                    continue;
                }
                out.images.push(RisImage {
                    sop_instance_uid: sop,
                    study_uid: get(study),
                    series_uid: get(series),
                    label,
                });
            } else if let (Some(st), Some(se)) = (get(study), get(series)) {
                let key = (st, se);
                let text = raw_label.to_ascii_lowercase();
                match series_seen.insert(key.clone(), text.clone()) {
                    Some(earlier) if earlier != text => {
                        out.series
                            .insert(key, Err("conflicting RIS series labels".into()));
                    }
                    _ => {
                        out.series.insert(key, label);
                    }
                }
            } else if let Some(acc) = get(accession) {
                let text = raw_label.to_ascii_lowercase();
                match accession_seen.insert(acc.clone(), text.clone()) {
                    Some(earlier) if earlier != text => {
                        out.accessions
                            .insert(acc, Err("conflicting RIS accession labels".into()));
                    }
                    _ => {
                        out.accessions.insert(acc, label);
                    }
                }
            } else {
                out.refused
                    .push(format!("line {line}: no UID or accession number"));
            }
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------
// Key Object Selection documents and SR

/// An image a document references.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    /// 1-based frame numbers as the document gives them; empty: the whole image.
    pub frames: Vec<u32>,
    pub series_uid: Option<String>,
    pub study_uid: Option<String>,
}

/// What a KOS or SR document says, as far as labels go.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Document {
    pub sop_class_uid: String,
    pub manufacturer: String,
    /// Coded concepts: (code value, coding scheme, code meaning) of the title and of every
    /// CODE content item.
    pub concepts: Vec<(String, String, String)>,
    /// TEXT content item values.
    pub texts: Vec<String>,
    pub references: Vec<Reference>,
}

/// Marks documents that anatomy-node wrote (its own predictions, not human labels).
pub const OWN_MANUFACTURER: &str = "anatomy-node";

impl Document {
    pub fn read(path: &Path) -> Result<Document, String> {
        let obj = OpenFileOptions::new()
            .open_file(path)
            .map_err(|e| format!("unreadable document: {e}"))?;
        let mut doc = Document {
            sop_class_uid: text(&obj, tags::SOP_CLASS_UID),
            manufacturer: text(&obj, tags::MANUFACTURER),
            ..Document::default()
        };
        doc.concepts
            .extend(codes(&obj, tags::CONCEPT_NAME_CODE_SEQUENCE));
        let mut where_: HashMap<String, (String, String)> = HashMap::new();
        for evidence in [
            tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
            tags::PERTINENT_OTHER_EVIDENCE_SEQUENCE,
        ] {
            for study in items(&obj, evidence) {
                let study_uid = text(study, tags::STUDY_INSTANCE_UID);
                for series in items(study, tags::REFERENCED_SERIES_SEQUENCE) {
                    let series_uid = text(series, tags::SERIES_INSTANCE_UID);
                    for sop in items(series, tags::REFERENCED_SOP_SEQUENCE) {
                        where_.insert(
                            text(sop, tags::REFERENCED_SOP_INSTANCE_UID),
                            (study_uid.clone(), series_uid.clone()),
                        );
                    }
                }
            }
        }
        walk_content(&obj, &mut doc, 0);
        for r in &mut doc.references {
            if let Some((study, series)) = where_.get(&r.sop_instance_uid) {
                r.study_uid = Some(study.clone()).filter(|s| !s.is_empty());
                r.series_uid = Some(series.clone()).filter(|s| !s.is_empty());
            }
        }
        Ok(doc)
    }

    pub fn is_own(&self) -> bool {
        self.manufacturer.trim() == OWN_MANUFACTURER
    }

    /// The label the mapping table gives this document: every rule that matches names a
    /// label; none is "no mapping", two different ones a conflict.
    pub fn label(&self, rules: &[LabelRule]) -> Result<String, String> {
        let mut labels = BTreeSet::new();
        for rule in rules {
            let matched = match (&rule.code, &rule.text) {
                (Some(code), _) => self.concepts.iter().any(|(value, scheme, _)| {
                    value == code.trim()
                        && rule
                            .scheme
                            .as_ref()
                            .is_none_or(|s| s.trim().eq_ignore_ascii_case(scheme))
                }),
                (None, Some(pattern)) => self
                    .texts
                    .iter()
                    .chain(self.concepts.iter().map(|(_, _, meaning)| meaning))
                    .any(|t| wildcard_match(pattern, t)),
                (None, None) => false,
            };
            if matched {
                labels.insert(rule.label.clone());
            }
        }
        match labels.len() {
            0 => Err("document without a mapped label (mine.kos_labels)".into()),
            1 => Ok(labels.into_iter().next().unwrap_or_default()),
            _ => Err("document with conflicting labels".into()),
        }
    }
}

/// The content tree, depth first (nested content items included, at most 16 deep).
fn walk_content(obj: &InMemDicomObject, doc: &mut Document, depth: usize) {
    if depth > 16 {
        return;
    }
    for item in items(obj, tags::CONTENT_SEQUENCE) {
        match text(item, tags::VALUE_TYPE).as_str() {
            "CODE" => doc
                .concepts
                .extend(codes(item, tags::CONCEPT_CODE_SEQUENCE)),
            "TEXT" => {
                let t = text(item, tags::TEXT_VALUE);
                if !t.is_empty() {
                    doc.texts.push(t);
                }
            }
            "IMAGE" => {
                for sop in items(item, tags::REFERENCED_SOP_SEQUENCE) {
                    let uid = text(sop, tags::REFERENCED_SOP_INSTANCE_UID);
                    if uid.is_empty() {
                        continue;
                    }
                    let frames = sop
                        .element(tags::REFERENCED_FRAME_NUMBER)
                        .ok()
                        .and_then(|e| e.to_multi_int::<u32>().ok())
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|f| *f > 0)
                        .collect();
                    doc.references.push(Reference {
                        sop_instance_uid: uid,
                        sop_class_uid: text(sop, tags::REFERENCED_SOP_CLASS_UID),
                        frames,
                        series_uid: None,
                        study_uid: None,
                    });
                }
            }
            _ => {}
        }
        walk_content(item, doc, depth + 1);
    }
}

fn items(obj: &InMemDicomObject, tag: Tag) -> Vec<&InMemDicomObject> {
    obj.element(tag)
        .ok()
        .and_then(|e| e.items())
        .map(|i| i.iter().collect())
        .unwrap_or_default()
}

fn text(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.element(tag)
        .ok()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches(['\0', ' ']).to_string())
        .unwrap_or_default()
}

fn codes(obj: &InMemDicomObject, tag: Tag) -> Vec<(String, String, String)> {
    items(obj, tag)
        .into_iter()
        .map(|c| {
            (
                text(c, tags::CODE_VALUE),
                text(c, tags::CODING_SCHEME_DESIGNATOR),
                text(c, tags::CODE_MEANING),
            )
        })
        .filter(|(v, _, _)| !v.is_empty())
        .collect()
}

/// Case-insensitive match of the whole `text` against `pattern` with `*` (any run) and
/// `?` (one character).
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.trim().to_lowercase().chars().collect();
    let t: Vec<char> = text.trim().to_lowercase().chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

// ---------------------------------------------------------------------------------------
// Pseudo labels

/// A key-image the node labelled, with the probability of its label.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub series_uid: String,
    pub sop_instance_uid: String,
    pub frame: u32,
    /// The image's own label (the class with the highest probability, `key_images.label`).
    pub label: String,
    /// The label the series' decoding in anatomical order gave the image
    /// (`key_images.smoothed_label`).
    pub decoded_label: String,
    pub probability: f64,
    pub model_version: String,
}

/// Whether a prediction may become a pseudo label, and why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PseudoCheck {
    Keep,
    /// The probability of its label is below `mine.pseudo_label_min_probability`.
    BelowThreshold,
    /// Its own label is not the one its series' decoding gave it (with
    /// `mine.pseudo_label_require_order`).
    OutOfOrder,
}

impl Prediction {
    /// The rule for pseudo labels: confident, and (with `require_order`) in agreement with
    /// the series' decoded head-to-foot order.
    pub fn pseudo_check(&self, min_probability: f64, require_order: bool) -> PseudoCheck {
        if self.probability < min_probability {
            PseudoCheck::BelowThreshold
        } else if require_order && self.label != self.decoded_label {
            PseudoCheck::OutOfOrder
        } else {
            PseudoCheck::Keep
        }
    }
}

/// The key-images of the latest label of every series of `study_uid` in the node's index.
pub async fn predictions(index: &Index, study_uid: &str) -> Result<Vec<Prediction>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT s.series_uid, k.sop_instance_uid, k.frame, k.label, k.probabilities, \
                COALESCE(l.model_version, ''), k.smoothed_label \
         FROM studies st \
         JOIN series s ON s.study_ref = st.id \
         JOIN series_labels l ON l.series_ref = s.id AND l.generation = s.label_generation \
         JOIN key_images k ON k.series_label_ref = l.id \
         WHERE st.study_uid = $1 AND l.status = 'labelled' \
         ORDER BY k.id",
    )
    .bind(study_uid)
    .fetch_all(index.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let label: String = r.get(3);
            let probabilities: String = r.get(4);
            let probability = serde_json::from_str::<HashMap<String, f64>>(&probabilities)
                .ok()
                .and_then(|p| p.get(&label).copied())
                .unwrap_or(0.0);
            Prediction {
                series_uid: r.get(0),
                sop_instance_uid: r.get(1),
                frame: u32::try_from(r.get::<i64, _>(2)).unwrap_or(0),
                label,
                decoded_label: r.get(6),
                probability,
                model_version: r.get(5),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(sop: &str, label: Result<&str, &str>, source: Source) -> Claim {
        Claim {
            sop_instance_uid: sop.into(),
            frame: None,
            series_uid: Some("1.2".into()),
            label: label.map(str::to_string).map_err(str::to_string),
            source,
        }
    }

    #[test]
    fn image_labels_beat_series_labels_and_conflicts_are_left_out() {
        let (decisions, unlabelled) = resolve(vec![
            claim("1", Ok("lungs"), Source::Kos),
            claim("1", Ok("lungs"), Source::Ris),
            claim("1", Ok("liver"), Source::RisSeries),
            claim("2", Ok("lungs"), Source::Kos),
            claim("2", Ok("liver"), Source::Ris),
            claim("2", Ok("liver"), Source::Pseudo("m1".into())),
            claim("3", Ok("pelvis"), Source::RisSeries),
            claim("3", Ok("legs"), Source::Pseudo("m1".into())),
            claim("4", Ok("legs"), Source::Pseudo("m 1,x".into())),
            claim(
                "5",
                Err("document without a mapped label (mine.kos_labels)"),
                Source::Kos,
            ),
        ]);
        let got: Vec<(&str, &str, &str)> = decisions
            .iter()
            .map(|d| {
                (
                    d.sop_instance_uid.as_str(),
                    d.label.as_str(),
                    d.label_source.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("1", "lungs", "mined:ris+kos"),
                ("3", "pelvis", "mined:ris-series"),
                ("4", "legs", "pseudo:m_1_x"),
            ]
        );
        assert_eq!(unlabelled["conflicting image labels"], 1);
        assert_eq!(
            unlabelled["document without a mapped label (mine.kos_labels)"],
            1
        );
    }

    #[test]
    fn pseudo_labels_need_confidence_and_the_decoded_order() {
        let p = |label: &str, decoded: &str, probability: f64| Prediction {
            series_uid: "1.2".into(),
            sop_instance_uid: "1.2.3".into(),
            frame: 0,
            label: label.into(),
            decoded_label: decoded.into(),
            probability,
            model_version: "m1".into(),
        };
        assert_eq!(
            p("liver", "liver", 0.99).pseudo_check(0.98, true),
            PseudoCheck::Keep
        );
        assert_eq!(
            p("liver", "liver", 0.98).pseudo_check(0.98, true),
            PseudoCheck::Keep
        );
        assert_eq!(
            p("liver", "liver", 0.97).pseudo_check(0.98, true),
            PseudoCheck::BelowThreshold
        );
        assert_eq!(
            p("legs", "lungs", 0.99).pseudo_check(0.98, true),
            PseudoCheck::OutOfOrder
        );
        // Below the threshold counts first; without the order rule only confidence counts.
        assert_eq!(
            p("legs", "lungs", 0.5).pseudo_check(0.98, true),
            PseudoCheck::BelowThreshold
        );
        assert_eq!(
            p("legs", "lungs", 0.99).pseudo_check(0.98, false),
            PseudoCheck::Keep
        );
    }

    #[test]
    fn wildcards_match_whole_text_case_insensitively() {
        assert!(wildcard_match("*lung*", "Both LUNGS clear"));
        assert!(wildcard_match("liver", " Liver "));
        assert!(!wildcard_match("liver", "liver dome"));
        assert!(wildcard_match("l?ver*", "liver dome"));
        assert!(wildcard_match("*", ""));
        assert!(!wildcard_match("a*b", "acd"));
    }

    #[test]
    fn document_labels_come_from_the_mapping() {
        let rules = vec![
            LabelRule {
                code: Some("39607008".into()),
                scheme: Some("SCT".into()),
                text: None,
                label: "lungs".into(),
            },
            LabelRule {
                code: None,
                scheme: None,
                text: Some("*liver*".into()),
                label: "liver".into(),
            },
        ];
        let doc = |concepts: Vec<(&str, &str, &str)>, texts: Vec<&str>| Document {
            concepts: concepts
                .into_iter()
                .map(|(a, b, c)| (a.into(), b.into(), c.into()))
                .collect(),
            texts: texts.into_iter().map(str::to_string).collect(),
            ..Document::default()
        };
        assert_eq!(
            doc(vec![("39607008", "SCT", "Lung")], vec![]).label(&rules),
            Ok("lungs".into())
        );
        assert!(doc(vec![("39607008", "SRT", "Lung")], vec![])
            .label(&rules)
            .is_err());
        assert_eq!(
            doc(vec![], vec!["Liver lesion"]).label(&rules),
            Ok("liver".into())
        );
        assert_eq!(
            doc(vec![("1", "X", "Liver")], vec![]).label(&rules),
            Ok("liver".into()),
            "text rules also read code meanings"
        );
        assert_eq!(
            doc(vec![("39607008", "SCT", "Lung")], vec!["liver"]).label(&rules),
            Err("document with conflicting labels".into())
        );
        assert!(doc(vec![], vec!["brain"]).label(&rules).is_err());
    }

    #[test]
    fn ris_csv_kinds_and_bad_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ris.csv");
        std::fs::write(
            &path,
            "study_uid,series_uid,sop_instance_uid,accession_number,label\n\
             ,,1.2.3,,Lungs\n\
             1.2,1.2.9,,,liver\n\
             ,,,A17,pelvis\n\
             ,,1.2.4,,thorax\n\
             ,,1.2.5,,legs\n\
             ,,1.2.5,,neck\n\
             ,,,,legs\n",
        )
        .unwrap();
        let ris = RisLabels::load(&path).unwrap();
        assert_eq!(ris.rows, 7);
        assert_eq!(ris.images.len(), 2, "{:?}", ris.images);
        assert_eq!(ris.images[0].label, Ok("lungs".into()));
        assert!(ris.images[1].label.is_err());
        assert_eq!(
            ris.series[&("1.2".into(), "1.2.9".into())],
            Ok("liver".into())
        );
        assert_eq!(ris.accessions["A17"], Ok("pelvis".into()));
        assert_eq!(ris.refused.len(), 2, "{:?}", ris.refused);
        std::fs::write(&path, "uid,label\n1,lungs\n").unwrap();
        assert!(RisLabels::load(&path).is_err());
    }
}
