//! One association, from A-ASSOCIATE-RQ to release or abort: negotiation, P-DATA
//! reassembly into DIMSE messages, and dispatch to the services (C-ECHO, C-STORE, C-FIND).
//!
//! Command fragments are collected in memory (they are small); data set fragments go
//! straight to the store's temporary file, so memory stays bounded by the PDU size. A
//! C-FIND identifier is collected in memory up to a limit (`find::IdentifierBuffer`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dicom_ul::association::server::{DefaultNegotiation, ServerAssociationOptions};
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use dicom_ul::Pdu;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument, Span};

use super::access::PeerAccess;
use super::command::{self, Request};
use super::find::{self, FindChannel, IdentifierBuffer, Interruption};
use super::sop_classes;
use super::status::Status;
use super::ServiceContext;
use crate::audit::{AuditEvent, EventType, Outcome};
use crate::net::{Incoming, PeerIdentity, ServerAssociation};
use crate::store::{IncomingHeader, StoreError, StoreOutcome};

/// Command sets are a few hundred bytes; anything this large is not a command.
const MAX_COMMAND_BYTES: usize = 64 * 1024;

static ASSOCIATION_IDS: AtomicU64 = AtomicU64::new(1);

/// Why the loop over PDUs ended, and so how the association is closed.
enum Ending {
    Released,
    PeerAborted,
    Closed(String),
    Abort(String),
}

struct AcceptedContext {
    abstract_syntax: String,
    transfer_syntax: String,
}

/// Accept (or reject) an association on `incoming` and serve it to the end.
pub async fn serve(incoming: Incoming, ctx: Arc<ServiceContext>, shutdown: CancellationToken) {
    let id = ASSOCIATION_IDS.fetch_add(1, Ordering::Relaxed);
    let peer = incoming.peer;
    let span = info_span!("association", id, peer = %peer, tls = incoming.is_tls(), calling_ae = tracing::field::Empty);
    async move {
        let Some(association) = establish(incoming, &ctx).await else {
            return;
        };
        Span::current().record("calling_ae", association.peer_ae_title());
        ctx.metrics.association("accepted");
        ctx.metrics.associations_active.inc();
        let contexts = accepted_contexts(&association);
        info!(contexts = contexts.len(), client_cert = %association_cert(&association), "association accepted");
        let audit = ctx.audit.association(
            peer,
            association.peer_ae_title(),
            contexts.len(),
            association.peer.certificate.as_ref(),
        );
        let mut handler = Handler {
            audit: audit.clone(),
            ctx: ctx.clone(),
            association: association.association,
            contexts,
            command_buf: Vec::new(),
            transfer: None,
            identifier: None,
            deferred: None,
        };
        let ending = handler.run(&shutdown).await;
        let Handler { association, .. } = handler;
        finish(association, ending).await;
        audit.finish();
        ctx.metrics.associations_active.dec();
    }
    .instrument(span)
    .await
}

/// An association with who is at the other end.
struct Established {
    association: ServerAssociation,
    peer: PeerIdentity,
}

impl Established {
    fn peer_ae_title(&self) -> &str {
        self.association.peer_ae_title()
    }
}

fn association_cert(association: &Established) -> String {
    match &association.peer.certificate {
        Some(c) => c.to_string(),
        None => "none".into(),
    }
}

