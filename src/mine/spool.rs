//! Where retrieved instances wait for conversion: one Part-10 file per SOP Instance UID in
//! the spool folder, written as the data set arrives (C-MOVE's Storage SCP, C-GET's
//! sub-operations, WADO-RS bodies), never held whole in memory.
//!
//! Only instances a retrieval asked for are kept ([`Spool::expect`]): an archive that sends
//! more (a whole series for an image-level request, or another run's instances) is answered
//! with success and its extra instances are dropped, so nothing unasked for lands in the
//! dataset.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use dicom_object::meta::FileMetaTableBuilder;
use tokio::sync::Notify;

use crate::store::layout::{path_component, trim_uid};
use crate::store::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};

static TMP_IDS: AtomicU64 = AtomicU64::new(1);

/// The spool is this folder of mine's own under `mine.spool` (default: the storage
/// directory): emptied at the start of a run, removed at its end.
pub const SPOOL_FOLDER: &str = "anatomy-node-mine-spool";

#[derive(Default)]
struct State {
    /// SOP Instance UID → where it landed (None: asked for, not arrived yet).
    expected: HashMap<String, Option<PathBuf>>,
    unexpected: u64,
}

pub struct Spool {
    dir: PathBuf,
    state: Mutex<State>,
    arrived: Notify,
}

/// A data set being written into the spool.
pub struct Incoming {
    sop_instance_uid: String,
    tmp: PathBuf,
    file: Option<BufWriter<File>>,
    bytes: u64,
}

