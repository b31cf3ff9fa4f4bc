//! The temporary Storage SCP of C-MOVE retrieval. While `mine` runs with
//! `archive.retrieve = "move"`, it listens on `archive.move_bind`:`archive.move_port` as
//! `archive.calling_ae_title` (the archive must know that AE title at this host and port as
//! a C-MOVE destination). Data sets go to the [`Spool`] as their fragments arrive; instances
//! nobody asked for are answered with success and dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dicom_dictionary_std::uids;
use dicom_ul::association::server::ServerAssociationOptions;
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use dicom_ul::Pdu;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::dimse::RETRIEVED_CLASSES;
use super::spool::{Incoming, Spool};
use crate::dimse::command::{self, Request};
use crate::dimse::sop_classes::TRANSFER_SYNTAXES;
use crate::dimse::status::Status;

pub struct StorageScp {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl StorageScp {
    /// Bind and start accepting. A port already in use is an error (another `mine`, or
    /// the node itself, may be on it).
    pub async fn start(
        bind: SocketAddr,
        ae_title: String,
        max_pdu_length: u32,
        idle: Duration,
        spool: Arc<Spool>,
        tls: Option<Arc<crate::net::ServerTls>>,
    ) -> std::io::Result<StorageScp> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = token.cancelled() => break,
                    a = listener.accept() => a,
                };
                match accepted {
                    Ok((socket, peer)) => {
                        let _ = socket.set_nodelay(true);
                        let transport = match &tls {
                            Some(tls) => crate::net::Transport::Tls(tls),
                            None => crate::net::Transport::Plain,
                        };
                        let incoming = match crate::net::Incoming::new(socket, peer, transport) {
                            Ok(incoming) => incoming,
                            Err(e) => {
                                warn!(%peer, error = %e, "C-MOVE destination: connection refused");
                                continue;
                            }
                        };
                        let spool = spool.clone();
                        let ae = ae_title.clone();
                        let token = token.clone();
                        tokio::spawn(async move {
                            serve(incoming, ae, max_pdu_length, idle, spool, token).await;
                        });
                    }
                    Err(e) => {
                        warn!(error = %e, "C-MOVE destination: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(StorageScp { addr, stop, task })
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn serve(
    incoming: crate::net::Incoming,
    ae_title: String,
    max_pdu_length: u32,
    idle: Duration,
    spool: Arc<Spool>,
    stop: CancellationToken,
) {
    let mut options = ServerAssociationOptions::new()
        .accept_called_ae_title()
        .ae_title(ae_title)
        .max_pdu_length(max_pdu_length)
        // Strict: a PDU longer than our maximum is refused from its header, not buffered
        // until its announced length (up to 4 GiB) has arrived (issue #18).
        .strict(true)
        .write_timeout(idle)
        .with_abstract_syntax(uids::VERIFICATION);
    for class in RETRIEVED_CLASSES {
        options = options.with_abstract_syntax(*class);
    }
    for ts in TRANSFER_SYNTAXES {
        options = options.with_transfer_syntax(*ts);
    }
    let peer = incoming.peer;
    let mut assoc = match tokio::time::timeout(idle, incoming.accept(options)).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            warn!(%peer, error = %e, "C-MOVE destination: association refused");
            return;
        }
        Err(_) => return,
    };
    debug!(%peer, calling_ae = assoc.peer_ae_title(), "C-MOVE destination: association");
    let contexts: Vec<(u8, String)> = assoc
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .map(|pc| {
            (
                pc.id,
                pc.transfer_syntax.trim_end_matches(['\0', ' ']).to_string(),
            )
        })
        .collect();
    let mut pending: std::collections::VecDeque<PDataValue> = Default::default();
    let mut command_buf: Vec<u8> = Vec::new();
    // The instance whose data set is arriving: (request, context, spool file or None).
    let mut current: Option<(Request, u8, Option<Incoming>, Option<String>)> = None;
    loop {
        let pdv = match pending.pop_front() {
            Some(pdv) => pdv,
            None => {
                let pdu = tokio::select! {
                    _ = stop.cancelled(), if current.is_none() => break,
                    r = tokio::time::timeout(idle, assoc.receive()) => r,
                };
                match pdu {
                    Ok(Ok(Pdu::PData { data })) => {
                        pending.extend(data);
                        continue;
                    }
                    Ok(Ok(Pdu::ReleaseRQ)) => {
                        let _ = assoc.send(&Pdu::ReleaseRP).await;
                        return;
                    }
                    Ok(Ok(Pdu::AbortRQ { .. })) | Ok(Err(_)) => return,
                    Ok(Ok(other)) => {
                        warn!(pdu = %other.short_description(), "C-MOVE destination: unexpected PDU");
                        break;
                    }
                    Err(_) => {
                        warn!("C-MOVE destination: association idle; aborting");
                        break;
                    }
                }
            }
        };
        match pdv.value_type {
            PDataValueType::Command => {
                command_buf.extend_from_slice(&pdv.data);
                if command_buf.len() > 64 * 1024 {
                    break;
                }
                if !pdv.is_last {
                    continue;
                }
                let Ok(request) = Request::parse(&std::mem::take(&mut command_buf)) else {
                    break;
                };
                match request.command_field {
                    command::C_STORE_RQ if request.has_dataset => {
                        let ts = contexts
                            .iter()
                            .find(|(id, _)| *id == pdv.presentation_context_id)
                            .map(|(_, ts)| ts.clone())
                            .unwrap_or_default();
                        let class = request.affected_sop_class_uid.clone().unwrap_or_default();
                        let uid = request
                            .affected_sop_instance_uid
                            .clone()
                            .unwrap_or_default();
                        let (incoming, error) = match spool.begin(&class, &uid, &ts) {
                            Ok(i) => (i, None),
                            Err(e) => (None, Some(e.to_string())),
                        };
                        current = Some((request, pdv.presentation_context_id, incoming, error));
                    }
                    command::C_ECHO_RQ => {
                        let rsp = command::encode_response(&request, &Status::success());
                        if respond(&mut assoc, pdv.presentation_context_id, rsp)
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    _ => {
                        let status = Status::failure(
                            Status::UNRECOGNIZED_OPERATION,
                            "this Storage SCP takes C-STORE and C-ECHO only",
                        );
                        let rsp = command::encode_response(&request, &status);
                        if request.has_dataset {
                            current = Some((request, pdv.presentation_context_id, None, None));
                        } else if respond(&mut assoc, pdv.presentation_context_id, rsp)
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
            PDataValueType::Data => {
                let Some((_, _, incoming, error)) = current.as_mut() else {
                    break;
                };
                if let Some(i) = incoming.as_mut() {
                    if let Err(e) = i.write(&pdv.data) {
                        *error = Some(e.to_string());
                        if let Some(i) = incoming.take() {
                            i.discard();
                        }
                    }
                }
                if !pdv.is_last {
                    continue;
                }
                let Some((request, context, incoming, error)) = current.take() else {
                    break;
                };
                let status = if request.command_field != command::C_STORE_RQ {
                    Status::failure(Status::UNRECOGNIZED_OPERATION, "C-STORE and C-ECHO only")
                } else {
                    match (error, incoming) {
                        (Some(why), _) => Status::failure(Status::OUT_OF_RESOURCES, why),
                        (None, Some(i)) => match spool.finish(i) {
                            Ok(_) => Status::success(),
                            Err(e) => Status::failure(Status::OUT_OF_RESOURCES, e.to_string()),
                        },
                        (None, None) => Status::success(),
                    }
                };
                let rsp = command::encode_response(&request, &status);
                if respond(&mut assoc, context, rsp).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), assoc.abort()).await;
}

async fn respond(
    assoc: &mut crate::net::ServerAssociation,
    context: u8,
    command: Vec<u8>,
) -> Result<(), dicom_ul::association::Error> {
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: context,
                value_type: PDataValueType::Command,
                is_last: true,
                data: command,
            }],
        })
        .await
}
