//! The durable store: one Part-10 file per instance under `storage.path`, by
//! study/series/SOP UID, written so that a success status is only ever sent for an
//! instance that survives a crash.
//!
//! The order (ARCHITECTURE.md, "Durability"): stream the data set into a temporary file,
//! fsync it, check it is well formed, rename it into place, fsync the directory, commit
//! the index row, and only then answer. Temporary files left by a crash are removed at
//! start-up; they were never acknowledged.

pub mod inspect;
pub mod layout;

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use dicom_object::meta::FileMetaTableBuilder;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::config::{DuplicatePolicy, StorageConfig};
use crate::index::{Index, IndexError, IndexWriter, InstanceRecord};
use crate::metrics::Metrics;
use inspect::{DatasetSummary, InspectError};

/// Our implementation class UID (a UUID-derived 2.25 UID) and version, written into the
/// file meta information of every stored file.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.115585197484103366221532460273528544301";
pub const IMPLEMENTATION_VERSION_NAME: &str = concat!("ANATOMY_", env!("CARGO_PKG_VERSION"));

const TMP_DIR: &str = ".incoming";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A local write/read failure (disk full, I/O error): the sender should retry later.
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("storage.min_free_mb reached ({free_mb} of {reserve_mb} MB free)")]
    BelowReserve { free_mb: u64, reserve_mb: u64 },
    /// The data set cannot be parsed.
    #[error("{0}")]
    Malformed(String),
    /// The data set parses but contradicts the request or lacks what every instance needs.
    #[error("{0}")]
    DoesNotMatch(String),
    #[error("SOP Instance UID {0} is already stored with different content (storage.duplicates = \"reject\")")]
    Duplicate(String),
    #[error("index: {0}")]
    Index(#[from] IndexError),
}

impl StoreError {
    fn io(context: &'static str) -> impl FnOnce(io::Error) -> StoreError {
        move |source| StoreError::Io { context, source }
    }

    /// True when the cause is local (disk, database), not the data the peer sent.
    pub fn is_out_of_resources(&self) -> bool {
        matches!(
            self,
            StoreError::Io { .. } | StoreError::BelowReserve { .. } | StoreError::Index(_)
        )
    }
}

impl From<InspectError> for StoreError {
    fn from(e: InspectError) -> Self {
        match e {
            InspectError::Io(source) => StoreError::Io {
                context: "reading back the received data set",
                source,
            },
            other => StoreError::Malformed(other.to_string()),
        }
    }
}

/// What the C-STORE request announced before its data set arrived.
#[derive(Debug, Clone)]
pub struct IncomingHeader {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax_uid: String,
    pub calling_ae: String,
    /// The association's audit tally: each committed instance is added (with its study and
    /// series UIDs) so the association's end can record what it received.
    pub received: Option<std::sync::Arc<crate::audit::ReceivedTally>>,
}

/// How a commit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    Stored,
    /// The same content was already stored (a resend): nothing changed.
    Identical,
    /// Different content under a stored SOP Instance UID, dropped by `keep-first`.
    KeptFirst,
    Overwritten,
}

/// A data set being received into a temporary file.
pub struct Incoming {
    file: Option<File>,
    temp_path: PathBuf,
    dataset_offset: u64,
    received: u64,
    header: IncomingHeader,
    /// storage.fsync: start writeback early, as the data will be fsynced anyway.
    durable: bool,
}

impl Incoming {
    pub fn header(&self) -> &IncomingHeader {
        &self.header
    }

    pub fn received_bytes(&self) -> u64 {
        self.received
    }

    /// Append one data fragment. A write into the page cache is short, so it runs in
    /// place (`block_in_place`) rather than paying a hop to the blocking pool per PDU.
    pub fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        let file = self.file.as_mut().ok_or_else(|| StoreError::Io {
            context: "writing the temporary file",
            source: io::Error::other("temporary file already closed"),
        })?;
        let offset = self.dataset_offset + self.received;
        tokio::task::block_in_place(|| {
            file.write_all(data)?;
            if self.durable {
                start_writeback(file, offset, data.len() as u64);
            }

            Ok::<_, io::Error>(())
        })
        .map_err(StoreError::io("writing the temporary file"))?;
        self.received += data.len() as u64;
        Ok(())
    }
}

