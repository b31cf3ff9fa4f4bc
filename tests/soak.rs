//! Soak (issue #18): sustained ingest + classification + forwarding + C-FIND against one
//! node for a configurable time, sampling its memory and open files, with latency
//! percentiles and a machine-checked verdict at the end:
//!
//! * RSS and open file descriptors flat: the last third's maximum within the first third's
//!   maximum plus slack (`RSS_SLACK_*`, `FD_SLACK`);
//! * 0 lost: every instance acknowledged with a success status is indexed;
//! * every series labelled exactly once, and every instance of a labelled series forwarded
//!   (its outbox job done; none pending, retried or dead);
//! * every C-FIND answered with success.
//!
//! Load: `ANATOMY_SOAK_SENDERS` storescu processes (default 3) and one timed sender (our
//! SCU: C-STORE latency) send copies of the real CT series of ../shared/data/ct (synthetic
//! ones when absent) under fresh UIDs, `ANATOMY_SOAK_SLICES` slices of each (default 12,
//! spread over the series), each sender pausing `ANATOMY_SOAK_PAUSE_MS` (default 4000)
//! between series; findscu asks a SERIES-level query every 2 s; the node labels with the
//! shipped model and forwards every CT series to DCMTK storescp (`--ignore`: it receives
//! and answers, writes nothing, so the disk holds only the node's own copies).
//!
//! ```text
//! cargo test --test soak -- --nocapture                        # CI: 60 s
//! ANATOMY_SOAK_SECS=1800 cargo test --test soak -- --nocapture # the 30-minute soak
//! ```
//!
//! The node stores everything it receives: about 0.3 GB a minute at the default pace
//! (about 11 images/s, 0.5 MB each), 10 GB for 30 minutes.

mod common;

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::open_file;

use common::data::{self, dataset_bytes};
use common::node::{Node, NodeOptions, AE};
use common::scu::{Scu, CT, EXPLICIT};
use common::{free_port, wait_until};

/// Slack of the memory verdict: the last third's peak RSS may exceed the first third's by
/// this much, or by this fraction of it, whichever is larger (allocator arenas and caches
/// grow for a while; a leak keeps growing).
const RSS_SLACK_MB: u64 = 48;
const RSS_SLACK_FRACTION: f64 = 0.25;
/// Open file descriptors: the last third's peak within the first third's plus this (a few
/// associations, database connections and files being sent may be open at a sample).
const FD_SLACK: u64 = 24;
/// How often RSS and open files are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(3);
const FIND_EVERY: Duration = Duration::from_secs(2);

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Fresh UIDs: 2.25 + a number unique in this process and across runs.
fn fresh_uid() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("2.25.{}", t * 10_000 + u128::from(n % 10_000))
}

/// The series the senders copy: real ones (explicit VR LE, 8 slices or more), else
/// synthetic ones written under `work`; at most `slices` of each, spread over the series.
fn source_series(work: &Path, slices: usize) -> Vec<Vec<PathBuf>> {
    all_series(work)
        .into_iter()
        .map(|files| spread(files, slices))
        .collect()
}

/// At most `n` of `files` (sorted by name), evenly spaced.
fn spread(mut files: Vec<PathBuf>, n: usize) -> Vec<PathBuf> {
    files.sort();
    if files.len() <= n || n == 0 {
        return files;
    }
    (0..n).map(|i| files[i * files.len() / n].clone()).collect()
}

fn all_series(work: &Path) -> Vec<Vec<PathBuf>> {
    if let Some(dir) = data::ct_data() {
        let mut by_series: HashMap<String, Vec<PathBuf>> = HashMap::new();
        for row in data::labels(&dir) {
            by_series.entry(row.series_uid).or_default().push(row.file);
        }
        let mut series: Vec<Vec<PathBuf>> = by_series
            .into_values()
            .filter(|files| {
                files.len() >= 8
                    && data::transfer_syntax(&files[0]).trim_end_matches('\0') == EXPLICIT
            })
            .collect();
        series.sort();
        if !series.is_empty() {
            return series;
        }
    }
    (0..4)
        .map(|k| data::synthetic_series(&work.join(format!("synthetic{k}")), 900 + k, 24, 128).1)
        .collect()
}

