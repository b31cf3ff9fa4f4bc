//! The Storage SCU: one association with a destination, negotiated for the SOP classes and
//! transfer syntaxes of a batch, then C-STORE after C-STORE (PS3.4 Annex B, PS3.7 9.1.1).
//!
//! Built on dicom-ul's async client. After negotiation the socket gets TCP_NODELAY (a
//! command PDU followed by data PDUs would otherwise wait for delayed ACKs), and P-DATA-TF
//! PDUs are written straight to it, several per write, sized to the destination's maximum
//! PDU length. Responses are read with dicom-ul.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use dicom_core::Tag;
use dicom_ul::association::client::ClientAssociationOptions;
use dicom_ul::pdu::{AssociationRJResult, PresentationContextResultReason};
use dicom_ul::Pdu;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::dimse::status::Status;
use crate::error_text::error_chain;
use crate::net::{ClientAssociation, ClientTls, ClientTlsConfig};
use crate::store::layout::trim_uid;

pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
pub const DEFLATED_EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1.99";

const C_STORE_RQ: u16 = 0x0001;
const C_STORE_RSP: u16 = 0x8001;
/// Bytes gathered before one write to the socket.
const WRITE_CHUNK: usize = 256 * 1024;
/// Bytes of a streamed file read at once.
const READ_CHUNK: usize = 1024 * 1024;

/// C-STORE statuses this SCU tells apart (PS3.4 B.2.3, PS3.7 Annex C), beyond the ones the
/// SCP side names in [`Status`].
pub mod status {
    pub const WARNING_OPTIONAL_ATTRIBUTES: u16 = 0x0001;
    pub const WARNING_ATTRIBUTE_LIST: u16 = 0x0107;
    pub const WARNING_VALUE_OUT_OF_RANGE: u16 = 0x0116;
    pub const INVALID_OBJECT_INSTANCE: u16 = 0x0117;
    pub const NOT_AUTHORIZED: u16 = 0x0124;
    pub const DUPLICATE_INVOCATION: u16 = 0x0210;
    pub const MISTYPED_ARGUMENT: u16 = 0x0212;
    pub const RESOURCE_LIMITATION: u16 = 0x0213;
    pub const COERCION_OF_DATA_ELEMENTS: u16 = 0xB000;
    pub const ELEMENTS_DISCARDED: u16 = 0xB006;
    pub const DATA_SET_DOES_NOT_MATCH_WARNING: u16 = 0xB007;
}

/// What a C-STORE status means for the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Stored,
    /// Stored, with a warning worth recording.
    Warning,
    /// The destination may take it later (out of resources).
    Transient,
    /// It will not take it as it is (SOP class, AE not authorized, data set refused).
    Permanent,
}

pub fn verdict(code: u16) -> Verdict {
    use status::*;
    match code {
        Status::SUCCESS => Verdict::Stored,
        WARNING_OPTIONAL_ATTRIBUTES | WARNING_ATTRIBUTE_LIST | WARNING_VALUE_OUT_OF_RANGE => {
            Verdict::Warning
        }
        c if c & 0xF000 == 0xB000 => Verdict::Warning,
        RESOURCE_LIMITATION => Verdict::Transient,
        c if c & 0xFF00 == Status::OUT_OF_RESOURCES => Verdict::Transient,
        _ => Verdict::Permanent,
    }
}

