//! A raw DIMSE SCU on dicom-ul's client, for what DCMTK will not send: garbage and
//! truncated data sets, hostile UIDs, files DCMTK cannot parse, commands split over many
//! PDUs, slow senders.

use std::net::TcpStream;
use std::time::Duration;

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::association::client::ClientAssociationOptions;
use dicom_ul::association::ClientAssociation;
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use dicom_ul::Pdu;

use super::node::AE;

pub const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
pub const EXPLICIT: &str = "1.2.840.10008.1.2.1";
pub const IMPLICIT: &str = "1.2.840.10008.1.2";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub command_field: u16,
    pub message_id: u16,
    pub status: u16,
    pub comment: Option<String>,
}

pub struct Scu {
    assoc: ClientAssociation<TcpStream>,
    next_message_id: u16,
}

impl Scu {
    pub fn connect(port: u16, calling: &str, contexts: &[(&str, &str)]) -> Result<Scu, String> {
        let mut options = ClientAssociationOptions::new()
            .calling_ae_title(calling)
            .called_ae_title(AE)
            .max_pdu_length(16_384)
            .read_timeout(Duration::from_secs(60))
            .write_timeout(Duration::from_secs(60));
        for (abstract_syntax, ts) in contexts {
            options = options.with_presentation_context(*abstract_syntax, vec![*ts]);
        }
        let assoc = options
            .establish(("127.0.0.1", port))
            .map_err(|e| e.to_string())?;
        Ok(Scu {
            assoc,
            next_message_id: 1,
        })
    }

    /// An association proposing CT Image Storage in Explicit and Implicit VR LE.
    pub fn ct(port: u16) -> Scu {
        Scu::connect(port, "TESTSCU", &[(CT, EXPLICIT), (CT, IMPLICIT)]).expect("association")
    }

    /// The id of the accepted context for (abstract syntax, transfer syntax).
    pub fn context(&self, abstract_syntax: &str, ts: &str) -> u8 {
        self.assoc
            .presentation_contexts()
            .iter()
            .find(|pc| {
                pc.reason == PresentationContextResultReason::Acceptance
                    && pc.abstract_syntax.trim_end_matches('\0') == abstract_syntax
                    && pc.transfer_syntax.trim_end_matches('\0') == ts
            })
            .map(|pc| pc.id)
            .unwrap_or_else(|| panic!("no accepted context for {abstract_syntax} / {ts}"))
    }

    pub fn max_data_chunk(&self) -> usize {
        (self.assoc.acceptor_max_pdu_length() as usize)
            .saturating_sub(16)
            .max(64)
    }

    /// C-STORE of raw data set bytes; returns the response.
    pub fn store(&mut self, ts: &str, sop_class: &str, sop_uid: &str, dataset: &[u8]) -> Response {
        let pc = self.context(sop_class, ts);
        let id = self.next_id();
        let chunk = self.max_data_chunk();
        self.send_command(pc, &store_rq(id, sop_class, sop_uid), usize::MAX);
        self.send_data(pc, dataset, chunk, Duration::ZERO);
        self.receive_response()
    }

    pub fn echo(&mut self) -> Response {
        let id = self.next_id();
        let pc = self
            .assoc
            .presentation_contexts()
            .iter()
            .find(|pc| pc.reason == PresentationContextResultReason::Acceptance)
            .map(|pc| pc.id)
            .expect("an accepted context");
        let cmd = command(&[
            (
                Tag(0x0000, 0x0002),
                VR::UI,
                PrimitiveValue::from("1.2.840.10008.1.1"),
            ),
            (Tag(0x0000, 0x0100), VR::US, PrimitiveValue::from(0x0030u16)),
            (Tag(0x0000, 0x0110), VR::US, PrimitiveValue::from(id)),
            (Tag(0x0000, 0x0800), VR::US, PrimitiveValue::from(0x0101u16)),
        ]);
        self.send_command(pc, &cmd, usize::MAX);
        self.receive_response()
    }

