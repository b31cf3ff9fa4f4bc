//! The C-FIND SCP (PS3.4 C.4.1): Patient Root and Study Root Query/Retrieve Information
//! Models – FIND, answered from the index.
//!
//! The association collects the identifier (small, bounded by
//! [`identifier::MAX_IDENTIFIER_BYTES`]) and hands it here with a [`FindChannel`] to
//! answer on. The identifier becomes one SELECT ([`sql`]); its rows are streamed from the
//! database and each becomes a pending response (FF00, or FF01 when a key was not
//! supported) as it is read; between them the association is polled for a C-CANCEL-RQ,
//! which ends the matching with FE00. The final response is 0000, or the failure that
//! stopped it.

pub mod identifier;
pub mod keys;
pub mod matching;
pub mod sql;

use std::time::{Duration, Instant};

use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use self::identifier::{IdentifierError, MAX_IDENTIFIER_BYTES};
use self::keys::Model;
use super::command::Request;
use super::status::Status;
use crate::index::{Backend, Index};

/// How long a C-FIND waits for one of the query slots before it is refused (A700).
const SLOT_WAIT: Duration = Duration::from_secs(10);
/// How often SQLite's query planner statistics are refreshed while queries come.
const ANALYZE_EVERY: Duration = Duration::from_secs(600);

/// The C-FIND SCP's share of the node: the index, and a bound on the queries streaming at
/// once. A streaming query holds a database connection while its peer reads; without the
/// bound, slow queries could take every connection of the pool from C-STORE.
pub struct FindScp {
    index: Index,
    slots: Semaphore,
    analyzed_at: std::sync::Mutex<Option<Instant>>,
}

impl FindScp {
    /// `max_connections` is the size of the index's pool (`database.max_connections`):
    /// half of it, at least one, may serve C-FIND at once.
    pub fn new(index: Index, max_connections: u32) -> FindScp {
        FindScp {
            index,
            slots: Semaphore::new((max_connections as usize / 2).max(1)),
            analyzed_at: std::sync::Mutex::new(None),
        }
    }

    /// SQLite plans a query well only with statistics (which index is selective: a week of
    /// study dates, or one Body Part Examined among a few), and nothing else gathers them:
    /// while queries come, refresh them in the background at most every 10 minutes, for
    /// the tables C-FIND selects from, with an approximate ANALYZE that reads at most
    /// 20,000 entries per index (enough to tell a date from a body part; a few ms, so the
    /// write lock it takes is short). PostgreSQL's autovacuum does this itself.
    fn refresh_statistics(&self) {
        if self.index.backend() != Backend::Sqlite {
            return;
        }
        {
            let Ok(mut at) = self.analyzed_at.lock() else {
                return;
            };
            if at.is_some_and(|t| t.elapsed() < ANALYZE_EVERY) {
                return;
            }
            *at = Some(Instant::now());
        }
        let pool = self.index.pool().clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let analyzed = async {
                let mut conn = pool.acquire().await?;
                sqlx::query("PRAGMA analysis_limit = 20000")
                    .execute(&mut *conn)
                    .await?;
                for table in ["patients", "studies", "series", "series_regions"] {
                    sqlx::query(&format!("ANALYZE {table}"))
                        .execute(&mut *conn)
                        .await?;
                }
                Ok::<_, sqlx::Error>(())
            };
            match analyzed.await {
                Ok(()) => debug!(
                    ms = started.elapsed().as_millis() as u64,
                    "query planner statistics refreshed"
                ),
                Err(e) => warn!(error = %e, "cannot refresh the query planner statistics"),
            }
        });
    }
}

/// Why the association stopped listening for our responses while they streamed.
#[derive(Debug)]
pub enum Interruption {
    /// C-CANCEL-RQ for this request.
    Cancel,
    /// The association cannot carry responses any more (aborted, closed); nothing more is
    /// sent.
    Gone(String),
}

/// What the C-FIND service needs from the association it answers on.
pub(crate) trait FindChannel {
    /// Send one C-FIND-RSP: a final status, or a pending one with its identifier (encoded
    /// in the presentation context's transfer syntax). An error means the association
    /// must be aborted.
    async fn respond(&mut self, status: &Status, identifier: Option<Vec<u8>>)
        -> Result<(), String>;

