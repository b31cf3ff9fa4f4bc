//! A small tmpfs (root only), to fill the disk under a running node on purpose.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mount (its path) removed when dropped.
pub struct SmallFs(pub PathBuf);

impl SmallFs {
    pub fn mount(dir: &Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount tmpfs: {}", super::text(&out));
        SmallFs(dir.to_path_buf())
    }

    /// Grow or shrink it in place (files stay).
    pub fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .expect("remount");
        assert!(out.status.success(), "remount: {}", super::text(&out));
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