/// Copies of `files` under one fresh study and series, each with a fresh SOP Instance UID,
/// written into `dir`; returns (path, SOP Instance UID) per copy.
fn fresh_copy(files: &[PathBuf], dir: &Path) -> Vec<(PathBuf, String)> {
    std::fs::create_dir_all(dir).expect("copy dir");
    let (study, series) = (fresh_uid(), fresh_uid());
    files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let mut obj = open_file(f).expect("a readable source instance");
            let sop = fresh_uid();
            for (tag, value) in [
                (tags::STUDY_INSTANCE_UID, &study),
                (tags::SERIES_INSTANCE_UID, &series),
                (tags::SOP_INSTANCE_UID, &sop),
            ] {
                obj.put(DataElement::new(
                    tag,
                    VR::UI,
                    PrimitiveValue::from(value.as_str()),
                ));
            }
            obj.update_meta(|m| m.media_storage_sop_instance_uid = sop.clone());
            let path = dir.join(format!("{i:04}.dcm"));
            obj.write_to_file(&path).expect("write the copy");
            (path, sop)
        })
        .collect()
}

/// What the load threads saw.
#[derive(Default)]
struct Seen {
    /// SOP Instance UIDs acknowledged with a success status.
    acknowledged: Vec<String>,
    /// Instances answered with something else, or not answered (the sender's view).
    refused: usize,
    store_ms: Vec<f64>,
    find_ms: Vec<f64>,
    find_failures: usize,
    series_sent: usize,
}

/// A storescu process per series copy, until `stop`.
fn storescu_sender(
    id: usize,
    port: u16,
    series: Arc<Vec<Vec<PathBuf>>>,
    work: PathBuf,
    pause: Duration,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) {
    let mut k = id;
    while !stop.load(Ordering::Relaxed) {
        let dir = work.join(format!("sender{id}"));
        let copy = fresh_copy(&series[k % series.len()], &dir);
        k += 1;
        let paths: Vec<PathBuf> = copy.iter().map(|(p, _)| p.clone()).collect();
        let out = Command::new("storescu")
            .env("TCP_NODELAY", "1")
            .args(["-v", "-aec", AE, "127.0.0.1", &port.to_string()])
            .args(&paths)
            .output()
            .expect("storescu (apt package dcmtk)");
        let log = common::text(&out);
        let acked = common::storescu_acknowledged(&log);
        let uid_of: HashMap<&PathBuf, &String> = copy.iter().map(|(p, u)| (p, u)).collect();
        {
            let mut s = seen.lock().expect("seen");
            s.series_sent += 1;
            s.refused += copy.len() - acked.len();
            s.acknowledged.extend(
                acked
                    .iter()
                    .filter_map(|p| uid_of.get(p).map(|u| (*u).clone())),
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
        sleep_unless(&stop, pause);
    }
}

/// Our SCU, one association per series copy, timing each C-STORE (request to response).
fn timed_sender(
    port: u16,
    series: Arc<Vec<Vec<PathBuf>>>,
    work: PathBuf,
    pause: Duration,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) {
    let mut k = series.len() / 2;
    while !stop.load(Ordering::Relaxed) {
        let dir = work.join("timed");
        let copy = fresh_copy(&series[k % series.len()], &dir);
        k += 1;
        let (mut acked, mut refused, mut times) = (Vec::new(), 0, Vec::new());
        match Scu::connect(port, "TESTSCU", &[(CT, EXPLICIT)]) {
            Ok(mut scu) => {
                for (path, uid) in &copy {
                    let bytes = dataset_bytes(path);
                    let started = Instant::now();
                    let rsp = scu.store(EXPLICIT, CT, uid, &bytes);
                    times.push(started.elapsed().as_secs_f64() * 1000.0);
                    if rsp.status == 0 {
                        acked.push(uid.clone());
                    } else {
                        refused += 1;
                    }
                }
                scu.release();
            }
            Err(e) => {
                eprintln!("soak: timed sender: no association: {e}");
                refused += copy.len();
            }
        }
        {
            let mut s = seen.lock().expect("seen");
            s.series_sent += 1;
            s.refused += refused;
            s.acknowledged.extend(acked);
            s.store_ms.extend(times);
        }
        let _ = std::fs::remove_dir_all(&dir);
        sleep_unless(&stop, pause);
    }
}

/// findscu, SERIES level, for the series of a study the node has, every FIND_EVERY.
fn finder(node_port: u16, index_url: String, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) {
    let index = common::db::IndexReader::open(&index_url);
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let studies = index.rows("SELECT study_uid FROM studies ORDER BY id DESC LIMIT 20");
        if let Some(study) = studies
            .get(n % studies.len().max(1))
            .and_then(|r| r.first())
        {
            n += 1;
            let started = Instant::now();
            let out = Command::new("findscu")
                .env("TCP_NODELAY", "1")
                .args(["-v", "-S", "-aet", "TESTSCU", "-aec", AE, "127.0.0.1"])
                .arg(node_port.to_string())
                .args(["-k", "QueryRetrieveLevel=SERIES"])
                .args(["-k", &format!("StudyInstanceUID={study}")])
                .args(["-k", "SeriesInstanceUID", "-k", "BodyPartExamined"])
                .output()
                .expect("findscu (apt package dcmtk)");
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            let ok = out.status.success()
                && common::text(&out).contains("Received Final Find Response (Success)");
            let mut s = seen.lock().expect("seen");
            s.find_ms.push(ms);
            s.find_failures += usize::from(!ok);
        }
        sleep_unless(&stop, FIND_EVERY);
    }
}

fn sleep_unless(stop: &AtomicBool, pause: Duration) {
    let until = Instant::now() + pause;
    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(50));
    }
}

