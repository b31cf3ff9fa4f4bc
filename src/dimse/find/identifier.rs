//! The identifier of a C-FIND-RQ: checked for structure first (so no length or nesting a
//! peer writes can make dicom-object allocate or recurse without bound), parsed with
//! dicom-object in the presentation context's transfer syntax, and turned into a [`Query`].

use std::io::Read;

use dicom_core::dictionary::DataDictionary;
use dicom_core::header::{HasLength, Header as _};
use dicom_core::value::{PrimitiveValue, Value};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;
use dicom_encoding::text::{SpecificCharacterSet, TextCodec};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::mem::InMemElement;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::keys::{self, ItemKey, Key, Level, Matching, Model};
use super::matching::{self, Condition};

/// Identifiers are a few hundred bytes; a long List of UID still fits.
pub const MAX_IDENTIFIER_BYTES: usize = 1 << 20;
/// A deflated identifier may not inflate beyond this.
const MAX_INFLATED_BYTES: usize = 4 << 20;
/// Sequences nested deeper than this are refused before dicom-object recurses into them.
const MAX_DEPTH: usize = 8;

const SPECIFIC_CHARACTER_SET: Tag = Tag(0x0008, 0x0005);
const QUERY_RETRIEVE_LEVEL: Tag = Tag(0x0008, 0x0052);
const ITEM: Tag = Tag(0xFFFE, 0xE000);
const ITEM_DELIMITER: Tag = Tag(0xFFFE, 0xE00D);
const SEQUENCE_DELIMITER: Tag = Tag(0xFFFE, 0xE0DD);
const PIXEL_DATA: Tag = Tag(0x7FE0, 0x0010);
const UNDEFINED: u32 = 0xFFFF_FFFF;
const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
const DEFLATED_EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1.99";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentifierError {
    /// The bytes are not a data set (C000).
    #[error("identifier cannot be parsed: {0}")]
    Unparseable(String),
    /// A data set, but not a query this information model defines (A900).
    #[error("{0}")]
    DoesNotMatch(String),
    /// A query this SCP cannot carry out (C001).
    #[error("{0}")]
    Unsupported(String),
}

/// A parsed C-FIND request.
#[derive(Debug)]
pub struct Query {
    pub model: Model,
    pub level: Level,
    /// The supported keys of the identifier, in tag order: each is matched and returned.
    pub keys: Vec<RequestedKey>,
    /// Keys that are not supported at this level (or not for matching): FF01.
    pub unsupported: Vec<Tag>,
    /// The block (gggg,00xx) where the request reserved our Private Creator; answers use it.
    pub private_block: Option<u8>,
}

#[derive(Debug)]
pub struct RequestedKey {
    pub key: &'static Key,
    pub condition: Condition,
    /// Anatomic Region Sequence: the item keys asked for, with their conditions. Empty:
    /// universal, every item is returned whole.
    pub items: Vec<(&'static ItemKey, Condition)>,
}

impl Query {
    pub fn has_private_keys(&self) -> bool {
        self.keys
            .iter()
            .any(|k| k.key.tag.group() == keys::PRIVATE_GROUP)
    }

