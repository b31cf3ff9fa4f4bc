//! The Query/Retrieve SCU (PS3.4 Annex C, Study Root): C-FIND, C-MOVE and C-GET on one
//! association with the archive, built on dicom-ul's async client like the forwarding SCU
//! (`forward::scu`).
//!
//! C-GET brings the instances back on the same association as C-STORE sub-operations: the
//! association proposes the storage SOP classes with SCP role selection (PS3.7 D.3.3.4), and
//! each sub-operation's data set goes to the [`Spool`] as its fragments arrive. C-MOVE asks
//! the archive to send them to our own AE title, where [`super::scp`] receives them.

use std::collections::VecDeque;
use std::time::Duration;

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::association::client::ClientAssociationOptions;
use dicom_ul::pdu::{PDataValue, PDataValueType};
use dicom_ul::Pdu;

use super::spool::{Incoming, Spool};
use crate::dimse::command::{self, Request};
use crate::dimse::status::Status;
use crate::error_text::error_chain;
use crate::forward::scu::{
    accepted_contexts, max_pdv_data, Accepted, EXPLICIT_VR_LE, IMPLICIT_VR_LE,
};
pub use crate::forward::scu::{Peer, Timeouts};
use crate::net::ClientAssociation;

pub const STUDY_ROOT_FIND: &str = uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND;
pub const STUDY_ROOT_MOVE: &str = uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_MOVE;
pub const STUDY_ROOT_GET: &str = uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_GET;

const C_FIND_RQ: u16 = 0x0020;
const C_GET_RQ: u16 = 0x0010;
const C_MOVE_RQ: u16 = 0x0021;
const C_STORE_RQ: u16 = 0x0001;

/// More answers than this to one query means the query is too wide; the association is
/// aborted rather than filling memory (a study query is then split, as a capped answer).
pub const MAX_ANSWERS: usize = 100_000;

/// The SOP classes `mine` retrieves: CT images and the documents that point at key-images.
pub const RETRIEVED_CLASSES: &[&str] = &[
    uids::CT_IMAGE_STORAGE,
    uids::ENHANCED_CT_IMAGE_STORAGE,
    uids::LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
    uids::KEY_OBJECT_SELECTION_DOCUMENT_STORAGE,
    uids::BASIC_TEXT_SR_STORAGE,
    uids::ENHANCED_SR_STORAGE,
    uids::COMPREHENSIVE_SR_STORAGE,
];

/// Compressed syntaxes proposed for images (anatomy::pixels decodes each), so the archive
/// can send what it stores instead of transcoding.
const IMAGE_SYNTAXES: &[&str] = &[
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.1.99",
];

#[derive(Debug, thiserror::Error)]
pub enum QrError {
    #[error("cannot associate with the archive {addr}: {reason}")]
    Associate { addr: String, reason: String },
    #[error("the archive accepted no presentation context for {0}")]
    NotAccepted(String),
    #[error("no response from the archive within {0} s")]
    Timeout(u64),
    #[error("the archive aborted the association")]
    Aborted,
    #[error("connection to the archive lost: {0}")]
    Lost(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{service} failed with status {status:04X}H{}", comment.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Status {
        service: &'static str,
        status: u16,
        comment: Option<String>,
    },
    #[error("more than {MAX_ANSWERS} answers to one query")]
    TooManyAnswers,
    #[error("writing a retrieved instance: {0}")]
    Spool(std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Find,
    Move,
    Get,
}

/// Sub-operation counts of a final C-MOVE/C-GET response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubOperations {
    pub completed: u16,
    pub failed: u16,
    pub warning: u16,
    pub status: u16,
}

pub struct QrAssociation {
    assoc: ClientAssociation,
    contexts: Vec<Accepted>,
    next_message_id: u16,
    timeout: Duration,
    max_data: usize,
    /// PDVs of the last P-DATA-TF not handed out yet.
    pending: VecDeque<PDataValue>,
}

/// A DIMSE message arriving: its command, then (maybe) its data set.
struct Message {
    context: u8,
    command: Vec<u8>,
}

