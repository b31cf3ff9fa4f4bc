//! Fault campaigns (issue #18 item 2): the node is broken on purpose, at random moments,
//! and every run ends with a machine-checked verdict.
//!
//! * kill -9 in the middle of 8 concurrent storescu senders;
//! * a CAD destination down, then flapping, with a kill -9 of the node in the middle;
//! * kill -9 of the node, three times, while it forwards a series to a CAD destination;
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
use std::time::{Duration, Instant, SystemTime};

use common::data::{self, dataset_bytes};
use common::db::IndexReader;
use common::node::{Node, NodeOptions};
use common::scu::{Scu, CT, EXPLICIT};
use common::smallfs::SmallFs;
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

/// The [classifier] section: `model`, then `rest` (further sections). A series whose
/// classification a killed node had claimed is taken over after 5 s (600 s by default,
/// longer than a campaign waits).
fn classifier(model: &Path, rest: &str) -> String {
    format!(
        "enabled = true\nmodel = \"{}\"\ndevice = \"cpu\"\nkey_images = 4\nclaim_timeout_secs = 5\n\n{rest}\n",
        model.display()
    )
}

/// storescu -v sending `files`, output captured.
fn storescu(port: u16, files: &[PathBuf]) -> Child {
    Command::new("storescu")
        .env("TCP_NODELAY", "1")
        .args([
            "-v",
            "-aec",
            common::node::AE,
            "127.0.0.1",
            &port.to_string(),
        ])
        .args(files)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("storescu (apt package dcmtk)")
}