/// The standard's name for a C-STORE status.
pub fn status_name(code: u16) -> &'static str {
    use status::*;
    match code {
        Status::SUCCESS => "success",
        WARNING_OPTIONAL_ATTRIBUTES => "warning: optional attributes not supported",
        WARNING_ATTRIBUTE_LIST => "warning: attribute list error",
        WARNING_VALUE_OUT_OF_RANGE => "warning: attribute value out of range",
        COERCION_OF_DATA_ELEMENTS => "warning: coercion of data elements",
        ELEMENTS_DISCARDED => "warning: elements discarded",
        DATA_SET_DOES_NOT_MATCH_WARNING => "warning: data set does not match SOP class",
        Status::DUPLICATE_SOP_INSTANCE => "duplicate SOP instance",
        INVALID_OBJECT_INSTANCE => "invalid SOP instance",
        Status::SOP_CLASS_NOT_SUPPORTED => "SOP class not supported",
        NOT_AUTHORIZED => "not authorized",
        DUPLICATE_INVOCATION => "duplicate invocation",
        Status::UNRECOGNIZED_OPERATION => "unrecognized operation",
        MISTYPED_ARGUMENT => "mistyped argument",
        RESOURCE_LIMITATION => "resource limitation",
        c if c & 0xFF00 == Status::OUT_OF_RESOURCES => "refused: out of resources",
        c if c & 0xFF00 == Status::DATASET_DOES_NOT_MATCH => {
            "error: data set does not match SOP class"
        }
        c if c & 0xF000 == Status::CANNOT_UNDERSTAND => "error: cannot understand",
        c if c & 0xF000 == 0xB000 => "warning",
        _ => "failure",
    }
}

/// The name of a SOP class, for messages (the classes a CT node usually forwards).
pub fn sop_class_name(uid: &str) -> String {
    use dicom_dictionary_std::uids;
    let name = match uid {
        uids::CT_IMAGE_STORAGE => "CT Image Storage",
        uids::ENHANCED_CT_IMAGE_STORAGE => "Enhanced CT Image Storage",
        uids::LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE => {
            "Legacy Converted Enhanced CT Image Storage"
        }
        uids::SECONDARY_CAPTURE_IMAGE_STORAGE => "Secondary Capture Image Storage",
        uids::KEY_OBJECT_SELECTION_DOCUMENT_STORAGE => "Key Object Selection Document Storage",
        uids::GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE => {
            "Grayscale Softcopy Presentation State Storage"
        }
        uids::X_RAY_RADIATION_DOSE_SR_STORAGE => "X-Ray Radiation Dose SR Storage",
        uids::POSITRON_EMISSION_TOMOGRAPHY_IMAGE_STORAGE => "PET Image Storage",
        uids::SEGMENTATION_STORAGE => "Segmentation Storage",
        _ => return format!("SOP class {uid}"),
    };
    format!("{name} ({uid})")
}

#[derive(Debug, thiserror::Error)]
pub enum ScuError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("no association with {addr} within {secs} s")]
    ConnectTimeout { addr: String, secs: u64 },
    #[error("association rejected ({}): {reason}", if *permanent { "permanent" } else { "transient" })]
    Rejected { permanent: bool, reason: String },
    #[error("the destination accepted none of the proposed presentation contexts ({classes})")]
    NoContexts { classes: String },
    #[error("association failed: {0}")]
    Association(String),
    #[error("no C-STORE-RSP within {0} s")]
    Timeout(u64),
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("the destination aborted the association")]
    Aborted,
    #[error("malformed C-STORE-RSP: {0}")]
    BadResponse(String),
    #[error("TLS settings of the destination: {0}")]
    Tls(String),
    #[error("not sent: {0}")]
    Held(String),
    #[error("reading the stored file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ScuError {
    /// A refusal that retrying will not change (until someone changes a configuration).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            ScuError::Rejected {
                permanent: true,
                ..
            } | ScuError::NoContexts { .. }
        )
    }
}

/// A remote AE, as an SCU needs it (a forwarding destination, the archive `mine` reads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub ae_title: String,
    pub host: String,
    pub port: u16,
    pub calling_ae_title: String,
    /// How to reach it over TLS (`tls.enabled`), read again for each association so
    /// renewed certificates are picked up without a restart.
    pub tls: std::sync::Arc<ClientTlsConfig>,
}