    pub fn next_id(&mut self) -> u16 {
        let id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1);
        id
    }

    /// Send a command set, split into fragments of `fragment` bytes, one PDU each.
    pub fn send_command(&mut self, pc: u8, bytes: &[u8], fragment: usize) {
        self.send_fragments(
            pc,
            PDataValueType::Command,
            bytes,
            fragment,
            Duration::ZERO,
            true,
        );
    }

    /// Send a data set in fragments of `chunk` bytes, one PDU each, pausing between them.
    pub fn send_data(&mut self, pc: u8, bytes: &[u8], chunk: usize, pause: Duration) {
        self.send_fragments(pc, PDataValueType::Data, bytes, chunk, pause, true);
    }

    /// Send the first part of a data set (no fragment marked last).
    pub fn send_data_start(&mut self, pc: u8, bytes: &[u8], chunk: usize) {
        self.send_fragments(
            pc,
            PDataValueType::Data,
            bytes,
            chunk,
            Duration::ZERO,
            false,
        );
    }

    fn send_fragments(
        &mut self,
        pc: u8,
        kind: PDataValueType,
        bytes: &[u8],
        chunk: usize,
        pause: Duration,
        finish: bool,
    ) {
        let chunk = chunk.min(self.max_data_chunk()).max(1);
        let pieces: Vec<&[u8]> = if bytes.is_empty() {
            vec![&[][..]]
        } else {
            bytes.chunks(chunk).collect()
        };
        let n = pieces.len();
        for (i, piece) in pieces.into_iter().enumerate() {
            let pdu = Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: pc,
                    value_type: kind.clone(),
                    is_last: finish && i + 1 == n,
                    data: piece.to_vec(),
                }],
            };
            self.assoc.send(&pdu).expect("send P-DATA");
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
    }

    /// Read the next DIMSE response (command set) from the node.
    pub fn receive_response(&mut self) -> Response {
        let mut buf = Vec::new();
        loop {
            match self.assoc.receive().expect("receive a response") {
                Pdu::PData { data } => {
                    for pdv in data {
                        assert_eq!(
                            pdv.value_type,
                            PDataValueType::Command,
                            "responses carry no data set"
                        );
                        buf.extend_from_slice(&pdv.data);
                        if pdv.is_last {
                            return parse_response(&buf);
                        }
                    }
                }
                other => panic!("expected a response, got {other:?}"),
            }
        }
    }

    /// The next PDU, whatever it is (to observe aborts and releases).
    pub fn receive_pdu(&mut self) -> Result<Pdu, String> {
        self.assoc.receive().map_err(|e| e.to_string())
    }

    pub fn release(self) {
        self.assoc.release().expect("release");
    }
}

pub fn store_rq(message_id: u16, sop_class: &str, sop_uid: &str) -> Vec<u8> {
    command(&[
        (Tag(0x0000, 0x0002), VR::UI, PrimitiveValue::from(sop_class)),
        (Tag(0x0000, 0x0100), VR::US, PrimitiveValue::from(0x0001u16)),
        (
            Tag(0x0000, 0x0110),
            VR::US,
            PrimitiveValue::from(message_id),
        ),
        (Tag(0x0000, 0x0700), VR::US, PrimitiveValue::from(0u16)),
        (Tag(0x0000, 0x0800), VR::US, PrimitiveValue::from(0x0000u16)),
        (Tag(0x0000, 0x1000), VR::UI, PrimitiveValue::from(sop_uid)),
    ])
}

fn implicit() -> &'static dicom_encoding::TransferSyntax {
    TransferSyntaxRegistry
        .get(IMPLICIT)
        .expect("implicit VR LE")
}

fn command(elements: &[(Tag, VR, PrimitiveValue)]) -> Vec<u8> {
    let obj = InMemDicomObject::from_element_iter(
        elements
            .iter()
            .map(|(t, vr, v)| DataElement::new(*t, *vr, v.clone())),
    );
    let mut body = Vec::new();
    obj.write_dataset_with_ts(&mut body, implicit())
        .expect("encode command");
    let mut out = vec![0, 0, 0, 0, 4, 0, 0, 0];
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn parse_response(bytes: &[u8]) -> Response {
    let obj = InMemDicomObject::read_dataset_with_ts(bytes, implicit()).expect("parse response");
    let int = |t: Tag| {
        obj.element(t)
            .ok()
            .and_then(|e| e.to_int::<u16>().ok())
            .unwrap_or(0xFFFF)
    };
    Response {
        command_field: int(Tag(0x0000, 0x0100)),
        message_id: int(Tag(0x0000, 0x0120)),
        status: int(Tag(0x0000, 0x0900)),
        comment: obj
            .element(Tag(0x0000, 0x0902))
            .ok()
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim().to_string()),
    }
}

/// Re-encode a Part-10 file's data set with one element's value replaced (explicit VR LE
/// files only; used to make hostile or conflicting variants of real instances).
pub fn with_replaced_uid(dataset: &[u8], tag: Tag, value: &str) -> Vec<u8> {
    let ts = TransferSyntaxRegistry
        .get(EXPLICIT)
        .expect("explicit VR LE");
    let mut obj = InMemDicomObject::read_dataset_with_ts(dataset, ts).expect("parse data set");
    obj.put(DataElement::new(tag, VR::UI, PrimitiveValue::from(value)));
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, ts)
        .expect("encode data set");
    out
}