/// Files storescu -v reports as acknowledged with a success status.
fn acknowledged(storescu_log: &str) -> Vec<PathBuf> {
    common::storescu_acknowledged(storescu_log)
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
        let (spec, files) =
            data::synthetic_series(&work.path().join(format!("s{k}")), 300 + k, SLICES, 64);
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

// ---------------------------------------------------------------------------------------
// Campaign 2: a CAD destination down, then flapping, and a kill -9 of the node meanwhile
// ---------------------------------------------------------------------------------------

const MAX_ATTEMPTS: i64 = 12;

/// How long before a kill a copy may have arrived and still be sent again: only the copy on
/// the wire is (its outcome is committed before the next goes out); the rest is slack for
/// a loaded machine and for the file times storescp leaves.
const KILL_WINDOW: Duration = Duration::from_secs(2);

/// Associations a node has open to one destination at a time (one worker per destination):
/// a kill of the node or of the destination can make at most this many copies arrive twice.
const ASSOCIATIONS_PER_DESTINATION: usize = 1;

/// DCMTK storescp as a CAD module that the campaign stops and starts on one port and one
/// directory; unique file names (+uf), so a copy received twice shows up twice.
struct FlappingScp {
    ae: &'static str,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl FlappingScp {
    fn new(ae: &'static str) -> FlappingScp {
        FlappingScp {
            ae,
            port: free_port(),
            dir: tempfile::tempdir().expect("storescp dir"),
            child: None,
        }
    }

    fn up(&mut self) {
        if self.child.is_some() {
            return;
        }
        let child = Command::new("storescp")
            .env("TCP_NODELAY", "1")
            .args(["+B", "+uf", "-aet", self.ae, "-od"])
            .arg(self.dir.path())
            .arg(self.port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start storescp (apt package dcmtk)");
        self.child = Some(child);
        assert!(
            wait_until(10, || TcpStream::connect(("127.0.0.1", self.port)).is_ok()),
            "storescp did not start"
        );
    }

    /// kill -9: the destination vanishes, possibly in the middle of an association.
    fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// down(), noting when it happened.
    fn kill(&mut self, kills: &mut Vec<SystemTime>) {
        kills.push(SystemTime::now());
        self.down();
    }

    /// When each SOP Instance UID arrived, earliest first: complete files only (a storescp
    /// killed while receiving leaves a partial or empty file, which is not a delivery).
    fn arrivals(&self) -> HashMap<String, Vec<SystemTime>> {
        let mut out: HashMap<String, Vec<SystemTime>> = HashMap::new();
        for e in std::fs::read_dir(self.dir.path())
            .expect("storescp dir")
            .flatten()
        {
            let p = e.path();
            let complete = p.is_file()
                && std::fs::read(&p).is_ok_and(|b| b.len() > 132 && &b[128..132] == b"DICM")
                && dicom_object::open_file(&p).is_ok();
            if complete {
                let at = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                out.entry(data::media_storage_sop_instance_uid(&p))
                    .or_default()
                    .push(at);
            }
        }
        for v in out.values_mut() {
            v.sort();
        }
        out
    }
}

impl Drop for FlappingScp {
    fn drop(&mut self) {
        self.down();
    }
}

fn destination(name: &str, port: u16) -> String {
    format!(
        "[[destinations]]\nname = \"{name}\"\nae_title = \"{name}\"\nhost = \"127.0.0.1\"\nport = {port}\n"
    )
}

fn jobs(index: &IndexReader, destination: &str, state: &str) -> i64 {
    index.count(&format!(
        "SELECT COUNT(*) FROM forward_jobs WHERE destination = '{destination}' AND state = '{state}'"
    ))
}

struct FlapFigures {
    instances: usize,
    lost: usize,
    duplicates: usize,
    unexplained: usize,
    kills: usize,
    early_dead: i64,
    never_dead: i64,
}

fn flapping_run(run: u32, model: &Path) -> FlapFigures {
    let mut rng = Rng::new("flapping", run);
    let work = tempfile::tempdir().unwrap();
    let cycles = 4;
    // One series before the destination goes down, one more at each flap.
    let series: Vec<Vec<PathBuf>> = (0..=cycles as u32)
        .map(|k| data::synthetic_series(&work.path().join(format!("s{k}")), 400 + k, 12, 64).1)
        .collect();
    let files: Vec<PathBuf> = series.iter().flatten().cloned().collect();
    let uids: Vec<String> = files
        .iter()
        .map(|f| data::media_storage_sop_instance_uid(f))
        .collect();
    let mut cad = FlappingScp::new("LUNG_CAD");
    let never = free_port(); // nothing ever listens there
    let mut node = Node::start_with(NodeOptions {
        stable_after_secs: 1,
        classifier: classifier(
            model,
            &format!(
                "[forward]\nretry_initial_secs = 1\nretry_max_secs = 1\nmax_attempts = {MAX_ATTEMPTS}\n\
                 batch_size = 64\nclaim_timeout_secs = 5\nconnect_timeout_secs = 2\n\n{}{}\
                 [[routes]]\nclasses = [\"lungs\"]\ndestinations = [\"LUNG_CAD\", \"NEVER_CAD\"]\n",
                destination("LUNG_CAD", cad.port),
                destination("NEVER_CAD", never),
            ),
        ),
        ..NodeOptions::default()
    });
    let out = node.storescu(&[], &series[0]);
    assert!(out.status.success(), "{}", common::text(&out));
    {
        // Down for a while: the jobs are tried and wait.
        let index = node.index();
        let tried = wait_until(30, || {
            index.count(
                "SELECT COUNT(*) FROM forward_jobs WHERE destination = 'LUNG_CAD' \
                 AND state = 'pending' AND attempts >= 2",
            ) > 0
        });
        assert!(tried, "retries while the destination is down");
    }
    // Flapping: up and down at random moments; the node is killed in the middle of it.
    let kill_at = rng.range(0, cycles);
    // Moments the node or the destination was killed: delivery is at least once, so a
    // copy the destination stored just before one of them may arrive again.
    let mut kills = Vec::new();
    for c in 0..cycles {
        let out = node.storescu(&[], &series[c as usize + 1]);
        assert!(out.status.success(), "{}", common::text(&out));
        cad.up();
        std::thread::sleep(Duration::from_millis(rng.range(100, 1500)));
        if c == kill_at {
            kills.push(SystemTime::now());
            node.kill9();
            std::thread::sleep(Duration::from_millis(rng.range(0, 1000)));
            node.spawn();
        }
        cad.kill(&mut kills);
        std::thread::sleep(Duration::from_millis(rng.range(300, 1500)));
    }
    cad.up();
    let index = node.index();
    let n = files.len() as i64;
    let settled = wait_until(90, || {
        jobs(&index, "LUNG_CAD", "done") + jobs(&index, "LUNG_CAD", "dead") == n
            && jobs(&index, "NEVER_CAD", "dead") == n
    });
    assert!(
        settled,
        "the outbox settles: {:?}",
        index.rows(
            "SELECT destination, state, COUNT(*), MAX(attempts) FROM forward_jobs \
             GROUP BY destination, state"
        )
    );
    // Let a stray duplicate, if any, arrive before counting.
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        index.count("SELECT COUNT(*) FROM forward_jobs"),
        2 * n,
        "the restart created no second set of jobs"
    );
    assert_eq!(
        jobs(&index, "LUNG_CAD", "dead"),
        0,
        "LUNG_CAD: no dead letters"
    );
    let early_dead = index.count(&format!(
        "SELECT COUNT(*) FROM forward_jobs WHERE state = 'dead' AND attempts < {MAX_ATTEMPTS}"
    ));
    let never_dead = index.count(&format!(
        "SELECT COUNT(*) FROM forward_jobs WHERE destination = 'NEVER_CAD' AND state = 'dead' \
         AND attempts = {MAX_ATTEMPTS}"
    ));
    let arrivals = cad.arrivals();
    let lost = uids.iter().filter(|u| !arrivals.contains_key(*u)).count();
    let duplicates: usize = arrivals.values().map(|a| a.len().saturating_sub(1)).sum();
    // A second copy is explained when the first arrived within KILL_WINDOW before a kill
    // of the node or of the destination (its outcome could not be committed or answered).
    let explained = |first: SystemTime| {
        kills
            .iter()
            .any(|k| k.duration_since(first).is_ok_and(|d| d <= KILL_WINDOW))
    };
    let unexplained: usize = arrivals
        .values()
        .filter(|a| a.len() > 2 || (a.len() == 2 && !explained(a[0])))
        .map(|a| a.len() - 1)
        .sum();
    if duplicates > 0 {
        eprintln!(
            "flapping run {run}: delivered twice {:?}",
            arrivals
                .iter()
                .filter(|(_, a)| a.len() > 1)
                .map(|(u, a)| (u, a.len()))
                .collect::<Vec<_>>()
        );
    }
    eprintln!(
        "flapping run {run}: node killed in cycle {kill_at}; {n} instances, lost {lost}, \
         delivered twice {duplicates} after {} kills of the node or the destination \
         (not explained by a kill: {unexplained})",
        kills.len()
    );
    drop(index);
    node.kill9();
    FlapFigures {
        instances: files.len(),
        lost,
        duplicates,
        unexplained,
        kills: kills.len(),
        early_dead,
        never_dead,
    }
}

#[test]
fn campaign_destination_down_then_flapping_with_a_node_kill() {
    let work = tempfile::tempdir().unwrap();
    let model = lung_model(work.path());
    let n = runs();
    let (mut routed, mut lost, mut dups, mut early, mut dead) = (0, 0, 0, 0, 0);
    let (mut unexplained, mut kills) = (0, 0);
    let started = Instant::now();
    for run in 0..n {
        let f = flapping_run(run, &model);
        assert!(
            f.duplicates <= f.kills * ASSOCIATIONS_PER_DESTINATION,
            "run {run}: {} copies delivered twice after {} kills: more than the one copy on \
             the wire per kill",
            f.duplicates,
            f.kills
        );
        routed += f.instances;
        lost += f.lost;
        dups += f.duplicates;
        kills += f.kills;
        unexplained += f.unexplained;
        early += f.early_dead;
        dead += f.never_dead;
    }
    eprintln!(
        "CAMPAIGN destination-flapping: runs {n}, instances routed {routed}, lost {lost}, \
         delivered twice {dups} after {kills} kills of the node or the destination (not \
         within {KILL_WINDOW:?} before one: {unexplained}), dead letters before {MAX_ATTEMPTS} attempts {early}, \
         dead letters of the never-up destination after {MAX_ATTEMPTS} attempts {dead}, {:.0} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(lost, 0, "routed instances never delivered");
    // Exactly once, except the one copy on the wire at a kill (README "The outbox").
    assert_eq!(
        unexplained, 0,
        "instances delivered twice without a kill to explain it"
    );
    assert_eq!(early, 0, "dead letters before max_attempts");
    assert_eq!(
        dead, routed as i64,
        "every job of the never-up destination dead"
    );
}

// ---------------------------------------------------------------------------------------
// Campaign 2b: kill -9 of the node while it forwards: at most the copy on the wire again
// ---------------------------------------------------------------------------------------

/// Kills of the node per run, each while copies are going out.
const FORWARD_KILLS: usize = 3;

struct MidForwardFigures {
    instances: usize,
    kills: usize,
    lost: usize,
    duplicates: usize,
}

/// One series (600 slices) routed to a storescp that stays up; the node is killed -9
/// `FORWARD_KILLS` times, each 0–150 ms after it was seen delivering, and started again.
fn kill_mid_forward_run(run: u32, model: &Path) -> MidForwardFigures {
    let mut rng = Rng::new("kill-mid-forward", run);
    let work = tempfile::tempdir().unwrap();
    let (_, files) = data::synthetic_series(&work.path().join("s"), 600 + run, 600, 64);
    let uids: Vec<String> = files
        .iter()
        .map(|f| data::media_storage_sop_instance_uid(f))
        .collect();
    let mut cad = FlappingScp::new("LUNG_CAD");
    cad.up();
    let mut node = Node::start_with(NodeOptions {
        stable_after_secs: 1,
        classifier: classifier(
            model,
            &format!(
                "[forward]\nretry_initial_secs = 1\nretry_max_secs = 1\nmax_attempts = {MAX_ATTEMPTS}\n\
                 batch_size = 100\nclaim_timeout_secs = 2\nconnect_timeout_secs = 2\n\n{}\
                 [[routes]]\nclasses = [\"lungs\"]\ndestinations = [\"LUNG_CAD\"]\n",
                destination("LUNG_CAD", cad.port),
            ),
        ),
        ..NodeOptions::default()
    });
    let out = node.storescu(&[], &files);
    assert!(out.status.success(), "{}", common::text(&out));
    let index = node.index();
    let n = files.len() as i64;
    let mut kills = 0;
    for _ in 0..FORWARD_KILLS {
        let before = jobs(&index, "LUNG_CAD", "done");
        let delivering = wait_until(60, || {
            let done = jobs(&index, "LUNG_CAD", "done");
            done > before || done == n
        });
        assert!(delivering, "the node forwards after its restart");
        if jobs(&index, "LUNG_CAD", "done") == n {
            break;
        }
        std::thread::sleep(Duration::from_millis(rng.range(0, 150)));
        node.kill9();
        kills += 1;
        node.spawn();
    }
    let settled = wait_until(120, || jobs(&index, "LUNG_CAD", "done") == n);
    assert!(
        settled,
        "every job done: {:?}",
        index.rows("SELECT state, COUNT(*), MAX(attempts) FROM forward_jobs GROUP BY state")
    );
    // Let a stray copy, if any, arrive before counting.
    std::thread::sleep(Duration::from_millis(1000));
    let arrivals = cad.arrivals();
    let lost = uids.iter().filter(|u| !arrivals.contains_key(*u)).count();
    let duplicates: usize = arrivals.values().map(|a| a.len().saturating_sub(1)).sum();
    eprintln!(
        "kill-mid-forward run {run}: {n} instances, {kills} kills while forwarding, lost {lost}, \
         delivered twice {duplicates}"
    );
    drop(index);
    node.kill9();
    MidForwardFigures {
        instances: files.len(),
        kills,
        lost,
        duplicates,
    }
}

#[test]
fn campaign_kill9_while_forwarding() {
    let work = tempfile::tempdir().unwrap();
    let model = lung_model(work.path());
    let n = runs();
    let (mut routed, mut kills, mut lost, mut dups) = (0, 0, 0, 0);
    let mut worst = 0;
    let started = Instant::now();
    for run in 0..n {
        let f = kill_mid_forward_run(run, &model);
        routed += f.instances;
        kills += f.kills;
        lost += f.lost;
        dups += f.duplicates;
        worst = worst.max(
            f.duplicates
                .saturating_sub(f.kills * ASSOCIATIONS_PER_DESTINATION),
        );
    }
    eprintln!(
        "CAMPAIGN kill-mid-forward: runs {n}, instances routed {routed}, kills while \
         forwarding {kills}, lost {lost}, delivered twice {dups} (bound: {} per kill), {:.0} s",
        ASSOCIATIONS_PER_DESTINATION,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(lost, 0, "routed instances never delivered");
    assert_eq!(
        worst, 0,
        "a run had more copies delivered twice than kills × associations in flight"
    );
}

// ---------------------------------------------------------------------------------------
// Campaign 3: PostgreSQL stopped and restarted during ingest (a throw-away server)
// ---------------------------------------------------------------------------------------

/// A throw-away PostgreSQL server of this campaign (deploy/pg-test.sh on its own port and
/// data directory), stopped and removed when dropped. `None` where there is no root or no
/// PostgreSQL binaries (skipped, unless ANATOMY_REQUIRE_ROOT_TESTS is set).
struct PgServer {
    port: u16,
    data: PathBuf,
}

impl PgServer {
    fn start() -> Option<PgServer> {
        if !common::require_root("campaign_postgres_stopped_during_ingest") {
            return None;
        }
        let port = free_port();
        let data =
            std::env::temp_dir().join(format!("anatomy-campaign-pg-{}-{port}", std::process::id()));
        let pg = PgServer { port, data };
        pg.ctl("start");
        Some(pg)
    }

    fn ctl(&self, what: &str) {
        let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/pg-test.sh"))
            .arg(what)
            .env("PGPORT", self.port.to_string())
            .env("PGDATA", &self.data)
            .output()
            .expect("deploy/pg-test.sh");
        assert!(
            out.status.success(),
            "pg-test.sh {what}: {}",
            common::text(&out)
        );
    }

    /// A crash of the database server: pg_ctl stop -m immediate.
    fn crash(&self) {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("/usr/lib/postgresql")
            .flatten()
            .map(|e| e.path().join("bin"))
            .max()
            .expect("a PostgreSQL version");
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output()
            .expect("pg_ctl");
        assert!(out.status.success(), "pg_ctl stop: {}", common::text(&out));
    }

    fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.ctl("stop");
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// One C-STORE of the campaign: the slice, its status (None: the association failed), and
/// when the answer came.
struct Attempt {
    slice: u32,
    status: Option<u16>,
    answered: Instant,
}

/// Store slices in order with our own SCU (it reports every status), reconnecting after a
/// failed association; `pause` between instances.
fn store_all(
    port: u16,
    spec: &anatomy_node::synth::SeriesSpec,
    files: &[PathBuf],
    slices: &[u32],
    pause: Duration,
) -> Vec<Attempt> {
    let mut out = Vec::new();
    let mut scu: Option<Scu> = None;
    for &i in slices {
        if scu.is_none() {
            scu = Scu::connect(port, "TESTSCU", &[(CT, EXPLICIT)]).ok();
        }
        let status = scu.as_mut().and_then(|s| {
            let set = dataset_bytes(&files[i as usize]);
            let uid = spec.sop_uid(i);
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                s.store(EXPLICIT, CT, &uid, &set).status
            }))
            .ok()
        });
        if status.is_none() {
            scu = None;
        }
        out.push(Attempt {
            slice: i,
            status,
            answered: Instant::now(),
        });
        std::thread::sleep(pause);
    }
    if let Some(s) = scu {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.release()));
    }
    out
}

