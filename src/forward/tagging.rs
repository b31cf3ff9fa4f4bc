//! The tagged copy: what the node adds to a data set before forwarding it. The stored file is
//! never touched; the copy is spliced at the byte level, so every element the node does not
//! set keeps the exact bytes the sender wrote, and the pixel data is never parsed:
//!
//! * Body Part Examined (0018,0015): the predicted defined term (`CHESTABDOMEN`, ...);
//! * Anatomic Region Sequence (0008,2218): one item (PS3.3 Table 10-7 permits a single one),
//!   the SNOMED CT code of that term from PS3.16 Table L-1 (Code Value, Coding Scheme
//!   Designator `SCT`, Code Meaning);
//! * the node's private block ([`crate::private_block`]: creator [`PRIVATE_CREATOR`] in group
//!   [`PRIVATE_GROUP`]; the first free block, or the block this creator already holds, which
//!   is replaced): model version, dominant class, the model's classes and their
//!   probabilities — of the image when it is a key-image, else the mean over the series'
//!   key-images — the scope of those probabilities, the coverage along z (JSON) and the
//!   codes of every region present.
//!
//! Group length elements of the groups that change are dropped (they are retired in data
//! sets and would be wrong). Nothing is changed where the label has nothing to say (a series
//! with no region keeps the sender's Body Part Examined).

use std::collections::{BTreeSet, HashMap};

use serde::Deserialize;

use crate::anatomy::coverage::{self, Region};
use crate::private_block::{self, Element as PrivateElement};

/// The odd group of the node's private block.
pub const PRIVATE_GROUP: u16 = private_block::GROUP;
/// Private Creator of the node's block (PS3.5 7.8.1).
pub const PRIVATE_CREATOR: &str = private_block::CREATOR;

const BODY_PART_EXAMINED: (u16, u16) = (0x0018, 0x0015);
const ANATOMIC_REGION_SEQUENCE: (u16, u16) = (0x0008, 0x2218);
const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_DELIMITER: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_DELIMITER: (u16, u16) = (0xFFFE, 0xE0DD);
const UNDEFINED: u32 = 0xFFFF_FFFF;
const MAX_DEPTH: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum TagError {
    #[error("the stored data set is malformed at byte {offset}: {reason}")]
    Malformed { offset: usize, reason: String },
    #[error("private group {PRIVATE_GROUP:04X} has no free block for {PRIVATE_CREATOR:?}")]
    NoPrivateBlock,
    #[error("a value for ({0:04X},{1:04X}) does not fit its length field")]
    TooLong(u16, u16),
}

/// How the data set is encoded (deflated data sets are inflated first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    ExplicitLe,
    ImplicitLe,
}

/// One key-image row of a label, with its probabilities in class order.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyImage {
    pub sop_instance_uid: String,
    pub frame: i64,
    pub z_mm: f64,
    pub label: String,
    pub smoothed_label: String,
    pub probabilities: Vec<f64>,
}

/// What a label result says, in the form the tagged copies need.
#[derive(Debug, Clone, PartialEq)]
pub struct Labels {
    pub body_part: Option<String>,
    /// The code of `body_part` (PS3.16 Table L-1).
    pub body_part_code: Option<Region>,
    /// Every region present, head to foot, as (code value, coding scheme, meaning).
    pub regions: Vec<(String, String, String)>,
    pub classes: Vec<String>,
    /// Mean over the key-images, per class.
    pub series_probabilities: Vec<f64>,
    /// Classes of the coverage and their confidence: the mean probability of the class over
    /// the key-images whose decoded label (`smoothed_label`, decoded along z) it is.
    pub class_confidence: Vec<(String, f64)>,
    pub dominant_class: Option<String>,
    pub model_version: Option<String>,
    pub coverage_json: Option<String>,
    pub key_images: Vec<KeyImage>,
    /// When the label was stored (Unix ms): the time of the KOS document.
    pub labelled_at: i64,
    /// Mean over its frames, per key-image instance.
    image_probabilities: HashMap<String, Vec<f64>>,
}

/// The raw label columns (series_labels), as stored.
#[derive(Debug, Clone, Default)]
pub struct LabelColumns {
    pub body_part_examined: Option<String>,
    pub anatomic_regions: Option<String>,
    pub classes: Option<String>,
    pub dominant_class: Option<String>,
    pub model_version: Option<String>,
    pub coverage: Option<String>,
    /// Unix ms.
    pub labelled_at: i64,
}

/// A key_images row, as stored (probabilities as a JSON object).
#[derive(Debug, Clone)]
pub struct KeyImageColumns {
    pub sop_instance_uid: String,
    pub frame: i64,
    pub z_mm: f64,
    pub label: String,
    pub smoothed_label: String,
    pub probabilities: String,
}

