//! DIMSE command sets (PS3.7 section 9, 10): parsing requests, encoding responses.
//! Command sets are always Implicit VR Little Endian.

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::status::Status;

pub const C_STORE_RQ: u16 = 0x0001;
pub const C_FIND_RQ: u16 = 0x0020;
pub const C_ECHO_RQ: u16 = 0x0030;
pub const C_CANCEL_RQ: u16 = 0x0FFF;
/// Command Data Set Type value meaning "no data set follows".
pub const NO_DATASET: u16 = 0x0101;
const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("command set cannot be parsed: {0}")]
    Parse(String),
    #[error("command set lacks {0}")]
    Missing(&'static str),
    /// An element whose header does not fit what follows: checked before anything is
    /// allocated, since dicom-parser reserves a value's declared length before reading it.
    #[error("command set is malformed at byte {offset}: {reason}")]
    Malformed { offset: usize, reason: String },
}

/// Element header of Implicit VR Little Endian: tag (4 bytes) and length (4 bytes).
const ELEMENT_HEADER: usize = 8;

/// Check that `bytes` is a flat command set, then parse it.
///
/// A command set holds only group 0000 elements, each of defined length (PS3.7 6.3,
/// E.1), Implicit VR Little Endian. Every declared length is checked against the bytes
/// that follow before dicom-object reads the set: it allocates each value's declared length
/// up front, so one corrupted length of a few bytes would otherwise cost gigabytes.
pub fn read_command_set(bytes: &[u8]) -> Result<InMemDicomObject, CommandError> {
    check_command_set(bytes)?;
    let ts = TransferSyntaxRegistry
        .get(IMPLICIT_VR_LE)
        .ok_or_else(|| CommandError::Parse("implicit VR little endian unavailable".into()))?;
    InMemDicomObject::read_dataset_with_ts(bytes, ts)
        .map_err(|e| CommandError::Parse(e.to_string()))
}

/// The structural check of [`read_command_set`]: every element of group 0000, of defined
/// length, and no longer than the bytes left.
pub fn check_command_set(bytes: &[u8]) -> Result<(), CommandError> {
    let malformed = |offset: usize, reason: String| CommandError::Malformed { offset, reason };
    if bytes.is_empty() {
        return Err(malformed(0, "empty command set".into()));
    }
    let mut at = 0usize;
    while at < bytes.len() {
        let header = bytes
            .get(at..at + ELEMENT_HEADER)
            .ok_or_else(|| malformed(at, "truncated element header".into()))?;
        let group = u16::from_le_bytes([header[0], header[1]]);
        let element = u16::from_le_bytes([header[2], header[3]]);
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if group != 0x0000 {
            return Err(malformed(
                at,
                format!("element ({group:04X},{element:04X}) is not a command element"),
            ));
        }
        let remaining = bytes.len() - at - ELEMENT_HEADER;
        if len == u32::MAX {
            return Err(malformed(
                at,
                format!("element (0000,{element:04X}) has undefined length"),
            ));
        }
        crate::store::inspect::check_value_length(
            crate::store::inspect::implicit_vr((group, element)),
            len,
        )
        .map_err(|why| malformed(at, format!("element (0000,{element:04X}) {why}")))?;
        if len as usize > remaining {
            return Err(malformed(
                at,
                format!(
                    "element (0000,{element:04X}) claims {len} bytes but only {remaining} remain"
                ),
            ));
        }
        at += ELEMENT_HEADER + len as usize;
    }
    Ok(())
}

/// The fields of a request command set that this node acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub command_field: u16,
    pub message_id: u16,
    pub affected_sop_class_uid: Option<String>,
    pub affected_sop_instance_uid: Option<String>,
    pub has_dataset: bool,
}