/// (seconds since start, RSS in kB, open file descriptors) of `pid`.
fn sample(pid: u32, since: Instant) -> Option<(f64, u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((since.elapsed().as_secs_f64(), rss_kb, fds))
}

/// The p-th percentile (nearest rank) of `values`.
fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

fn print_latency(name: &str, values: &mut [f64]) {
    eprintln!(
        "SOAK latency {name}: n {}, p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        values.len(),
        percentile(values, 50.0),
        percentile(values, 90.0),
        percentile(values, 99.0),
        percentile(values, 100.0)
    );
}

/// Peaks of the first and last thirds of the samples (by time).
fn thirds(samples: &[(f64, u64, u64)], secs: f64, pick: fn(&(f64, u64, u64)) -> u64) -> (u64, u64) {
    let first = samples
        .iter()
        .filter(|s| s.0 <= secs / 3.0)
        .map(pick)
        .max()
        .unwrap_or(0);
    let last = samples
        .iter()
        .filter(|s| s.0 >= secs * 2.0 / 3.0)
        .map(pick)
        .max()
        .unwrap_or(0);
    (first, last)
}

/// DCMTK storescp as the CAD destination: receives and answers, writes nothing.
struct Destination {
    child: Child,
}

impl Destination {
    fn start(port: u16) -> Destination {
        let child = Command::new("storescp")
            .env("TCP_NODELAY", "1")
            .args(["-aet", "CAD", "--ignore"])
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start storescp (apt package dcmtk)");
        assert!(
            wait_until(10, || TcpStream::connect(("127.0.0.1", port)).is_ok()),
            "storescp did not start"
        );
        Destination { child }
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The model the node labels with: the shipped one, or a one-class test model.
fn model(work: &Path) -> PathBuf {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/anatomy.onnx");
    if shipped.is_file() {
        return shipped;
    }
    eprintln!("NOTE: no shipped model: the soak labels with a one-class test model");
    common::models::make(
        work,
        "lungs",
        &["--size", "64", "--kind", "stats", "--classes", "lungs"],
    )
    .expect("a Python with onnx (ANATOMY_TEST_PYTHON or .venv-tests)")
}

fn column(index: &common::db::IndexReader, sql: &str) -> Vec<f64> {
    index
        .rows(sql)
        .iter()
        .filter_map(|r| r.first().and_then(|v| v.parse().ok()))
        .collect()
}

#[test]
fn soak_ingest_classify_forward_and_find() {
    let secs: u64 = env_or("ANATOMY_SOAK_SECS", 60);
    let senders: usize = env_or("ANATOMY_SOAK_SENDERS", 3);
    let pause = Duration::from_millis(env_or("ANATOMY_SOAK_PAUSE_MS", 4000));
    let slices: usize = env_or("ANATOMY_SOAK_SLICES", 12);
    let work = tempfile::tempdir().unwrap();
    let series = Arc::new(source_series(work.path(), slices));
    let model = model(work.path());
    let cad_port = free_port();
    let _cad = Destination::start(cad_port);
    let node = Node::start_with(NodeOptions {
        stable_after_secs: 2,
        classifier: format!(
            "enabled = true\nmodel = \"{}\"\ndevice = \"cpu\"\n\n\
             [forward]\nretry_initial_secs = 1\nretry_max_secs = 5\n\n\
             [[destinations]]\nname = \"CAD\"\nae_title = \"CAD\"\nhost = \"127.0.0.1\"\nport = {cad_port}\n\n\
             [[routes]]\nmodalities = [\"CT\"]\ndestinations = [\"CAD\"]\n",
            model.display()
        ),
        ..NodeOptions::default()
    });
    eprintln!(
        "SOAK: {secs} s, {senders} storescu senders + 1 timed sender, {} source series ({slices} slices of each at most), pause {} ms, model {}",
        series.len(),
        pause.as_millis(),
        model.display()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut threads = Vec::new();
    for id in 0..senders {
        let (series, work, stop, seen) = (
            series.clone(),
            work.path().to_path_buf(),
            stop.clone(),
            seen.clone(),
        );
        let port = node.dicom_port;
        threads.push(thread::spawn(move || {
            storescu_sender(id, port, series, work, pause, stop, seen)
        }));
    }
    {
        let (series, work, stop, seen) = (
            series.clone(),
            work.path().to_path_buf(),
            stop.clone(),
            seen.clone(),
        );
        let port = node.dicom_port;
        threads.push(thread::spawn(move || {
            timed_sender(port, series, work, pause, stop, seen)
        }));
    }
    {
        let (stop, seen, url, port) = (
            stop.clone(),
            seen.clone(),
            node.index_url(),
            node.dicom_port,
        );
        threads.push(thread::spawn(move || finder(port, url, stop, seen)));
    }

    let pid = node.pid();
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < Duration::from_secs(secs) {
        if let Some(s) = sample(pid, started) {
            samples.push(s);
        }
        thread::sleep(SAMPLE_EVERY);
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("a load thread");
    }
    let load_secs = started.elapsed().as_secs_f64();

    // Let the last series complete, be labelled and forwarded.
    let index = node.index();
    let settled = wait_until(240, || {
        index.count(
            "SELECT COUNT(*) FROM series s WHERE NOT EXISTS \
             (SELECT 1 FROM series_labels l WHERE l.series_ref = s.id AND l.routed_at IS NOT NULL)",
        ) == 0
            && index
                .count("SELECT COUNT(*) FROM forward_jobs WHERE state IN ('pending', 'sending')")
                == 0
    });
    let drain_secs = started.elapsed().as_secs_f64() - load_secs;

    let seen = std::mem::take(&mut *seen.lock().expect("seen"));
    let indexed: std::collections::HashSet<String> = index
        .rows("SELECT sop_instance_uid FROM instances")
        .into_iter()
        .filter_map(|r| r.into_iter().next())
        .collect();
    let lost = seen
        .acknowledged
        .iter()
        .filter(|u| !indexed.contains(*u))
        .count();
    let series_count = index.count("SELECT COUNT(*) FROM series");
    let not_once = index.count(
        "SELECT COUNT(*) FROM series s WHERE \
         (SELECT COUNT(*) FROM series_labels l WHERE l.series_ref = s.id) != 1",
    );
    let labelled = index.count("SELECT COUNT(*) FROM series_labels WHERE status = 'labelled'");
    let to_forward = index.count(
        "SELECT COUNT(*) FROM instances i JOIN series_labels l ON l.series_ref = i.series_ref \
         WHERE l.status = 'labelled'",
    );
    let done = index.count("SELECT COUNT(*) FROM forward_jobs WHERE state = 'done'");
    let not_done = index.count("SELECT COUNT(*) FROM forward_jobs WHERE state != 'done'");
    let retried = index.count("SELECT COUNT(*) FROM forward_jobs WHERE attempts > 1");

    let mut store_ms = seen.store_ms.clone();
    let mut find_ms = seen.find_ms.clone();
    let mut labelled_ms = column(
        &index,
        "SELECT l.labelled_at - (SELECT MAX(i.received_at) FROM instances i \
             WHERE i.series_ref = l.series_ref) FROM series_labels l",
    );
    let mut forwarded_ms = column(
        &index,
        "SELECT j.finished_at - i.received_at FROM forward_jobs j \
         JOIN instances i ON i.id = j.instance_ref WHERE j.state = 'done'",
    );
    let (rss_first, rss_last) = thirds(&samples, load_secs, |s| s.1);
    let (fd_first, fd_last) = thirds(&samples, load_secs, |s| s.2);
    let rss_bound =
        rss_first + (RSS_SLACK_MB * 1024).max((rss_first as f64 * RSS_SLACK_FRACTION) as u64);
    let fd_bound = fd_first + FD_SLACK;

    eprintln!(
        "SOAK: load {load_secs:.0} s, drained in {drain_secs:.0} s; series sent {}, in the index {series_count}, \
         labelled {labelled} (not exactly once: {not_once}); instances acknowledged {}, refused {}, \
         indexed {}, lost {lost}; forwarded {done} of {to_forward} (jobs not done {not_done}, \
         retried {retried}); C-FIND {} (failed {})",
        seen.series_sent,
        seen.acknowledged.len(),
        seen.refused,
        indexed.len(),
        find_ms.len(),
        seen.find_failures
    );
    print_latency("C-STORE (timed sender)", &mut store_ms);
    print_latency("C-FIND (findscu process, SERIES level)", &mut find_ms);
    print_latency(
        "store -> labelled (last instance of a series to its label; includes series.stable_after_secs = 2)",
        &mut labelled_ms,
    );
    print_latency(
        "store -> forwarded (instance received to copy stored by the destination)",
        &mut forwarded_ms,
    );
    eprintln!(
        "SOAK RSS: first third peak {} MB, last third peak {} MB (bound {} MB); open fds: first third peak {fd_first}, last third peak {fd_last} (bound {fd_bound}); {} samples",
        rss_first / 1024,
        rss_last / 1024,
        rss_bound / 1024,
        samples.len()
    );
    for (t, rss, fds) in samples.iter().step_by((samples.len() / 12).max(1)) {
        eprintln!("SOAK sample t={t:.0}s rss={} MB fds={fds}", rss / 1024);
    }

    assert!(
        settled,
        "the node labelled and forwarded everything within 240 s of the load's end"
    );
    assert!(
        !seen.acknowledged.is_empty(),
        "the senders got instances acknowledged"
    );
    assert_eq!(lost, 0, "acknowledged instances missing from the index");
    assert_eq!(not_once, 0, "series not labelled exactly once");
    assert_eq!(not_done, 0, "forward jobs not done");
    assert_eq!(
        done, to_forward,
        "every instance of a labelled series forwarded"
    );
    assert_eq!(seen.find_failures, 0, "C-FIND failures");
    assert!(samples.len() >= 6, "too few samples: {}", samples.len());
    assert!(
        rss_last <= rss_bound,
        "RSS grew: last third peak {rss_last} kB > {rss_bound} kB"
    );
    assert!(
        fd_last <= fd_bound,
        "open files grew: last third peak {fd_last} > {fd_bound}"
    );
}