impl QrAssociation {
    pub async fn open(
        peer: &Peer,
        service: Service,
        max_pdu_length: u32,
        timeouts: Timeouts,
    ) -> Result<QrAssociation, QrError> {
        let model = match service {
            Service::Find => STUDY_ROOT_FIND,
            Service::Move => STUDY_ROOT_MOVE,
            Service::Get => STUDY_ROOT_GET,
        };
        let mut options = ClientAssociationOptions::new()
            .calling_ae_title(peer.calling_ae_title.clone())
            .called_ae_title(peer.ae_title.clone())
            .max_pdu_length(max_pdu_length)
            // Strict: a PDU longer than our maximum is refused from its header, not buffered
            // until its announced length (up to 4 GiB) has arrived (issue #18).
            .strict(true)
            .connection_timeout(timeouts.connect)
            .read_timeout(timeouts.dimse)
            .write_timeout(timeouts.dimse)
            .with_presentation_context(model, vec![EXPLICIT_VR_LE, IMPLICIT_VR_LE]);
        if service == Service::Move {
            // C-MOVE's pending responses say how far it is; a C-FIND context lets one
            // association do both in the future without renegotiation.
            options = options
                .with_presentation_context(STUDY_ROOT_FIND, vec![EXPLICIT_VR_LE, IMPLICIT_VR_LE]);
        }
        if service == Service::Get {
            for class in RETRIEVED_CLASSES {
                options = options
                    .with_presentation_context(*class, vec![EXPLICIT_VR_LE, IMPLICIT_VR_LE])
                    .with_role_selection(*class, false, true);
                if crate::anatomy::select::is_ct_image_class(class) {
                    for ts in IMAGE_SYNTAXES {
                        options = options.with_presentation_context(*class, vec![*ts]);
                    }
                }
            }
        }
        let addr = format!("{} {}:{}", peer.ae_title, peer.host, peer.port);
        let tls = peer.client_tls().map_err(|e| QrError::Associate {
            addr: addr.clone(),
            reason: format!("archive.tls: {e}"),
        })?;
        let established = tokio::time::timeout(
            timeouts.connect * 2,
            ClientAssociation::connect(options, &peer.host, peer.port, tls.as_ref()),
        )
        .await;
        let assoc = match established {
            Err(_) => {
                return Err(QrError::Associate {
                    addr,
                    reason: format!("no answer within {} s", (timeouts.connect * 2).as_secs()),
                })
            }
            Ok(Err(e)) => {
                return Err(QrError::Associate {
                    addr,
                    reason: error_chain(&e),
                })
            }
            Ok(Ok(a)) => a,
        };
        let contexts = accepted_contexts(&assoc);
        if !contexts.iter().any(|c| c.abstract_syntax == model) {
            let _ = assoc.abort().await;
            return Err(QrError::NotAccepted(model.to_string()));
        }
        let max_data = max_pdv_data(&assoc);
        Ok(QrAssociation {
            assoc,
            contexts,
            next_message_id: 1,
            timeout: timeouts.dimse,
            max_data,
            pending: VecDeque::new(),
        })
    }

    fn context_of(&self, model: &str) -> Result<(u8, String), QrError> {
        self.contexts
            .iter()
            .find(|c| c.abstract_syntax == model)
            .map(|c| (c.id, c.transfer_syntax.clone()))
            .ok_or_else(|| QrError::NotAccepted(model.to_string()))
    }