/// Negotiate within ARTIM (after the TLS handshake, on the TLS port); `None` when the
/// association was refused or failed (logged, counted, and audited when it is a refusal).
async fn establish(incoming: Incoming, ctx: &ServiceContext) -> Option<Established> {
    let dicom = &ctx.config.dicom;
    let peer = incoming.peer;
    let access = PeerAccess::new(dicom.allow_any_peer, ctx.allowed_peers.clone(), peer.ip())
        .with_audit(ctx.audit.clone(), peer)
        .with_client_cert(incoming.client_cert.clone());
    let options = server_options(dicom, access);
    let artim = Duration::from_secs(dicom.artim_timeout_secs);
    let deadline = tokio::time::Instant::now() + artim;
    // On TLS the first bytes are a handshake record, not a PDU header; dicom-ul's strict
    // mode checks the A-ASSOCIATE-RQ's length after the handshake.
    if !incoming.is_tls() {
        if let Some(len) = oversized_request(&incoming.socket, dicom.max_pdu_length, deadline).await
        {
            // dicom-ul would refuse it too, but only by dropping the connection.
            ctx.metrics.association("failed");
            warn!(
                pdu_length = len,
                "the first PDU announces more than dicom.max_pdu_length; aborting"
            );
            let mut socket = incoming.socket;
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::io::AsyncWriteExt::write_all(&mut socket, &INVALID_PDU_ABORT),
            )
            .await;
            return None;
        }
    }
    let slot = incoming.client_cert.clone();
    match tokio::time::timeout_at(deadline, incoming.accept(options)).await {
        Err(_) => {
            ctx.metrics.association("artim_timeout");
            warn!("no A-ASSOCIATE-RQ within dicom.artim_timeout_secs; closing");
            None
        }
        Ok(Err(e)) => {
            let outcome = rejection_outcome(&e);
            ctx.metrics.association(&outcome);
            if outcome == "closed_before_request" {
                // Port probes and health checks connect and leave: not worth a warning.
                debug!("connection closed before an A-ASSOCIATE-RQ");
            } else if outcome == "tls_handshake_failed" {
                tls_refused(ctx, peer, &e);
            } else {
                warn!(error = %e, outcome, "association not established");
            }
            None
        }
        Ok(Ok(association)) => Some(Established {
            association,
            peer: PeerIdentity::with_certificate(peer, slot.get()),
        }),
    }
}

/// A TLS handshake that failed (no or an untrusted client certificate, an old protocol,
/// plain DICOM on the TLS port): logged and audited as a refused association.
fn tls_refused(ctx: &ServiceContext, peer: SocketAddr, e: &dicom_ul::association::Error) {
    let why = crate::error_text::error_chain(e);
    warn!(error = %why, "TLS handshake failed; association refused");
    ctx.audit.record(
        AuditEvent::new(EventType::AssociationRefused, Outcome::Refused, "")
            .peer(peer)
            .object("TLS handshake".to_string())
            .detail(format!("TLS handshake failed: {why}")),
    );
}

/// A-ABORT from the service provider, reason "invalid PDU parameter value" (PS3.8 9.3.8).
const INVALID_PDU_ABORT: [u8; 10] = [0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6];

