//! Group commit: one task owns index writes. Requests that arrive while a transaction is
//! being committed wait and go into the next one together, so N concurrent C-STOREs cost
//! one commit (one fsync) instead of N, and SQLite never sees competing writers.

use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::{record_instance, Index, IndexError, InstanceRecord};

type Reply = oneshot::Sender<Result<(), IndexError>>;

struct Request {
    record: InstanceRecord,
    reply: Reply,
}

/// Handle to the writer task; cheap to clone.
#[derive(Clone)]
pub struct IndexWriter {
    tx: mpsc::Sender<Request>,
}

impl IndexWriter {
    /// Start the writer task. It stops when every handle has been dropped.
    pub fn spawn(index: Index, batch_max: usize) -> IndexWriter {
        let (tx, rx) = mpsc::channel(batch_max * 4);
        tokio::spawn(run(index, rx, batch_max));
        IndexWriter { tx }
    }

    /// Record one instance; returns once its row is committed.
    pub async fn record(&self, record: InstanceRecord) -> Result<(), IndexError> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send(Request { record, reply })
            .await
            .map_err(|_| IndexError::WriterGone)?;
        done.await.map_err(|_| IndexError::WriterGone)?
    }
}

async fn run(index: Index, mut rx: mpsc::Receiver<Request>, batch_max: usize) {
    let mut batch = Vec::with_capacity(batch_max);
    while rx.recv_many(&mut batch, batch_max).await > 0 {
        match commit_batch(&index, &batch).await {
            Ok(()) => {
                for req in batch.drain(..) {
                    let _ = req.reply.send(Ok(()));
                }
            }
            Err(e) if batch.len() == 1 => {
                if let Some(req) = batch.pop() {
                    let _ = req.reply.send(Err(e));
                }
            }
            Err(e) => {
                // One bad row must not fail its neighbours: retry each on its own.
                warn!(error = %e, size = batch.len(), "index batch failed; committing one by one");
                for req in batch.drain(..) {
                    let result = commit_batch(&index, std::slice::from_ref(&req)).await;
                    let _ = req.reply.send(result);
                }
            }
        }
    }
}

async fn commit_batch(index: &Index, batch: &[Request]) -> Result<(), IndexError> {
    let mut tx = index.pool().begin().await?;
    for req in batch {
        record_instance(&mut tx, &req.record).await?;
    }
    tx.commit().await?;
    Ok(())
}