impl Labels {
    /// Read the stored columns. JSON the worker wrote always parses; anything else is read
    /// as absent rather than failing the forward.
    pub fn from_columns(columns: &LabelColumns, key_images: &[KeyImageColumns]) -> Labels {
        #[derive(Deserialize)]
        struct StoredRegion {
            code_value: String,
            coding_scheme: String,
            #[serde(default)]
            code_meaning: String,
        }
        let classes: Vec<String> = columns
            .classes
            .as_deref()
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default();
        let regions: Vec<StoredRegion> = columns
            .anatomic_regions
            .as_deref()
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default();
        let key_images: Vec<KeyImage> = key_images
            .iter()
            .map(|k| {
                let map: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(&k.probabilities).unwrap_or_default();
                KeyImage {
                    sop_instance_uid: k.sop_instance_uid.clone(),
                    frame: k.frame,
                    z_mm: k.z_mm,
                    label: k.label.clone(),
                    smoothed_label: k.smoothed_label.clone(),
                    probabilities: classes
                        .iter()
                        .map(|c| map.get(c).and_then(|v| v.as_f64()).unwrap_or(0.0))
                        .collect(),
                }
            })
            .collect();
        let mean = |images: &[&KeyImage]| -> Vec<f64> {
            let mut sum = vec![0.0; classes.len()];
            for k in images {
                for (s, p) in sum.iter_mut().zip(&k.probabilities) {
                    *s += p;
                }
            }
            let n = images.len().max(1) as f64;
            sum.into_iter().map(|s| s / n).collect()
        };
        let all: Vec<&KeyImage> = key_images.iter().collect();
        let series_probabilities = if key_images.is_empty() {
            Vec::new()
        } else {
            mean(&all)
        };
        let class_confidence = classes
            .iter()
            .enumerate()
            .filter_map(|(i, class)| {
                let of_class: Vec<&KeyImage> = key_images
                    .iter()
                    .filter(|k| &k.smoothed_label == class)
                    .collect();
                (!of_class.is_empty()).then(|| (class.clone(), mean(&of_class)[i]))
            })
            .collect();
        let mut by_instance: HashMap<String, Vec<&KeyImage>> = HashMap::new();
        for k in &key_images {
            by_instance
                .entry(k.sop_instance_uid.clone())
                .or_default()
                .push(k);
        }
        let image_probabilities = by_instance
            .into_iter()
            .map(|(uid, frames)| (uid, mean(&frames)))
            .collect();
        let body_part = columns
            .body_part_examined
            .clone()
            .filter(|t| !t.trim().is_empty());
        Labels {
            body_part_code: body_part.as_deref().and_then(region_of_term),
            body_part,
            regions: regions
                .into_iter()
                .map(|r| (r.code_value, r.coding_scheme, r.code_meaning))
                .collect(),
            classes,
            series_probabilities,
            class_confidence,
            dominant_class: columns.dominant_class.clone(),
            model_version: columns.model_version.clone(),
            coverage_json: columns.coverage.clone(),
            key_images,
            labelled_at: columns.labelled_at,
            image_probabilities,
        }
    }

    /// The probabilities a copy of this instance carries, and their scope (`IMAGE`, `SERIES`).
    pub fn probabilities_for(&self, sop_instance_uid: &str) -> (&[f64], &'static str) {
        match self.image_probabilities.get(sop_instance_uid) {
            Some(p) => (p, "IMAGE"),
            None => (&self.series_probabilities, "SERIES"),
        }
    }
}

/// The coded region of a Body Part Examined term this node writes.
pub fn region_of_term(term: &str) -> Option<Region> {
    [
        coverage::NECK,
        coverage::CHEST,
        coverage::ABDOMEN,
        coverage::PELVIS,
        coverage::LOWER_LIMB,
        coverage::NECK_CHEST,
        coverage::NECK_CHEST_ABDOMEN,
        coverage::NECK_CHEST_ABDOMEN_PELVIS,
        coverage::CHEST_ABDOMEN,
        coverage::CHEST_ABDOMEN_PELVIS,
        coverage::ABDOMEN_PELVIS,
        coverage::PELVIS_LOWER_LIMBS,
    ]
    .into_iter()
    .find(|r| r.body_part == term.trim())
}

/// A tag and its encoded element.
type Encoded = ((u16, u16), Vec<u8>);
/// Tag, VR (blank in Implicit VR and for items), value length.
type Header = ((u16, u16), [u8; 2], u32);

