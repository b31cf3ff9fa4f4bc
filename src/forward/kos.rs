//! The Key Object Selection document (PS3.3 A.35.4, template TID 2010) that
//! `forward.key_object_selection` sends with a series: it flags the key-images the
//! classifier looked at, and its Key Object Description lists each with its label and
//! probability. Patient and study attributes are copied from a stored instance of the
//! series; its UIDs are derived from the series and generation, so a retry (or a second
//! destination) sends the same document.

use std::path::Path;

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, Length, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::{InMemDicomObject, OpenFileOptions};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use sha2::{Digest, Sha256};

use super::tagging::Labels;

pub const KEY_OBJECT_SELECTION: &str = uids::KEY_OBJECT_SELECTION_DOCUMENT_STORAGE;
/// Series Number of the documents (high, so viewers list them after the images).
const SERIES_NUMBER: &str = "9901";

#[derive(Debug, thiserror::Error)]
pub enum KosError {
    #[error("reading patient and study attributes from {path}: {reason}")]
    Source { path: String, reason: String },
    #[error("the label has no key-image to reference")]
    NoKeyImages,
    #[error("encoding the document: {0}")]
    Encode(String),
}

/// A `2.25.` UID (PS3.5 B.2) derived from `text`: the first 128 bits of its SHA-256.
pub fn uid_from(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    format!("2.25.{}", u128::from_be_bytes(bytes))
}

/// The SOP Instance UID of the document for one generation of a series.
pub fn document_uid(series_uid: &str, generation: i64) -> String {
    uid_from(&format!(
        "anatomy-node key object selection {series_uid} {generation}"
    ))
}

/// The Series Instance UID of the documents of a series.
pub fn document_series_uid(series_uid: &str) -> String {
    uid_from(&format!("anatomy-node key object series {series_uid}"))
}

/// A key-image as the document references it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    /// 0-based frames (multi-frame images); empty for single-frame ones.
    pub frames: Vec<i64>,
}