/// The length the first PDU on `socket` announces, when it is more than `max` (peeked, so
/// nothing is consumed); `None` when it is not, or when no header arrives before
/// `deadline` (the negotiation then ends the connection as usual).
async fn oversized_request(
    socket: &TcpStream,
    max: u32,
    deadline: tokio::time::Instant,
) -> Option<u32> {
    let mut header = [0u8; 6];
    // Bounded: a peer that dribbles its header is looked at every 10 ms until ARTIM.
    for _ in 0..10_000 {
        let n = tokio::time::timeout_at(deadline, socket.peek(&mut header))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if n >= 6 {
            let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
            return (len > max).then_some(len);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// How the node negotiates an association as SCP (also driven by `crate::fuzz`).
pub fn server_options(
    dicom: &crate::config::DicomConfig,
    access: PeerAccess,
) -> ServerAssociationOptions<'static, PeerAccess, DefaultNegotiation> {
    let mut options = ServerAssociationOptions::new()
        .ae_access_control(access)
        .ae_title(dicom.ae_title.clone())
        .max_pdu_length(dicom.max_pdu_length)
        // Strict: a PDU (the A-ASSOCIATE-RQ included) that declares more than
        // dicom.max_pdu_length is refused from its 6-byte header. Not strict, dicom-ul
        // buffers whatever the peer sends until the declared length (up to 4 GiB) has
        // arrived (issue #18); the refusal is answered with an A-ABORT (`receive_error`).
        .strict(true)
        .write_timeout(Duration::from_secs(dicom.idle_timeout_secs))
        .with_abstract_syntax(sop_classes::VERIFICATION);
    for uid in sop_classes::STORAGE_SOP_CLASSES {
        options = options.with_abstract_syntax(*uid);
    }
    for uid in sop_classes::QUERY_SOP_CLASSES {
        options = options.with_abstract_syntax(*uid);
    }
    for ts in sop_classes::TRANSFER_SYNTAXES {
        options = options.with_transfer_syntax(*ts);
    }
    options
}

fn rejection_outcome(e: &dicom_ul::association::Error) -> String {
    match e {
        dicom_ul::association::Error::Rejected { association_rj, .. } => {
            use dicom_ul::pdu::{AssociationRJServiceUserReason as R, AssociationRJSource as S};
            match &association_rj.source {
                S::ServiceUser(R::CalledAETitleNotRecognized) => "rejected_called_ae".into(),
                S::ServiceUser(R::CallingAETitleNotRecognized) => "rejected_calling_ae".into(),
                _ => "rejected_other".into(),
            }
        }
        // A probe that connects to the TLS port and leaves without a ClientHello is a port
        // check, as on the plain port, not a refused peer.
        dicom_ul::association::Error::TlsHandshake { source, .. }
            if source.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            "closed_before_request".into()
        }
        dicom_ul::association::Error::TlsHandshake { .. } => "tls_handshake_failed".into(),
        e if is_closed_before_request(e) => "closed_before_request".into(),
        _ => "failed".into(),
    }
}

fn is_closed_before_request(e: &dicom_ul::association::Error) -> bool {
    let mut cause: Option<&dyn std::error::Error> = Some(e);
    while let Some(c) = cause {
        if matches!(
            c.downcast_ref::<dicom_ul::association::Error>(),
            Some(dicom_ul::association::Error::ConnectionClosed { .. })
        ) {
            return true;
        }
        cause = c.source();
    }
    false
}

fn accepted_contexts(association: &Established) -> HashMap<u8, AcceptedContext> {
    association
        .association
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .map(|pc| {
            (
                pc.id,
                AcceptedContext {
                    abstract_syntax: pc.abstract_syntax.trim_end_matches(['\0', ' ']).to_string(),
                    transfer_syntax: pc.transfer_syntax.trim_end_matches(['\0', ' ']).to_string(),
                },
            )
        })
        .collect()
}

async fn finish(association: ServerAssociation, ending: Ending) {
    match ending {
        Ending::Released => {
            // Give the peer a moment to close first (it owns the release), then drop.
            debug!("association released");
            let mut association = association;
            let _ = tokio::time::timeout(Duration::from_secs(1), association.receive()).await;
        }
        Ending::PeerAborted => info!("association aborted by the peer"),
        Ending::Closed(why) => info!(reason = %why, "connection closed"),
        Ending::Abort(why) => {
            warn!(reason = %why, "aborting association");
            let _ = tokio::time::timeout(Duration::from_secs(2), association.abort()).await;
        }
    }
}

/// How a failed read ends the association: a PDU that cannot be parsed or is longer
/// than negotiated is the peer's protocol error and is answered with an A-ABORT; a closed
/// or broken connection is just closed.
fn receive_error(e: dicom_ul::association::Error) -> Ending {
    use dicom_ul::pdu::ReadError;
    match &e {
        dicom_ul::association::Error::ReceivePdu { source } => match source {
            ReadError::ReadPdu { .. } => Ending::Closed(e.to_string()),
            ReadError::PduTooLarge {
                pdu_length,
                max_pdu_length,
                ..
            } => Ending::Abort(format!(
                "PDU of {pdu_length} bytes announced, dicom.max_pdu_length is {max_pdu_length}"
            )),
            other => Ending::Abort(format!("malformed PDU: {other}")),
        },
        _ => Ending::Closed(e.to_string()),
    }
}

struct Handler {
    ctx: Arc<ServiceContext>,
    audit: crate::audit::AssociationAudit,
    association: ServerAssociation,
    contexts: HashMap<u8, AcceptedContext>,
    command_buf: Vec<u8>,
    /// The data set of the current request, while its fragments arrive.
    transfer: Option<DataTransfer>,
    /// The identifier of the current C-FIND-RQ, while its fragments arrive.
    identifier: Option<IdentifierBuffer>,
    /// A PDU that arrived while C-FIND responses streamed and was not a C-CANCEL-RQ: it is
    /// handled once the C-FIND has ended.
    deferred: Option<Pdu>,
}

/// How long a shutting-down association waits for a message already sent to it.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

fn shutdown_grace_end() -> tokio::time::Instant {
    tokio::time::Instant::now() + SHUTDOWN_GRACE
}

impl Handler {
    async fn run(&mut self, shutdown: &CancellationToken) -> Ending {
        let idle = Duration::from_secs(self.ctx.config.dicom.idle_timeout_secs);
        // Once shutdown starts, a message whose first PDU is already on its way (sent before
        // the peer could know) is still served; after this grace only the one in progress is.
        let mut drain_until: Option<tokio::time::Instant> = None;
        loop {
            let between_messages =
                self.transfer.is_none() && self.identifier.is_none() && self.command_buf.is_empty();
            let pdu = if let Some(pdu) = self.deferred.take() {
                pdu
            } else {
                let receive = tokio::time::timeout(idle, self.association.receive());
                tokio::pin!(receive);
                let draining = between_messages && shutdown.is_cancelled();
                let received = if draining {
                    let until = *drain_until.get_or_insert_with(shutdown_grace_end);
                    match tokio::time::timeout_at(until, &mut receive).await {
                        Err(_) => return Ending::Abort("node is shutting down".into()),
                        Ok(r) => r,
                    }
                } else {
                    tokio::select! {
                        r = &mut receive => r,
                        _ = shutdown.cancelled(), if between_messages => {
                            let until = *drain_until.get_or_insert_with(shutdown_grace_end);
                            match tokio::time::timeout_at(until, &mut receive).await {
                                Err(_) => return Ending::Abort("node is shutting down".into()),
                                Ok(r) => r,
                            }
                        }
                    }
                };
                match received {
                    Err(_) => return Ending::Abort("no PDU within dicom.idle_timeout_secs".into()),
                    Ok(Err(e)) => return receive_error(e),
                    Ok(Ok(pdu)) => pdu,
                }
            };
            match pdu {
                Pdu::PData { data } => {
                    for pdv in data {
                        if let Err(why) = self.on_fragment(pdv).await {
                            return Ending::Abort(why);
                        }
                    }
                }
                Pdu::ReleaseRQ => {
                    if self.transfer.is_some() {
                        warn!("release requested in the middle of a data set; it is discarded");
                    }
                    return match self.association.send(&Pdu::ReleaseRP).await {
                        Ok(()) => Ending::Released,
                        Err(e) => Ending::Closed(e.to_string()),
                    };
                }
                Pdu::AbortRQ { .. } => return Ending::PeerAborted,
                other => {
                    return Ending::Abort(format!("unexpected PDU {}", other.short_description()));
                }
            }
        }
    }

    /// One presentation data value. An `Err` is a protocol violation: abort.
    async fn on_fragment(&mut self, pdv: PDataValue) -> Result<(), String> {
        let pc_id = pdv.presentation_context_id;
        if !self.contexts.contains_key(&pc_id) {
            return Err(format!(
                "fragment on presentation context {pc_id}, which was not accepted"
            ));
        }
        match pdv.value_type {
            PDataValueType::Command => {
                if self.transfer.is_some() || self.identifier.is_some() {
                    return Err("command fragment while a data set is still arriving".into());
                }
                self.command_buf.extend_from_slice(&pdv.data);
                if self.command_buf.len() > MAX_COMMAND_BYTES {
                    return Err("command set larger than 64 KiB".into());
                }
                if pdv.is_last {
                    let bytes = std::mem::take(&mut self.command_buf);
                    let request = Request::parse(&bytes).map_err(|e| e.to_string())?;
                    self.on_command(request, pc_id).await?;
                }
                Ok(())
            }
            PDataValueType::Data if self.identifier.is_some() => {
                self.on_identifier_fragment(pdv).await
            }
            PDataValueType::Data => {
                let Some(transfer) = self.transfer.as_mut() else {
                    return Err("data fragment without a command that announced it".into());
                };
                if transfer.pc_id != pc_id {
                    return Err(
                        "data set fragment on another presentation context than its command".into(),
                    );
                }
                transfer.feed(&pdv.data, &self.ctx);

                if pdv.is_last {
                    if let Some(transfer) = self.transfer.take() {
                        let (request, status) = transfer.finish(&self.ctx).await;
                        self.audit.store_status(status.code);
                        self.respond(pc_id, "C-STORE", &request, &status).await?;
                    }
                }
                Ok(())
            }
        }
    }

    async fn on_command(&mut self, request: Request, pc_id: u8) -> Result<(), String> {
        match request.command_field {
            command::C_ECHO_RQ if !request.has_dataset => {
                self.respond(pc_id, "C-ECHO", &request, &Status::success())
                    .await
            }
            command::C_STORE_RQ if request.has_dataset => {
                self.transfer = Some(self.start_store(request, pc_id).await);
                Ok(())
            }
            command::C_FIND_RQ if request.has_dataset => {
                self.identifier = Some(IdentifierBuffer::new(request, pc_id));
                Ok(())
            }
            command::C_FIND_RQ => self.find(request, pc_id, None).await,
            // A C-FIND is cancelled while it streams (`FindLink::interrupted`); a C-CANCEL-RQ
            // seen here came after its final response, or for a message with nothing to stop.
            command::C_CANCEL_RQ => Ok(()),
            _ => {
                let status = Status::failure(
                    Status::UNRECOGNIZED_OPERATION,
                    format!(
                        "command 0x{:04X} is not supported here",
                        request.command_field
                    ),
                );
                if request.has_dataset {
                    self.transfer = Some(DataTransfer::refused(request, pc_id, status));
                    Ok(())
                } else {
                    self.respond(pc_id, "other", &request, &status).await
                }
            }
        }
    }

    async fn on_identifier_fragment(&mut self, pdv: PDataValue) -> Result<(), String> {
        let Some(identifier) = self.identifier.as_mut() else {
            return Err("data fragment without a command that announced it".into());
        };
        if identifier.pc_id != pdv.presentation_context_id {
            return Err(
                "identifier fragment on another presentation context than its command".into(),
            );
        }
        identifier.feed(&pdv.data);
        if pdv.is_last {
            if let Some(identifier) = self.identifier.take() {
                let request = identifier.request.clone();
                return self
                    .find(request, pdv.presentation_context_id, Some(identifier))
                    .await;
            }
        }
        Ok(())
    }

    /// C-FIND: stream the answers, watching for C-CANCEL-RQ (`find::serve`).
    async fn find(
        &mut self,
        request: Request,
        pc_id: u8,
        identifier: Option<IdentifierBuffer>,
    ) -> Result<(), String> {
        let (abstract_syntax, transfer_syntax) = match self.contexts.get(&pc_id) {
            Some(pc) => (pc.abstract_syntax.clone(), pc.transfer_syntax.clone()),
            None => return Err(format!("presentation context {pc_id} was not accepted")),
        };
        let ctx = self.ctx.clone();
        let audit = self.audit.clone();
        let context = find::Context {
            abstract_syntax: &abstract_syntax,
            transfer_syntax: &transfer_syntax,
        };
        let span = info_span!("find", message_id = request.message_id);
        let mut link = FindLink {
            handler: self,
            pc_id,
            request: &request,
        };
        find::serve(
            &ctx.find,
            &ctx.config.dicom.ae_title,
            &mut link,
            &request,
            context,
            identifier,
            &audit,
        )
        .instrument(span)
        .await
    }

    /// Send a DIMSE message: the command set, then the data set if any, in P-DATA-TF PDUs
    /// no longer than the peer's maximum PDU length.
    async fn send_message(
        &mut self,
        pc_id: u8,
        command: Vec<u8>,
        dataset: Option<Vec<u8>>,
    ) -> Result<(), dicom_ul::association::Error> {
        // Each PDV item costs 6 bytes (length, context id, control header).
        let max = (self.association.requestor_max_pdu_length() as usize)
            .saturating_sub(6)
            .max(64);
        let mut pdvs = Vec::new();
        for (value_type, bytes) in [
            (PDataValueType::Command, Some(command)),
            (PDataValueType::Data, dataset),
        ] {
            let Some(bytes) = bytes else { continue };
            let n = bytes.len().div_ceil(max).max(1);
            for (i, chunk) in bytes
                .chunks(max)
                .chain(bytes.is_empty().then_some(&[][..]))
                .enumerate()
            {
                pdvs.push(PDataValue {
                    presentation_context_id: pc_id,
                    value_type: value_type.clone(),
                    is_last: i + 1 == n,
                    data: chunk.to_vec(),
                });
            }
        }
        // Pack the items into as few PDUs as fit (a small answer: one PDU, one write).
        let mut batch: Vec<PDataValue> = Vec::new();
        let mut size = 0;
        for pdv in pdvs {
            let item = pdv.data.len() + 6;
            if !batch.is_empty() && size + item > max + 6 {
                self.association
                    .send(&Pdu::PData {
                        data: std::mem::take(&mut batch),
                    })
                    .await?;
                size = 0;
            }
            size += item;
            batch.push(pdv);
        }
        if !batch.is_empty() {
            self.association.send(&Pdu::PData { data: batch }).await?;
        }
        Ok(())
    }

    async fn start_store(&self, request: Request, pc_id: u8) -> DataTransfer {
        let span = info_span!(
            "instance",
            message_id = request.message_id,
            sop_instance_uid = request.affected_sop_instance_uid.as_deref().unwrap_or(""),
        );
        let Some(pc) = self.contexts.get(&pc_id) else {
            let status = Status::failure(
                Status::SOP_CLASS_NOT_SUPPORTED,
                "presentation context not accepted",
            );
            return DataTransfer::refused(request, pc_id, status);
        };
        let sop_class = request.affected_sop_class_uid.clone().unwrap_or_default();
        if sop_class != pc.abstract_syntax || !sop_classes::is_storage_class(&sop_class) {
            let status = Status::failure(
                Status::SOP_CLASS_NOT_SUPPORTED,
                format!("SOP class {sop_class} not negotiated on this context"),
            );
            return DataTransfer::refused(request, pc_id, status);
        }
        let Some(sop_instance_uid) = request
            .affected_sop_instance_uid
            .clone()
            .filter(|u| !u.is_empty())
        else {
            let status = Status::failure(
                Status::CANNOT_UNDERSTAND,
                "C-STORE-RQ without Affected SOP Instance UID",
            );
            return DataTransfer::refused(request, pc_id, status);
        };
        let header = IncomingHeader {
            sop_class_uid: sop_class,
            sop_instance_uid,
            transfer_syntax_uid: pc.transfer_syntax.clone(),
            calling_ae: self.association.peer_ae_title().to_string(),
            received: Some(self.audit.tally()),
        };
        let started = Instant::now();
        match self.ctx.store.begin(header).instrument(span.clone()).await {
            Ok(incoming) => DataTransfer {
                request,
                pc_id,
                incoming: Some(incoming),
                failure: None,
                span,
                started,
                bytes: 0,
            },
            Err(e) => {
                let status = status_for(&e);
                warn!(parent: &span, error = %e, "cannot receive the instance");
                let mut t = DataTransfer::refused(request, pc_id, status);
                t.span = span;
                t
            }
        }
    }

    async fn respond(
        &mut self,
        pc_id: u8,
        service: &str,
        request: &Request,
        status: &Status,
    ) -> Result<(), String> {
        let data = command::encode_response(request, status);
        self.ctx.metrics.dimse_response(service, status.code);
        let pdu = Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc_id,
                value_type: PDataValueType::Command,
                is_last: true,
                data,
            }],
        };
        self.association
            .send(&pdu)
            .await
            .map_err(|e| format!("cannot send the {service} response: {e}"))
    }
}

