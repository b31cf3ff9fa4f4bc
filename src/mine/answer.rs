//! One query answer, whether it came as a C-FIND identifier or as QIDO-RS DICOM JSON: the
//! top-level attributes as text values, which is all `mine` reads from answers.

use std::collections::BTreeMap;

use dicom_core::header::Header;
use dicom_core::value::Value;
use dicom_core::Tag;
use dicom_object::InMemDicomObject;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer(BTreeMap<Tag, Vec<String>>);

impl Answer {
    /// The first non-empty value of `tag`, trimmed.
    pub fn get(&self, tag: Tag) -> Option<&str> {
        self.0
            .get(&tag)?
            .iter()
            .map(|v| v.as_str())
            .find(|v| !v.is_empty())
    }

    pub fn text(&self, tag: Tag) -> String {
        self.get(tag).unwrap_or_default().to_string()
    }

    /// Every value of `tag` joined by a backslash, as DICOM writes multiple values.
    pub fn joined(&self, tag: Tag) -> Option<String> {
        let values = self.0.get(&tag)?;
        (!values.is_empty()).then(|| values.join("\\"))
    }

    pub fn values(&self, tag: Tag) -> &[String] {
        self.0.get(&tag).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn insert(&mut self, tag: Tag, values: Vec<String>) {
        self.0.insert(tag, values);
    }

    /// The primitive top-level elements of a C-FIND identifier.
    pub fn from_dicom(obj: &InMemDicomObject) -> Answer {
        let mut out = BTreeMap::new();
        for element in obj.iter() {
            if let Value::Primitive(p) = element.value() {
                let values: Vec<String> = p
                    .to_multi_str()
                    .iter()
                    .map(|v| v.trim_matches(['\0', ' ']).to_string())
                    .collect();
                out.insert(element.tag(), values);
            }
        }
        Answer(out)
    }

    /// A QIDO-RS result object (PS3.18 F.2): `{"0020000D": {"vr": "UI", "Value": [...]}}`.
    pub fn from_json(value: &serde_json::Value) -> Result<Answer, String> {
        let object = value
            .as_object()
            .ok_or("a QIDO-RS result is not a JSON object")?;
        let mut out = BTreeMap::new();
        for (key, attribute) in object {
            let tag =
                parse_tag(key).ok_or_else(|| format!("attribute key {key:?} is not a tag"))?;
            let values = attribute
                .get("Value")
                .and_then(|v| v.as_array())
                .map(|a| a.iter().filter_map(json_text).collect())
                .unwrap_or_default();
            out.insert(tag, values);
        }
        Ok(Answer(out))
    }
}

fn parse_tag(key: &str) -> Option<Tag> {
    if key.len() != 8 {
        return None;
    }
    Some(Tag(
        u16::from_str_radix(&key[..4], 16).ok()?,
        u16::from_str_radix(&key[4..], 16).ok()?,
    ))
}

/// Text of one JSON value: strings as they are, numbers as written, person names by their
/// alphabetic group; sequences (objects) are not kept.
fn json_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.trim().to_string()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Object(o) => o
            .get("Alphabetic")
            .and_then(|a| a.as_str())
            .map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;

    #[test]
    fn json_and_dicom_read_the_same() {
        let json: serde_json::Value = serde_json::from_str(
            r#"{"0020000D": {"vr": "UI", "Value": ["1.2.3"]},
                "00201208": {"vr": "IS", "Value": [7]},
                "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^J"}]},
                "00080061": {"vr": "CS", "Value": ["CT", "KO"]},
                "00100020": {"vr": "LO"}}"#,
        )
        .unwrap();
        let a = Answer::from_json(&json).unwrap();
        let obj = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::STUDY_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2.3\0"),
            ),
            DataElement::new(
                tags::NUMBER_OF_STUDY_RELATED_INSTANCES,
                VR::IS,
                PrimitiveValue::from("7 "),
            ),
            DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("Doe^J")),
            DataElement::new(
                tags::MODALITIES_IN_STUDY,
                VR::CS,
                PrimitiveValue::Strs(["CT".to_string(), "KO".to_string()].into()),
            ),
            DataElement::new(tags::PATIENT_ID, VR::LO, PrimitiveValue::Empty),
        ]);
        let b = Answer::from_dicom(&obj);
        for answer in [&a, &b] {
            assert_eq!(answer.get(tags::STUDY_INSTANCE_UID), Some("1.2.3"));
            assert_eq!(
                answer.get(tags::NUMBER_OF_STUDY_RELATED_INSTANCES),
                Some("7")
            );
            assert_eq!(answer.get(tags::PATIENT_NAME), Some("Doe^J"));
            assert_eq!(
                answer.joined(tags::MODALITIES_IN_STUDY).as_deref(),
                Some("CT\\KO")
            );
            assert_eq!(answer.get(tags::PATIENT_ID), None);
        }
    }
}