impl Request {
    pub fn parse(bytes: &[u8]) -> Result<Request, CommandError> {
        let obj = read_command_set(bytes)?;
        let int = |tag: Tag, name: &'static str| -> Result<u16, CommandError> {
            obj.element(tag)
                .map_err(|_| CommandError::Missing(name))?
                .to_int::<u16>()
                .map_err(|e| CommandError::Parse(format!("{name}: {e}")))
        };
        let text = |tag: Tag| -> Option<String> {
            obj.element(tag)
                .ok()
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        };
        Ok(Request {
            command_field: int(tags::COMMAND_FIELD, "Command Field")?,
            // C-CANCEL carries Message ID Being Responded To instead of Message ID.
            message_id: int(tags::MESSAGE_ID, "Message ID")
                .or_else(|_| int(tags::MESSAGE_ID_BEING_RESPONDED_TO, "Message ID"))?,
            affected_sop_class_uid: text(tags::AFFECTED_SOP_CLASS_UID),
            affected_sop_instance_uid: text(tags::AFFECTED_SOP_INSTANCE_UID),
            has_dataset: int(tags::COMMAND_DATA_SET_TYPE, "Command Data Set Type")? != NO_DATASET,
        })
    }
}

/// Encode the response to `request` with `status`.
pub fn encode_response(request: &Request, status: &Status) -> Vec<u8> {
    encode_response_with(request, status, false)
}

/// Encode the response to `request` with `status`, announcing a data set (the identifier
/// of a pending C-FIND-RSP) when `has_dataset`.
pub fn encode_response_with(request: &Request, status: &Status, has_dataset: bool) -> Vec<u8> {
    // Any value but 0x0101 means a data set follows (PS3.7 E.2); 0x0000 is customary.
    let dataset_type = if has_dataset { 0x0000 } else { NO_DATASET };
    let mut elements = vec![
        DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            PrimitiveValue::from(request.command_field | 0x8000),
        ),
        DataElement::new(
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            VR::US,
            PrimitiveValue::from(request.message_id),
        ),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(dataset_type),
        ),
        DataElement::new(tags::STATUS, VR::US, PrimitiveValue::from(status.code)),
    ];
    if let Some(uid) = &request.affected_sop_class_uid {
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(uid.as_str()),
        ));
    }
    if let Some(uid) = &request.affected_sop_instance_uid {
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(uid.as_str()),
        ));
    }
    if let Some(comment) = &status.comment {
        elements.push(DataElement::new(
            tags::ERROR_COMMENT,
            VR::LO,
            PrimitiveValue::from(comment.as_str()),
        ));
    }
    encode_command(elements)
}