/// The association as the C-FIND service sees it while its responses stream.
struct FindLink<'a> {
    handler: &'a mut Handler,
    pc_id: u8,
    request: &'a Request,
}

impl FindChannel for FindLink<'_> {
    async fn respond(
        &mut self,
        status: &Status,
        identifier: Option<Vec<u8>>,
    ) -> Result<(), String> {
        let command = command::encode_response_with(self.request, status, identifier.is_some());
        self.handler
            .ctx
            .metrics
            .dimse_response("C-FIND", status.code);
        self.handler
            .send_message(self.pc_id, command, identifier)
            .await
            .map_err(|e| format!("cannot send the C-FIND response: {e}"))
    }

    async fn interrupted(&mut self) -> Interruption {
        loop {
            // Something else already waits for the C-FIND to end: read nothing more until
            // then (the peer is held back by TCP).
            if self.handler.deferred.is_some() {
                return std::future::pending().await;
            }
            let pdu = match self.handler.association.receive().await {
                Ok(pdu) => pdu,
                Err(e) => return Interruption::Gone(e.to_string()),
            };
            match pdu {
                Pdu::PData { ref data }
                    if data.len() == 1
                        && data[0].value_type == PDataValueType::Command
                        && data[0].is_last =>
                {
                    match Request::parse(&data[0].data) {
                        Ok(rq) if rq.command_field == command::C_CANCEL_RQ => {
                            if rq.message_id == self.request.message_id {
                                return Interruption::Cancel;
                            }
                            // A cancel for another message: nothing to do (PS3.7 9.3.2.3).
                        }
                        _ => self.handler.deferred = Some(pdu),
                    }
                }
                Pdu::AbortRQ { .. } => {
                    self.handler.deferred = Some(pdu);
                    return Interruption::Gone("aborted by the peer".into());
                }
                other => self.handler.deferred = Some(other),
            }
        }
    }
}