    /// Resolves when the peer cancels this request, or the association can carry no more
    /// responses. Cancel-safe: it is raced against each row from the database.
    async fn interrupted(&mut self) -> Interruption;
}

/// The identifier of a C-FIND-RQ while its fragments arrive.
pub struct IdentifierBuffer {
    pub request: Request,
    pub pc_id: u8,
    bytes: Vec<u8>,
    too_large: bool,
}

impl IdentifierBuffer {
    pub fn new(request: Request, pc_id: u8) -> IdentifierBuffer {
        IdentifierBuffer {
            request,
            pc_id,
            bytes: Vec::new(),
            too_large: false,
        }
    }

    /// Collect a fragment; past the limit the rest is read and dropped, to be refused.
    pub fn feed(&mut self, data: &[u8]) {
        if self.too_large || self.bytes.len() + data.len() > MAX_IDENTIFIER_BYTES {
            self.too_large = true;
            self.bytes = Vec::new();
        } else {
            self.bytes.extend_from_slice(data);
        }
    }
}

/// The presentation context a request came on.
pub struct Context<'a> {
    pub abstract_syntax: &'a str,
    pub transfer_syntax: &'a str,
}

/// Answer one C-FIND-RQ. `Err` only when a response cannot be sent: abort.
pub(crate) async fn serve(
    scp: &FindScp,
    ae_title: &str,
    channel: &mut impl FindChannel,
    request: &Request,
    context: Context<'_>,
    identifier: Option<IdentifierBuffer>,
    audit: &crate::audit::AssociationAudit,
) -> Result<(), String> {
    let started = Instant::now();
    let (status, matches, level) =
        match run(scp, ae_title, channel, request, &context, identifier).await {
            Ok(Finished::Answered {
                status,
                matches,
                level,
            }) => (status, matches, level),
            Ok(Finished::Gone(why)) => {
                info!(reason = %why, "C-FIND stopped: the association is gone");
                return Ok(());
            }
            Err(status) => (status, 0, ""),
        };
    let log = |s: &Status| {
        info!(
            status = format_args!("{:04X}", s.code),
            level,
            matches,
            ms = started.elapsed().as_millis() as u64,
            comment = s.comment.as_deref().unwrap_or(""),
            "C-FIND"
        )
    };
    log(&status);
    audit.find(level, matches, status.code);
    channel.respond(&status, None).await
}

enum Finished {
    Answered {
        status: Status,
        matches: u64,
        level: &'static str,
    },
    Gone(String),
}

