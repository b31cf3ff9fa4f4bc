//! The DICOM listener: accepts TCP connections on the plain port and the TLS port
//! (`[dicom.tls]`), enforces `dicom.max_associations` over both (beyond it: A-ASSOCIATE-RJ,
//! transient, local limit exceeded), and hands each connection to an association task. On
//! shutdown it stops accepting; the tasks finish their in-flight message and abort.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJSource,
};
use dicom_ul::Pdu;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::{association, ServiceContext};
use crate::net::{Incoming, ServerTls, Transport};

/// At most this many over-limit connections are answered at once; more are just closed.
const MAX_PENDING_REJECTIONS: usize = 64;
/// Longest A-ASSOCIATE-RQ read from a connection that is rejected for the limit.
const MAX_REJECTED_REQUEST: u32 = 64 * 1024;

/// The association limit, shared by the plain and the TLS port.
#[derive(Clone)]
pub struct Limits {
    limit: Arc<Semaphore>,
    rejections: Arc<Semaphore>,
}

impl Limits {
    pub fn new(max_associations: usize) -> Limits {
        Limits {
            limit: Arc::new(Semaphore::new(max_associations)),
            rejections: Arc::new(Semaphore::new(MAX_PENDING_REJECTIONS)),
        }
    }
}

pub struct Listener {
    listener: TcpListener,
    ctx: Arc<ServiceContext>,
    /// TLS on this port: the server whose certificate each handshake takes.
    tls: Option<Arc<ServerTls>>,
    limits: Limits,
}

impl Listener {
    pub async fn bind(
        addr: SocketAddr,
        ctx: Arc<ServiceContext>,
        tls: Option<Arc<ServerTls>>,
        limits: Limits,
    ) -> std::io::Result<Listener> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Listener {
            listener,
            ctx,
            tls,
            limits,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    fn incoming(&self, socket: tokio::net::TcpStream, peer: SocketAddr) -> Option<Incoming> {
        let transport = match &self.tls {
            Some(tls) => Transport::Tls(tls),
            None => Transport::Plain,
        };
        match Incoming::new(socket, peer, transport) {
            Ok(incoming) => Some(incoming),
            Err(e) => {
                // Only a configuration rustls cannot build gets here (loaded files were checked).
                error!(error = %e, %peer, "no TLS configuration for the connection; closing");
                None
            }
        }
    }

    /// Accept until `shutdown`; association tasks are registered on `tasks`.
    pub async fn run(self, shutdown: CancellationToken, tasks: TaskTracker) {
        let mut backoff = Duration::from_millis(10);
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.listener.accept() => r,
            };
            let (socket, peer) = match accepted {
                Ok(pair) => {
                    backoff = Duration::from_millis(10);
                    pair
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    error!(error = %e, "accept failed; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            if let Err(e) = socket.set_nodelay(true) {
                warn!(error = %e, %peer, "cannot set TCP_NODELAY");
            }
            let Some(incoming) = self.incoming(socket, peer) else {
                continue;
            };
            match self.limits.limit.clone().try_acquire_owned() {
                Ok(permit) => {
                    let ctx = self.ctx.clone();
                    let shutdown = shutdown.clone();
                    tasks.spawn(async move {
                        association::serve(incoming, ctx, shutdown).await;
                        drop(permit);
                    });
                }
                Err(_) => match self.limits.rejections.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let ctx = self.ctx.clone();
                        tasks.spawn(async move {
                            reject_over_limit(incoming, &ctx).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        self.ctx.metrics.association("dropped_over_limit");
                        drop(incoming);
                    }
                },
            }
        }
        info!("listener stopped accepting associations");
    }
}

/// Read the request (within ARTIM, after the TLS handshake on the TLS port) and answer
/// A-ASSOCIATE-RJ: transient, service provider (presentation), local limit exceeded, so
/// the peer retries later.
async fn reject_over_limit(incoming: Incoming, ctx: &ServiceContext) {
    let peer = incoming.peer;
    ctx.metrics.association("rejected_busy");
    warn!(%peer, limit = ctx.config.dicom.max_associations, "association limit reached; rejecting (transient)");
    let artim = Duration::from_secs(ctx.config.dicom.artim_timeout_secs);
    // A request announcing more than 64 KiB is refused from its header instead of being
    // buffered while it arrives (issue #18).
    let read = async {
        let mut stream = incoming.into_stream().await.ok()?;
        match stream.read_pdu(MAX_REJECTED_REQUEST).await {
            Ok(Pdu::AssociationRQ(_)) => Some(stream),
            _ => None,
        }
    };
    let Ok(Some(mut stream)) = tokio::time::timeout(artim, read).await else {
        return;
    };
    let rj = Pdu::AssociationRJ(AssociationRJ {
        result: AssociationRJResult::Transient,
        source: AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
    });
    let mut out = Vec::with_capacity(16);
    if dicom_ul::write_pdu(&mut out, &rj).is_ok() {
        let _ = tokio::time::timeout(artim, stream.write_all_and_close(&out)).await;
    }
}