impl Peer {
    /// The TLS client for this peer, `None` for plain TCP.
    pub fn client_tls(&self) -> Result<Option<ClientTls>, crate::net::TlsError> {
        ClientTls::build(&self.tls, &self.host)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub dimse: Duration,
}

/// A presentation context accepted by the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub id: u8,
    pub abstract_syntax: String,
    pub transfer_syntax: String,
}

/// The presentation contexts the peer accepted, with their UIDs unpadded.
pub(crate) fn accepted_contexts(assoc: &ClientAssociation) -> Vec<Accepted> {
    assoc
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .map(|pc| Accepted {
            id: pc.id,
            abstract_syntax: trim_uid(&pc.abstract_syntax).to_string(),
            transfer_syntax: trim_uid(&pc.transfer_syntax).to_string(),
        })
        .collect()
}

/// The largest PDV value per P-DATA-TF the peer takes (its max PDU less the PDV header),
/// kept between 1 KiB and 4 MiB whatever it announced.
pub(crate) fn max_pdv_data(assoc: &ClientAssociation) -> usize {
    (assoc.acceptor_max_pdu_length() as usize)
        .saturating_sub(6)
        .clamp(1024, 4 * 1024 * 1024)
}

/// The bytes of one data set: `head` in memory, then optionally the rest of a file.
#[derive(Debug)]
pub struct Payload {
    pub head: Vec<u8>,
    pub tail: Option<FileTail>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileTail {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
}

impl Payload {
    pub fn len(&self) -> u64 {
        self.head.len() as u64 + self.tail.as_ref().map_or(0, |t| t.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A C-STORE-RSP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreResponse {
    pub status: u16,
    pub comment: Option<String>,
}

/// The presentation contexts proposed for a batch: per (SOP class, stored transfer syntax)
/// one context with that syntax, and per SOP class one with Explicit and Implicit VR Little
/// Endian, so the stored syntax is used where the destination accepts it and an uncompressed
/// one otherwise. At most 128 contexts (PS3.8 9.3.2.2: odd IDs 1-255).
pub fn proposals(items: &[(String, String)]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut push = |class: &str, syntaxes: Vec<String>| {
        if out.len() < 128 && !out.iter().any(|(c, s)| c == class && *s == syntaxes) {
            out.push((class.to_string(), syntaxes));
        }
    };
    for (class, ts) in items {
        push(class, vec![ts.clone()]);
        push(
            class,
            vec![EXPLICIT_VR_LE.to_string(), IMPLICIT_VR_LE.to_string()],
        );
    }
    out
}

pub struct Association {
    assoc: ClientAssociation,
    contexts: Vec<Accepted>,
    next_message_id: u16,
    /// Largest PDV value per PDU the destination takes.
    max_data: usize,
    dimse_timeout: Duration,
    out: Vec<u8>,
}

impl Association {
    /// Connect and negotiate. `proposals` as made by [`proposals`].
    pub async fn open(
        peer: &Peer,
        proposals: &[(String, Vec<String>)],
        max_pdu_length: u32,
        timeouts: Timeouts,
    ) -> Result<Association, ScuError> {
        let mut options = ClientAssociationOptions::new()
            .calling_ae_title(peer.calling_ae_title.clone())
            .called_ae_title(peer.ae_title.clone())
            .max_pdu_length(max_pdu_length)
            // Strict: a PDU longer than our maximum is refused from its header, not buffered
            // until its announced length (up to 4 GiB) has arrived (issue #18).
            .strict(true)
            .connection_timeout(timeouts.connect)
            .read_timeout(timeouts.dimse)
            .write_timeout(timeouts.dimse);
        for (class, syntaxes) in proposals {
            options = options.with_presentation_context(class.clone(), syntaxes.clone());
        }
        let addr = format!("{}:{}", peer.host, peer.port);
        let tls = peer
            .client_tls()
            .map_err(|e| ScuError::Tls(e.to_string()))?;
        let established = tokio::time::timeout(
            timeouts.connect * 2,
            ClientAssociation::connect(options, &peer.host, peer.port, tls.as_ref()),
        )
        .await;
        let assoc = match established {
            Err(_) => {
                return Err(ScuError::ConnectTimeout {
                    addr,
                    secs: (timeouts.connect * 2).as_secs(),
                })
            }
            Ok(Err(e)) => return Err(negotiation_error(e, &addr, proposals, timeouts)),
            Ok(Ok(a)) => a,
        };
        let contexts = accepted_contexts(&assoc);
        let max_data = max_pdv_data(&assoc);
        Ok(Association {
            assoc,
            contexts,
            next_message_id: 1,
            max_data,
            dimse_timeout: timeouts.dimse,
            out: Vec::with_capacity(WRITE_CHUNK + 64 * 1024),
        })
    }

    pub fn accepted(&self) -> &[Accepted] {
        &self.contexts
    }

    /// The context to send an instance of `sop_class` stored in `stored_ts` on: its own
    /// syntax if accepted, else Explicit, else Implicit VR Little Endian.
    pub fn choose(&self, sop_class: &str, stored_ts: &str) -> Option<&Accepted> {
        let of_class = |ts: &str| {
            self.contexts
                .iter()
                .find(|c| c.abstract_syntax == sop_class && c.transfer_syntax == ts)
        };
        of_class(stored_ts)
            .or_else(|| of_class(EXPLICIT_VR_LE))
            .or_else(|| of_class(IMPLICIT_VR_LE))
    }

    /// One C-STORE: the request, the data set, the response.
    pub async fn store(
        &mut self,
        context: u8,
        sop_class: &str,
        sop_instance_uid: &str,
        payload: Payload,
    ) -> Result<StoreResponse, ScuError> {
        self.store_gated(
            context,
            sop_class,
            sop_instance_uid,
            payload,
            std::future::ready(Ok(())),
        )
        .await
    }

    /// C-STORE whose last P-DATA fragment waits for `gate`: everything before it is on the
    /// wire meanwhile, and the destination cannot store the copy before it has that last
    /// fragment. The forward worker commits the previous copy's outcome in the gate, so
    /// that commit overlaps this copy's transfer and still precedes its delivery. A gate
    /// that fails sends nothing more: `ScuError::Held` (abort the association then).
    pub async fn store_gated(
        &mut self,
        context: u8,
        sop_class: &str,
        sop_instance_uid: &str,
        payload: Payload,
        gate: impl std::future::Future<Output = Result<(), String>>,
    ) -> Result<StoreResponse, ScuError> {
        let message_id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1).max(1);
        let command = store_rq(message_id, sop_class, sop_instance_uid);
        self.out.clear();
        push_pdu(&mut self.out, context, true, true, &command);
        self.send_data(context, payload, gate).await?;
        self.receive_response(message_id).await
    }

    async fn send_data(
        &mut self,
        context: u8,
        payload: Payload,
        gate: impl std::future::Future<Output = Result<(), String>>,
    ) -> Result<(), ScuError> {
        let mut gate = std::pin::pin!(gate);
        let mut remaining = payload.len();
        let mut buf = payload.head;
        let mut pos = 0;
        let mut file = match &payload.tail {
            Some(t) => {
                let mut f =
                    tokio::fs::File::open(&t.path)
                        .await
                        .map_err(|source| ScuError::File {
                            path: t.path.clone(),
                            source,
                        })?;
                f.seek(io::SeekFrom::Start(t.offset))
                    .await
                    .map_err(|source| ScuError::File {
                        path: t.path.clone(),
                        source,
                    })?;
                Some((f, t.path.clone()))
            }
            None => None,
        };
        if remaining == 0 {
            self.flush().await?;
            gate.as_mut().await.map_err(ScuError::Held)?;
            push_pdu(&mut self.out, context, false, true, &[]);
        }
        while remaining > 0 {
            if pos == buf.len() {
                let Some((f, path)) = file.as_mut() else {
                    return Err(ScuError::Lost("data set shorter than announced".into()));
                };
                let want = remaining.min(READ_CHUNK as u64) as usize;
                buf.resize(want, 0);
                f.read_exact(&mut buf)
                    .await
                    .map_err(|source| ScuError::File {
                        path: path.clone(),
                        source,
                    })?;
                pos = 0;
            }
            let n = self.max_data.min(buf.len() - pos);
            if remaining == n as u64 {
                // The last fragment: only once the gate opens.
                self.flush().await?;
                gate.as_mut().await.map_err(ScuError::Held)?;
            }
            remaining -= n as u64;
            push_pdu(
                &mut self.out,
                context,
                false,
                remaining == 0,
                &buf[pos..pos + n],
            );
            pos += n;
            if self.out.len() >= WRITE_CHUNK {
                self.flush().await?;
            }
        }
        self.flush().await
    }

    async fn flush(&mut self) -> Result<(), ScuError> {
        if self.out.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(self.dimse_timeout, self.assoc.write_encoded(&self.out)).await {
            Err(_) => return Err(ScuError::Timeout(self.dimse_timeout.as_secs())),
            Ok(Err(e)) => return Err(ScuError::Lost(e.to_string())),
            Ok(Ok(())) => {}
        }
        self.out.clear();
        Ok(())
    }

    async fn receive_response(&mut self, message_id: u16) -> Result<StoreResponse, ScuError> {
        let mut command = Vec::new();
        loop {
            let pdu = match tokio::time::timeout(self.dimse_timeout, self.assoc.receive()).await {
                Err(_) => return Err(ScuError::Timeout(self.dimse_timeout.as_secs())),
                Ok(Err(e)) => return Err(ScuError::Lost(error_chain(&e))),
                Ok(Ok(pdu)) => pdu,
            };
            match pdu {
                Pdu::PData { data } => {
                    for pdv in data {
                        if pdv.value_type != dicom_ul::pdu::PDataValueType::Command {
                            return Err(ScuError::BadResponse(
                                "a data set fragment where a response was expected".into(),
                            ));
                        }
                        command.extend_from_slice(&pdv.data);
                        if command.len() > 64 * 1024 {
                            return Err(ScuError::BadResponse("command set over 64 KiB".into()));
                        }
                        if pdv.is_last {
                            return parse_response(&command, message_id);
                        }
                    }
                }
                Pdu::AbortRQ { .. } => return Err(ScuError::Aborted),
                other => {
                    return Err(ScuError::BadResponse(format!(
                        "unexpected {} instead of a C-STORE-RSP",
                        other.short_description()
                    )))
                }
            }
        }
    }

    /// A-RELEASE; a peer that does not answer in time is left.
    pub async fn release(self) {
        let wait = self.dimse_timeout.min(Duration::from_secs(10));
        let _ = tokio::time::timeout(wait, self.assoc.release()).await;
    }

    pub async fn abort(self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.assoc.abort()).await;
    }
}

fn negotiation_error(
    e: dicom_ul::association::Error,
    addr: &str,
    proposals: &[(String, Vec<String>)],
    timeouts: Timeouts,
) -> ScuError {
    use dicom_ul::association::Error as E;
    match e {
        E::Connect { source, .. } => ScuError::Connect {
            addr: addr.to_string(),
            source,
        },
        E::Timeout { .. } => ScuError::ConnectTimeout {
            addr: addr.to_string(),
            secs: timeouts.connect.as_secs(),
        },
        E::Rejected { association_rj, .. } => ScuError::Rejected {
            permanent: association_rj.result == AssociationRJResult::Permanent,
            reason: association_rj.source.to_string(),
        },
        E::NoAcceptedPresentationContexts { .. } => {
            let mut classes: Vec<String> =
                proposals.iter().map(|(c, _)| sop_class_name(c)).collect();
            classes.dedup();
            ScuError::NoContexts {
                classes: classes.join(", "),
            }
        }
        E::Aborted { .. } => ScuError::Aborted,
        other => ScuError::Association(error_chain(&other)),
    }
}

/// One P-DATA-TF PDU with one PDV (PS3.8 9.3.5).
fn push_pdu(out: &mut Vec<u8>, context: u8, command: bool, last: bool, data: &[u8]) {
    let pdv_len = data.len() as u32 + 2;
    out.push(0x04);
    out.push(0);
    out.extend_from_slice(&(pdv_len + 4).to_be_bytes());
    out.extend_from_slice(&pdv_len.to_be_bytes());
    out.push(context);
    out.push(u8::from(command) | (u8::from(last) << 1));
    out.extend_from_slice(data);
}

/// A C-STORE-RQ command set, Implicit VR Little Endian, group length first (PS3.7 9.3.1.1).
pub fn store_rq(message_id: u16, sop_class: &str, sop_instance_uid: &str) -> Vec<u8> {
    fn element(out: &mut Vec<u8>, element: u16, value: &[u8]) {
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&element.to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }
    fn uid(value: &str) -> Vec<u8> {
        let mut v = value.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        v
    }
    let mut body = Vec::with_capacity(160);
    element(&mut body, 0x0002, &uid(sop_class));
    element(&mut body, 0x0100, &C_STORE_RQ.to_le_bytes());
    element(&mut body, 0x0110, &message_id.to_le_bytes());
    element(&mut body, 0x0700, &0u16.to_le_bytes()); // priority: medium
    element(&mut body, 0x0800, &0u16.to_le_bytes()); // a data set follows
    element(&mut body, 0x1000, &uid(sop_instance_uid));
    let mut out = Vec::with_capacity(body.len() + 12);
    element(&mut out, 0x0000, &(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn parse_response(bytes: &[u8], message_id: u16) -> Result<StoreResponse, ScuError> {
    // Lengths checked against the bytes before anything is allocated (issue #18).
    let obj = crate::dimse::command::read_command_set(bytes)
        .map_err(|e| ScuError::BadResponse(e.to_string()))?;
    let int = |element: u16, name: &str| -> Result<u16, ScuError> {
        obj.element(Tag(0x0000, element))
            .map_err(|_| ScuError::BadResponse(format!("no {name}")))?
            .to_int::<u16>()
            .map_err(|e| ScuError::BadResponse(format!("{name}: {e}")))
    };
    let field = int(0x0100, "Command Field")?;
    if field != C_STORE_RSP {
        return Err(ScuError::BadResponse(format!(
            "command 0x{field:04X} instead of C-STORE-RSP"
        )));
    }
    let responded_to = int(0x0120, "Message ID Being Responded To")?;
    if responded_to != message_id {
        return Err(ScuError::BadResponse(format!(
            "response to message {responded_to}, expected {message_id}"
        )));
    }
    Ok(StoreResponse {
        status: int(0x0900, "Status")?,
        comment: obj
            .element(Tag(0x0000, 0x0902))
            .ok()
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
            .filter(|s| !s.is_empty()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_encoding::TransferSyntaxIndex;
    use dicom_object::InMemDicomObject;
    use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

    #[test]
    fn statuses_are_sorted_on_purpose() {
        assert_eq!(verdict(0x0000), Verdict::Stored);
        for w in [0xB000, 0xB006, 0xB007, 0x0001, 0x0107, 0x0116] {
            assert_eq!(verdict(w), Verdict::Warning, "{w:04X}");
        }
        for t in [0xA700, 0xA7FF, 0x0213] {
            assert_eq!(verdict(t), Verdict::Transient, "{t:04X}");
        }
        for p in [
            0x0122, 0x0124, 0x0111, 0xA900, 0xA9AB, 0xC000, 0xC123, 0x0211,
        ] {
            assert_eq!(verdict(p), Verdict::Permanent, "{p:04X}");
        }
        assert_eq!(status_name(0x0122), "SOP class not supported");
        assert_eq!(status_name(0xA702), "refused: out of resources");
        assert_eq!(status_name(0xC011), "error: cannot understand");
    }

    #[test]
    fn the_request_is_a_valid_command_set() {
        let rq = store_rq(7, "1.2.840.10008.5.1.4.1.1.2", "1.2.3");
        let ts = TransferSyntaxRegistry.get(IMPLICIT_VR_LE).unwrap();
        let group_len = u32::from_le_bytes(rq[8..12].try_into().unwrap());
        assert_eq!(group_len as usize, rq.len() - 12);
        let obj = InMemDicomObject::read_dataset_with_ts(&rq[..], ts).unwrap();
        let int = |e| obj.element(Tag(0, e)).unwrap().to_int::<u16>().unwrap();
        assert_eq!(int(0x0100), 1);
        assert_eq!(int(0x0110), 7);
        assert_eq!(int(0x0800), 0);
        let uid = obj.element(Tag(0, 0x1000)).unwrap().to_str().unwrap();
        assert_eq!(uid.trim_end_matches('\0'), "1.2.3");
    }

    #[test]
    fn pdus_carry_one_pdv_with_its_flags() {
        let mut out = Vec::new();
        push_pdu(&mut out, 3, false, true, &[1, 2, 3]);
        assert_eq!(out, [4, 0, 0, 0, 0, 9, 0, 0, 0, 5, 3, 2, 1, 2, 3]);
        out.clear();
        push_pdu(&mut out, 1, true, true, &[]);
        assert_eq!(&out[10..], &[1, 3]);
    }

    #[test]
    fn proposals_offer_the_stored_syntax_and_uncompressed_ones() {
        let ct = "1.2.840.10008.5.1.4.1.1.2".to_string();
        let p = proposals(&[
            (ct.clone(), "1.2.840.10008.1.2.4.90".into()),
            (ct.clone(), "1.2.840.10008.1.2.4.90".into()),
            (ct.clone(), EXPLICIT_VR_LE.into()),
        ]);
        assert_eq!(p.len(), 3, "{p:?}");
        assert_eq!(p[0].1, ["1.2.840.10008.1.2.4.90"]);
        assert_eq!(p[1].1, [EXPLICIT_VR_LE, IMPLICIT_VR_LE]);
        assert_eq!(p[2].1, [EXPLICIT_VR_LE]);
    }

    #[test]
    fn a_response_to_another_message_is_refused() {
        let mut rsp = store_rq(9, "1.2", "1.2.3");
        // Turn the request into a response to message 9: field 8001, (0000,0120) = 9.
        let ts = TransferSyntaxRegistry.get(IMPLICIT_VR_LE).unwrap();
        let mut obj = InMemDicomObject::read_dataset_with_ts(&rsp[..], ts).unwrap();
        use dicom_core::{DataElement, PrimitiveValue, VR};
        obj.put(DataElement::new(
            Tag(0, 0x0100),
            VR::US,
            PrimitiveValue::from(0x8001u16),
        ));
        obj.put(DataElement::new(
            Tag(0, 0x0120),
            VR::US,
            PrimitiveValue::from(9u16),
        ));
        obj.put(DataElement::new(
            Tag(0, 0x0900),
            VR::US,
            PrimitiveValue::from(0xA700u16),
        ));
        rsp.clear();
        obj.write_dataset_with_ts(&mut rsp, ts).unwrap();
        let ok = parse_response(&rsp, 9).unwrap();
        assert_eq!(ok.status, 0xA700);
        assert!(matches!(
            parse_response(&rsp, 10),
            Err(ScuError::BadResponse(_))
        ));
    }
}