/// Build the document. `source` is a stored instance of the series (patient and study
/// attributes), `references` the key-image instances with their SOP classes, `created_at_ms`
/// the time the label was stored (so every copy of the document is the same).
pub fn build(
    source: &Path,
    series_uid: &str,
    generation: i64,
    labels: &Labels,
    references: &[Reference],
    created_at_ms: i64,
) -> Result<InMemDicomObject, KosError> {
    if references.is_empty() {
        return Err(KosError::NoKeyImages);
    }
    let header = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(source)
        .map_err(|e| KosError::Source {
            path: source.display().to_string(),
            reason: e.to_string(),
        })?;
    let study_uid = header
        .element(tags::STUDY_INSTANCE_UID)
        .ok()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .ok_or_else(|| KosError::Source {
            path: source.display().to_string(),
            reason: "no Study Instance UID".into(),
        })?;

    let mut doc = InMemDicomObject::new_empty();
    // Patient and General Study modules (type 2: present, maybe empty).
    for tag in [
        tags::SPECIFIC_CHARACTER_SET,
        tags::PATIENT_NAME,
        tags::PATIENT_ID,
        tags::ISSUER_OF_PATIENT_ID,
        tags::PATIENT_BIRTH_DATE,
        tags::PATIENT_SEX,
        tags::STUDY_DATE,
        tags::STUDY_TIME,
        tags::REFERRING_PHYSICIAN_NAME,
        tags::STUDY_ID,
        tags::ACCESSION_NUMBER,
    ] {
        match header.element(tag) {
            Ok(e) => {
                doc.put(e.clone());
            }
            Err(_) if tag == tags::SPECIFIC_CHARACTER_SET || tag == tags::ISSUER_OF_PATIENT_ID => {}
            Err(_) => {
                let vr = dicom_object::StandardDataDictionary
                    .by_tag(tag)
                    .map_or(VR::LO, |entry| entry.vr().relaxed());
                doc.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
            }
        }
    }
    let (date, time) = date_time(created_at_ms);
    let put = |doc: &mut InMemDicomObject, tag: Tag, vr: VR, value: &str| {
        doc.put(DataElement::new(tag, vr, PrimitiveValue::from(value)));
    };
    put(&mut doc, tags::SOP_CLASS_UID, VR::UI, KEY_OBJECT_SELECTION);
    put(
        &mut doc,
        tags::SOP_INSTANCE_UID,
        VR::UI,
        &document_uid(series_uid, generation),
    );
    put(&mut doc, tags::STUDY_INSTANCE_UID, VR::UI, &study_uid);
    put(&mut doc, tags::INSTANCE_CREATION_DATE, VR::DA, &date);
    put(&mut doc, tags::INSTANCE_CREATION_TIME, VR::TM, &time);
    // Key Object Document Series, General Equipment.
    put(&mut doc, tags::MODALITY, VR::CS, "KO");
    put(
        &mut doc,
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        &document_series_uid(series_uid),
    );
    put(&mut doc, tags::SERIES_NUMBER, VR::IS, SERIES_NUMBER);
    put(
        &mut doc,
        tags::SERIES_DESCRIPTION,
        VR::LO,
        "Anatomy key-images (anatomy-node)",
    );
    doc.put(sequence(
        tags::REFERENCED_PERFORMED_PROCEDURE_STEP_SEQUENCE,
        vec![],
    ));
    put(&mut doc, tags::MANUFACTURER, VR::LO, "anatomy-node");
    put(
        &mut doc,
        tags::SOFTWARE_VERSIONS,
        VR::LO,
        env!("CARGO_PKG_VERSION"),
    );
    // Key Object Document.
    put(
        &mut doc,
        tags::INSTANCE_NUMBER,
        VR::IS,
        &generation.to_string(),
    );
    put(&mut doc, tags::CONTENT_DATE, VR::DA, &date);
    put(&mut doc, tags::CONTENT_TIME, VR::TM, &time);
    let referenced_sops: Vec<InMemDicomObject> =
        references.iter().map(|r| sop_reference(r, false)).collect();
    let series_item = InMemDicomObject::from_element_iter([
        DataElement::new(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(series_uid),
        ),
        sequence(tags::REFERENCED_SOP_SEQUENCE, referenced_sops),
    ]);
    let study_item = InMemDicomObject::from_element_iter([
        DataElement::new(
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(study_uid.as_str()),
        ),
        sequence(tags::REFERENCED_SERIES_SEQUENCE, vec![series_item]),
    ]);
    doc.put(sequence(
        tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
        vec![study_item],
    ));
    // SR Document Content: TID 2010, "Of Interest".
    put(&mut doc, tags::VALUE_TYPE, VR::CS, "CONTAINER");
    doc.put(sequence(
        tags::CONCEPT_NAME_CODE_SEQUENCE,
        vec![code("113000", "DCM", "Of Interest")],
    ));
    put(&mut doc, tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE");
    doc.put(sequence(
        tags::CONTENT_TEMPLATE_SEQUENCE,
        vec![InMemDicomObject::from_element_iter([
            DataElement::new(tags::MAPPING_RESOURCE, VR::CS, PrimitiveValue::from("DCMR")),
            DataElement::new(
                tags::TEMPLATE_IDENTIFIER,
                VR::CS,
                PrimitiveValue::from("2010"),
            ),
        ])],
    ));
    let mut content = vec![InMemDicomObject::from_element_iter([
        DataElement::new(
            tags::RELATIONSHIP_TYPE,
            VR::CS,
            PrimitiveValue::from("CONTAINS"),
        ),
        DataElement::new(tags::VALUE_TYPE, VR::CS, PrimitiveValue::from("TEXT")),
        sequence(
            tags::CONCEPT_NAME_CODE_SEQUENCE,
            vec![code("113012", "DCM", "Key Object Description")],
        ),
        DataElement::new(
            tags::TEXT_VALUE,
            VR::UT,
            PrimitiveValue::from(description(labels)),
        ),
    ])];
    for r in references {
        content.push(InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::RELATIONSHIP_TYPE,
                VR::CS,
                PrimitiveValue::from("CONTAINS"),
            ),
            DataElement::new(tags::VALUE_TYPE, VR::CS, PrimitiveValue::from("IMAGE")),
            sequence(tags::REFERENCED_SOP_SEQUENCE, vec![sop_reference(r, true)]),
        ]));
    }
    doc.put(sequence(tags::CONTENT_SEQUENCE, content));
    Ok(doc)
}