/// A top-level element of the data set being tagged.
struct Element {
    tag: (u16, u16),
    start: usize,
    end: usize,
    value_start: usize,
}

/// Tag the beginning of a data set. `data` holds the data set from its first byte, whole or
/// at least up to the first top-level element after group [`PRIVATE_GROUP`]. Returns the
/// tagged bytes replacing `data[..consumed]`; everything from `consumed` on is sent as it is.
/// `Ok(None)` when `data` ends before that point and is not the whole data set.
pub fn tag(
    data: &[u8],
    whole: bool,
    encoding: Encoding,
    labels: &Labels,
    sop_instance_uid: &str,
) -> Result<Option<(Vec<u8>, usize)>, TagError> {
    let stop = (PRIVATE_GROUP, 0xFFFF);
    let mut walker = Walker {
        data,
        pos: 0,
        encoding,
    };
    let mut elements = Vec::new();
    let consumed = loop {
        if walker.pos == data.len() {
            if whole {
                break data.len();
            }
            return Ok(None);
        }
        // The tag decides before the value is walked: pixel data is never read.
        if let Some(t) = walker.peek_tag() {
            if t > stop {
                break walker.pos;
            }
        }
        match walker.top_element() {
            Ok(e) => elements.push(e),
            Err(_) if !whole => return Ok(None),
            Err(e) => return Err(e),
        }
    };

    // The node's block: the one its creator already holds, else the first free one.
    let mut used_blocks = BTreeSet::new();
    let mut ours = None;
    for e in &elements {
        let (g, el) = e.tag;
        if g != PRIVATE_GROUP {
            continue;
        }
        if (0x0010..=0x00FF).contains(&el) {
            used_blocks.insert(el as u8);
            let value = &data[e.value_start..e.end];
            let creator = String::from_utf8_lossy(value);
            if creator.trim_end_matches(['\0', ' ']).trim() == PRIVATE_CREATOR {
                ours = Some(el as u8);
            }
        } else if el >= 0x1000 {
            used_blocks.insert((el >> 8) as u8);
        }
    }
    let block = match ours {
        Some(b) => b,
        None => (0x10..=0xFF)
            .find(|b| !used_blocks.contains(b))
            .ok_or(TagError::NoPrivateBlock)?,
    };

    let new = new_elements(encoding, labels, sop_instance_uid, block)?;
    let replaced = |tag: (u16, u16)| -> bool {
        let (g, el) = tag;
        let group_length = el == 0x0000 && (g == 0x0008 || g == 0x0018 || g == PRIVATE_GROUP);
        let own_block = g == PRIVATE_GROUP && (el == u16::from(block) || (el >> 8) as u8 == block);
        group_length || own_block || new.iter().any(|(t, _)| *t == tag)
    };
    let added: usize = new.iter().map(|(_, b)| b.len()).sum();
    let mut out = Vec::with_capacity(consumed + added);
    let mut pending = new.iter().peekable();
    for e in &elements {
        while let Some((t, bytes)) = pending.peek() {
            if *t > e.tag {
                break;
            }
            out.extend_from_slice(bytes);
            pending.next();
        }
        if !replaced(e.tag) {
            out.extend_from_slice(&data[e.start..e.end]);
        }
    }
    for (_, bytes) in pending {
        out.extend_from_slice(bytes);
    }
    Ok(Some((out, consumed)))
}