/// Serialise a command set, with its group length first (PS3.7 6.3.1).
pub(crate) fn encode_command(elements: Vec<DataElement<InMemDicomObject>>) -> Vec<u8> {
    let obj = InMemDicomObject::from_element_iter(elements);
    let mut body = Vec::with_capacity(256);
    if let Some(ts) = TransferSyntaxRegistry.get(IMPLICIT_VR_LE) {
        // Writing a handful of small, valid elements into memory does not fail.
        let _ = obj.write_dataset_with_ts(&mut body, ts);
    }
    let mut out = Vec::with_capacity(body.len() + 12);
    out.extend_from_slice(&[0, 0, 0, 0, 4, 0, 0, 0]);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_round_trips() {
        let rq = Request {
            command_field: C_STORE_RQ,
            message_id: 7,
            affected_sop_class_uid: Some("1.2.840.10008.5.1.4.1.1.2".into()),
            affected_sop_instance_uid: Some("1.2.3".into()),
            has_dataset: true,
        };
        let bytes = encode_response(&rq, &Status::failure(Status::OUT_OF_RESOURCES, "disk full"));
        let group_len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        assert_eq!(group_len as usize, bytes.len() - 12);
        let ts = TransferSyntaxRegistry.get(IMPLICIT_VR_LE).unwrap();
        let obj = InMemDicomObject::read_dataset_with_ts(&bytes[..], ts).unwrap();
        assert_eq!(
            obj.element(tags::COMMAND_FIELD)
                .unwrap()
                .to_int::<u16>()
                .unwrap(),
            0x8001
        );
        assert_eq!(
            obj.element(tags::MESSAGE_ID_BEING_RESPONDED_TO)
                .unwrap()
                .to_int::<u16>()
                .unwrap(),
            7
        );
        assert_eq!(
            obj.element(tags::STATUS).unwrap().to_int::<u16>().unwrap(),
            0xA700
        );
        assert_eq!(
            obj.element(tags::ERROR_COMMENT).unwrap().to_str().unwrap(),
            "disk full"
        );
    }

    #[test]
    fn garbage_command_is_an_error() {
        assert!(Request::parse(&[1, 2, 3, 4, 5]).is_err());
        assert!(Request::parse(&[]).is_err());
    }

    fn echo_rq() -> Vec<u8> {
        let rq = Request {
            command_field: C_ECHO_RQ,
            message_id: 1,
            affected_sop_class_uid: Some("1.2.840.10008.1.1".into()),
            affected_sop_instance_uid: None,
            has_dataset: false,
        };
        // A response has the same shape as a request for this check.
        encode_response(&rq, &Status::success())
    }

    /// Element offsets of a flat Implicit VR LE command set.
    fn element_offsets(bytes: &[u8]) -> Vec<usize> {
        let mut out = vec![];
        let mut at = 0;
        while at + 8 <= bytes.len() {
            out.push(at);
            at += 8 + u32::from_le_bytes([
                bytes[at + 4],
                bytes[at + 5],
                bytes[at + 6],
                bytes[at + 7],
            ]) as usize;
        }
        out
    }

    /// Regression (issue #18): a C-STORE-RQ whose command element lengths were corrupted
    /// made dicom-object reserve (and zero) the declared length, hundreds of megabytes for a
    /// 608-byte stream. Every corrupted length is now refused before anything is read.
    #[test]
    fn corrupted_element_lengths_are_refused_before_allocation() {
        let good = echo_rq();
        assert!(read_command_set(&good).is_ok());
        for at in element_offsets(&good) {
            for len in [
                0x3000_0000u32,
                0x7FFF_FFFF,
                0xFFFF_FFFE,
                u32::MAX,
                good.len() as u32,
            ] {
                let mut bad = good.clone();
                bad[at + 4..at + 8].copy_from_slice(&len.to_le_bytes());
                match check_command_set(&bad) {
                    Err(CommandError::Malformed { offset, .. }) => assert!(offset <= at),
                    other => panic!("length {len:#x} at {at}: {other:?}"),
                }
                assert!(Request::parse(&bad).is_err());
            }
        }
    }

    #[test]
    fn elements_outside_group_0000_or_truncated_are_refused() {
        let mut bad = echo_rq();
        bad[0] = 0x08;
        assert!(matches!(
            check_command_set(&bad),
            Err(CommandError::Malformed { .. })
        ));
        let good = echo_rq();
        for cut in 1..good.len() {
            // Every cut inside an element is refused; a cut at a boundary leaves a shorter
            // but well-formed set.
            let boundary = element_offsets(&good).contains(&cut);
            assert_eq!(
                check_command_set(&good[..cut]).is_ok(),
                boundary,
                "cut at {cut}"
            );
        }
    }

    /// Regression (issue #18, found by `tests/fuzz.rs`): a 173-byte command set whose group
    /// length (UL) declares 127 bytes. dicom-parser reads 31 values (124 bytes), leaves 3,
    /// reads the next headers out of phase and reserved 493 MB for a value; lengths of
    /// binary VRs must now hold whole values.
    #[test]
    fn a_binary_value_length_that_is_not_whole_values_is_refused() {
        let hex = [
        "000000007f000000380000000000020012000000312e322e3834302e31303030382e312e310000000001020000003000",
        "000010010200000001000000000802000000000000312e322e3834302e31303030382e352e312e342e312e312e320000",
        "000001020000000100000010010200000002000000000702000000000000000008020000000000000000101e00000031",
        "2e322e3832362e302e312e333638303034332e382e3439382e312e3100",
        ]
        .concat();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(bytes.len(), 173);
        match check_command_set(&bytes) {
            Err(CommandError::Malformed { offset: 0, reason }) => {
                assert!(reason.contains("not a multiple of 4"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // A US of 3 bytes, anywhere.
        let mut good = echo_rq();
        let at = element_offsets(&good)[2];
        good[at + 4] = 3;
        good.insert(at + 8, 0);
        assert!(check_command_set(&good).is_err());
    }
}