    /// The tag a key has in answers: private keys in the request's block.
    pub fn answer_tag(&self, key: &Key) -> Tag {
        if key.tag.group() == keys::PRIVATE_GROUP {
            let block = self.private_block.unwrap_or(keys::PRIVATE_BLOCK);
            Tag(
                key.tag.group(),
                (u16::from(block) << 8) | (key.tag.element() & 0xFF),
            )
        } else {
            key.tag
        }
    }
}

/// Parse `bytes`, a data set in transfer syntax `ts_uid`, as a query of `model`.
pub fn parse(bytes: &[u8], ts_uid: &str, model: Model) -> Result<Query, IdentifierError> {
    let object = read(bytes, ts_uid)?;
    query_of(&object, model)
}

fn read(bytes: &[u8], ts_uid: &str) -> Result<InMemDicomObject, IdentifierError> {
    let unparseable = IdentifierError::Unparseable;
    let inflated;
    let (data, ts_uid) = if ts_uid == DEFLATED_EXPLICIT_VR_LE {
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(bytes)
            .take(MAX_INFLATED_BYTES as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| unparseable(format!("corrupt deflated data: {e}")))?;
        if out.len() > MAX_INFLATED_BYTES {
            return Err(unparseable("inflates beyond 4 MiB".into()));
        }
        inflated = out;
        (&inflated[..], EXPLICIT_VR_LE)
    } else {
        (bytes, ts_uid)
    };
    let ts = TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or_else(|| unparseable(format!("unknown transfer syntax {ts_uid}")))?;
    // Every syntax this node negotiates but Implicit VR LE encodes the data set in Explicit
    // VR Little Endian (the encapsulated ones differ only in Pixel Data).
    if ts.endianness() != dicom_encoding::transfer_syntax::Endianness::Little {
        return Err(unparseable(format!("big endian transfer syntax {ts_uid}")));
    }
    let explicit = ts_uid != IMPLICIT_VR_LE;
    check_structure(data, explicit).map_err(unparseable)?;
    InMemDicomObject::read_dataset_with_ts(data, ts).map_err(|e| unparseable(e.to_string()))
}

/// Walk the element headers: every defined length must fit in what encloses it, and
/// sequences may nest at most [`MAX_DEPTH`] deep. dicom-object allocates a value's
/// announced length before reading it and recurses once per nested sequence, so both are
/// bounded here, following the same rules it uses to tell sequences from values.
pub fn check_structure(bytes: &[u8], explicit: bool) -> Result<(), String> {
    let mut pos = 0;
    scan_dataset(bytes, &mut pos, bytes.len(), false, explicit, 0)
}

struct ElementHeader {
    tag: Tag,
    vr: [u8; 2],
    len: u32,
}

fn read_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn read_header(
    b: &[u8],
    pos: &mut usize,
    end: usize,
    explicit: bool,
) -> Result<ElementHeader, String> {
    let at = *pos;
    if at + 8 > end {
        return Err(format!("truncated element header at byte {at}"));
    }
    let tag = Tag(read_u16(b, at), read_u16(b, at + 2));
    if tag.group() == 0xFFFE || !explicit {
        *pos += 8;
        return Ok(ElementHeader {
            tag,
            vr: *b"  ",
            len: read_u32(b, at + 4),
        });
    }
    let vr = [b[at + 4], b[at + 5]];
    if !vr.iter().all(u8::is_ascii_uppercase) {
        return Err(format!("{tag} has no valid VR at byte {at}"));
    }
    if crate::store::inspect::has_long_length(vr) {
        if at + 12 > end {
            return Err(format!("truncated element header at byte {at}"));
        }
        *pos += 12;
        Ok(ElementHeader {
            tag,
            vr,
            len: read_u32(b, at + 8),
        })
    } else {
        *pos += 8;
        Ok(ElementHeader {
            tag,
            vr,
            len: u32::from(read_u16(b, at + 6)),
        })
    }
}

fn skip(pos: &mut usize, len: u32, end: usize, tag: Tag) -> Result<(), String> {
    let len = len as usize;
    if *pos + len > end {
        return Err(format!(
            "{tag} claims {len} bytes but only {} remain",
            end - *pos
        ));
    }
    *pos += len;
    Ok(())
}

/// The elements of a data set or item, up to `end` or (for an item of undefined length)
/// its delimiter.
fn scan_dataset(
    b: &[u8],
    pos: &mut usize,
    end: usize,
    delimited: bool,
    explicit: bool,
    depth: usize,
) -> Result<(), String> {
    loop {
        if *pos >= end {
            return if delimited {
                Err("item without its delimiter".into())
            } else {
                Ok(())
            };
        }
        let h = read_header(b, pos, end, explicit)?;
        if h.tag == ITEM_DELIMITER && delimited {
            return Ok(());
        }
        if h.tag.group() == 0xFFFE {
            return Err(format!("unexpected {} in a data set", h.tag));
        }
        let is_sequence = if explicit {
            &h.vr == b"SQ" || (&h.vr == b"UN" && h.len == UNDEFINED)
        } else {
            h.tag != PIXEL_DATA
                && (h.len == UNDEFINED
                    || StandardDataDictionary
                        .by_tag(h.tag)
                        .is_some_and(|e| e.vr.relaxed() == VR::SQ))
        };
        if is_sequence {
            if depth + 1 > MAX_DEPTH {
                return Err(format!("sequences nested deeper than {MAX_DEPTH}"));
            }
            // A UN of undefined length holds Implicit VR items (PS3.5 6.2.2).
            let items_explicit = explicit && &h.vr == b"SQ";
            scan_sequence(b, pos, end, h.len, h.tag, items_explicit, depth + 1)?;
        } else if h.len == UNDEFINED {
            scan_fragments(b, pos, end, h.tag)?;
        } else {
            let vr = if explicit {
                h.vr
            } else {
                crate::store::inspect::implicit_vr((h.tag.group(), h.tag.element()))
            };
            crate::store::inspect::check_value_length(vr, h.len)
                .map_err(|why| format!("{} {why}", h.tag))?;
            skip(pos, h.len, end, h.tag)?;
        }
    }
}

fn scan_sequence(
    b: &[u8],
    pos: &mut usize,
    end: usize,
    len: u32,
    tag: Tag,
    explicit: bool,
    depth: usize,
) -> Result<(), String> {
    let defined_end = if len == UNDEFINED {
        None
    } else {
        let start = *pos;
        skip(pos, len, end, tag)?;
        let seq_end = *pos;
        *pos = start;
        Some(seq_end)
    };
    let limit = defined_end.unwrap_or(end);
    loop {
        if defined_end == Some(*pos) {
            return Ok(());
        }
        let h = read_header(b, pos, limit, false)?;
        match h.tag {
            SEQUENCE_DELIMITER if defined_end.is_none() => return Ok(()),
            ITEM if h.len == UNDEFINED => scan_dataset(b, pos, limit, true, explicit, depth)?,
            ITEM => {
                let start = *pos;
                skip(pos, h.len, limit, tag)?;
                let item_end = *pos;
                *pos = start;
                scan_dataset(b, pos, item_end, false, explicit, depth)?;
            }
            other => return Err(format!("{other} inside the sequence {tag}")),
        }
    }
}

/// An element of undefined length that is not a sequence (encapsulated Pixel Data): items
/// of raw bytes up to a sequence delimiter.
fn scan_fragments(b: &[u8], pos: &mut usize, end: usize, tag: Tag) -> Result<(), String> {
    loop {
        let h = read_header(b, pos, end, false)?;
        match h.tag {
            SEQUENCE_DELIMITER => return Ok(()),
            ITEM if h.len != UNDEFINED => skip(pos, h.len, end, tag)?,
            other => return Err(format!("{other} inside the fragments of {tag}")),
        }
    }
}

/// The text values of an element, trimmed (PS3.5: leading and trailing spaces are not
/// significant in the VRs of keys). Values the dictionary does not know (UN: private keys
/// in Implicit VR) are decoded with the request's character set.
fn values(element: &InMemElement, charset: &SpecificCharacterSet) -> Vec<String> {
    let trim = |s: &str| s.trim_matches([' ', '\0']).to_string();
    match element.value() {
        Value::Primitive(PrimitiveValue::U8(bytes)) => {
            let text = charset
                .decode(bytes)
                .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned());
            text.split('\\').map(trim).collect()
        }
        Value::Primitive(PrimitiveValue::Empty) => Vec::new(),
        Value::Primitive(p) => p.to_multi_str().iter().map(|s| trim(s)).collect(),
        _ => Vec::new(),
    }
}