/// The data set bytes in `ts_uid` (Explicit or Implicit VR Little Endian).
pub fn encode(doc: &InMemDicomObject, ts_uid: &str) -> Result<Vec<u8>, KosError> {
    let ts = TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or_else(|| KosError::Encode(format!("unknown transfer syntax {ts_uid}")))?;
    let mut out = Vec::with_capacity(4096);
    doc.write_dataset_with_ts(&mut out, ts)
        .map_err(|e| KosError::Encode(e.to_string()))?;
    Ok(out)
}

/// "anatomy-node, model ...: Body Part Examined ...", then one line per key-image.
fn description(labels: &Labels) -> String {
    let mut text = format!(
        "Anatomy key-images labelled by anatomy-node, model {}. Body Part Examined: {}. Dominant class: {}.",
        labels.model_version.as_deref().unwrap_or("unknown"),
        labels.body_part.as_deref().unwrap_or("none"),
        labels.dominant_class.as_deref().unwrap_or("none"),
    );
    let multi_frame = |uid: &str| {
        labels
            .key_images
            .iter()
            .any(|k| k.sop_instance_uid == uid && k.frame > 0)
    };
    for k in &labels.key_images {
        let p = labels
            .classes
            .iter()
            .position(|c| c == &k.label)
            .and_then(|i| k.probabilities.get(i))
            .copied()
            .unwrap_or(0.0);
        let frame = if multi_frame(&k.sop_instance_uid) {
            format!(" frame {}", k.frame + 1)
        } else {
            String::new()
        };
        text.push_str(&format!(
            "\r\n{}{frame}: {} (p = {p:.3}, decoded along z {}), z = {:.1} mm",
            k.sop_instance_uid, k.label, k.smoothed_label, k.z_mm
        ));
    }
    text
}

fn sop_reference(r: &Reference, with_frames: bool) -> InMemDicomObject {
    let mut item = InMemDicomObject::from_element_iter([
        DataElement::new(
            tags::REFERENCED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(r.sop_class_uid.as_str()),
        ),
        DataElement::new(
            tags::REFERENCED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(r.sop_instance_uid.as_str()),
        ),
    ]);
    if with_frames && !r.frames.is_empty() {
        let frames: Vec<String> = r.frames.iter().map(|f| (f + 1).to_string()).collect();
        item.put(DataElement::new(
            tags::REFERENCED_FRAME_NUMBER,
            VR::IS,
            PrimitiveValue::Strs(frames.into()),
        ));
    }
    item
}

fn code(value: &str, scheme: &str, meaning: &str) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        DataElement::new(tags::CODE_VALUE, VR::SH, PrimitiveValue::from(value)),
        DataElement::new(
            tags::CODING_SCHEME_DESIGNATOR,
            VR::SH,
            PrimitiveValue::from(scheme),
        ),
        DataElement::new(tags::CODE_MEANING, VR::LO, PrimitiveValue::from(meaning)),
    ])
}

fn sequence(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new_with_len(
        tag,
        VR::SQ,
        Length::UNDEFINED,
        DataSetSequence::new(items, Length::UNDEFINED),
    )
}

/// DICOM DA and TM (UTC) of a Unix time in milliseconds.
fn date_time(ms: i64) -> (String, String) {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    // Civil from days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        format!("{year:04}{month:02}{day:02}"),
        format!(
            "{:02}{:02}{:02}",
            of_day / 3600,
            (of_day % 3600) / 60,
            of_day % 60
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_valid_and_stable() {
        let a = document_uid("1.2.3", 1);
        assert_eq!(a, document_uid("1.2.3", 1));
        assert_ne!(a, document_uid("1.2.3", 2));
        assert!(a.starts_with("2.25.") && a.len() <= 64, "{a}");
        assert!(crate::store::layout::is_valid_uid(&a), "{a}");
        assert_ne!(document_series_uid("1.2.3"), document_series_uid("1.2.4"));
    }

    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(date_time(0), ("19700101".into(), "000000".into()));
        assert_eq!(
            date_time(1_709_251_199_000),
            ("20240229".into(), "235959".into())
        );
    }
}