    /// C-FIND: every answer's identifier, and whether the archive capped the answer (its
    /// final status Cancel FE00, as Orthanc answers when `LimitFindResults` is reached, or a
    /// warning Bxxx): more studies match than came.
    pub async fn find(
        &mut self,
        identifier: &InMemDicomObject,
    ) -> Result<(Vec<InMemDicomObject>, bool), QrError> {
        let (context, ts) = self.context_of(STUDY_ROOT_FIND)?;
        let message_id = self
            .send_request(context, C_FIND_RQ, STUDY_ROOT_FIND, None, identifier, &ts)
            .await?;
        let mut answers = Vec::new();
        loop {
            let message = self.receive_command().await?;
            let rsp = Response::parse(&message.command)?;
            rsp.check_for(message_id)?;
            if rsp.has_dataset {
                let bytes = self.receive_dataset(message.context).await?;
                if is_pending(rsp.status) {
                    if answers.len() >= MAX_ANSWERS {
                        return Err(QrError::TooManyAnswers);
                    }
                    answers.push(decode(&bytes, &ts)?);
                }
            }
            if !is_pending(rsp.status) {
                return match rsp.status {
                    Status::SUCCESS => Ok((answers, false)),
                    status if is_capped(status) => Ok((answers, true)),
                    status => Err(QrError::Status {
                        service: "C-FIND",
                        status,
                        comment: rsp.comment,
                    }),
                };
            }
        }
    }

    /// C-MOVE to `destination`: waits for the final response.
    pub async fn move_to(
        &mut self,
        identifier: &InMemDicomObject,
        destination: &str,
    ) -> Result<SubOperations, QrError> {
        let (context, ts) = self.context_of(STUDY_ROOT_MOVE)?;
        let message_id = self
            .send_request(
                context,
                C_MOVE_RQ,
                STUDY_ROOT_MOVE,
                Some(destination),
                identifier,
                &ts,
            )
            .await?;
        loop {
            let message = self.receive_command().await?;
            let rsp = Response::parse(&message.command)?;
            rsp.check_for(message_id)?;
            if rsp.has_dataset {
                // A final response may list the failed SOP instances; the counts say enough.
                self.receive_dataset(message.context).await?;
            }
            if !is_pending(rsp.status) {
                return rsp.sub_operations("C-MOVE");
            }
        }
    }

    /// C-GET: the instances arrive on this association as C-STORE sub-operations and go to
    /// `spool` (only those it expects).
    pub async fn get(
        &mut self,
        identifier: &InMemDicomObject,
        spool: &Spool,
    ) -> Result<SubOperations, QrError> {
        let (context, ts) = self.context_of(STUDY_ROOT_GET)?;
        let message_id = self
            .send_request(context, C_GET_RQ, STUDY_ROOT_GET, None, identifier, &ts)
            .await?;
        loop {
            let message = self.receive_command().await?;
            let field = command_field(&message.command)?;
            if field == C_STORE_RQ {
                self.store_sub_operation(message, spool).await?;
                continue;
            }
            let rsp = Response::parse(&message.command)?;
            rsp.check_for(message_id)?;
            if rsp.has_dataset {
                self.receive_dataset(message.context).await?;
            }
            if !is_pending(rsp.status) {
                return rsp.sub_operations("C-GET");
            }
        }
    }

    /// One C-STORE sub-operation of a C-GET: the data set into the spool, then the answer.
    async fn store_sub_operation(
        &mut self,
        message: Message,
        spool: &Spool,
    ) -> Result<(), QrError> {
        let request = Request::parse(&message.command)
            .map_err(|e| QrError::Protocol(format!("C-STORE-RQ: {e}")))?;
        let ts = self
            .contexts
            .iter()
            .find(|c| c.id == message.context)
            .map(|c| c.transfer_syntax.clone())
            .ok_or_else(|| {
                QrError::Protocol("C-STORE-RQ on an unknown presentation context".into())
            })?;
        let class = request.affected_sop_class_uid.clone().unwrap_or_default();
        let uid = request
            .affected_sop_instance_uid
            .clone()
            .unwrap_or_default();
        let mut incoming: Option<Incoming> = match spool.begin(&class, &uid, &ts) {
            Ok(i) => i,
            Err(e) => return Err(QrError::Spool(e)),
        };
        let mut failed: Option<String> = None;
        if request.has_dataset {
            loop {
                let pdv = self.next_pdv().await?;
                if pdv.value_type != PDataValueType::Data
                    || pdv.presentation_context_id != message.context
                {
                    return Err(QrError::Protocol(
                        "a command where a data set fragment was expected".into(),
                    ));
                }
                if let Some(i) = incoming.as_mut() {
                    if let Err(e) = i.write(&pdv.data) {
                        failed = Some(e.to_string());
                        if let Some(i) = incoming.take() {
                            i.discard();
                        }
                    }
                }
                if pdv.is_last {
                    break;
                }
            }
        }
        let status = match (failed, incoming) {
            (Some(why), _) => Status::failure(Status::OUT_OF_RESOURCES, why),
            (None, Some(i)) => match spool.finish(i) {
                Ok(_) => Status::success(),
                Err(e) => Status::failure(Status::OUT_OF_RESOURCES, e.to_string()),
            },
            (None, None) => Status::success(),
        };
        let response = command::encode_response(&request, &status);
        self.send_fragments(message.context, PDataValueType::Command, &response)
            .await
    }