fn query_of(object: &InMemDicomObject, model: Model) -> Result<Query, IdentifierError> {
    let charset = request_charset(object)?;
    let level_values = object
        .get(QUERY_RETRIEVE_LEVEL)
        .map(|e| values(e, &charset))
        .unwrap_or_default();
    let level = match level_values.as_slice() {
        [] => {
            return Err(IdentifierError::DoesNotMatch(
                "Query/Retrieve Level (0008,0052) is missing".into(),
            ))
        }
        [one] => Level::parse(one).ok_or_else(|| {
            IdentifierError::DoesNotMatch(format!("unknown Query/Retrieve Level {one:?}"))
        })?,
        _ => {
            return Err(IdentifierError::DoesNotMatch(
                "Query/Retrieve Level (0008,0052) has several values".into(),
            ))
        }
    };
    if !model.has_level(level) {
        return Err(IdentifierError::DoesNotMatch(format!(
            "level {} is not in the {} model",
            level.as_str(),
            model.name()
        )));
    }
    let private_block = object
        .iter()
        .filter(|e| is_private_creator(e.tag()))
        .find(|e| {
            values(e, &charset)
                .first()
                .is_some_and(|v| v == keys::PRIVATE_CREATOR)
        })
        .map(|e| (e.tag().element() & 0xFF) as u8);

    let mut query = Query {
        model,
        level,
        keys: Vec::new(),
        unsupported: Vec::new(),
        private_block,
    };
    for element in object.iter() {
        let tag = element.tag();
        if tag.element() == 0x0000
            || tag == SPECIFIC_CHARACTER_SET
            || tag == QUERY_RETRIEVE_LEVEL
            || is_private_creator(tag)
        {
            continue;
        }
        let known = if tag.group() == keys::PRIVATE_GROUP {
            // Only elements of the block our creator reserved are ours.
            let block = (tag.element() >> 8) as u8;
            private_block.filter(|b| *b == block).and_then(|_| {
                keys::lookup(Tag(
                    tag.group(),
                    (u16::from(keys::PRIVATE_BLOCK) << 8) | (tag.element() & 0xFF),
                ))
            })
        } else if tag.group() % 2 == 1 {
            None
        } else {
            keys::lookup(tag)
        };
        let Some(key) = known.filter(|k| k.level <= level) else {
            query.unsupported.push(tag);
            continue;
        };
        let requested = requested_key(key, element, &charset, &mut query.unsupported)?;
        query.keys.push(requested);
    }
    Ok(query)
}