impl Spool {
    /// Open (create) the spool folder; files left by an earlier run are removed.
    pub fn open(dir: &Path) -> io::Result<Spool> {
        std::fs::create_dir_all(dir)?;
        for entry in std::fs::read_dir(dir)?.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Spool {
            dir: dir.to_path_buf(),
            state: Mutex::new(State::default()),
            arrived: Notify::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Announce the instances a retrieval is about to ask for.
    pub fn expect(&self, uids: &[String]) {
        let mut state = self.state();
        for uid in uids {
            state.expected.entry(uid.clone()).or_insert(None);
        }
    }

    pub fn is_expected(&self, sop_instance_uid: &str) -> bool {
        self.state()
            .expected
            .contains_key(trim_uid(sop_instance_uid))
    }

    /// Start writing an instance (`None`: nobody asked for it; the caller drops its bytes).
    pub fn begin(
        &self,
        sop_class_uid: &str,
        sop_instance_uid: &str,
        transfer_syntax_uid: &str,
    ) -> io::Result<Option<Incoming>> {
        let uid = trim_uid(sop_instance_uid).to_string();
        if !self.is_expected(&uid) {
            self.state().unexpected += 1;
            tracing::debug!(sop_instance_uid = %uid, "an instance nobody asked for: dropped");
            return Ok(None);
        }
        let tmp = self.tmp_path();
        let mut file = BufWriter::with_capacity(256 * 1024, File::create(&tmp)?);
        let meta = FileMetaTableBuilder::new()
            .media_storage_sop_class_uid(trim_uid(sop_class_uid))
            .media_storage_sop_instance_uid(uid.as_str())
            .transfer_syntax(trim_uid(transfer_syntax_uid))
            .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
            .implementation_version_name(IMPLEMENTATION_VERSION_NAME)
            .build()
            .map_err(io::Error::other)?;
        file.write_all(&[0u8; 128])?;
        file.write_all(b"DICM")?;
        meta.write(&mut file).map_err(io::Error::other)?;
        Ok(Some(Incoming {
            sop_instance_uid: uid,
            tmp,
            file: Some(file),
            bytes: 0,
        }))
    }

    /// Start writing an instance that arrives as a whole Part-10 file (a WADO-RS part).
    pub fn begin_file(&self, sop_instance_uid: &str) -> io::Result<Option<Incoming>> {
        let uid = trim_uid(sop_instance_uid).to_string();
        if !self.is_expected(&uid) {
            self.state().unexpected += 1;
            return Ok(None);
        }
        let tmp = self.tmp_path();
        let file = BufWriter::with_capacity(256 * 1024, File::create(&tmp)?);
        Ok(Some(Incoming {
            sop_instance_uid: uid,
            tmp,
            file: Some(file),
            bytes: 0,
        }))
    }

    fn tmp_path(&self) -> PathBuf {
        self.dir.join(format!(
            ".{}-{}.part",
            std::process::id(),
            TMP_IDS.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Finish an instance: it is complete and findable by [`Spool::take`].
    pub fn finish(&self, mut incoming: Incoming) -> io::Result<PathBuf> {
        if let Some(mut file) = incoming.file.take() {
            file.flush()?;
        }
        let path = self.final_path(&incoming.sop_instance_uid);
        std::fs::rename(&incoming.tmp, &path)?;
        self.arrive(incoming.sop_instance_uid.clone(), path.clone());
        Ok(path)
    }

    fn final_path(&self, uid: &str) -> PathBuf {
        self.dir.join(format!("{}.dcm", path_component(uid)))
    }

    fn arrive(&self, uid: String, path: PathBuf) {
        self.state().expected.insert(uid, Some(path));
        self.arrived.notify_waiters();
    }

    /// Wait up to `wait` until `need` of `uids` (at most all of them) have arrived, then
    /// hand over those that did (and forget all of `uids`).
    pub async fn take(
        &self,
        uids: &[String],
        need: usize,
        wait: Duration,
    ) -> HashMap<String, PathBuf> {
        let deadline = tokio::time::Instant::now() + wait;
        let need = need.min(uids.len());
        loop {
            let notified = self.arrived.notified();
            let here = {
                let state = self.state();
                uids.iter()
                    .filter(|u| matches!(state.expected.get(*u), Some(Some(_))))
                    .count()
            };
            if here >= need || tokio::time::Instant::now() >= deadline {
                break;
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
        let mut state = self.state();
        uids.iter()
            .filter_map(|u| match state.expected.remove(u) {
                Some(Some(path)) => Some((u.clone(), path)),
                _ => None,
            })
            .collect()
    }

    /// Instances that arrived without being asked for, so far.
    pub fn unexpected(&self) -> u64 {
        self.state().unexpected
    }
}

impl Incoming {
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.bytes += bytes.len() as u64;
        match self.file.as_mut() {
            Some(f) => f.write_all(bytes),
            None => Err(io::Error::other("instance already finished")),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Give up on the instance (an association that broke half way).
    pub fn discard(mut self) {
        self.file.take();
        let _ = std::fs::remove_file(&self.tmp);
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_expected_instances_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.expect(&["1.2.3".into(), "1.2.4".into()]);
        assert!(spool
            .begin("1.2.840.10008.5.1.4.1.1.2", "9.9", "1.2.840.10008.1.2")
            .unwrap()
            .is_none());
        let mut incoming = spool
            .begin("1.2.840.10008.5.1.4.1.1.2", "1.2.3\0", "1.2.840.10008.1.2")
            .unwrap()
            .expect("expected");
        incoming.write(&[0x08, 0x00]).unwrap();
        let path = spool.finish(incoming).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[128..132], b"DICM");
        assert!(bytes.ends_with(&[0x08, 0x00]));
        let started = std::time::Instant::now();
        let got = spool
            .take(
                &["1.2.3".into(), "1.2.4".into()],
                2,
                Duration::from_millis(50),
            )
            .await;
        assert!(
            started.elapsed() >= Duration::from_millis(50),
            "waited for the second"
        );
        assert_eq!(got.len(), 1);
        assert_eq!(got["1.2.3"], path);
        assert_eq!(spool.unexpected(), 1);
        assert!(!spool.is_expected("1.2.4"), "taken uids are forgotten");
        // Only what the archive counted as sent is waited for.
        spool.expect(&["1.2.5".into()]);
        let started = std::time::Instant::now();
        assert!(spool
            .take(&["1.2.5".into()], 0, Duration::from_secs(10))
            .await
            .is_empty());
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