struct PgFigures {
    acknowledged: usize,
    lost: usize,
    success_while_down: usize,
    refused_while_down: usize,
}

fn postgres_run(run: u32, pg: &PgServer) -> PgFigures {
    let mut rng = Rng::new("postgres", run);
    let work = tempfile::tempdir().unwrap();
    let slices = 80;
    let (spec, files) = data::synthetic_series(&work.path().join("s"), 500 + run, slices, 64);
    let db = std::sync::Arc::new(common::db::TestDb::create_on(pg.admin_url()));
    let mut node = Node::start_sharing(
        NodeOptions {
            stable_after_secs: 2,
            ..NodeOptions::default()
        },
        db,
    );
    let port = node.dicom_port;
    let all: Vec<u32> = (0..slices).collect();
    let sender = {
        let (spec, files) = (spec.clone(), files.clone());
        std::thread::spawn(move || store_all(port, &spec, &files, &all, Duration::from_millis(40)))
    };
    std::thread::sleep(Duration::from_millis(rng.range(300, 1200)));
    pg.crash();
    let down_at = Instant::now();
    // Longer than the index pool's acquire timeout (10 s): shorter outages only delay answers.
    std::thread::sleep(Duration::from_millis(rng.range(12_000, 16_000)));
    assert!(
        node.exited().is_none(),
        "the node survives its database going away"
    );
    let up_at = Instant::now();
    pg.ctl("start");
    let attempts = sender.join().expect("sender");

    // Answered while the server was down (a margin after the stop for a commit that made
    // it just before the crash).
    let while_down =
        |a: &&Attempt| a.answered > down_at + Duration::from_millis(500) && a.answered < up_at;
    let success_while_down = attempts
        .iter()
        .filter(while_down)
        .filter(|a| a.status == Some(0))
        .count();
    let refused_while_down = attempts
        .iter()
        .filter(while_down)
        .filter(|a| a.status != Some(0))
        .count();
    let statuses: BTreeMap<String, usize> = attempts.iter().fold(BTreeMap::new(), |mut m, a| {
        *m.entry(a.status.map_or("no answer".into(), |s| format!("{s:04X}")))
            .or_default() += 1;
        m
    });
    eprintln!("postgres run {run}: statuses {statuses:?}");

    // The node recovers by itself: the refused instances, sent again, are accepted.
    let refused: Vec<u32> = attempts
        .iter()
        .filter(|a| a.status != Some(0))
        .map(|a| a.slice)
        .collect();
    let mut again = Vec::new();
    let recovered = wait_until(60, || {
        again = store_all(port, &spec, &files, &refused, Duration::ZERO);
        again.iter().all(|a| a.status == Some(0))
    });
    assert!(
        recovered,
        "the node accepts again after the database is back: {:?}",
        again.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    node.restart(); // and what was acknowledged survives a restart on top
    let index = node.index();
    let acked: Vec<u32> = attempts
        .iter()
        .filter(|a| a.status == Some(0))
        .map(|a| a.slice)
        .collect();
    let mut lost = 0;
    for i in 0..slices {
        let rows = index.rows(&format!(
            "SELECT file_path FROM instances WHERE sop_instance_uid = '{}'",
            spec.sop_uid(i)
        ));
        let intact = rows.len() == 1
            && std::fs::read(node.storage().join(&rows[0][0]))
                .map(|b| b[data::dataset_offset(&b)..] == dataset_bytes(&files[i as usize])[..])
                .unwrap_or(false);
        if !intact {
            eprintln!("LOST: slice {i} rows {rows:?}");
            lost += 1;
        }
    }
    assert!(node.temporary_files().is_empty(), "no temporary files left");
    assert_eq!(
        node.stored_files().len(),
        slices as usize,
        "one file per instance"
    );
    let complete = wait_until(30, || {
        index.count("SELECT COUNT(*) FROM series WHERE state = 'complete'") == 1
    });
    assert!(complete, "the series completes");
    drop(index);
    node.kill9();
    PgFigures {
        acknowledged: acked.len() + refused.len(),
        lost,
        success_while_down,
        refused_while_down,
    }
}

#[test]
fn campaign_postgres_stopped_during_ingest() {
    let Some(pg) = PgServer::start() else {
        return;
    };
    let n = runs();
    let (mut acked, mut lost, mut bad, mut refused) = (0, 0, 0, 0);
    let started = Instant::now();
    for run in 0..n {
        let f = postgres_run(run, &pg);
        acked += f.acknowledged;
        lost += f.lost;
        bad += f.success_while_down;
        refused += f.refused_while_down;
    }
    eprintln!(
        "CAMPAIGN postgres-stopped: runs {n}, instances acknowledged {acked}, lost {lost}, \
         C-STOREs answered while the database was down: failure {refused}, success {bad}, \
         {:.0} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(lost, 0, "acknowledged instances lost");
    assert_eq!(bad, 0, "success answered while the database was down");
    assert!(
        refused > 0,
        "some C-STOREs were answered while the database was down"
    );
}

// ---------------------------------------------------------------------------------------
// Campaign 4: slow-loris senders, associations that never release, connection floods
// ---------------------------------------------------------------------------------------

const MAX_ASSOCIATIONS: usize = 4;
const TIMEOUT_SECS: u64 = 2;
const VERIFICATION: &str = "1.2.840.10008.1.1";
const IMPLICIT: &str = "1.2.840.10008.1.2";

/// The start of an A-ASSOCIATE-RQ (type, length, version, called and calling AE titles),
/// to be sent a byte at a time.
fn associate_rq_prefix() -> Vec<u8> {
    let mut pdu = vec![0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00];
    pdu.extend_from_slice(b"ANATOMY         TESTSCU         ");
    pdu.extend_from_slice(&[0u8; 32]);
    pdu
}

/// A slow-loris sender: one byte of an A-ASSOCIATE-RQ every `every`; returns how long the
/// node let it go on (None: still open after `limit`).
fn slow_loris(port: u16, every: Duration, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    let bytes = associate_rq_prefix();
    let mut i = 0;
    while started.elapsed() < limit {
        if s.write_all(&bytes[i % bytes.len()..i % bytes.len() + 1])
            .is_err()
        {
            return Some(started.elapsed());
        }
        i += 1;
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {} // an A-ASSOCIATE-RJ or A-ABORT: wait for the close
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(started.elapsed()),
        }
        std::thread::sleep(every);
    }
    None
}

/// A clean C-ECHO, timed.
fn echo(node: &Node) -> (bool, String, Duration) {
    let started = Instant::now();
    let out = node.echoscu("ECHOSCU", "ANATOMY");
    (out.status.success(), common::text(&out), started.elapsed())
}

struct FloodFigures {
    attempts: usize,
    accepted: usize,
    rejected_local_limit: usize,
    other_failures: usize,
    slowest_echo_ms: u128,
}

fn flood_run(run: u32) -> FloodFigures {
    let mut rng = Rng::new("flood", run);
    let node = Node::start_with(NodeOptions {
        max_associations: MAX_ASSOCIATIONS,
        artim_timeout_secs: TIMEOUT_SECS,
        idle_timeout_secs: TIMEOUT_SECS,
        ..NodeOptions::default()
    });
    let port = node.dicom_port;
    let limit = Duration::from_secs(TIMEOUT_SECS + 5);
    let mut slowest = Duration::ZERO;

    // Slow loris and an association that never releases, at once.
    let loris = std::thread::spawn(move || {
        slow_loris(port, Duration::from_millis(rng.range(100, 400)), limit)
    });
    let mut idle = Scu::connect(port, "TESTSCU", &[(VERIFICATION, IMPLICIT)]).expect("idle");
    let idle_started = Instant::now();
    let (ok, text, took) = echo(&node);
    assert!(ok, "a clean C-ECHO beside a slow loris: {text}");
    slowest = slowest.max(took);
    let aborted = matches!(
        idle.receive_pdu(),
        Ok(dicom_ul::Pdu::AbortRQ { .. }) | Err(_)
    );
    let idle_for = idle_started.elapsed();
    assert!(
        aborted && idle_for < limit,
        "an association that never releases is aborted after idle_timeout_secs ({idle_for:?})"
    );
    let loris_for = loris.join().expect("slow loris");
    assert!(
        loris_for.is_some_and(|d| d < limit),
        "the slow loris is cut off by ARTIM: {loris_for:?}"
    );

    // 10 × max_associations associations at once, each held for a while.
    let attempts = 10 * MAX_ASSOCIATIONS;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(attempts));
    let flood: Vec<_> = (0..attempts)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let r = Scu::connect(port, "TESTSCU", &[(VERIFICATION, IMPLICIT)]);
                let held = r.is_ok();
                std::thread::sleep(Duration::from_millis(1500));
                // dropped without a release, as a misbehaving peer would
                (held, r.err().unwrap_or_default())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // Responsive meanwhile: a C-ECHO gets its answer at once, success or transient reject.
    let (ok, text, took) = echo(&node);
    slowest = slowest.max(took);
    assert!(
        ok || (text.contains("Rejected Transient") && text.contains("Local Limit Exceeded")),
        "a C-ECHO during the flood: {text}"
    );
    assert!(took < Duration::from_secs(5), "the C-ECHO took {took:?}");
    let results: Vec<(bool, String)> = flood.into_iter().map(|t| t.join().unwrap()).collect();
    let accepted = results.iter().filter(|r| r.0).count();
    let rejected_local_limit = results
        .iter()
        .filter(|r| !r.0 && r.1.contains("local limit exceeded"))
        .count();
    let other_failures = attempts - accepted - rejected_local_limit;
    if other_failures > 0 {
        eprintln!(
            "flood run {run}: other failures {:?}",
            results
                .iter()
                .filter(|r| !r.0)
                .map(|r| &r.1)
                .collect::<Vec<_>>()
        );
    }
    assert!(
        accepted <= MAX_ASSOCIATIONS,
        "{accepted} associations accepted, the limit is {MAX_ASSOCIATIONS}"
    );
    // Afterwards the node serves again.
    let served = wait_until(TIMEOUT_SECS + 5, || echo(&node).0);
    assert!(served, "C-ECHO after the flood:\n{}", echo(&node).1);
    let (_, _, took) = echo(&node);
    slowest = slowest.max(took);
    eprintln!(
        "flood run {run}: slow loris cut after {loris_for:?}, idle association aborted after \
         {idle_for:?}; flood of {attempts}: accepted {accepted}, rejected (local limit) \
         {rejected_local_limit}, other {other_failures}"
    );
    FloodFigures {
        attempts,
        accepted,
        rejected_local_limit,
        other_failures,
        slowest_echo_ms: slowest.as_millis(),
    }
}