fn is_private_creator(tag: Tag) -> bool {
    tag.group() % 2 == 1 && (0x0010..=0x00FF).contains(&tag.element())
}

/// The request's Specific Character Set, as dicom-object already decoded its values.
fn request_charset(object: &InMemDicomObject) -> Result<SpecificCharacterSet, IdentifierError> {
    let Some(element) = object.get(SPECIFIC_CHARACTER_SET) else {
        return Ok(SpecificCharacterSet::default());
    };
    let codes = values(element, &SpecificCharacterSet::default());
    match codes.as_slice() {
        [] => Ok(SpecificCharacterSet::default()),
        [code] => SpecificCharacterSet::from_code(code).ok_or_else(|| {
            IdentifierError::Unsupported(format!(
                "Specific Character Set {code:?} is not supported"
            ))
        }),
        _ => Err(IdentifierError::Unsupported(
            "code extensions (several Specific Character Sets) are not supported".into(),
        )),
    }
}

fn requested_key(
    key: &'static Key,
    element: &InMemElement,
    charset: &SpecificCharacterSet,
    unsupported: &mut Vec<Tag>,
) -> Result<RequestedKey, IdentifierError> {
    let bad = |e: matching::BadValue| {
        IdentifierError::DoesNotMatch(format!("{} {}: {}", key.name, key.tag, e.0))
    };
    let vals = values(element, charset);
    let condition = match key.matching {
        Matching::Uid => matching::uids(&vals),
        Matching::Text | Matching::PersonName | Matching::ModalitiesInStudy => {
            matching::text(&vals)
        }
        Matching::LowerCase => {
            let lower: Vec<String> = vals.iter().map(|v| v.to_lowercase()).collect();
            matching::text(&lower)
        }
        Matching::Date => matching::dates(&vals).map_err(bad)?,
        Matching::Time => matching::times(&vals).map_err(bad)?,
        Matching::DateTime => matching::datetimes(&vals).map_err(bad)?,
        Matching::Integer => matching::integers(&vals).map_err(bad)?,
        Matching::ReturnOnly => {
            if vals.iter().any(|v| !v.is_empty() && v != "*") {
                unsupported.push(element.tag());
            }
            Condition::Universal
        }
        Matching::AnatomicRegions => {
            let items = region_items(key, element, charset, unsupported)?;
            return Ok(RequestedKey {
                key,
                condition: Condition::Universal,
                items,
            });
        }
    };
    Ok(RequestedKey {
        key,
        condition,
        items: Vec::new(),
    })
}