async fn run(
    scp: &FindScp,
    ae_title: &str,
    channel: &mut impl FindChannel,
    request: &Request,
    context: &Context<'_>,
    identifier: Option<IdentifierBuffer>,
) -> Result<Finished, Status> {
    let sop_class = request.affected_sop_class_uid.as_deref().unwrap_or("");
    let model = Model::of_sop_class(sop_class)
        .filter(|_| sop_class == context.abstract_syntax)
        .ok_or_else(|| {
            Status::failure(
                Status::SOP_CLASS_NOT_SUPPORTED,
                format!("SOP class {sop_class} not negotiated on this context for C-FIND"),
            )
        })?;
    let Some(identifier) = identifier else {
        return Err(Status::failure(
            Status::DATASET_DOES_NOT_MATCH,
            "C-FIND-RQ without an identifier",
        ));
    };
    if identifier.too_large {
        return Err(Status::failure(
            Status::OUT_OF_RESOURCES,
            "identifier larger than 1 MiB",
        ));
    }
    let query = identifier::parse(&identifier.bytes, context.transfer_syntax, model).map_err(
        |e| match &e {
            IdentifierError::Unparseable(_) => {
                Status::failure(Status::CANNOT_UNDERSTAND, e.to_string())
            }
            IdentifierError::DoesNotMatch(_) => {
                Status::failure(Status::DATASET_DOES_NOT_MATCH, e.to_string())
            }
            IdentifierError::Unsupported(_) => {
                Status::failure(Status::UNABLE_TO_PROCESS, e.to_string())
            }
        },
    )?;
    let level = query.level.as_str();
    if !query.unsupported.is_empty() {
        debug!(keys = ?query.unsupported, "C-FIND keys not supported here; answered with FF01");
    }
    scp.refresh_statistics();
    let select = sql::build(&query, scp.index.backend());
    // SQLite allows 32766 bound values, PostgreSQL 65535.
    if select.bind_count() > 30_000 {
        return Err(Status::failure(
            Status::UNABLE_TO_PROCESS,
            "too many values to match in one query",
        ));
    }
    debug!(sql = %select.sql, "C-FIND query");
    let ts = TransferSyntaxRegistry
        .get(context.transfer_syntax)
        .ok_or_else(|| Status::failure(Status::UNABLE_TO_PROCESS, "unknown transfer syntax"))?;
    let _slot = match tokio::time::timeout(SLOT_WAIT, scp.slots.acquire()).await {
        Ok(Ok(permit)) => permit,
        _ => {
            return Err(Status::failure(
                Status::OUT_OF_RESOURCES,
                "too many queries at once; try again",
            ))
        }
    };
    let pending = Status::of(if query.unsupported.is_empty() {
        Status::PENDING
    } else {
        Status::PENDING_WARNING
    });

    let mut rows = select.query().fetch(scp.index.pool());
    let mut assembler = sql::Assembler::new(&select, &query, ae_title);
    let mut matches = 0u64;
    let status = loop {
        // The peer's C-CANCEL-RQ is looked for before every row; dicom-ul keeps partly
        // received PDUs in its buffer, so dropping the unfinished receive loses nothing.
        let step = tokio::select! {
            biased;
            i = channel.interrupted() => Step::Interrupted(i),
            r = rows.next() => Step::Row(r),
        };
        let answer = match step {
            Step::Interrupted(Interruption::Cancel) => break Status::of(Status::CANCEL),
            Step::Interrupted(Interruption::Gone(why)) => return Ok(Finished::Gone(why)),
            Step::Row(None) => match assembler.finish() {
                Ok(Some(last)) => {
                    // The last answer of IMAGE-level key-image queries.
                    match send(channel, &pending, &last, ts).await {
                        Ok(()) => {
                            matches += 1;
                            break Status::success();
                        }
                        Err(e) => break e,
                    }
                }
                Ok(None) => break Status::success(),
                Err(e) => break database_status(&e),
            },
            Step::Row(Some(Err(e))) => break database_status(&e),
            Step::Row(Some(Ok(row))) => match assembler.push(row) {
                Ok(answer) => answer,
                Err(e) => break database_status(&e),
            },
        };
        if let Some(answer) = answer {
            if let Err(e) = send(channel, &pending, &answer, ts).await {
                break e;
            }
            matches += 1;
        }
    };
    Ok(Finished::Answered {
        status,
        matches,
        level,
    })
}

enum Step {
    Interrupted(Interruption),
    Row(Option<Result<sqlx::any::AnyRow, sqlx::Error>>),
}

/// Send one pending response; `Err` is the final status to end with.
async fn send(
    channel: &mut impl FindChannel,
    pending: &Status,
    answer: &InMemDicomObject,
    ts: &dicom_encoding::TransferSyntax,
) -> Result<(), Status> {
    let mut bytes = Vec::with_capacity(512);
    if let Err(e) = answer.write_dataset_with_ts(&mut bytes, ts) {
        warn!(error = %e, "cannot encode a C-FIND answer");
        return Err(Status::failure(
            Status::UNABLE_TO_PROCESS,
            format!("cannot encode an answer: {e}"),
        ));
    }
    channel
        .respond(pending, Some(bytes))
        .await
        .map_err(|e| Status::failure(Status::UNABLE_TO_PROCESS, e))
}

/// The status for a failed query: the database out of reach is "out of resources".
fn database_status(e: &sqlx::Error) -> Status {
    warn!(error = %e, "C-FIND query failed");
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            Status::failure(Status::OUT_OF_RESOURCES, "index unavailable")
        }
        _ => Status::failure(
            Status::UNABLE_TO_PROCESS,
            format!("index query failed: {e}"),
        ),
    }
}