#[test]
fn campaign_slow_loris_idle_associations_and_floods() {
    let n = runs();
    let (mut attempts, mut accepted, mut rejected, mut other, mut slowest) = (0, 0, 0, 0, 0);
    let started = Instant::now();
    for run in 0..n {
        let f = flood_run(run);
        attempts += f.attempts;
        accepted += f.accepted;
        rejected += f.rejected_local_limit;
        other += f.other_failures;
        slowest = slowest.max(f.slowest_echo_ms);
    }
    eprintln!(
        "CAMPAIGN slow-loris-and-floods: runs {n}, association attempts {attempts}, accepted \
         {accepted}, rejected transient/local limit exceeded {rejected}, other failures \
         {other}, slowest clean C-ECHO {slowest} ms, {:.0} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(other, 0, "failures other than a local-limit rejection");
    assert_eq!(accepted + rejected, attempts);
}

// ---------------------------------------------------------------------------------------
// Campaign 5: the disk fills up during ingest (a small tmpfs, as root), then space is freed
// ---------------------------------------------------------------------------------------

struct DiskFigures {
    acknowledged: usize,
    refused: usize,
    lost: usize,
    bad_status: usize,
}

fn disk_full_run(run: u32) -> DiskFigures {
    let mut rng = Rng::new("disk-full", run);
    let work = tempfile::tempdir().unwrap();
    let senders = 4u32;
    let slices = 20u32;
    let series: Vec<_> = (0..senders)
        .map(|k| data::synthetic_series(&work.path().join(format!("s{k}")), 600 + k, slices, 256))
        .collect(); // 4 × 20 × 128 KiB = 10 MiB
    let size = format!("{}m", rng.range(3, 6));
    let fs = SmallFs::mount(&work.path().join("small"), &size);
    let mut node = Node::start_with(NodeOptions {
        storage: Some(fs.0.join("storage")),
        stable_after_secs: 2,
        ..NodeOptions::default()
    });
    let port = node.dicom_port;
    let all: Vec<u32> = (0..slices).collect();
    let threads: Vec<_> = series
        .iter()
        .map(|(spec, files)| {
            let (spec, files, all) = (spec.clone(), files.clone(), all.clone());
            std::thread::spawn(move || store_all(port, &spec, &files, &all, Duration::ZERO))
        })
        .collect();
    let attempts: Vec<Vec<Attempt>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(node.exited().is_none(), "the node survives a full disk");
    let statuses: BTreeMap<String, usize> =
        attempts.iter().flatten().fold(BTreeMap::new(), |mut m, a| {
            *m.entry(a.status.map_or("no answer".into(), |s| format!("{s:04X}")))
                .or_default() += 1;
            m
        });
    eprintln!("disk-full run {run}: tmpfs {size}, statuses {statuses:?}");
    let bad_status = attempts
        .iter()
        .flatten()
        .filter(|a| !matches!(a.status, Some(0) | Some(0xA700)))
        .count();
    let acknowledged = attempts
        .iter()
        .flatten()
        .filter(|a| a.status == Some(0))
        .count();
    let refused = attempts.len() * slices as usize - acknowledged;
    assert!(
        node.temporary_files().is_empty(),
        "partial files removed: {:?}",
        node.temporary_files()
    );

    // Space again: the refused instances, sent again, are accepted.
    fs.resize("64m");
    for ((spec, files), tried) in series.iter().zip(&attempts) {
        let again: Vec<u32> = tried
            .iter()
            .filter(|a| a.status != Some(0))
            .map(|a| a.slice)
            .collect();
        let answers = store_all(port, spec, files, &again, Duration::ZERO);
        assert!(
            answers.iter().all(|a| a.status == Some(0)),
            "accepted once space is freed: {:?}",
            answers.iter().map(|a| a.status).collect::<Vec<_>>()
        );
    }
    node.restart();
    let index = node.index();
    let mut lost = 0;
    for (spec, files) in &series {
        for i in 0..slices {
            let rows = index.rows(&format!(
                "SELECT file_path FROM instances WHERE sop_instance_uid = '{}'",
                spec.sop_uid(i)
            ));
            let intact = rows.len() == 1
                && std::fs::read(node.storage().join(&rows[0][0]))
                    .map(|b| b[data::dataset_offset(&b)..] == dataset_bytes(&files[i as usize])[..])
                    .unwrap_or(false);
            if !intact {
                eprintln!("LOST: series {} slice {i} rows {rows:?}", spec.number);
                lost += 1;
            }
        }
    }
    assert_eq!(
        node.stored_files().len(),
        (senders * slices) as usize,
        "one file per instance"
    );
    assert!(node.temporary_files().is_empty(), "no temporary files left");
    drop(index);
    node.kill9();
    DiskFigures {
        acknowledged,
        refused,
        lost,
        bad_status,
    }
}

#[test]
fn campaign_disk_full_during_ingest() {
    if !common::require_root("campaign_disk_full_during_ingest") {
        return;
    }
    let n = runs();
    let (mut acked, mut refused, mut lost, mut bad) = (0, 0, 0, 0);
    let started = Instant::now();
    for run in 0..n {
        let f = disk_full_run(run);
        acked += f.acknowledged;
        refused += f.refused;
        lost += f.lost;
        bad += f.bad_status;
    }
    eprintln!(
        "CAMPAIGN disk-full: runs {n}, instances acknowledged {acked} (then {refused} refused \
         with A700 and accepted once space was freed), lost {lost}, statuses other than \
         success or A700 {bad}, {:.0} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(lost, 0, "instances lost");
    assert_eq!(bad, 0, "statuses other than success or A700");
    assert!(refused > 0, "the disk filled up");
}