    async fn send_request(
        &mut self,
        context: u8,
        field: u16,
        model: &str,
        move_destination: Option<&str>,
        identifier: &InMemDicomObject,
        ts: &str,
    ) -> Result<u16, QrError> {
        let message_id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1).max(1);
        let command = request_command(field, message_id, model, move_destination);
        let data = encode(identifier, ts)?;
        self.send_fragments(context, PDataValueType::Command, &command)
            .await?;
        self.send_fragments(context, PDataValueType::Data, &data)
            .await?;
        Ok(message_id)
    }

    async fn send_fragments(
        &mut self,
        context: u8,
        value_type: PDataValueType,
        bytes: &[u8],
    ) -> Result<(), QrError> {
        let mut chunks: Vec<&[u8]> = bytes.chunks(self.max_data).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let pdu = Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: context,
                    value_type: value_type.clone(),
                    is_last: i == last,
                    data: chunk.to_vec(),
                }],
            };
            match tokio::time::timeout(self.timeout, self.assoc.send(&pdu)).await {
                Err(_) => return Err(QrError::Timeout(self.timeout.as_secs())),
                Ok(Err(e)) => return Err(QrError::Lost(error_chain(&e))),
                Ok(Ok(())) => {}
            }
        }
        Ok(())
    }

    /// The next PDV, reading a PDU when none is left.
    async fn next_pdv(&mut self) -> Result<PDataValue, QrError> {
        loop {
            if let Some(pdv) = self.pending.pop_front() {
                return Ok(pdv);
            }
            let pdu = match tokio::time::timeout(self.timeout, self.assoc.receive()).await {
                Err(_) => return Err(QrError::Timeout(self.timeout.as_secs())),
                Ok(Err(e)) => return Err(QrError::Lost(error_chain(&e))),
                Ok(Ok(pdu)) => pdu,
            };
            match pdu {
                Pdu::PData { data } => self.pending.extend(data),
                Pdu::AbortRQ { .. } => return Err(QrError::Aborted),
                Pdu::ReleaseRQ => {
                    let _ = self.assoc.send(&Pdu::ReleaseRP).await;
                    return Err(QrError::Lost("the archive released the association".into()));
                }
                other => {
                    return Err(QrError::Protocol(format!(
                        "unexpected {}",
                        other.short_description()
                    )))
                }
            }
        }
    }

    async fn receive_command(&mut self) -> Result<Message, QrError> {
        let mut command = Vec::new();
        loop {
            let pdv = self.next_pdv().await?;
            if pdv.value_type != PDataValueType::Command {
                return Err(QrError::Protocol(
                    "a data set fragment where a command was expected".into(),
                ));
            }
            command.extend_from_slice(&pdv.data);
            if command.len() > 64 * 1024 {
                return Err(QrError::Protocol("command set over 64 KiB".into()));
            }
            if pdv.is_last {
                return Ok(Message {
                    context: pdv.presentation_context_id,
                    command,
                });
            }
        }
    }

    async fn receive_dataset(&mut self, context: u8) -> Result<Vec<u8>, QrError> {
        let mut data = Vec::new();
        loop {
            let pdv = self.next_pdv().await?;
            if pdv.value_type != PDataValueType::Data || pdv.presentation_context_id != context {
                return Err(QrError::Protocol(
                    "a command where a data set fragment was expected".into(),
                ));
            }
            data.extend_from_slice(&pdv.data);
            if data.len() > 16 * 1024 * 1024 {
                return Err(QrError::Protocol("identifier over 16 MiB".into()));
            }
            if pdv.is_last {
                return Ok(data);
            }
        }
    }

    pub async fn release(self) {
        let _ = tokio::time::timeout(Duration::from_secs(10), self.assoc.release()).await;
    }

    pub async fn abort(self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.assoc.abort()).await;
    }
}