/// Sequence Matching (PS3.4 C.2.2.2.6): one item whose keys are matched item by item.
fn region_items(
    key: &'static Key,
    element: &InMemElement,
    charset: &SpecificCharacterSet,
    unsupported: &mut Vec<Tag>,
) -> Result<Vec<(&'static ItemKey, Condition)>, IdentifierError> {
    let items = match element.value() {
        Value::Sequence(seq) => seq.items(),
        // A zero-length value where a sequence was expected: universal.
        Value::Primitive(p) if p.is_empty() => return Ok(Vec::new()),
        _ => {
            return Err(IdentifierError::DoesNotMatch(format!(
                "{} {} is not a sequence",
                key.name, key.tag
            )))
        }
    };
    let item = match items {
        [] => return Ok(Vec::new()),
        [one] => one,
        _ => {
            return Err(IdentifierError::DoesNotMatch(format!(
                "{} {} has {} items; a key sequence has one",
                key.name,
                key.tag,
                items.len()
            )))
        }
    };
    let mut out = Vec::new();
    for e in item.iter() {
        if e.tag().element() == 0x0000 {
            continue;
        }
        match keys::lookup_item(e.tag()) {
            Some(item_key) => out.push((item_key, matching::text(&values(e, charset)))),
            None => unsupported.push(e.tag()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::value::DataSetSequence;
    use dicom_core::DataElement;

    fn encode(elements: Vec<DataElement<InMemDicomObject>>, ts: &str) -> Vec<u8> {
        let obj = InMemDicomObject::from_element_iter(elements);
        let mut out = Vec::new();
        obj.write_dataset_with_ts(&mut out, TransferSyntaxRegistry.get(ts).unwrap())
            .unwrap();
        out
    }

    fn text(tag: Tag, vr: VR, v: &str) -> DataElement<InMemDicomObject> {
        DataElement::new(tag, vr, PrimitiveValue::from(v))
    }

    fn series_query(
        extra: Vec<DataElement<InMemDicomObject>>,
        ts: &str,
    ) -> Result<Query, IdentifierError> {
        let mut e = vec![text(QUERY_RETRIEVE_LEVEL, VR::CS, "SERIES")];
        e.extend(extra);
        parse(&encode(e, ts), ts, Model::StudyRoot)
    }

    #[test]
    fn keys_levels_and_unsupported_keys() {
        for ts in [IMPLICIT_VR_LE, EXPLICIT_VR_LE, DEFLATED_EXPLICIT_VR_LE] {
            let q = series_query(
                vec![
                    text(Tag(0x0018, 0x0015), VR::CS, "CHEST"),
                    text(Tag(0x0020, 0x000D), VR::UI, "1.2.3\\1.2.4"),
                    text(Tag(0x0008, 0x0018), VR::UI, ""), // IMAGE key at SERIES level
                    text(Tag(0x0008, 0x0090), VR::PN, ""), // not indexed
                    text(Tag(0x0020, 0x1209), VR::IS, "5"), // return key with a value
                ],
                ts,
            )
            .unwrap();
            assert_eq!(q.level, Level::Series);
            let names: Vec<&str> = q.keys.iter().map(|k| k.key.name).collect();
            assert_eq!(
                names,
                [
                    "BodyPartExamined",
                    "StudyInstanceUID",
                    "NumberOfSeriesRelatedInstances"
                ]
            );
            assert_eq!(
                q.keys[1].condition,
                Condition::Uids(vec!["1.2.3".into(), "1.2.4".into()])
            );
            assert_eq!(
                q.unsupported,
                [
                    Tag(0x0008, 0x0018),
                    Tag(0x0008, 0x0090),
                    Tag(0x0020, 0x1209)
                ]
            );
        }
    }

    #[test]
    fn private_keys_follow_the_creator_block() {
        for ts in [IMPLICIT_VR_LE, EXPLICIT_VR_LE] {
            let q = series_query(
                vec![
                    text(Tag(0x0099, 0x0010), VR::LO, "SOMEONE ELSE"),
                    text(Tag(0x0099, 0x0011), VR::LO, keys::PRIVATE_CREATOR),
                    text(Tag(0x0099, 0x1013), VR::CS, "X"),
                    text(Tag(0x0099, 0x1112), VR::CS, "LABELLED"),
                    text(Tag(0x0099, 0x1113), VR::CS, "ABDOMEN"),
                    // a block element that is not a C-FIND key
                    text(Tag(0x0099, 0x1117), VR::CS, "IMAGE"),
                ],
                ts,
            )
            .unwrap();
            assert_eq!(q.private_block, Some(0x11));
            assert_eq!(q.unsupported, [Tag(0x0099, 0x1013), Tag(0x0099, 0x1117)]);
            assert_eq!(q.keys[0].key.name, "LabelStatus");
            assert_eq!(
                q.keys[0].condition,
                matching::text(&["labelled".to_string()])
            );
            assert_eq!(q.keys[1].key.name, "ReceivedBodyPartExamined");
            assert_eq!(
                q.keys[1].condition,
                matching::text(&["ABDOMEN".to_string()])
            );
            assert_eq!(q.answer_tag(q.keys[0].key), Tag(0x0099, 0x1112));
            assert_eq!(q.answer_tag(q.keys[1].key), Tag(0x0099, 0x1113));
        }
    }

    #[test]
    fn sequence_keys() {
        let item = InMemDicomObject::from_element_iter([
            text(Tag(0x0008, 0x0100), VR::SH, "43799004"),
            text(Tag(0x0008, 0x0102), VR::SH, "SCT"),
            text(Tag(0x0008, 0x0104), VR::LO, ""),
        ]);
        let seq = DataElement::new(
            Tag(0x0008, 0x2218),
            VR::SQ,
            DataSetSequence::from(vec![item]),
        );
        for ts in [IMPLICIT_VR_LE, EXPLICIT_VR_LE] {
            let q = series_query(vec![seq.clone()], ts).unwrap();
            let items = &q.keys[0].items;
            assert_eq!(items.len(), 3);
            assert_eq!(items[0].1, matching::text(&["43799004".to_string()]));
            assert_eq!(items[2].1, Condition::Universal);
        }
        let empty = DataElement::new(
            Tag(0x0008, 0x2218),
            VR::SQ,
            DataSetSequence::from(Vec::<InMemDicomObject>::new()),
        );
        let q = series_query(vec![empty], EXPLICIT_VR_LE).unwrap();
        assert!(q.keys[0].items.is_empty());
    }

    #[test]
    fn bad_identifiers() {
        let level = |l: &str| {
            parse(
                &encode(vec![text(QUERY_RETRIEVE_LEVEL, VR::CS, l)], EXPLICIT_VR_LE),
                EXPLICIT_VR_LE,
                Model::StudyRoot,
            )
        };
        assert!(matches!(
            level("PATIENT"),
            Err(IdentifierError::DoesNotMatch(_))
        ));
        assert!(matches!(
            level("FRAME"),
            Err(IdentifierError::DoesNotMatch(_))
        ));
        assert!(matches!(level(""), Err(IdentifierError::DoesNotMatch(_))));
        assert!(matches!(
            series_query(
                vec![text(Tag(0x0008, 0x0020), VR::DA, "yesterday")],
                EXPLICIT_VR_LE
            ),
            Err(IdentifierError::DoesNotMatch(_))
        ));
        assert!(matches!(
            series_query(
                vec![text(Tag(0x0008, 0x0005), VR::CS, "ISO_IR 999")],
                EXPLICIT_VR_LE
            ),
            Err(IdentifierError::Unsupported(_))
        ));
        assert!(matches!(
            parse(b"\x01\x02\x03", EXPLICIT_VR_LE, Model::StudyRoot),
            Err(IdentifierError::Unparseable(_))
        ));
    }

    #[test]
    fn hostile_lengths_and_nesting_are_refused_before_parsing() {
        // (0010,0010) claiming 4 GB in 12 bytes
        let mut huge = vec![0x10, 0x00, 0x10, 0x00, 0xF0, 0xFF, 0xFF, 0xFF];
        huge.extend_from_slice(b"ABCD");
        assert!(check_structure(&huge, false).is_err());
        // 5000 nested sequences of undefined length
        let mut nested = Vec::new();
        for _ in 0..5000 {
            nested.extend_from_slice(&[0x08, 0x00, 0x15, 0x11, 0xFF, 0xFF, 0xFF, 0xFF]);
            nested.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        }
        assert!(check_structure(&nested, false)
            .unwrap_err()
            .contains("nested deeper"));
        assert!(matches!(
            parse(&nested, IMPLICIT_VR_LE, Model::StudyRoot),
            Err(IdentifierError::Unparseable(_))
        ));
        // defined-length sequences nest too (implicit VR: known from the dictionary)
        let mut inner: Vec<u8> = Vec::new();
        for _ in 0..20 {
            let mut item = vec![0xFE, 0xFF, 0x00, 0xE0];
            item.extend_from_slice(&(inner.len() as u32).to_le_bytes());
            item.extend_from_slice(&inner);
            let mut seq = vec![0x08, 0x00, 0x15, 0x11];
            seq.extend_from_slice(&(item.len() as u32).to_le_bytes());
            seq.extend_from_slice(&item);
            inner = seq;
        }
        assert!(check_structure(&inner, false).is_err());
        // a well-formed identifier passes
        let ok = encode(
            vec![text(QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY")],
            EXPLICIT_VR_LE,
        );
        assert_eq!(check_structure(&ok, true), Ok(()));
    }

    /// Regression (issue #18, found by `tests/fuzz.rs`): an element with an unknown VR of
    /// two uppercase letters passed the structure check with a 16-bit length, while
    /// dicom-parser reads it as UN with a 32-bit length and allocated the 709 MB that the
    /// next four bytes ("DOE*") announced.
    #[test]
    fn an_unknown_vr_is_checked_as_dicom_parser_reads_it() {
        let mut bytes = Vec::new();
        // (0008,0052) CS "STUDY "
        bytes.extend_from_slice(&[0x08, 0, 0x52, 0, b'C', b'S', 6, 0]);
        bytes.extend_from_slice(b"STUDY ");
        // (0010,0010) "PJ" (no such VR), 16-bit length 4, value "DOE*"
        bytes.extend_from_slice(&[0x10, 0, 0x10, 0, b'P', b'J', 4, 0]);
        bytes.extend_from_slice(b"DOE*");
        bytes.extend_from_slice(&[0x10, 0, 0x20, 0, b'L', b'O', 6, 0]);
        bytes.extend_from_slice(b"12345 ");
        assert!(check_structure(&bytes, true).is_err());
        assert!(matches!(
            parse(&bytes, EXPLICIT_VR_LE, Model::StudyRoot),
            Err(IdentifierError::Unparseable(_))
        ));
    }

    /// Regression (issue #18, found by `tests/fuzz.rs`): a US value of 3 bytes. dicom-parser
    /// reads one value and leaves a byte, then takes value bytes for the next length (a
    /// 4 GiB allocation that aborted the process).
    #[test]
    fn a_binary_value_of_partial_length_is_refused() {
        for explicit in [true, false] {
            let mut bytes = Vec::new();
            // (0008,0052) CS "STUDY "
            bytes.extend_from_slice(&[0x08, 0, 0x52, 0]);
            if explicit {
                bytes.extend_from_slice(&[b'C', b'S', 6, 0]);
            } else {
                bytes.extend_from_slice(&[6, 0, 0, 0]);
            }
            bytes.extend_from_slice(b"STUDY ");
            // (0020,1206) Number of Study Related Series is IS; (0028,0010) Rows is US
            bytes.extend_from_slice(&[0x28, 0, 0x10, 0]);
            if explicit {
                bytes.extend_from_slice(&[b'U', b'S', 3, 0]);
            } else {
                bytes.extend_from_slice(&[3, 0, 0, 0]);
            }
            bytes.extend_from_slice(&[1, 0, 0x20]);
            bytes.extend_from_slice(&[0x00, 0x0D, b'U', b'I', 0xFF, 0xFF, 0xFF, 0xF0]);
            let err = check_structure(&bytes, explicit).unwrap_err();
            assert!(err.contains("not a multiple of 2"), "{err}");
        }
    }
}
