//! Mining throughput: Orthanc (Debian package, with its DICOMweb plugin) on loopback holds
//! synthetic 512×512 16-bit CT studies, and a RIS CSV labels every image; a release
//! `anatomy-node mine` mines them into a fresh dataset with C-MOVE, with C-GET and with
//! DICOMweb (no rate limit; mine.max_concurrent_retrieves at its default, 2). Prints
//! key-images mined per second (rows / wall time of the run) and where the time went, from
//! the run's report: waiting on the archive (summed over the concurrent requests), decoding
//! and preprocessing, writing the PNGs, and index commits.
//!
//!     cargo bench --bench mine
//!
//! Environment: ANATOMY_BENCH_STUDIES (default 8), ANATOMY_BENCH_SLICES (per study,
//! default 40), ANATOMY_BENCH_DIR (default /tmp). Without Orthanc it says so and exits.

#[allow(dead_code)]
#[path = "../tests/common/orthanc.rs"]
mod orthanc;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anatomy_node::synth::{self, SeriesSpec};
use orthanc::{Orthanc, OrthancOptions};

fn main() {
    if !orthanc::installed() {
        println!("SKIPPED: Orthanc is not installed (apt package orthanc); nothing measured");
        return;
    }
    let dicomweb = Path::new(orthanc::DICOMWEB_PLUGIN).is_file();
    let studies: u32 = env_or("ANATOMY_BENCH_STUDIES", 8);
    let slices: u32 = env_or("ANATOMY_BENCH_SLICES", 40);
    let work =
        tempfile::tempdir_in(std::env::var("ANATOMY_BENCH_DIR").unwrap_or_else(|_| "/tmp".into()))
            .expect("bench directory");
    let move_port = free_port();
    let archive = Orthanc::start(OrthancOptions {
        ae_title: "ARCHIVE".into(),
        dicomweb,
        modalities: vec![("miner".into(), "MINER".into(), move_port)],
        ..OrthancOptions::default()
    });

    // The studies, uploaded through Orthanc's REST API, and a RIS row for every image.
    let mut ris = String::from("sop_instance_uid,label\n");
    let mut bytes = 0u64;
    let started = Instant::now();
    for n in 0..studies {
        let dir = work.path().join(format!("series{n}"));
        std::fs::create_dir_all(&dir).expect("series dir");
        let spec = SeriesSpec::new(100 + n, slices, 512);
        let files = synth::write_series(&dir, &spec).expect("synthetic series");
        for (i, f) in files.iter().enumerate() {
            bytes += std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
            archive.upload(f);
            ris.push_str(&format!("{},lungs\n", spec.sop_uid(i as u32)));
        }
    }
    let images = studies * slices;
    println!(
        "archive: Orthanc {} with {studies} studies x {slices} slices 512x512 16-bit ({images} images, {:.0} MB, uploaded in {:.1} s); every image labelled by the RIS CSV",
        if dicomweb { "+ DICOMweb plugin" } else { "(no DICOMweb plugin: dicomweb skipped)" },
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    let ris_path = work.path().join("ris.csv");
    std::fs::write(&ris_path, ris).expect("ris.csv");

    println!(
        "{:<9} {:>7} {:>8} {:>14} | {:>16} {:>16} {:>16} {:>12}",
        "retrieve",
        "rows",
        "wall s",
        "key-images/s",
        "archive s (%)",
        "decode s (%)",
        "write s (%)",
        "commit s"
    );
    let modes: &[&str] = if dicomweb {
        &["move", "get", "dicomweb"]
    } else {
        &["move", "get"]
    };
    for retrieve in modes {
        let dir = work.path().join(format!("run-{retrieve}"));
        std::fs::create_dir_all(&dir).expect("run dir");
        let config = dir.join("mine.toml");
        std::fs::write(
            &config,
            format!(
                "[storage]\npath = \"{storage}\"\n[log]\nlevel = \"warn\"\n\
                 [archive]\nae_title = \"ARCHIVE\"\nhost = \"127.0.0.1\"\nport = {port}\ncalling_ae_title = \"MINER\"\n\
                 retrieve = \"{retrieve}\"\ndicomweb_url = \"{web}\"\nmove_bind = \"127.0.0.1\"\nmove_port = {move_port}\n\
                 query_page_days = 10000\n\
                 [mine]\npatient_key_secret = \"bench secret, not a real one\"\nris_csv = \"{ris}\"\nkos = false\n\
                 max_requests_per_second = 0\n",
                storage = dir.join("node").display(),
                port = archive.dicom_port,
                web = archive.dicomweb_url(),
                ris = ris_path.display(),
            ),
        )
        .expect("config");
        let out = dir.join("dataset");
        let started = Instant::now();
        let output = Command::new(env!("CARGO_BIN_EXE_anatomy-node"))
            .args(["mine", "--config"])
            .arg(&config)
            .arg("--out")
            .arg(&out)
            .args(["--since", "20251231", "--until", "20260102"])
            .env_remove("RUST_LOG")
            .output()
            .expect("run anatomy-node mine");
        let process_s = started.elapsed().as_secs_f64();
        assert!(
            output.status.success(),
            "anatomy-node mine ({retrieve}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let stats = report(&out);
        let rows = stats["rows_added"].as_u64().unwrap_or(0);
        assert_eq!(
            rows,
            u64::from(images),
            "{retrieve}: every image mined: {stats}"
        );
        let t = &stats["timing"];
        let f = |k: &str| t[k].as_f64().unwrap_or(0.0);
        let (wall, archive_s, decode, write, commit) = (
            f("wall_s"),
            f("archive_s"),
            f("decode_s"),
            f("write_s"),
            f("commit_s"),
        );
        let busy = (archive_s + decode + write + commit).max(1e-9);
        let share = |x: f64| format!("{x:.2} ({:.0} %)", 100.0 * x / busy);
        println!(
            "{:<9} {:>7} {:>8.2} {:>14.1} | {:>16} {:>16} {:>16} {:>12.2}   (process {:.2} s, {} requests)",
            retrieve,
            rows,
            wall,
            rows as f64 / wall.max(1e-9),
            share(archive_s),
            share(decode),
            share(write),
            commit,
            process_s,
            t["archive_requests"]
        );
    }
    println!(
        "archive s sums the time of the requests (up to max_concurrent_retrieves = 2 at once); the % are of archive + decode + write + commit"
    );
}

/// The stats of the last run, as dataset.json keeps them.
fn report(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("dataset.json")).expect("dataset.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    json["mined"]["run"]["stats"].clone()
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Used by the Orthanc fixture (tests/common/orthanc.rs) too.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Used by the Orthanc fixture: poll `check` until it holds or `secs` pass.
fn wait_until(secs: u64, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check()
}