/// The elements the node writes, sorted by tag, each encoded.
fn new_elements(
    encoding: Encoding,
    labels: &Labels,
    sop_instance_uid: &str,
    block: u8,
) -> Result<Vec<Encoded>, TagError> {
    let enc = Encoder { encoding };
    let mut out = Vec::new();
    if let Some(region) = labels.body_part_code {
        let mut item = Vec::new();
        item.extend(enc.text((0x0008, 0x0100), *b"SH", region.code_value)?);
        item.extend(enc.text((0x0008, 0x0102), *b"SH", region.coding_scheme)?);
        item.extend(enc.text((0x0008, 0x0104), *b"LO", region.code_meaning)?);
        out.push((
            ANATOMIC_REGION_SEQUENCE,
            enc.sequence(ANATOMIC_REGION_SEQUENCE, &[item])?,
        ));
    }
    if let Some(term) = &labels.body_part {
        out.push((
            BODY_PART_EXAMINED,
            enc.text(BODY_PART_EXAMINED, *b"CS", term)?,
        ));
    }
    let creator = (PRIVATE_GROUP, u16::from(block));
    out.push((creator, enc.text(creator, *b"LO", PRIVATE_CREATOR)?));
    // Each element with the tag and VR the block defines.
    let tag_of = |e: &PrivateElement| {
        let t = e.tag_in(block);
        (t.group(), t.element())
    };
    let text = |e: &PrivateElement, value: &str| -> Result<Encoded, TagError> {
        Ok((tag_of(e), enc.text(tag_of(e), e.vr.to_bytes(), value)?))
    };
    if let Some(v) = &labels.model_version {
        out.push(text(&private_block::MODEL_VERSION, v)?);
    }
    if let Some(d) = &labels.dominant_class {
        out.push(text(&private_block::DOMINANT_CLASS, d)?);
    }
    let (probabilities, scope) = labels.probabilities_for(sop_instance_uid);
    if !labels.classes.is_empty() && probabilities.len() == labels.classes.len() {
        out.push(text(&private_block::CLASSES, &labels.classes.join("\\"))?);
        let e = &private_block::PROBABILITIES;
        let bytes: Vec<u8> = probabilities.iter().flat_map(|p| p.to_le_bytes()).collect();
        out.push((tag_of(e), enc.raw(tag_of(e), e.vr.to_bytes(), &bytes)?));
        out.push(text(&private_block::PROBABILITY_SCOPE, scope)?);
    }
    if let Some(c) = &labels.coverage_json {
        out.push(text(&private_block::COVERAGE, c)?);
    }
    if !labels.regions.is_empty() {
        let codes = labels
            .regions
            .iter()
            .map(|(value, scheme, _)| format!("{scheme}:{value}"))
            .collect::<Vec<_>>()
            .join("\\");
        out.push(text(&private_block::REGION_CODES, &codes)?);
    }
    out.sort_by_key(|(t, _)| *t);
    Ok(out)
}

struct Encoder {
    encoding: Encoding,
}

impl Encoder {
    /// A text value, padded with a space to an even length.
    fn text(&self, tag: (u16, u16), vr: [u8; 2], value: &str) -> Result<Vec<u8>, TagError> {
        let mut bytes = value.as_bytes().to_vec();
        if bytes.len() % 2 == 1 {
            bytes.push(b' ');
        }
        self.raw(tag, vr, &bytes)
    }

    fn raw(&self, tag: (u16, u16), vr: [u8; 2], value: &[u8]) -> Result<Vec<u8>, TagError> {
        let mut out = Vec::with_capacity(value.len() + 12);
        self.header(&mut out, tag, vr, value.len())?;
        out.extend_from_slice(value);
        Ok(out)
    }

    /// A sequence of defined length whose items are the given encoded element lists.
    fn sequence(&self, tag: (u16, u16), items: &[Vec<u8>]) -> Result<Vec<u8>, TagError> {
        let mut body = Vec::new();
        for item in items {
            let len = u32::try_from(item.len()).map_err(|_| TagError::TooLong(tag.0, tag.1))?;
            body.extend_from_slice(&ITEM.0.to_le_bytes());
            body.extend_from_slice(&ITEM.1.to_le_bytes());
            body.extend_from_slice(&len.to_le_bytes());
            body.extend_from_slice(item);
        }
        self.raw(tag, *b"SQ", &body)
    }

    fn header(
        &self,
        out: &mut Vec<u8>,
        tag: (u16, u16),
        vr: [u8; 2],
        len: usize,
    ) -> Result<(), TagError> {
        out.extend_from_slice(&tag.0.to_le_bytes());
        out.extend_from_slice(&tag.1.to_le_bytes());
        let too_long = || TagError::TooLong(tag.0, tag.1);
        match self.encoding {
            Encoding::ImplicitLe => {
                let len = u32::try_from(len).map_err(|_| too_long())?;
                out.extend_from_slice(&len.to_le_bytes());
            }
            Encoding::ExplicitLe if has_long_length(vr) => {
                let len = u32::try_from(len).map_err(|_| too_long())?;
                out.extend_from_slice(&vr);
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&len.to_le_bytes());
            }
            Encoding::ExplicitLe => {
                let len = u16::try_from(len).map_err(|_| too_long())?;
                out.extend_from_slice(&vr);
                out.extend_from_slice(&len.to_le_bytes());
            }
        }
        Ok(())
    }
}

/// PS3.5 7.1.2 (one list for the whole node: `store::inspect`).
fn has_long_length(vr: [u8; 2]) -> bool {
    crate::store::inspect::has_long_length(vr)
}

/// Element boundaries of a data set in memory (headers only; values are skipped).
struct Walker<'a> {
    data: &'a [u8],
    pos: usize,
    encoding: Encoding,
}