/// The fields of a C-FIND/C-MOVE/C-GET response this SCU acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Response {
    field: u16,
    responded_to: u16,
    status: u16,
    has_dataset: bool,
    comment: Option<String>,
    remaining: Option<u16>,
    completed: Option<u16>,
    failed: Option<u16>,
    warning: Option<u16>,
}

impl Response {
    fn parse(bytes: &[u8]) -> Result<Response, QrError> {
        let obj = decode(bytes, IMPLICIT_VR_LE)
            .map_err(|e| QrError::Protocol(format!("response command set: {e}")))?;
        let int = |tag: Tag| -> Option<u16> { obj.element(tag).ok()?.to_int::<u16>().ok() };
        let need = |tag: Tag, name: &str| -> Result<u16, QrError> {
            int(tag).ok_or_else(|| QrError::Protocol(format!("response without {name}")))
        };
        Ok(Response {
            field: need(tags::COMMAND_FIELD, "Command Field")?,
            responded_to: need(
                tags::MESSAGE_ID_BEING_RESPONDED_TO,
                "Message ID Being Responded To",
            )?,
            status: need(tags::STATUS, "Status")?,
            has_dataset: need(tags::COMMAND_DATA_SET_TYPE, "Command Data Set Type")?
                != command::NO_DATASET,
            comment: obj
                .element(tags::ERROR_COMMENT)
                .ok()
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
                .filter(|s| !s.is_empty()),
            remaining: int(tags::NUMBER_OF_REMAINING_SUBOPERATIONS),
            completed: int(tags::NUMBER_OF_COMPLETED_SUBOPERATIONS),
            failed: int(tags::NUMBER_OF_FAILED_SUBOPERATIONS),
            warning: int(tags::NUMBER_OF_WARNING_SUBOPERATIONS),
        })
    }

    fn check_for(&self, message_id: u16) -> Result<(), QrError> {
        if self.field & 0x8000 == 0 {
            return Err(QrError::Protocol(format!(
                "command 0x{:04X} where a response was expected",
                self.field
            )));
        }
        if self.responded_to != message_id {
            return Err(QrError::Protocol(format!(
                "response to message {}, expected {message_id}",
                self.responded_to
            )));
        }
        Ok(())
    }

    /// The outcome of a final C-MOVE/C-GET response: success, or a warning with some
    /// sub-operations failed (B000), are results; anything else is an error.
    fn sub_operations(&self, service: &'static str) -> Result<SubOperations, QrError> {
        let counts = SubOperations {
            completed: self.completed.unwrap_or(0),
            failed: self.failed.unwrap_or(0),
            warning: self.warning.unwrap_or(0),
            status: self.status,
        };
        match self.status {
            Status::SUCCESS => Ok(counts),
            s if s & 0xF000 == 0xB000 => Ok(counts),
            status => Err(QrError::Status {
                service,
                status,
                comment: self.comment.clone(),
            }),
        }
    }
}

/// A final C-FIND status that says the answer is incomplete: Cancel (FE00, Orthanc's
/// `LimitFindResults`) or a warning (Bxxx).
pub fn is_capped(status: u16) -> bool {
    status == 0xFE00 || status & 0xF000 == 0xB000
}

fn is_pending(status: u16) -> bool {
    matches!(status, 0xFF00 | 0xFF01)
}

fn command_field(bytes: &[u8]) -> Result<u16, QrError> {
    let obj = decode(bytes, IMPLICIT_VR_LE)
        .map_err(|e| QrError::Protocol(format!("command set: {e}")))?;
    obj.element(tags::COMMAND_FIELD)
        .ok()
        .and_then(|e| e.to_int::<u16>().ok())
        .ok_or_else(|| QrError::Protocol("command set without Command Field".into()))
}