/// The data set of one request while it arrives: written to the store, or, once
/// anything failed, read and discarded so the association stays in step.
struct DataTransfer {
    request: Request,
    pc_id: u8,
    incoming: Option<crate::store::Incoming>,
    failure: Option<Status>,
    span: Span,
    started: Instant,
    bytes: u64,
}

impl DataTransfer {
    fn refused(request: Request, pc_id: u8, status: Status) -> DataTransfer {
        DataTransfer {
            request,
            pc_id,
            incoming: None,
            failure: Some(status),
            span: Span::none(),
            started: Instant::now(),
            bytes: 0,
        }
    }

    fn feed(&mut self, data: &[u8], ctx: &ServiceContext) {
        self.bytes += data.len() as u64;
        ctx.metrics.bytes_received.inc_by(data.len() as u64);
        let Some(incoming) = self.incoming.as_mut() else {
            return;
        };
        if let Err(e) = incoming.write(data) {
            warn!(parent: &self.span, error = %e, "writing the instance failed; the rest of its data set is discarded");
            self.failure = Some(status_for(&e));
            self.incoming = None; // dropping it removes the partial file
        }
    }

    async fn finish(mut self, ctx: &ServiceContext) -> (Request, Status) {
        let status = match (self.failure.take(), self.incoming.take()) {
            (Some(status), _) => status,
            (None, None) => Status::failure(Status::OUT_OF_RESOURCES, "instance was not received"),
            (None, Some(incoming)) => {
                let commit_started = Instant::now();
                let result = ctx
                    .store
                    .commit(incoming)
                    .instrument(self.span.clone())
                    .await;
                ctx.metrics
                    .store_seconds
                    .observe(commit_started.elapsed().as_secs_f64());
                match result {
                    Ok(outcome) => {
                        if outcome == StoreOutcome::KeptFirst {
                            info!(parent: &self.span, "already stored with other content; kept the first");
                        }
                        Status::success()
                    }
                    Err(e) => {
                        warn!(parent: &self.span, error = %e, "instance not stored");
                        status_for(&e)
                    }
                }
            }
        };
        info!(
            parent: &self.span,
            status = format_args!("{:04X}", status.code),
            bytes = self.bytes,
            ms = self.started.elapsed().as_millis() as u64,
            "C-STORE"
        );
        (self.request, status)
    }
}

/// The DIMSE status for a store failure (PS3.4 B.2.3).
pub fn status_for(e: &StoreError) -> Status {
    match e {
        StoreError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
            Status::failure(Status::OUT_OF_RESOURCES, "storage is full")
        }
        e if e.is_out_of_resources() => Status::failure(Status::OUT_OF_RESOURCES, e.to_string()),

        StoreError::DoesNotMatch(why) => Status::failure(Status::DATASET_DOES_NOT_MATCH, why),
        StoreError::Duplicate(_) => Status::failure(Status::DUPLICATE_SOP_INSTANCE, e.to_string()),
        _ => Status::failure(Status::CANNOT_UNDERSTAND, e.to_string()),
    }
}
