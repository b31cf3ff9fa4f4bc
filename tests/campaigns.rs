//! Fault campaigns (issue #18 item 2): the node is broken on purpose, at random moments,
//! and every run ends with a machine-checked verdict.
//!
//! * kill -9 in the middle of 8 concurrent storescu senders;
//! * a CAD destination down, then flapping, with a kill -9 of the node in the middle;
//! * slow-loris senders, associations that never release, and connection floods.
//!
//! `cargo test --test campaigns` runs each campaign once (CI). The long version runs each
//! campaign N times and prints the figures:
//!
//! ```text
//! ANATOMY_CAMPAIGN_RUNS=20 cargo test --test campaigns -- --nocapture --test-threads=1
//! ```
//!
//! `ANATOMY_CAMPAIGN_SEED` replays a run's random choices (each run prints its seed).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::data::{self, dataset_bytes};
use common::db::IndexReader;
use common::node::{Node, NodeOptions};
use common::scu::{Scu, CT, EXPLICIT};
use common::{free_port, wait_until};

/// How many runs each campaign makes: $ANATOMY_CAMPAIGN_RUNS, 1 by default.
fn runs() -> u32 {
    std::env::var("ANATOMY_CAMPAIGN_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

/// A small xorshift generator: the campaigns need random moments, not a crate.
struct Rng(u64);

impl Rng {
    fn new(campaign: &str, run: u32) -> Rng {
        let base = std::env::var("ANATOMY_CAMPAIGN_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        let seed = (base ^ (u64::from(run) << 32)).max(1);
        eprintln!("{campaign} run {run}: seed {seed} (ANATOMY_CAMPAIGN_SEED={base})");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in [lo, hi).
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

/// A one-class test model: every image is "lungs", so labelling and routing do not depend
/// on the pixels.
fn lung_model(dir: &Path) -> PathBuf {
    common::models::make(
        dir,
        "lungs",
        &["--size", "64", "--kind", "stats", "--classes", "lungs"],
    )
    .expect("a Python with onnx (ANATOMY_TEST_PYTHON or .venv-tests)")
}

fn classifier(model: &Path, rest: &str) -> String {
    format!(
        "enabled = true\nmodel = \"{}\"\ndevice = \"cpu\"\nkey_images = 4\n\n{rest}\n",
        model.display()
    )
}

/// storescu -v sending `files`, output captured.
fn storescu(port: u16, files: &[PathBuf]) -> Child {
    Command::new("storescu")
        .env("TCP_NODELAY", "1")
        .args(["-v", "-aec", common::node::AE, "127.0.0.1", &port.to_string()])
        .args(files)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("storescu (apt package dcmtk)")
}

/// Files storescu -v reports as acknowledged with a success status.
fn acknowledged(storescu_log: &str) -> Vec<PathBuf> {
    let mut current = None;
    let mut out = Vec::new();
    for line in storescu_log.lines() {
        if let Some(f) = line.strip_prefix("I: Sending file: ") {
            current = Some(PathBuf::from(f.trim()));
        } else if line.contains("Received Store Response (Success)") {
            if let Some(f) = current.take() {
                out.push(f);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Campaign 1: kill -9 in the middle of 8 concurrent senders
// ---------------------------------------------------------------------------------------

const SENDERS: u32 = 8;
const SLICES: u32 = 60;

struct KillFigures {
    acknowledged: usize,
    lost: usize,
    temporaries_left: usize,
    labels_not_once: usize,
}

fn kill9_run(run: u32, model: &Path) -> KillFigures {
    let mut rng = Rng::new("kill9", run);
    let work = tempfile::tempdir().unwrap();
    // Every series: (SOP Instance UID by source file, files)
    let mut sources: HashMap<PathBuf, String> = HashMap::new();
    let mut series: Vec<Vec<PathBuf>> = Vec::new();
    for k in 0..SENDERS {
        let (spec, files) = data::synthetic_series(
            &work.path().join(format!("s{k}")),
            300 + k,
            SLICES,
            64,
        );
        for (i, f) in files.iter().enumerate() {
            sources.insert(f.clone(), spec.sop_uid(i as u32));
        }
        series.push(files);
    }
    let mut node = Node::start_with(NodeOptions {
        stable_after_secs: 2,
        classifier: classifier(model, ""),
        ..NodeOptions::default()
    });
    let senders: Vec<Child> = series
        .iter()
        .map(|files| storescu(node.dicom_port, files))
        .collect();
    let delay = rng.range(100, 1500);
    std::thread::sleep(Duration::from_millis(delay));
    node.kill9();
    let mut acked: Vec<PathBuf> = Vec::new();
    for s in senders {
        let out = s.wait_with_output().expect("storescu ended");
        acked.extend(acknowledged(&common::text(&out)));
    }
    eprintln!(
        "kill9 run {run}: killed after {delay} ms, {} of {} instances acknowledged",
        acked.len(),
        sources.len()
    );

    node.spawn();
    let temporaries_left = node.temporary_files().len();
    let index = node.index();
    let mut lost = 0;
    for f in &acked {
        let uid = &sources[f];
        let rows = index.rows(&format!(
            "SELECT file_path FROM instances WHERE sop_instance_uid = '{uid}'"
        ));
        let intact = rows.len() == 1
            && std::fs::read(node.storage().join(&rows[0][0]))
                .map(|b| b[data::dataset_offset(&b)..] == dataset_bytes(f)[..])
                .unwrap_or(false);
        if !intact {
            eprintln!("LOST: {} ({uid}) rows {rows:?}", f.display());
            lost += 1;
        }
    }
    // Whatever is on disk is a complete copy of something sent, and everything indexed is
    // on disk.
    let sent: Vec<Vec<u8>> = sources.keys().map(|f| dataset_bytes(f)).collect();
    for f in node.stored_files() {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            sent.iter()
                .any(|s| bytes.len() > 132 && s[..] == bytes[data::dataset_offset(&bytes)..]),
            "{} is not a complete copy of an instance sent",
            f.display()
        );
    }
    for path in index.rows("SELECT file_path FROM instances") {
        assert!(
            node.storage().join(&path[0]).is_file(),
            "indexed {} is missing",
            path[0]
        );
    }

    // The senders retry; every series completes and is labelled exactly once.
    let retries: Vec<Child> = series
        .iter()
        .map(|files| storescu(node.dicom_port, files))
        .collect();
    for r in retries {
        let out = r.wait_with_output().expect("storescu ended");
        assert!(out.status.success(), "retry: {}", common::text(&out));
    }
    assert_eq!(
        index.count("SELECT COUNT(*) FROM instances"),
        sources.len() as i64
    );
    let labelled = wait_until(60, || {
        index.count(
            "SELECT COUNT(*) FROM series s WHERE s.state = 'complete' AND EXISTS \
             (SELECT 1 FROM series_labels l WHERE l.series_ref = s.id \
              AND l.generation = s.generation AND l.status = 'labelled')",
        ) == i64::from(SENDERS)
    });
    assert!(
        labelled,
        "every series complete and labelled: {:?}",
        index.rows("SELECT series_uid, state, generation FROM series")
    );
    // Settle: a second labelling of a generation would show up within a check interval.
    std::thread::sleep(Duration::from_millis(1500));
    let labels_not_once = index
        .rows(
            "SELECT series_ref, generation, COUNT(*) FROM series_labels \
             GROUP BY series_ref, generation HAVING COUNT(*) <> 1",
        )
        .len();
    drop(index);
    node.kill9();
    KillFigures {
        acknowledged: acked.len(),
        lost,
        temporaries_left,
        labels_not_once,
    }
}

#[test]
fn campaign_kill9_mid_ingest_of_8_senders() {
    let work = tempfile::tempdir().unwrap();
    let model = lung_model(work.path());
    let n = runs();
    let (mut acked, mut lost, mut temps, mut twice) = (0, 0, 0, 0);
    let started = Instant::now();
    for run in 0..n {
        let f = kill9_run(run, &model);
        acked += f.acknowledged;
        lost += f.lost;
        temps += f.temporaries_left;
        twice += f.labels_not_once;
    }
    eprintln!(
        "CAMPAIGN kill9-mid-ingest: runs {n}, senders {SENDERS}, instances acknowledged \
         {acked}, lost {lost}, temporary files left after restart {temps}, series \
         generations not labelled exactly once {twice}, {:.0} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(lost, 0, "acknowledged instances lost");
    assert_eq!(temps, 0, "temporary files left after restart");
    assert_eq!(twice, 0, "series generations labelled more than once");
}