/// Ask the kernel to start writing this range to disk now, without waiting, so the fsync
/// at the end of the instance has little left to do: the disk works while the rest of
/// the data set is still arriving. Only a hint; failures are ignored.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open
    // for the lifetime of `file`.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // Whatever did not reach commit (error, abort, crash of the task) leaves nothing.
        self.file.take();
        if !self.temp_path.as_os_str().is_empty() {
            if let Err(e) = fs::remove_file(&self.temp_path) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!(path = %self.temp_path.display(), error = %e, "cannot remove temporary file");
                }
            }
        }
    }
}

pub struct Store {
    root: PathBuf,
    tmp_dir: PathBuf,
    policy: DuplicatePolicy,
    fsync: bool,
    min_free_bytes: u64,
    index: Index,
    writer: IndexWriter,
    metrics: Arc<Metrics>,
    locks: UidLocks,
    temp_counter: AtomicU64,
}

impl Store {
    /// Prepare the storage directory and remove what a crash left half-written.
    pub fn open(
        config: &StorageConfig,
        index: Index,
        writer: IndexWriter,
        metrics: Arc<Metrics>,
    ) -> Result<Store, StoreError> {
        let root = config.path.clone();
        fs::create_dir_all(&root).map_err(StoreError::io("creating the storage directory"))?;
        let tmp_dir = root.join(TMP_DIR);
        fs::create_dir_all(&tmp_dir).map_err(StoreError::io("creating the temporary directory"))?;
        let removed = clean_temporary_files(&tmp_dir)
            .map_err(StoreError::io("cleaning the temporary directory"))?;
        if removed > 0 {
            info!(
                removed,
                "removed unacknowledged partial files left by an earlier run"
            );
        }
        Ok(Store {
            root,
            tmp_dir,
            policy: config.duplicates,
            fsync: config.fsync,
            min_free_bytes: config.min_free_mb * 1024 * 1024,
            index,
            writer,
            metrics,
            locks: UidLocks::default(),
            temp_counter: AtomicU64::new(0),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `storage.path/.incoming`: files here were never acknowledged and are removed at
    /// start-up (STOW-RS spools request bodies here).
    pub fn temp_dir(&self) -> &Path {
        &self.tmp_dir
    }

    /// Open a temporary file for an announced instance and write its file meta header.
    pub async fn begin(&self, header: IncomingHeader) -> Result<Incoming, StoreError> {
        let free = available_bytes(&self.root).map_err(StoreError::io("checking free space"))?;
        if free < self.min_free_bytes {
            return Err(StoreError::BelowReserve {
                free_mb: free / (1024 * 1024),
                reserve_mb: self.min_free_bytes / (1024 * 1024),
            });
        }
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let temp_path =
            self.tmp_dir
                .join(format!("{}-{}-{n}.part", std::process::id(), now_millis()));
        let meta = file_meta_bytes(&header)?;
        let dataset_offset = meta.len() as u64;
        let file = tokio::task::block_in_place(|| -> io::Result<File> {
            let mut file = OpenOptions::new()
                .write(true)
                .read(true)
                .create_new(true)
                .open(&temp_path)?;
            file.write_all(&meta)?;
            Ok(file)
        });
        let mut incoming = Incoming {
            file: None,
            temp_path,
            dataset_offset,
            received: 0,
            header,
            durable: self.fsync,
        };
        match file {
            Ok(f) => {
                incoming.file = Some(f);
                Ok(incoming)
            }
            Err(source) => Err(StoreError::Io {
                context: "creating the temporary file",
                source,
            }),
        }
    }

    /// Make a completely received instance durable and indexed.
    pub async fn commit(&self, mut incoming: Incoming) -> Result<StoreOutcome, StoreError> {
        let file = incoming.file.take().ok_or_else(|| StoreError::Io {
            context: "committing",
            source: io::Error::other("temporary file already closed"),
        })?;
        let offset = incoming.dataset_offset;
        let fsync = self.fsync;
        let header = incoming.header.clone();
        let sop_uid = header.sop_instance_uid.clone();
        let started = std::time::Instant::now();
        let _guard = self.locks.lock(&sop_uid).await;
        // Check the data set, then make it durable, while the index looks for an earlier
        // copy: the two waits overlap instead of adding up.
        let inspect_and_sync = tokio::task::spawn_blocking(move || {
            let mut file = file;
            file.flush()
                .map_err(StoreError::io("flushing the temporary file"))?;
            let summary = inspect::inspect_file(&mut file, offset, &header.transfer_syntax_uid)?;
            let hierarchy = check_matches(&header, &summary)?;
            if fsync {
                file.sync_data()
                    .map_err(StoreError::io("syncing the temporary file"))?;
            }
            let size = file
                .metadata()
                .map_err(StoreError::io("reading file size"))?
                .len();
            Ok::<_, StoreError>((summary, hierarchy, size))
        });
        let (existing, inspected) =
            tokio::join!(self.index.find_instance(&sop_uid), inspect_and_sync);
        let (summary, (study_uid, series_uid), file_size) =
            inspected.map_err(|e| StoreError::Io {
                context: "inspecting the data set",
                source: io::Error::other(e),
            })??;
        let existing = existing?;

        let rel_path = layout::instance_path(&study_uid, &series_uid, &sop_uid);
        let mut outcome = StoreOutcome::Stored;
        let mut replaced_path = None;
        if let Some(existing) = &existing {
            let stored = self.root.join(&existing.file_path);
            let temp = incoming.temp_path.clone();
            let same = blocking(move || same_dataset(&temp, &stored)).await;
            match same.map_err(StoreError::io("comparing with the stored instance"))? {
                Some(true) => {
                    self.metrics.duplicate("identical");
                    if let Some(t) = &incoming.header.received {
                        t.stored(&study_uid, &series_uid);
                    }
                    return Ok(StoreOutcome::Identical);
                }
                None => {} // the indexed file is gone: store this one in its place
                Some(false) => match self.policy {
                    DuplicatePolicy::KeepFirst => {
                        warn!(sop_instance_uid = %sop_uid, "different content for a stored SOP Instance UID; keeping the first (storage.duplicates = keep-first)");
                        self.metrics.duplicate("kept_first");
                        if let Some(t) = &incoming.header.received {
                            t.stored(&study_uid, &series_uid);
                        }
                        return Ok(StoreOutcome::KeptFirst);
                    }
                    DuplicatePolicy::Reject => {
                        self.metrics.duplicate("rejected");
                        return Err(StoreError::Duplicate(sop_uid));
                    }
                    DuplicatePolicy::Overwrite => {
                        self.metrics.duplicate("overwritten");
                        outcome = StoreOutcome::Overwritten;
                        if Path::new(&existing.file_path) != rel_path {
                            replaced_path = Some(self.root.join(&existing.file_path));
                        }
                    }
                },
            }
        }

        let root = self.root.clone();
        let temp = std::mem::take(&mut incoming.temp_path);
        let rel = rel_path.clone();
        let synced = started.elapsed();
        // A rename and a directory fsync: short enough to run in place.
        let placed = tokio::task::block_in_place(|| place_file(&root, &temp, &rel, fsync));

        let moved = started.elapsed();
        if let Err(source) = placed {
            if existing.is_none() {
                // The rename may have happened before a directory sync failed.
                let _ = fs::remove_file(self.root.join(&rel_path));
            }
            return Err(StoreError::Io {
                context: "moving the instance into place",
                source,
            });
        }

        let tally = incoming
            .header
            .received
            .as_ref()
            .map(|t| (t.clone(), study_uid.clone(), series_uid.clone()));
        let record = InstanceRecord {
            sop_class_uid: incoming.header.sop_class_uid.clone(),
            sop_instance_uid: sop_uid,
            study_uid,
            series_uid,
            transfer_syntax_uid: incoming.header.transfer_syntax_uid.clone(),
            file_path: rel_path.to_string_lossy().into_owned(),
            file_size: i64::try_from(file_size).unwrap_or(i64::MAX),
            calling_ae: incoming.header.calling_ae.clone(),
            received_at: now_millis(),
            summary,
        };
        if let Err(e) = self.writer.record(record).await {
            if existing.is_none() {
                // Unacknowledged and unindexed: the sender will send it again.
                let _ = fs::remove_file(self.root.join(&rel_path));
            }
            return Err(e.into());
        }
        if let Some(old) = replaced_path {
            if let Err(e) = fs::remove_file(&old) {
                warn!(path = %old.display(), error = %e, "cannot remove the replaced file");
            }
        }
        self.metrics.instances_stored.inc();
        if let Some((t, study_uid, series_uid)) = tally {
            t.stored(&study_uid, &series_uid);
        }
        tracing::debug!(
            sync_inspect_us = synced.as_micros() as u64,
            place_us = (moved - synced).as_micros() as u64,
            index_us = (started.elapsed() - moved).as_micros() as u64,
            "committed"
        );

        Ok(outcome)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

/// The data set must be the instance the request announced, and carry the hierarchy.
fn check_matches(
    header: &IncomingHeader,
    s: &DatasetSummary,
) -> Result<(String, String), StoreError> {
    let announced_class = layout::trim_uid(&header.sop_class_uid);
    match s.sop_class_uid.as_deref() {
        Some(c) if c == announced_class => {}
        Some(c) => {
            return Err(StoreError::DoesNotMatch(format!(
                "SOP Class UID {c} in the data set differs from {announced_class} in the request"
            )))
        }
        None => {
            return Err(StoreError::DoesNotMatch(
                "data set has no SOP Class UID".into(),
            ))
        }
    }
    let announced = layout::trim_uid(&header.sop_instance_uid);
    match s.sop_instance_uid.as_deref() {
        Some(i) if i == announced => {}
        Some(i) => {
            return Err(StoreError::DoesNotMatch(format!(
                "SOP Instance UID {i} in the data set differs from {announced} in the request"
            )))
        }
        None => {
            return Err(StoreError::DoesNotMatch(
                "data set has no SOP Instance UID".into(),
            ))
        }
    }
    check_pixel_data(header, s)?;
    let study = s
        .study_uid
        .clone()
        .ok_or_else(|| StoreError::DoesNotMatch("data set has no Study Instance UID".into()))?;
    let series = s
        .series_uid
        .clone()
        .ok_or_else(|| StoreError::DoesNotMatch("data set has no Series Instance UID".into()))?;
    Ok((study, series))
}

/// An image (it has Rows) must carry its pixels; native pixels must all be there. This is
/// what catches a data set cut short at an element boundary.
fn check_pixel_data(header: &IncomingHeader, s: &DatasetSummary) -> Result<(), StoreError> {
    if s.rows.is_none() {
        return Ok(());
    }
    let native = matches!(
        layout::trim_uid(&header.transfer_syntax_uid),
        "1.2.840.10008.1.2" | "1.2.840.10008.1.2.1" | "1.2.840.10008.1.2.1.99"
    );
    match s.pixel_data_length {
        None => Err(StoreError::DoesNotMatch(
            "image without Pixel Data (truncated data set?)".into(),
        )),
        Some(Some(len)) if native => match s.expected_native_pixel_bytes() {
            Some(expected) if len < expected => Err(StoreError::Malformed(format!(
                "Pixel Data holds {len} bytes but the image needs {expected}"
            ))),
            _ => Ok(()),
        },
        Some(None) if native => Err(StoreError::Malformed(
            "encapsulated Pixel Data in an uncompressed transfer syntax".into(),
        )),
        _ => Ok(()),
    }
}

fn file_meta_bytes(header: &IncomingHeader) -> Result<Vec<u8>, StoreError> {
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(layout::trim_uid(&header.sop_class_uid))
        .media_storage_sop_instance_uid(layout::trim_uid(&header.sop_instance_uid))
        .transfer_syntax(layout::trim_uid(&header.transfer_syntax_uid))
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME)
        .source_application_entity_title(header.calling_ae.trim())
        .build()
        .map_err(|e| StoreError::Malformed(format!("cannot build file meta information: {e}")))?;
    // Preamble and magic code; FileMetaTable::write writes the group elements only.
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    meta.write(&mut out)
        .map_err(|e| StoreError::Malformed(format!("cannot write file meta information: {e}")))?;
    Ok(out)
}

/// Byte offset of the data set in a Part-10 file: preamble, "DICM", group 0002.
fn dataset_offset(file: &mut File) -> io::Result<u64> {
    let mut head = [0u8; 144];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut head)?;
    if &head[128..132] != b"DICM" || head[132..136] != [2, 0, 0, 0] {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a Part-10 file",
        ));
    }
    let group_len = u32::from_le_bytes([head[140], head[141], head[142], head[143]]);
    Ok(144 + u64::from(group_len))
}

/// Compare the data sets (not the file meta headers, which name the sender) of two files.
/// `None` when the stored file no longer exists.
fn same_dataset(new: &Path, stored: &Path) -> io::Result<Option<bool>> {
    let mut b = match File::open(stored) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut a = File::open(new)?;
    let (oa, ob) = (dataset_offset(&mut a)?, dataset_offset(&mut b)?);
    let (la, lb) = (a.metadata()?.len(), b.metadata()?.len());
    if la - oa != lb - ob {
        return Ok(Some(false));
    }
    a.seek(SeekFrom::Start(oa))?;
    b.seek(SeekFrom::Start(ob))?;
    let (mut ra, mut rb) = (BufReader::new(a), BufReader::new(b));
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut left = la - oa;
    while left > 0 {
        let n = left.min(ba.len() as u64) as usize;
        ra.read_exact(&mut ba[..n])?;
        rb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(Some(false));
        }
        left -= n as u64;
    }
    Ok(Some(true))
}