impl Walker<'_> {
    fn malformed(&self, reason: impl Into<String>) -> TagError {
        TagError::Malformed {
            offset: self.pos,
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], TagError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.data.len())
            .ok_or_else(|| self.malformed(format!("truncated in {what}")))?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    /// (tag, VR, length) of the next element; items and delimiters have no VR.
    fn header(&mut self, encoding: Encoding) -> Result<Header, TagError> {
        let raw = self.take(8, "element header")?;
        let group = u16::from_le_bytes([raw[0], raw[1]]);
        let element = u16::from_le_bytes([raw[2], raw[3]]);
        if group == 0xFFFE || encoding == Encoding::ImplicitLe {
            let len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
            return Ok(((group, element), *b"  ", len));
        }
        let vr = [raw[4], raw[5]];
        if !vr.iter().all(u8::is_ascii_uppercase) {
            return Err(self.malformed(format!("({group:04X},{element:04X}) has no valid VR")));
        }
        if has_long_length(vr) {
            let ext = self.take(4, "element length")?;
            let len = u32::from_le_bytes([ext[0], ext[1], ext[2], ext[3]]);
            Ok(((group, element), vr, len))
        } else {
            Ok((
                (group, element),
                vr,
                u32::from(u16::from_le_bytes([raw[6], raw[7]])),
            ))
        }
    }

    fn peek_tag(&self) -> Option<(u16, u16)> {
        let b = self.data.get(self.pos..self.pos + 4)?;
        Some((
            u16::from_le_bytes([b[0], b[1]]),
            u16::from_le_bytes([b[2], b[3]]),
        ))
    }

    fn top_element(&mut self) -> Result<Element, TagError> {
        let start = self.pos;
        let (tag, vr, len) = self.header(self.encoding)?;
        let value_start = self.pos;
        self.skip_value(self.encoding, vr, len, 0)?;
        Ok(Element {
            tag,
            start,
            end: self.pos,
            value_start,
        })
    }

    fn skip_value(
        &mut self,
        encoding: Encoding,
        vr: [u8; 2],
        len: u32,
        depth: usize,
    ) -> Result<(), TagError> {
        if depth > MAX_DEPTH {
            return Err(self.malformed("sequences nested too deep"));
        }
        if len != UNDEFINED {
            self.take(len as usize, "element value")?;
            return Ok(());
        }
        // Undefined length: a sequence, encapsulated pixel data, or UN holding a sequence
        // (whose content is Implicit VR Little Endian, PS3.5 6.2.2).
        let inner = if &vr == b"UN" {
            Encoding::ImplicitLe
        } else {
            encoding
        };
        loop {
            let (tag, _, item_len) = self.header(inner)?;
            match tag {
                SEQUENCE_DELIMITER => return Ok(()),
                ITEM if item_len == UNDEFINED => loop {
                    let (t, v, l) = self.header(inner)?;
                    if t == ITEM_DELIMITER {
                        break;
                    }
                    self.skip_value(inner, v, l, depth + 1)?;
                },
                ITEM => {
                    self.take(item_len as usize, "item")?;
                }
                (g, e) => {
                    return Err(self.malformed(format!(
                        "({g:04X},{e:04X}) inside a sequence where an item was expected"
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::header::Header as _;
    use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
    use dicom_dictionary_std::tags;
    use dicom_encoding::TransferSyntaxIndex;
    use dicom_object::InMemDicomObject;
    use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

    fn labels() -> Labels {
        let columns = LabelColumns {
            body_part_examined: Some("CHESTABDOMEN".into()),
            anatomic_regions: Some(
                r#"[{"body_part":"CHEST","code_value":"43799004","coding_scheme":"SCT","code_meaning":"Chest"},
                    {"body_part":"ABDOMEN","code_value":"818981001","coding_scheme":"SCT","code_meaning":"Abdomen"}]"#
                    .into(),
            ),
            classes: Some(r#"["lungs","liver","other"]"#.into()),
            dominant_class: Some("lungs".into()),
            model_version: Some("test-1".into()),
            coverage: Some(r#"[{"class":"lungs","z_from_mm":0.0,"z_to_mm":-10.0,"images":2}]"#.into()),
            labelled_at: 0,
        };
        let key = |uid: &str, p: &str, smoothed: &str| KeyImageColumns {
            sop_instance_uid: uid.into(),
            frame: 0,
            z_mm: 0.0,
            label: smoothed.into(),
            smoothed_label: smoothed.into(),
            probabilities: p.into(),
        };
        Labels::from_columns(
            &columns,
            &[
                key(
                    "1.2.3.1",
                    r#"{"lungs":0.9,"liver":0.05,"other":0.05}"#,
                    "lungs",
                ),
                key(
                    "1.2.3.2",
                    r#"{"lungs":0.7,"liver":0.2,"other":0.1}"#,
                    "lungs",
                ),
                key(
                    "1.2.3.3",
                    r#"{"lungs":0.2,"liver":0.6,"other":0.2}"#,
                    "liver",
                ),
            ],
        )
    }

    fn ts(uid: &str) -> &'static dicom_encoding::TransferSyntax {
        TransferSyntaxRegistry
            .get(uid)
            .expect("known transfer syntax")
    }

    fn sample(extra: Vec<DataElement<InMemDicomObject>>) -> InMemDicomObject {
        let mut obj = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2.3.1"),
            ),
            DataElement::new(tags::MODALITY, VR::CS, PrimitiveValue::from("CT")),
            DataElement::new(
                tags::BODY_PART_EXAMINED,
                VR::CS,
                PrimitiveValue::from("HEAD"),
            ),
            DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("Doe^J")),
            DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(2u16)),
            DataElement::new(
                tags::PIXEL_DATA,
                VR::OW,
                PrimitiveValue::from(vec![1u8, 2, 3, 4, 5, 6, 7, 8]),
            ),
        ]);
        for e in extra {
            obj.put(e);
        }
        obj
    }

    fn encode(obj: &InMemDicomObject, uid: &str) -> Vec<u8> {
        let mut out = Vec::new();
        obj.write_dataset_with_ts(&mut out, ts(uid)).unwrap();
        out
    }

    fn tagged(bytes: &[u8], encoding: Encoding, uid: &str) -> InMemDicomObject {
        let (head, consumed) = tag(bytes, true, encoding, &labels(), "1.2.3.1")
            .unwrap()
            .expect("whole data set");
        let mut out = head;
        out.extend_from_slice(&bytes[consumed..]);
        InMemDicomObject::read_dataset_with_ts(&out[..], ts(uid)).expect("tagged copy parses")
    }

    fn text(obj: &InMemDicomObject, tag: Tag) -> String {
        obj.element(tag)
            .unwrap()
            .to_str()
            .unwrap()
            .trim()
            .to_string()
    }

    #[test]
    fn explicit_copy_has_the_tags_and_keeps_everything_else() {
        let obj = sample(vec![]);
        let bytes = encode(&obj, "1.2.840.10008.1.2.1");
        let copy = tagged(&bytes, Encoding::ExplicitLe, "1.2.840.10008.1.2.1");
        assert_eq!(text(&copy, tags::BODY_PART_EXAMINED), "CHESTABDOMEN");
        let items = copy
            .element(tags::ANATOMIC_REGION_SEQUENCE)
            .unwrap()
            .items()
            .unwrap();
        assert_eq!(items.len(), 1, "PS3.3 Table 10-7: a single item");
        assert_eq!(text(&items[0], tags::CODE_VALUE), "416550000");
        assert_eq!(text(&items[0], tags::CODING_SCHEME_DESIGNATOR), "SCT");
        assert_eq!(text(&items[0], tags::CODE_MEANING), "Chest and Abdomen");
        assert_eq!(text(&copy, Tag(0x0099, 0x0010)), PRIVATE_CREATOR);
        assert_eq!(text(&copy, Tag(0x0099, 0x1010)), "test-1");
        assert_eq!(text(&copy, Tag(0x0099, 0x1011)), "lungs");
        assert_eq!(text(&copy, Tag(0x0099, 0x1015)), "lungs\\liver\\other");
        let p: Vec<f64> = copy
            .element(Tag(0x0099, 0x1016))
            .unwrap()
            .to_multi_float64()
            .unwrap();
        assert_eq!(p, vec![0.9, 0.05, 0.05], "a key-image carries its own");
        assert_eq!(text(&copy, Tag(0x0099, 0x1017)), "IMAGE");
        assert!(text(&copy, Tag(0x0099, 0x1018)).starts_with("[{\"class\":\"lungs\""));
        assert_eq!(
            text(&copy, Tag(0x0099, 0x1019)),
            "SCT:43799004\\SCT:818981001"
        );
        // Each element has the VR the block defines, and nothing else is in the block.
        let mut written = 0;
        for e in copy.iter().filter(|e| e.tag().group() == 0x0099) {
            if e.tag().element() <= 0x00FF {
                continue;
            }
            let defined = private_block::by_offset(e.tag().element() as u8).unwrap();
            assert_eq!(e.vr(), defined.vr, "{}", defined.name);
            written += 1;
        }
        assert_eq!(written, 7);
        assert_eq!(text(&copy, tags::PATIENT_NAME), "Doe^J");
        assert_eq!(
            copy.element(tags::PIXEL_DATA)
                .unwrap()
                .to_bytes()
                .unwrap()
                .as_ref(),
            &[1, 2, 3, 4, 5, 6, 7, 8]
        );
    }

    #[test]
    fn implicit_copy_and_series_probabilities() {
        let bytes = encode(&sample(vec![]), "1.2.840.10008.1.2");
        let (head, consumed) = tag(&bytes, true, Encoding::ImplicitLe, &labels(), "9.9")
            .unwrap()
            .unwrap();
        let mut out = head;
        out.extend_from_slice(&bytes[consumed..]);
        let copy = InMemDicomObject::read_dataset_with_ts(&out[..], ts("1.2.840.10008.1.2"))
            .expect("parses");
        assert_eq!(text(&copy, tags::BODY_PART_EXAMINED), "CHESTABDOMEN");
        let raw = copy
            .element(Tag(0x0099, 0x1016))
            .unwrap()
            .to_bytes()
            .unwrap();
        let p: Vec<f64> = raw
            .chunks(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let expected = [0.6, 0.85 / 3.0, 0.35 / 3.0];
        for (a, b) in p.iter().zip(expected) {
            assert!((a - b).abs() < 1e-12, "{p:?}");
        }
        let source = copy
            .element(Tag(0x0099, 0x1017))
            .unwrap()
            .to_bytes()
            .unwrap();
        assert_eq!(&source[..], b"SERIES");
    }

    #[test]
    fn the_prefix_after_the_private_group_is_left_alone() {
        let bytes = encode(&sample(vec![]), "1.2.840.10008.1.2.1");
        let (_, consumed) = tag(&bytes, true, Encoding::ExplicitLe, &labels(), "1.2.3.1")
            .unwrap()
            .unwrap();
        // Pixel Data (7FE0,0010) is the first element after group 0099.
        assert_eq!(&bytes[consumed..consumed + 4], &[0xE0, 0x7F, 0x10, 0]);
        // A prefix that stops before that point asks for more.
        assert!(tag(
            &bytes[..consumed - 3],
            false,
            Encoding::ExplicitLe,
            &labels(),
            "x"
        )
        .unwrap()
        .is_none());
        assert!(tag(
            &bytes[..consumed + 4],
            false,
            Encoding::ExplicitLe,
            &labels(),
            "x"
        )
        .unwrap()
        .is_some());
    }

    #[test]
    fn foreign_private_blocks_are_kept_and_ours_is_replaced() {
        let foreign = vec![
            DataElement::new(
                Tag(0x0099, 0x0010),
                VR::LO,
                PrimitiveValue::from("OTHER VENDOR"),
            ),
            DataElement::new(Tag(0x0099, 0x1001), VR::LO, PrimitiveValue::from("theirs")),
            DataElement::new(
                Tag(0x0099, 0x0011),
                VR::LO,
                PrimitiveValue::from(PRIVATE_CREATOR),
            ),
            DataElement::new(
                Tag(0x0099, 0x1110),
                VR::LO,
                PrimitiveValue::from("old-model"),
            ),
            DataElement::new(Tag(0x0099, 0x1199), VR::LO, PrimitiveValue::from("stale")),
            DataElement::new(Tag(0x0008, 0x0000), VR::UL, PrimitiveValue::from(1234u32)),
        ];
        let bytes = encode(&sample(foreign), "1.2.840.10008.1.2.1");
        let copy = tagged(&bytes, Encoding::ExplicitLe, "1.2.840.10008.1.2.1");
        assert_eq!(text(&copy, Tag(0x0099, 0x1001)), "theirs");
        assert_eq!(text(&copy, Tag(0x0099, 0x0011)), PRIVATE_CREATOR);
        assert_eq!(text(&copy, Tag(0x0099, 0x1110)), "test-1");
        assert!(
            copy.element(Tag(0x0099, 0x1199)).is_err(),
            "stale values go"
        );
        assert!(
            copy.element(Tag(0x0008, 0x0000)).is_err(),
            "group length dropped"
        );

        // Tagging a tagged copy again gives the same bytes.
        let (head, consumed) = tag(&bytes, true, Encoding::ExplicitLe, &labels(), "1.2.3.1")
            .unwrap()
            .unwrap();
        let mut once = head;
        once.extend_from_slice(&bytes[consumed..]);
        let (head, consumed) = tag(&once, true, Encoding::ExplicitLe, &labels(), "1.2.3.1")
            .unwrap()
            .unwrap();
        let mut twice = head;
        twice.extend_from_slice(&once[consumed..]);
        assert_eq!(once, twice);

        // A block taken by another creator is not reused.
        let other = vec![DataElement::new(
            Tag(0x0099, 0x0010),
            VR::LO,
            PrimitiveValue::from("OTHER VENDOR"),
        )];
        let copy = tagged(
            &encode(&sample(other), "1.2.840.10008.1.2.1"),
            Encoding::ExplicitLe,
            "1.2.840.10008.1.2.1",
        );
        assert_eq!(text(&copy, Tag(0x0099, 0x0011)), PRIVATE_CREATOR);
        assert_eq!(text(&copy, Tag(0x0099, 0x1111)), "lungs");
    }

    #[test]
    fn sequences_of_undefined_length_and_encapsulated_pixel_data_are_walked() {
        // (0008,1140) sequence, undefined length, one item of undefined length holding a
        // nested undefined-length sequence; then encapsulated pixel data.
        let mut d = Vec::new();
        let el = |d: &mut Vec<u8>, g: u16, e: u16, vr: &[u8; 2], v: &[u8]| {
            d.extend_from_slice(&g.to_le_bytes());
            d.extend_from_slice(&e.to_le_bytes());
            d.extend_from_slice(vr);
            d.extend_from_slice(&(v.len() as u16).to_le_bytes());
            d.extend_from_slice(v);
        };
        let undefined = |d: &mut Vec<u8>, g: u16, e: u16, vr: &[u8; 2]| {
            d.extend_from_slice(&g.to_le_bytes());
            d.extend_from_slice(&e.to_le_bytes());
            d.extend_from_slice(vr);
            d.extend_from_slice(&[0, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
        };
        let marker = |d: &mut Vec<u8>, e: u16, len: u32| {
            d.extend_from_slice(&0xFFFEu16.to_le_bytes());
            d.extend_from_slice(&e.to_le_bytes());
            d.extend_from_slice(&len.to_le_bytes());
        };
        el(&mut d, 0x0008, 0x0060, b"CS", b"CT");
        undefined(&mut d, 0x0008, 0x1140, b"SQ");
        marker(&mut d, 0xE000, UNDEFINED);
        undefined(&mut d, 0x0008, 0x1199, b"SQ");
        marker(&mut d, 0xE000, 0);
        marker(&mut d, 0xE0DD, 0);
        marker(&mut d, 0xE00D, 0);
        marker(&mut d, 0xE0DD, 0);
        el(&mut d, 0x0018, 0x0015, b"CS", b"HEAD");
        undefined(&mut d, 0x7FE0, 0x0010, b"OB");
        marker(&mut d, 0xE000, 0);
        marker(&mut d, 0xE000, 4);
        d.extend_from_slice(&[9, 9, 9, 9]);
        marker(&mut d, 0xE0DD, 0);
        let (head, consumed) = tag(&d, true, Encoding::ExplicitLe, &labels(), "1.2.3.1")
            .unwrap()
            .unwrap();
        let mut out = head;
        out.extend_from_slice(&d[consumed..]);
        let copy = InMemDicomObject::read_dataset_with_ts(&out[..], ts("1.2.840.10008.1.2.4.70"))
            .expect("parses");
        assert_eq!(text(&copy, tags::BODY_PART_EXAMINED), "CHESTABDOMEN");
        assert!(copy.element(Tag(0x0008, 0x1140)).is_ok());
        assert!(copy.element(tags::PIXEL_DATA).is_ok());

        // Damaged: an item claims more bytes than there are.
        let mut bad = d.clone();
        let at = bad.len() - 16;
        bad[at..at + 4].copy_from_slice(&0x7FFF_0000u32.to_le_bytes());
        // The damage is after group 0099: the walk never reaches it.
        assert!(tag(&bad, true, Encoding::ExplicitLe, &labels(), "x").is_ok());
        let mut truncated = d[..30].to_vec();
        truncated.truncate(30);
        assert!(matches!(
            tag(&truncated, true, Encoding::ExplicitLe, &labels(), "x"),
            Err(TagError::Malformed { .. })
        ));
    }

    #[test]
    fn confidence_is_the_mean_over_the_images_of_the_class() {
        let l = labels();
        assert_eq!(l.class_confidence.len(), 2);
        assert_eq!(l.class_confidence[0].0, "lungs");
        assert!((l.class_confidence[0].1 - 0.8).abs() < 1e-12);
        assert_eq!(l.class_confidence[1].0, "liver");
        assert!((l.class_confidence[1].1 - 0.6).abs() < 1e-12);
        assert_eq!(l.body_part_code, Some(coverage::CHEST_ABDOMEN));
    }
}