/// A C-FIND/C-MOVE/C-GET request command set (PS3.7 9.3.2, 9.3.3, 9.3.4): Implicit VR
/// Little Endian, group length first, priority medium, an identifier follows.
fn request_command(
    field: u16,
    message_id: u16,
    model: &str,
    move_destination: Option<&str>,
) -> Vec<u8> {
    let mut elements = vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(model),
        ),
        DataElement::new(tags::COMMAND_FIELD, VR::US, PrimitiveValue::from(field)),
        DataElement::new(tags::MESSAGE_ID, VR::US, PrimitiveValue::from(message_id)),
        DataElement::new(tags::PRIORITY, VR::US, PrimitiveValue::from(0u16)),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(0u16),
        ),
    ];
    if let Some(destination) = move_destination {
        elements.push(DataElement::new(
            tags::MOVE_DESTINATION,
            VR::AE,
            PrimitiveValue::from(destination),
        ));
    }
    command::encode_command(elements)
}

/// An identifier in the presentation context's transfer syntax.
pub fn encode(obj: &InMemDicomObject, ts_uid: &str) -> Result<Vec<u8>, QrError> {
    let ts = TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or_else(|| QrError::Protocol(format!("transfer syntax {ts_uid} unknown")))?;
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, ts)
        .map_err(|e| QrError::Protocol(format!("encoding the identifier: {e}")))?;
    Ok(out)
}

pub fn decode(bytes: &[u8], ts_uid: &str) -> Result<InMemDicomObject, QrError> {
    let ts = TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or_else(|| QrError::Protocol(format!("transfer syntax {ts_uid} unknown")))?;
    // Every length checked against the bytes before dicom-object allocates it (issue #18).
    if ts.endianness() == dicom_encoding::transfer_syntax::Endianness::Little
        && ts_uid != "1.2.840.10008.1.2.1.99"
    {
        crate::dimse::find::identifier::check_structure(bytes, ts_uid != IMPLICIT_VR_LE)
            .map_err(|e| QrError::Protocol(format!("an identifier cannot be parsed: {e}")))?;
    }
    InMemDicomObject::read_dataset_with_ts(bytes, ts)
        .map_err(|e| QrError::Protocol(format!("an identifier cannot be parsed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_the_move_destination() {
        let bytes = request_command(C_MOVE_RQ, 3, STUDY_ROOT_MOVE, Some("MINE"));
        let group_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        assert_eq!(group_len as usize, bytes.len() - 12);
        let obj = decode(&bytes, IMPLICIT_VR_LE).unwrap();
        assert_eq!(command_field(&bytes).unwrap(), C_MOVE_RQ);
        let text = |t| {
            obj.element(t)
                .unwrap()
                .to_str()
                .unwrap()
                .trim_end_matches(['\0', ' '])
                .to_string()
        };
        assert_eq!(text(tags::MOVE_DESTINATION), "MINE");
        assert_eq!(text(tags::AFFECTED_SOP_CLASS_UID), STUDY_ROOT_MOVE);
    }

    #[test]
    fn final_responses_are_sorted() {
        let rsp = |status: u16| Response {
            field: 0x8021,
            responded_to: 1,
            status,
            has_dataset: false,
            comment: None,
            remaining: Some(0),
            completed: Some(2),
            failed: Some(1),
            warning: None,
        };
        assert_eq!(rsp(0).sub_operations("C-MOVE").unwrap().completed, 2);
        assert_eq!(rsp(0xB000).sub_operations("C-MOVE").unwrap().failed, 1);
        assert!(matches!(
            rsp(0xA801).sub_operations("C-MOVE"),
            Err(QrError::Status { status: 0xA801, .. })
        ));
        assert!(rsp(0).check_for(2).is_err());
        assert!(is_pending(0xFF00) && is_pending(0xFF01) && !is_pending(0));
        assert!(is_capped(0xFE00) && is_capped(0xB000) && !is_capped(0) && !is_capped(0xA700));
    }
}