/// Rename the temporary file to `root/rel`, creating directories, and make the new
/// directory entries durable.
fn place_file(root: &Path, temp: &Path, rel: &Path, fsync: bool) -> io::Result<()> {
    let dir_rel = rel.parent().unwrap_or(Path::new(""));
    let mut current = root.to_path_buf();
    for component in dir_rel.components() {
        let parent = current.clone();
        current.push(component);
        match fs::create_dir(&current) {
            Ok(()) if fsync => sync_dir(&parent)?,
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                let _ = fs::remove_file(temp);
                return Err(e);
            }
        }
    }
    let target = root.join(rel);
    if let Err(e) = fs::rename(temp, &target) {
        let _ = fs::remove_file(temp);
        return Err(e);
    }
    if fsync {
        sync_dir(&current)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn clean_temporary_files(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Bytes available to unprivileged writers on the file system holding `path`.
pub fn available_bytes(path: &Path) -> io::Result<u64> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: c_path is a valid NUL-terminated string and stat points to writable memory
    // of the right type; statvfs fills it completely when it returns 0.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so the struct is initialised.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_bavail * stat.f_frsize)
}

pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// In-process exclusion per SOP Instance UID, so two associations sending the same
/// instance at once cannot interleave their duplicate check and rename.
#[derive(Default)]
struct UidLocks {
    held: Mutex<HashSet<String>>,
    released: Notify,
}

struct UidGuard<'a> {
    locks: &'a UidLocks,
    uid: String,
}

impl UidLocks {
    async fn lock(&self, uid: &str) -> UidGuard<'_> {
        loop {
            // Created before the check, so a release between check and await still wakes us.
            let released = self.released.notified();
            {
                let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
                if held.insert(uid.to_string()) {
                    return UidGuard {
                        locks: self,
                        uid: uid.to_string(),
                    };
                }
            }
            released.await;
        }
    }
}

impl Drop for UidGuard<'_> {
    fn drop(&mut self) {
        self.locks
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.uid);
        self.locks.released.notify_waiters();
    }
}
