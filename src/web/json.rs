//! The DICOM JSON Model (PS3.18 Annex F.2) for the data sets this node answers with: C-FIND
//! style answers (text, numbers, person names, code sequences) and the STOW-RS response.

use dicom_core::header::{HasLength as _, Header as _};
use dicom_core::value::{PrimitiveValue, Value};
use dicom_core::VR;
use dicom_object::mem::InMemElement;
use dicom_object::InMemDicomObject;
use serde_json::{Map, Value as Json};

/// One data set as a DICOM JSON object: keys are the tags as 8 upper-case hex digits, so
/// serde_json's sorted map puts them in tag order, as F.2.2 asks.
pub fn object(obj: &InMemDicomObject) -> Json {
    let mut map = Map::new();
    for element in obj.iter() {
        let tag = element.tag();
        map.insert(
            format!("{:04X}{:04X}", tag.group(), tag.element()),
            attribute(element),
        );
    }
    Json::Object(map)
}

fn attribute(element: &InMemElement) -> Json {
    let vr = element.vr();
    let mut map = Map::new();
    map.insert("vr".into(), Json::String(vr.to_string().into()));
    let values = match element.value() {
        Value::Sequence(seq) => seq.items().iter().map(object).collect(),
        Value::Primitive(p) => primitive(vr, p),
        // Encapsulated pixel data never appears in our answers.
        Value::PixelSequence(_) => Vec::new(),
    };
    if !values.is_empty() {
        map.insert("Value".into(), Json::Array(values));
    }
    Json::Object(map)
}

/// The values of a primitive element; an empty list when it has none (F.2.5: no "Value").
fn primitive(vr: VR, value: &PrimitiveValue) -> Vec<Json> {
    if value.is_empty() {
        return Vec::new();
    }
    match vr {
        // Bulk data and binary values are not part of any answer this node gives.
        VR::OB | VR::OD | VR::OF | VR::OL | VR::OV | VR::OW | VR::UN => Vec::new(),
        VR::AT => match value {
            PrimitiveValue::Tags(tags) => tags
                .iter()
                .map(|t| Json::String(format!("{:04X}{:04X}", t.group(), t.element())))
                .collect(),
            _ => Vec::new(),
        },
        VR::PN => strings(vr, value)
            .into_iter()
            .map(|v| v.map_or(Json::Null, person_name))
            .collect(),
        VR::IS | VR::DS => strings(vr, value)
            .into_iter()
            .map(|v| v.map_or(Json::Null, |s| number(&s).unwrap_or(Json::String(s))))
            .collect(),
        VR::US | VR::SS | VR::UL | VR::SL | VR::UV | VR::SV | VR::FL | VR::FD => value
            .to_multi_str()
            .iter()
            .map(|s| number(s.trim()).unwrap_or(Json::Null))
            .collect(),
        _ => strings(vr, value)
            .into_iter()
            .map(|v| v.map_or(Json::Null, Json::String))
            .collect(),
    }
}

/// Text values, split at backslashes where the VR allows several, trimmed of padding;
/// `None` for an empty value among several (F.2.5: null).
fn strings(vr: VR, value: &PrimitiveValue) -> Vec<Option<String>> {
    let single = matches!(vr, VR::LT | VR::ST | VR::UT | VR::UR);
    let mut out = Vec::new();
    for s in value.to_multi_str().iter() {
        let parts: Vec<&str> = if single {
            vec![s.as_str()]
        } else {
            s.split('\\').collect()
        };
        for part in parts {
            let trimmed = if single {
                part.trim_end_matches([' ', '\0'])
            } else {
                part.trim_matches([' ', '\0'])
            };
            out.push((!trimmed.is_empty()).then(|| trimmed.to_string()));
        }
    }
    if out.iter().all(Option::is_none) {
        return Vec::new();
    }
    out
}

/// A number as JSON, integers kept exact.
fn number(text: &str) -> Option<Json> {
    let text = text.trim().trim_start_matches('+');
    if let Ok(i) = text.parse::<i64>() {
        return Some(Json::from(i));
    }
    if let Ok(u) = text.parse::<u64>() {
        return Some(Json::from(u));
    }
    text.parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map(Json::Number)
}

/// F.2.2: a PN value as its component groups.
fn person_name(value: String) -> Json {
    let mut map = Map::new();
    for (group, name) in value
        .split('=')
        .zip(["Alphabetic", "Ideographic", "Phonetic"])
    {
        if !group.is_empty() {
            map.insert(name.into(), Json::String(group.to_string()));
        }
    }
    Json::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::value::DataSetSequence;
    use dicom_core::{DataElement, Tag};

    #[test]
    fn answers_in_dicom_json() {
        let item = InMemDicomObject::from_element_iter([
            DataElement::new(
                Tag(0x0008, 0x0100),
                VR::SH,
                PrimitiveValue::from("43799004"),
            ),
            DataElement::new(Tag(0x0008, 0x0104), VR::LO, PrimitiveValue::Empty),
        ]);
        let obj = InMemDicomObject::from_element_iter([
            DataElement::new(
                Tag(0x0010, 0x0010),
                VR::PN,
                PrimitiveValue::from("Müller^Jörg=ミュラー"),
            ),
            DataElement::new(Tag(0x0008, 0x0061), VR::CS, PrimitiveValue::from("CT\\MR")),
            DataElement::new(Tag(0x0020, 0x1206), VR::IS, PrimitiveValue::from("12 ")),
            DataElement::new(Tag(0x0099, 0x1021), VR::DS, PrimitiveValue::from("0.25\\1")),
            DataElement::new(Tag(0x0028, 0x0010), VR::US, PrimitiveValue::from(512_u16)),
            DataElement::new(Tag(0x0020, 0x000D), VR::UI, PrimitiveValue::from("1.2.3\0")),
            DataElement::new(Tag(0x0008, 0x1030), VR::LO, PrimitiveValue::Empty),
            DataElement::new(
                Tag(0x0008, 0x2218),
                VR::SQ,
                DataSetSequence::from(vec![item]),
            ),
        ]);
        let json = object(&obj);
        assert_eq!(
            json,
            serde_json::json!({
                "00080061": {"vr": "CS", "Value": ["CT", "MR"]},
                "00081030": {"vr": "LO"},
                "00082218": {"vr": "SQ", "Value": [{
                    "00080100": {"vr": "SH", "Value": ["43799004"]},
                    "00080104": {"vr": "LO"}
                }]},
                "00991021": {"vr": "DS", "Value": [0.25, 1]},
                "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jörg", "Ideographic": "ミュラー"}]},
                "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
                "00201206": {"vr": "IS", "Value": [12]},
                "00280010": {"vr": "US", "Value": [512]}
            })
        );
        // Keys come out in tag order.
        let text = serde_json::to_string(&json).unwrap();
        assert!(text.find("00080061") < text.find("00100010"));
    }

    #[test]
    fn empty_values_among_several_are_null() {
        let obj = InMemDicomObject::from_element_iter([DataElement::new(
            Tag(0x0008, 0x0008),
            VR::CS,
            PrimitiveValue::from("ORIGINAL\\\\AXIAL"),
        )]);
        assert_eq!(
            object(&obj)["00080008"]["Value"],
            serde_json::json!(["ORIGINAL", null, "AXIAL"])
        );
    }
}
