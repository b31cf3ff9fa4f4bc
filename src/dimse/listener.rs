//! The DICOM listener: accepts TCP connections, enforces `dicom.max_associations`
//! (beyond it: A-ASSOCIATE-RJ, transient, local limit exceeded), and hands each socket to
//! an association task. On shutdown it stops accepting; the tasks finish their in-flight
//! message and abort.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJSource,
};
use dicom_ul::Pdu;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::{association, ServiceContext};

/// At most this many over-limit connections are answered at once; more are just closed.
const MAX_PENDING_REJECTIONS: usize = 64;
/// Longest A-ASSOCIATE-RQ read from a connection that is rejected for the limit.
const MAX_REJECTED_REQUEST: u32 = 64 * 1024;

pub struct Listener {
    listener: TcpListener,
    ctx: Arc<ServiceContext>,
    limit: Arc<Semaphore>,
    rejections: Arc<Semaphore>,
}

impl Listener {
    pub async fn bind(addr: SocketAddr, ctx: Arc<ServiceContext>) -> std::io::Result<Listener> {
        let listener = TcpListener::bind(addr).await?;
        let limit = Arc::new(Semaphore::new(ctx.config.dicom.max_associations));
        Ok(Listener {
            listener,
            ctx,
            limit,
            rejections: Arc::new(Semaphore::new(MAX_PENDING_REJECTIONS)),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
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
            match self.limit.clone().try_acquire_owned() {
                Ok(permit) => {
                    let ctx = self.ctx.clone();
                    let shutdown = shutdown.clone();
                    tasks.spawn(async move {
                        association::serve(socket, peer, ctx, shutdown).await;
                        drop(permit);
                    });
                }
                Err(_) => match self.rejections.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let ctx = self.ctx.clone();
                        tasks.spawn(async move {
                            reject_over_limit(socket, peer, &ctx).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        self.ctx.metrics.association("dropped_over_limit");
                        drop(socket);
                    }
                },
            }
        }
        info!("listener stopped accepting associations");
    }
}

/// Read the request (within ARTIM) and answer A-ASSOCIATE-RJ: transient, service
/// provider (presentation), local limit exceeded, so the peer retries later.
async fn reject_over_limit(mut socket: TcpStream, peer: SocketAddr, ctx: &ServiceContext) {
    ctx.metrics.association("rejected_busy");
    warn!(%peer, limit = ctx.config.dicom.max_associations, "association limit reached; rejecting (transient)");
    let artim = Duration::from_secs(ctx.config.dicom.artim_timeout_secs);
    let mut buf = bytes::BytesMut::with_capacity(16 * 1024);
    // Strict: a request announcing more than 64 KiB is refused from its header instead of
    // being buffered while it arrives (issue #18).
    let read = dicom_ul::association::read_pdu_from_wire_async(
        &mut socket,
        &mut buf,
        MAX_REJECTED_REQUEST,
        true,
    );
    match tokio::time::timeout(artim, read).await {
        Ok(Ok(Pdu::AssociationRQ(_))) => {}
        _ => return,
    }
    let rj = Pdu::AssociationRJ(AssociationRJ {
        result: AssociationRJResult::Transient,
        source: AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
    });
    let mut out = Vec::with_capacity(16);
    if dicom_ul::write_pdu(&mut out, &rj).is_ok() {
        let _ = tokio::time::timeout(artim, socket.write_all(&out)).await;
        let _ = socket.shutdown().await;
    }
}
