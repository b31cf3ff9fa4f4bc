//! `anatomy-node mine` against a real archive: Orthanc (with its DICOMweb plugin) on
//! loopback holds CT series (../shared/data/ct, synthetic where it is absent) and Key Object
//! Selection and SR documents the test writes (tests/tools/make_kos.py); a RIS CSV labels
//! other images, whole series and a whole study (accession number). Checked: the exact rows
//! and labels with C-MOVE, C-GET and DICOMweb (the same rows, keys, splits and image bytes by
//! all three), the unlabelled counts, an image deleted from the archive, the patient keys
//! and splits against an independent HMAC, no patient names, IDs or birth dates in the
//! dataset; cron behaviour: a second run mines nothing, a new study is mined alone, a run
//! killed with SIGKILL is completed by the next without duplicates, two runs at once (exit
//! 75, or waiting); every exit code (2, 1, 3 with retries and giving up, 4 by window and by
//! SIGTERM); pseudo labels from the node's own predictions, above a threshold, marked and
//! never over a human label; mining by range (issue #19): one C-FIND for studies 40 years
//! apart, and every study from an archive that caps its answers (C-FIND and QIDO-RS). Every test runs on SQLite and, via tests/run-all.sh, on
//! PostgreSQL.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;

use common::db::{IndexReader, TestDb};
use common::node::{Node, NodeOptions};
use common::orthanc::{Orthanc, OrthancOptions};
use common::{data, files_under, free_port};
use dicom_dictionary_std::tags;
use serde_json::Value;

const SECRET: &str = "the mine tests' patient key secret";
const ARCHIVE_AE: &str = "ARCHIVE";
const MINER_AE: &str = "MINER";
/// Both the real data (Study Date 20000101) and the synthetic series (20260101).
const SINCE: &str = "19991231";
const UNTIL: &str = "20260102";
const IMAGE_SIZE: usize = 64;
const LUNG: &str = "39607008^SCT^Lung structure";

/// A series as stored in the archive: its files (sorted), their SOP Instance UIDs in the
/// same order, its study and patient.
#[derive(Clone, Debug)]
struct Series {
    files: Vec<PathBuf>,
    sops: Vec<String>,
    study_uid: String,
    patient_id: String,
}

impl Series {
    fn from_files(mut files: Vec<PathBuf>) -> Series {
        files.sort();
        assert!(!files.is_empty());
        let read = |path: &Path, tag| -> String {
            let obj = dicom_object::OpenFileOptions::new()
                .read_until(tags::PIXEL_DATA)
                .open_file(path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            obj.element(tag)
                .map(|e| {
                    e.to_str()
                        .unwrap_or_default()
                        .trim_end_matches(['\0', ' '])
                        .to_string()
                })
                .unwrap_or_default()
        };
        Series {
            sops: files
                .iter()
                .map(|f| read(f, tags::SOP_INSTANCE_UID))
                .collect(),
            study_uid: read(&files[0], tags::STUDY_INSTANCE_UID),
            patient_id: read(&files[0], tags::PATIENT_ID),
            files,
        }
    }

    fn instance(&self, i: usize) -> &Path {
        &self.files[i]
    }
}

/// The `n`-th test series: a real CT series from ../shared/data/ct (one subject each)
/// when it is there, else a synthetic one.
fn series(work: &Path, n: usize) -> Series {
    const REAL: [&str; 4] = ["sts-019", "sts-025", "sts-008", "sts-042"];
    if let Some(dir) = data::ct_data() {
        let case = dir.join(REAL[n]);
        let mut files = Vec::new();
        for sub in std::fs::read_dir(&case).expect("case folder").flatten() {
            for f in std::fs::read_dir(sub.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if f.path().extension().is_some_and(|e| e == "dcm") {
                    files.push(f.path());
                }
            }
        }
        return Series::from_files(files);
    }
    synthetic(work, 40 + n as u32)
}

/// A synthetic series (12 slices): its patient has a name and a birth date, which the
/// privacy checks look for in the dataset.
fn synthetic(work: &Path, number: u32) -> Series {
    let (_, files) = data::synthetic_series(&work.join(format!("synth{number}")), number, 12, 64);
    Series::from_files(files)
}

/// The key-images the node would choose in `series` (`anatomy::select`, the classifier's
/// rules with `count` key-images).
fn node_key_images(series: &Series, count: usize) -> BTreeSet<String> {
    use anatomy_node::anatomy::select::{self, KeyImageCount, Selection, SelectionRules};
    let instances: Vec<_> = series
        .files
        .iter()
        .map(|f| {
            anatomy_node::classify_cli::read_instance(f)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
                .instance
        })
        .collect();
    let rules = SelectionRules {
        key_images: KeyImageCount::Count(count),
        axial_tolerance_deg: 35.0,
    };
    match select::select(&instances, &rules) {
        Selection::Selected { key_images, .. } => {
            key_images.into_iter().map(|k| k.sop_instance_uid).collect()
        }
        Selection::Skipped { reason } => panic!("no key-images: {reason}"),
    }
}

/// A Python that can `import pydicom` (tests/run-all.sh makes .venv-tests).
fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    [
        std::env::var_os("ANATOMY_TEST_PYTHON").map(PathBuf::from),
        Some(root.join(".venv-tests/bin/python")),
        Some(PathBuf::from("python3")),
    ]
    .into_iter()
    .flatten()
    .find(|p| {
        Command::new(p)
            .args(["-c", "import pydicom"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
    .expect(
        "no Python with pydicom to write Key Object Selection documents: run \
         `python3 -m venv .venv-tests && .venv-tests/bin/pip install -r tests/tools/requirements.txt` \
         (tests/run-all.sh does it), or set ANATOMY_TEST_PYTHON",
    )
}

/// What a Key Object Selection document says.
#[derive(Default)]
struct Note<'a> {
    text: Option<&'a str>,
    code: Option<&'a str>,
    manufacturer: Option<&'a str>,
    /// A Comprehensive SR document instead of a Key Object Selection document.
    sr: bool,
}

/// Write a Key Object Selection document flagging `images` (tests/tools/make_kos.py).
fn kos(work: &Path, images: &[&Path], note: Note) -> PathBuf {
    static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = work.join(format!("kos{n}.dcm"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new(python());
    cmd.arg(root.join("tests/tools/make_kos.py")).arg(&out);
    if let Some(t) = note.text {
        cmd.args(["--text", t]);
    }
    if let Some(c) = note.code {
        cmd.args(["--code", c]);
    }
    if let Some(m) = note.manufacturer {
        cmd.args(["--manufacturer", m]);
    }
    if note.sr {
        cmd.arg("--sr");
    }
    cmd.args(images);
    let output = cmd.output().expect("run make_kos.py");
    assert!(
        output.status.success(),
        "make_kos.py: {}",
        common::text(&output)
    );
    out
}

/// The archive, the index database and a folder for configurations and datasets.
struct Setup {
    orthanc: Orthanc,
    db: Arc<TestDb>,
    work: tempfile::TempDir,
    move_port: u16,
}

impl Setup {
    fn new() -> Setup {
        Setup::capped(0)
    }

    /// An archive that answers a C-FIND with at most `limit` studies (Orthanc's
    /// `LimitFindResults`; 0: no limit).
    fn capped(limit: u32) -> Setup {
        Setup::with(limit, None)
    }

    /// `dicom_tls`: Orthanc's DICOM port speaks TLS only (certificate, key, client CA).
    fn with(limit: u32, dicom_tls: Option<(PathBuf, PathBuf, PathBuf)>) -> Setup {
        let move_port = free_port();
        let orthanc = Orthanc::start(OrthancOptions {
            ae_title: ARCHIVE_AE.into(),
            check_called_ae_title: true,
            dicomweb: true,
            // The miner's AE: allowed to query and retrieve, and the C-MOVE destination.
            modalities: vec![("miner".into(), MINER_AE.into(), move_port)],
            allow_any_query: false,
            limit_find_results: limit,
            dicom_tls,
        });
        Setup {
            orthanc,
            db: Arc::new(TestDb::create()),
            work: tempfile::tempdir().expect("work dir"),
            move_port,
        }
    }

    fn work(&self) -> &Path {
        self.work.path()
    }

    /// A configuration for `mine` (`retrieve`: move, get or dicomweb) whose index is the
    /// test database (SQLite in `<work>/node` by default); `extra` is appended to [mine].
    fn config(&self, retrieve: &str, extra: &str) -> PathBuf {
        self.config_on(retrieve, extra, &self.work().join("node"), &self.db.url)
    }

    fn config_on(&self, retrieve: &str, extra: &str, storage: &Path, db_url: &str) -> PathBuf {
        let path = self.work().join(format!("mine-{retrieve}.toml"));
        let text = format!(
            r#"
[storage]
path = "{storage}"

[database]
url = "{db_url}"

[archive]
ae_title = "{ARCHIVE_AE}"
host = "127.0.0.1"
port = {dicom}
calling_ae_title = "{MINER_AE}"
retrieve = "{retrieve}"
dicomweb_url = "{web}"
move_bind = "127.0.0.1"
move_port = {move_port}
query_page_days = 10000
dimse_timeout_secs = 30

[mine]
patient_key_secret = "{SECRET}"
image_size = {IMAGE_SIZE}
max_requests_per_second = 0
kos_labels = [
    {{ code = "39607008", scheme = "SCT", label = "lungs" }},
    {{ text = "*pelvi*", label = "pelvis" }},
]
{extra}
"#,
            storage = storage.display(),
            dicom = self.orthanc.dicom_port,
            web = self.orthanc.dicomweb_url(),
            move_port = self.move_port,
        );
        std::fs::write(&path, text).expect("write the mine configuration");
        path
    }

    /// The index as the test reads it.
    fn index(&self) -> IndexReader {
        IndexReader::open(&self.db.reader_url(&self.work().join("node")))
    }

    fn ris_csv(&self, name: &str, text: &str) -> PathBuf {
        let path = self.work().join(name);
        std::fs::write(&path, text).expect("write the RIS CSV");
        path
    }
}

fn command(config: &Path, out: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_anatomy-node"));
    cmd.args(["mine", "--config"])
        .arg(config)
        .arg("--out")
        .arg(out)
        .args(["--since", SINCE, "--until", UNTIL])
        .env_remove("RUST_LOG")
        .envs(env.iter().copied());
    cmd
}

/// Run `anatomy-node mine` to the end.
fn mine(config: &Path, out: &Path, env: &[(&str, &str)]) -> Output {
    command(config, out, env)
        .output()
        .expect("run anatomy-node mine")
}

fn spawn(config: &Path, out: &Path, env: &[(&str, &str)]) -> Child {
    command(config, out, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start anatomy-node mine")
}

#[track_caller]
fn assert_exit(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "anatomy-node mine: {}",
        common::text(output)
    );
}

type Row = BTreeMap<String, String>;
/// Image file bytes by manifest name.
type Images = BTreeMap<String, Vec<u8>>;

/// manifest.csv as header → value maps (and the header).
fn manifest(out: &Path) -> (Vec<String>, Vec<Row>) {
    let mut reader = csv::Reader::from_path(out.join("manifest.csv")).expect("manifest.csv");
    let header: Vec<String> = reader
        .headers()
        .expect("header")
        .iter()
        .map(str::to_string)
        .collect();
    let rows = reader
        .records()
        .map(|r| {
            let r = r.expect("manifest row");
            header
                .iter()
                .cloned()
                .zip(r.iter().map(str::to_string))
                .collect()
        })
        .collect();
    (header, rows)
}

/// (SOP Instance UID, label, label source) of every row.
fn labels(rows: &[Row]) -> BTreeSet<(String, String, String)> {
    rows.iter()
        .map(|r| {
            (
                r["sop_instance_uid"].clone(),
                r["label"].clone(),
                r["label_source"].clone(),
            )
        })
        .collect()
}

fn expect(sop: &str, label: &str, source: &str) -> (String, String, String) {
    (sop.to_string(), label.to_string(), source.to_string())
}

/// The stats of the latest run's report (reports/mine-NNNNNN.json).
fn stats(out: &Path) -> Value {
    let mut reports: Vec<PathBuf> = std::fs::read_dir(out.join("reports"))
        .expect("reports")
        .flatten()
        .map(|e| e.path())
        .collect();
    reports.sort();
    let last = reports.last().expect("a report");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(last).expect("report")).expect("JSON");
    report["report"]["stats"].clone()
}

fn t_wall(stats: &Value) -> f64 {
    stats["timing"]["wall_s"].as_f64().expect("wall_s")
}

/// The dataset id of an --out folder (mine.json), which keys its rows in the index.
fn dataset_id(out: &Path) -> String {
    let text = std::fs::read_to_string(out.join("mine.json")).expect("mine.json");
    let json: Value = serde_json::from_str(&text).expect("mine.json is JSON");
    json["dataset_id"].as_str().expect("dataset_id").to_string()
}

/// (patient_key, split) by an implementation independent of the node's: Python's hmac.
fn expected_patient(patient_id: &str) -> (String, String) {
    let script = r#"
import hashlib, hmac, sys
secret, patient = sys.argv[1], sys.argv[2]
mac = hmac.new(secret.encode(), ("anatomy-node patient\0" + "" + "\0" + patient).encode(), hashlib.sha256).digest()
u = int.from_bytes(mac[8:16], "big") / 2**64
print(mac[:8].hex(), "train" if u < 0.70 else "val" if u < 0.85 else "test")
"#;
    let out = Command::new("python3")
        .args(["-c", script, SECRET, patient_id])
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", common::text(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let (key, split) = text.trim().split_once(' ').expect("key and split");
    (key.to_string(), split.to_string())
}

/// Width, height and bit depth of a PNG file.
fn png_header(path: &Path) -> (u32, u32, u8) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    let be = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    (be(16), be(20), bytes[24])
}

#[test]
fn the_same_rows_and_labels_by_c_move_c_get_and_dicomweb() {
    let s = Setup::new();
    let work = s.work();
    let a = series(work, 0);
    let b = series(work, 1);
    let c = synthetic(work, 7);
    let d = series(work, 2);
    for x in [&a, &b, &c, &d] {
        s.orthanc.upload_all(&x.files);
    }
    // Key Object Selection documents: a coded finding, a text, an unmapped text, one the
    // node itself wrote (machine output: never a human label), and one that contradicts
    // the RIS.
    let documents = [
        kos(
            work,
            &[a.instance(0), a.instance(5)],
            Note {
                code: Some(LUNG),
                ..Note::default()
            },
        ),
        kos(
            work,
            &[a.instance(2)],
            Note {
                text: Some("Pelvic floor"),
                ..Note::default()
            },
        ),
        kos(
            work,
            &[a.instance(7)],
            Note {
                text: Some("Follow-up in 6 months"),
                ..Note::default()
            },
        ),
        kos(
            work,
            &[a.instance(9)],
            Note {
                code: Some(LUNG),
                manufacturer: Some("anatomy-node"),
                ..Note::default()
            },
        ),
        kos(
            work,
            &[c.instance(0)],
            Note {
                code: Some(LUNG),
                ..Note::default()
            },
        ),
        // An SR document (mine.sr = true) is read the same way.
        kos(
            work,
            &[d.instance(4)],
            Note {
                text: Some("Pelvis, bones"),
                sr: true,
                ..Note::default()
            },
        ),
    ];
    s.orthanc.upload_all(&documents);
    // A document flags an image that was deleted from the archive since: it is counted as
    // not sent, without failing the study (nor a wait for it by C-MOVE).
    s.orthanc.upload_all(&[kos(
        work,
        &[c.instance(3)],
        Note {
            code: Some(LUNG),
            ..Note::default()
        },
    )]);
    let (_, gone) = s
        .orthanc
        .instances()
        .into_iter()
        .find(|(sop, _)| sop == &c.sops[3])
        .expect("c[3] in the archive");
    let (status, _) = s
        .orthanc
        .request("DELETE", &format!("/instances/{gone}"), None);
    assert_eq!(status, 200);
    let ris = s.ris_csv(
        "ris.csv",
        &format!(
            "sop_instance_uid,label\n{},liver\n{},Liver\n{},thorax\n{},liver\n{},neck\n1.2.3.4.5.6.7.8.9,lungs\n",
            b.sops[1], b.sops[4], b.sops[6], c.sops[0], c.sops[1]
        ),
    );
    let expected: BTreeSet<_> = [
        expect(&a.sops[0], "lungs", "mined:kos"),
        expect(&a.sops[5], "lungs", "mined:kos"),
        expect(&a.sops[2], "pelvis", "mined:kos"),
        expect(&b.sops[1], "liver", "mined:ris"),
        expect(&b.sops[4], "liver", "mined:ris"),
        expect(&c.sops[1], "neck", "mined:ris"),
        expect(&d.sops[4], "pelvis", "mined:sr"),
    ]
    .into();
    // The CT images in the archive, less the labelled ones (c[3], deleted, was labelled).
    let without_label =
        a.files.len() + b.files.len() + (c.files.len() - 1) + d.files.len() - expected.len() - 1;
    let patient_of: BTreeMap<&str, &str> = [&a, &b, &c, &d]
        .iter()
        .flat_map(|x| x.sops.iter().map(|u| (u.as_str(), x.patient_id.as_str())))
        .collect();

    let mut first: Option<(Vec<Row>, Images)> = None;
    for retrieve in ["move", "get", "dicomweb"] {
        let config = s.config(
            retrieve,
            &format!("ris_csv = \"{}\"\nsr = true", ris.display()),
        );
        let out = work.join(format!("dataset-{retrieve}"));
        let output = mine(&config, &out, &[]);
        assert_exit(&output, 0);
        let (header, mut rows) = manifest(&out);
        // Rows are in the order studies were committed (two at once here): compare sorted.
        rows.sort_by(|x, y| x["sop_instance_uid"].cmp(&y["sop_instance_uid"]));
        for column in [
            "sop_instance_uid",
            "label",
            "label_source",
            "split",
            "image",
            "patient_key",
            "study_uid",
            "series_uid",
            "z_mm",
        ] {
            assert!(
                header.iter().any(|h| h == column),
                "{retrieve}: no {column} in {header:?}"
            );
        }
        assert_eq!(
            rows.len(),
            expected.len(),
            "{retrieve}: one row per key-image: {rows:?}"
        );
        assert_eq!(labels(&rows), expected, "{retrieve}");

        let mut images = BTreeMap::new();
        for row in &rows {
            let path = out.join(&row["image"]);
            assert_eq!(
                png_header(&path),
                (IMAGE_SIZE as u32, IMAGE_SIZE as u32, 16),
                "{retrieve}: {}",
                path.display()
            );
            images.insert(row["image"].clone(), std::fs::read(&path).expect("image"));
            assert!(row["z_mm"].parse::<f64>().is_ok(), "{retrieve}: z {row:?}");
            let patient = patient_of[row["sop_instance_uid"].as_str()];
            let (key, split) = expected_patient(patient);
            assert_eq!(
                row["patient_key"], key,
                "{retrieve}: the keyed patient key of {patient}"
            );
            assert_eq!(
                row["split"], split,
                "{retrieve}: the keyed split of {patient}"
            );
        }
        let files = files_under(&out.join("images"));
        assert_eq!(
            files.len(),
            rows.len(),
            "{retrieve}: an image per row and nothing else"
        );

        let st = stats(&out);
        assert_eq!(st["studies_found"], 4, "{retrieve}: {st}");
        assert_eq!(st["studies_mined"], 4, "{retrieve}: {st}");
        assert_eq!(st["rows_added"], expected.len(), "{retrieve}: {st}");
        assert_eq!(
            st["unlabelled"],
            serde_json::json!({
                "conflicting image labels": 1,
                "document without a mapped label (mine.kos_labels)": 1,
                "RIS label \"thorax\" is not a dataset label": 1,
            }),
            "{retrieve}"
        );
        assert_eq!(
            st["instances_without_label"], without_label,
            "{retrieve}: every CT image of the four studies but the labelled ones: {st}"
        );
        assert_eq!(
            st["images_skipped"],
            serde_json::json!({"not sent by the archive": 1}),
            "{retrieve}"
        );
        assert!(
            t_wall(&st) < 9.0,
            "{retrieve}: no wait for what was not sent: {st}"
        );
        assert_eq!(
            st["documents"],
            serde_json::json!({
                "key object selection": 5,
                "structured report": 1,
                "written by anatomy-node (ignored)": 1
            }),
            "{retrieve}"
        );
        assert_eq!(
            st["ris"],
            serde_json::json!({"rows": 6, "rows not in the archive": 1}),
            "{retrieve}"
        );
        let t = &st["timing"];
        assert!(t["archive_s"].as_f64().unwrap() > 0.0, "{retrieve}: {t}");
        assert!(
            t["archive_requests"].as_u64().unwrap() >= 5,
            "{retrieve}: {t}"
        );
        assert!(t["decode_s"].as_f64().unwrap() > 0.0, "{retrieve}: {t}");
        assert!(t["write_s"].as_f64().unwrap() > 0.0, "{retrieve}: {t}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stdout.contains(&format!("{without_label} instances without a label")),
            "{stdout}"
        );

        // Nothing that names the patient: no Patient ID, name or birth date in any file.
        let patients = s.orthanc.get("/patients?expand").expect("patients");
        let mut secrets = BTreeSet::new();
        for p in patients.as_array().expect("a list") {
            for tag in ["PatientID", "PatientName", "PatientBirthDate"] {
                let value = p["MainDicomTags"][tag].as_str().unwrap_or_default();
                for part in value.split('^').filter(|v| v.len() >= 4) {
                    secrets.insert(part.to_string());
                }
            }
        }
        assert!(
            secrets.contains("19700101") && secrets.contains(&c.patient_id),
            "{secrets:?}"
        );
        for file in files_under(&out) {
            let bytes = std::fs::read(&file).expect("dataset file");
            for secret in &secrets {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{retrieve}: {} holds {secret:?}",
                    file.display()
                );
            }
        }

        // The next run finds every study unchanged: the RIS rows it mined are not looked
        // for again, and that does not make the studies look changed (it once did, and every
        // study labelled image by image was queried again once).
        if retrieve == "get" {
            let manifest_before = std::fs::read(out.join("manifest.csv")).expect("manifest");
            assert_exit(&mine(&config, &out, &[]), 0);
            let st = stats(&out);
            assert_eq!(
                (
                    st["studies_unchanged"].as_u64(),
                    st["studies_mined"].as_u64(),
                    st["rows_added"].as_u64()
                ),
                (Some(4), Some(0), Some(0)),
                "{st}"
            );
            assert_eq!(
                st["timing"]["archive_requests"], 2,
                "one C-FIND of the studies, one for the RIS rows not mined (not in the \
                 archive, or conflicting): {st}"
            );
            assert_eq!(st["ris"]["rows mined before"], 3, "{st}");
            assert_eq!(
                std::fs::read(out.join("manifest.csv")).expect("manifest"),
                manifest_before
            );
        }

        // The three ways give the same dataset: rows (keys, splits, names) and pixels.
        match &first {
            None => first = Some((rows, images)),
            Some((rows0, images0)) => {
                assert_eq!(&rows, rows0, "{retrieve} vs move");
                assert_eq!(&images, images0, "{retrieve} vs move: image bytes");
            }
        }
    }
    // Each dataset's rows are in the index, apart.
    let index = s.index();
    assert_eq!(
        index.count("SELECT COUNT(*) FROM mine_images"),
        3 * expected.len() as i64
    );
    assert_eq!(
        index.count("SELECT COUNT(DISTINCT dataset_id) FROM mine_images"),
        3
    );
}

#[test]
fn a_second_run_mines_nothing_a_new_study_alone_and_a_killed_run_resumes_without_duplicates() {
    let s = Setup::new();
    let work = s.work();
    let (a, b, c) = (series(work, 0), series(work, 1), series(work, 3));
    // A synthetic study: its Accession Number (ACC9) is what a RIS row names.
    let e = synthetic(work, 9);
    s.orthanc.upload_all(&a.files);
    s.orthanc.upload_all(&b.files);
    s.orthanc.upload_all(&e.files);
    s.orthanc.upload_all(&[kos(
        work,
        &[b.instance(1), b.instance(3)],
        Note {
            code: Some(LUNG),
            ..Note::default()
        },
    )]);
    // The RIS labels a whole series: its key-images are chosen as the node chooses them.
    let a_series_uid = {
        let obj = dicom_object::OpenFileOptions::new()
            .read_until(tags::PIXEL_DATA)
            .open_file(a.instance(0))
            .expect("a file");
        obj.element(tags::SERIES_INSTANCE_UID)
            .expect("series UID")
            .to_str()
            .expect("text")
            .trim_end_matches(['\0', ' '])
            .to_string()
    };
    // ...and one row labels a whole study by its accession number.
    let ris = s.ris_csv(
        "ris.csv",
        &format!(
            "study_uid,series_uid,accession_number,label\n{},{a_series_uid},,legs\n,,ACC9,neck\n",
            a.study_uid
        ),
    );
    let config = s.config(
        "get",
        &format!("ris_csv = \"{}\"\nseries_key_images = 4", ris.display()),
    );
    let out = work.join("dataset");

    let first = mine(&config, &out, &[]);
    assert_exit(&first, 0);
    let (_, rows1) = manifest(&out);
    assert_eq!(rows1.len(), 10, "{rows1:?}");
    let from_a: BTreeSet<&String> = rows1
        .iter()
        .filter(|r| r["label"] == "legs" && r["label_source"] == "mined:ris-series")
        .map(|r| &r["sop_instance_uid"])
        .collect();
    assert_eq!(
        from_a,
        node_key_images(&a, 4).iter().collect(),
        "series_key_images of the RIS series, as the node chooses them"
    );
    let from_e: BTreeSet<&String> = rows1
        .iter()
        .filter(|r| r["label"] == "neck" && r["label_source"] == "mined:ris-accession")
        .map(|r| &r["sop_instance_uid"])
        .collect();
    assert_eq!(from_e, node_key_images(&e, 4).iter().collect());
    let manifest1 = std::fs::read(out.join("manifest.csv")).expect("manifest");

    // Nothing changed: nothing is retrieved, the dataset stays byte for byte.
    let second = mine(&config, &out, &[]);
    assert_exit(&second, 0);
    let st = stats(&out);
    assert_eq!(
        (
            st["studies_unchanged"].as_u64(),
            st["studies_mined"].as_u64()
        ),
        (Some(3), Some(0)),
        "{st}"
    );
    assert_eq!(st["rows_added"], 0, "{st}");
    assert_eq!(
        st["timing"]["archive_requests"], 1,
        "one C-FIND of the studies: {st}"
    );
    assert_eq!(
        std::fs::read(out.join("manifest.csv")).expect("manifest"),
        manifest1
    );

    // A new study: only it is mined; the rows before stay as they were, in order.
    s.orthanc.upload_all(&c.files);
    s.orthanc.upload_all(&[kos(
        work,
        &[c.instance(2)],
        Note {
            text: Some("pelvis"),
            ..Note::default()
        },
    )]);
    let third = mine(&config, &out, &[]);
    assert_exit(&third, 0);
    let st = stats(&out);
    assert_eq!(
        (
            st["studies_unchanged"].as_u64(),
            st["studies_mined"].as_u64()
        ),
        (Some(3), Some(1)),
        "{st}"
    );
    let (_, rows3) = manifest(&out);
    assert_eq!(rows3.len(), 11);
    assert_eq!(rows3[..10], rows1[..]);
    assert_eq!(
        labels(&rows3[10..]),
        [expect(&c.sops[2], "pelvis", "mined:kos")].into()
    );

    // kill -9 half way (requests paced so the run takes seconds), then a plain run.
    let out2 = work.join("dataset-killed");
    let mut child = spawn(
        &config,
        &out2,
        &[("ANATOMY_MINE__MAX_REQUESTS_PER_SECOND", "4")],
    );
    let index = s.index();
    let committed = || -> i64 {
        if !out2.join("mine.json").is_file() {
            return 0;
        }
        let id = dataset_id(&out2);
        index.count(&format!(
            "SELECT COUNT(*) FROM mine_images WHERE dataset_id = '{id}'"
        ))
    };
    assert!(
        common::wait_until(60, || committed() > 0),
        "no study committed"
    );
    child.kill().expect("kill -9");
    let status = child.wait().expect("wait");
    assert_eq!(status.signal(), Some(9), "the run ended before the kill");
    // Whatever was retrieved waits outside the dataset folder: even now it holds no DICOM.
    for file in files_under(&out2) {
        let bytes = std::fs::read(&file).expect("dataset file");
        assert!(
            bytes.len() < 132 || &bytes[128..132] != b"DICM",
            "{} is a DICOM file",
            file.display()
        );
    }
    let before = committed();
    assert!(
        (1..11).contains(&before),
        "killed half way: {before} rows committed"
    );
    let id = dataset_id(&out2);
    assert_eq!(
        index.count(&format!(
            "SELECT COUNT(*) FROM mine_runs WHERE dataset_id = '{id}' AND finished_at IS NULL"
        )),
        1,
        "the killed run never finished"
    );

    let resumed = mine(&config, &out2, &[]);
    assert_exit(&resumed, 0);
    let st = stats(&out2);
    assert!(st["studies_unchanged"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(st["rows_added"].as_i64().unwrap(), 11 - before, "{st}");
    let (_, rows) = manifest(&out2);
    assert_eq!(
        labels(&rows),
        labels(&rows3),
        "the same labels as the run never killed"
    );
    let sops: BTreeSet<&String> = rows.iter().map(|r| &r["sop_instance_uid"]).collect();
    assert_eq!(sops.len(), rows.len(), "no duplicate rows");
    assert_eq!(
        index.count(&format!(
            "SELECT COUNT(*) FROM mine_images WHERE dataset_id = '{id}'"
        )),
        11
    );
    let images = files_under(&out2.join("images"));
    assert_eq!(images.len(), 11, "no stray or partial images: {images:?}");
    assert!(
        !work.join("node/anatomy-node-mine-spool").exists(),
        "the spool is removed"
    );
}

#[test]
fn two_runs_at_once_one_exits_75_and_one_waits() {
    let s = Setup::new();
    let work = s.work();
    let (a, b) = (series(work, 0), series(work, 1));
    s.orthanc.upload_all(&a.files);
    s.orthanc.upload_all(&b.files);
    s.orthanc.upload_all(&[
        kos(
            work,
            &[a.instance(1)],
            Note {
                code: Some(LUNG),
                ..Note::default()
            },
        ),
        kos(
            work,
            &[b.instance(2)],
            Note {
                text: Some("pelvis"),
                ..Note::default()
            },
        ),
    ]);
    let config = s.config("move", "");
    let out = work.join("dataset");
    // The first run is paced (2 requests per second) so it holds the lock for seconds.
    let mut slow = spawn(
        &config,
        &out,
        &[("ANATOMY_MINE__MAX_REQUESTS_PER_SECOND", "2")],
    );
    // mine.json is written once the run holds the lock (and the index is migrated).
    assert!(
        common::wait_until(30, || out.join("mine.json").is_file()),
        "the first run did not start"
    );
    let index = s.index();
    assert!(common::wait_until(10, || index
        .count("SELECT COUNT(*) FROM mine_runs")
        == 1));

    let refused = mine(&config, &out, &[]);
    assert_exit(&refused, 75);
    assert!(
        common::text(&refused).contains("another `anatomy-node mine` is running"),
        "{}",
        common::text(&refused)
    );
    assert_eq!(
        index.count("SELECT COUNT(*) FROM mine_runs"),
        1,
        "the refused run recorded nothing"
    );

    let waiting = spawn(&config, &out, &[("ANATOMY_MINE__LOCK_WAIT_SECS", "120")]);
    let slow_status = slow.wait().expect("first run");
    let mut slow_out = String::new();
    std::io::Read::read_to_string(slow.stdout.as_mut().expect("stdout"), &mut slow_out)
        .expect("stdout");
    assert_eq!(slow_status.code(), Some(0), "{slow_out}");
    let waited = waiting.wait_with_output().expect("second run");
    assert_exit(&waited, 0);
    let runs = index.rows("SELECT started_at, finished_at, exit_code FROM mine_runs ORDER BY id");
    assert_eq!(runs.len(), 2, "{runs:?}");
    let n = |v: &String| v.parse::<i64>().expect("a time");
    assert!(
        n(&runs[1][0]) >= n(&runs[0][1]),
        "the waiting run began after the first ended: {runs:?}"
    );
    let st = stats(&out);
    assert_eq!(
        (st["studies_unchanged"].as_u64(), st["rows_added"].as_u64()),
        (Some(2), Some(0)),
        "{st}"
    );
    let (_, rows) = manifest(&out);
    assert_eq!(
        labels(&rows),
        [
            expect(&a.sops[1], "lungs", "mined:kos"),
            expect(&b.sops[2], "pelvis", "mined:kos")
        ]
        .into()
    );
}

#[test]
fn pseudo_labels_come_from_the_node_marked_and_never_over_a_human_label() {
    let s = Setup::new();
    let work = s.work();
    let models = work.join("models");
    let Some(model) = common::models::make(
        &models,
        "lungs-liver",
        &[
            "--size",
            "64",
            "--kind",
            "stats",
            "--classes",
            "lungs,liver",
        ],
    ) else {
        return;
    };
    let mut node = Node::start_sharing(
        NodeOptions {
            stable_after_secs: 1,
            classifier: format!(
                "enabled = true\nmodel = \"{}\"\ndevice = \"cpu\"\nkey_images = 6\n",
                model.display()
            ),
            ..NodeOptions::default()
        },
        s.db.clone(),
    );
    let a = series(work, 0);
    let b = series(work, 1);
    let out = node.storescu(&[], &a.files);
    assert!(out.status.success(), "{}", common::text(&out));
    let index = node.index();
    assert!(
        common::wait_until(60, || index
            .count("SELECT COUNT(*) FROM series_labels WHERE status = 'labelled'")
            == 1),
        "the node did not label the series: {}",
        node.log()
    );
    // The node's key-images: SOP Instance UID, predicted class, its probability, and
    // whether the class is the one the series' decoding (head-to-foot order) gave it.
    let in_order: BTreeMap<String, bool> = index
        .rows("SELECT sop_instance_uid, label, smoothed_label FROM key_images")
        .into_iter()
        .map(|r| (r[0].clone(), r[1] == r[2]))
        .collect();
    let predictions: Vec<(String, String, f64)> = index
        .rows("SELECT sop_instance_uid, label, probabilities FROM key_images ORDER BY id")
        .into_iter()
        .map(|r| {
            let p: BTreeMap<String, f64> = serde_json::from_str(&r[2]).expect("probabilities");
            (r[0].clone(), r[1].clone(), p[&r[1]])
        })
        .collect();
    let predicted: Vec<String> = predictions.iter().map(|p| p.0.clone()).collect();
    let model_version = index.rows("SELECT model_version FROM series_labels")[0][0].clone();
    assert_eq!(predicted.len(), 6);
    // The threshold: the third highest probability among the key-images no human labels
    // (predicted[2] gets a human label below), so some pass and some do not.
    let mut probabilities: Vec<f64> = predictions
        .iter()
        .filter(|p| p.0 != predicted[2])
        .map(|p| p.2)
        .collect();
    probabilities.sort_by(|x, y| y.total_cmp(x));
    let threshold = probabilities[2];
    assert!(
        probabilities.iter().any(|p| *p < threshold),
        "the probabilities differ: {predictions:?}"
    );
    // Every prediction under the threshold is counted (a human-labelled image's too), and
    // every confident one out of its series' order (mine.pseudo_label_require_order).
    let below = predictions.iter().filter(|p| p.2 < threshold).count();
    let out_of_order = predictions
        .iter()
        .filter(|p| p.2 >= threshold && !in_order[&p.0])
        .count();

    // The archive has both series; a radiologist flagged one of the node's key-images
    // (pelvis) and an image of the other series.
    s.orthanc.upload_all(&a.files);
    s.orthanc.upload_all(&b.files);
    let human = a
        .sops
        .iter()
        .position(|u| u == &predicted[2])
        .expect("a key-image of the series");
    s.orthanc.upload_all(&[
        kos(
            work,
            &[a.instance(human)],
            Note {
                text: Some("pelvis"),
                ..Note::default()
            },
        ),
        kos(
            work,
            &[b.instance(0)],
            Note {
                code: Some(LUNG),
                ..Note::default()
            },
        ),
    ]);
    // mine reads the node's own index (its database and storage).
    let config = s.config_on(
        "get",
        &format!("pseudo_labels = true\npseudo_label_min_probability = {threshold}"),
        &node.storage(),
        &s.db.url,
    );
    let dataset = work.join("dataset");
    let output = mine(&config, &dataset, &[]);
    assert_exit(&output, 0);
    let (_, rows) = manifest(&dataset);
    let pseudo = format!("pseudo:{model_version}");
    let mut expected: BTreeSet<_> = predictions
        .iter()
        .filter(|(u, _, p)| *u != predicted[2] && *p >= threshold && in_order[u])
        .map(|(u, label, _)| expect(u, label, &pseudo))
        .collect();
    let pseudo_rows = expected.len();
    expected.insert(expect(&predicted[2], "pelvis", "mined:kos"));
    expected.insert(expect(&b.sops[0], "lungs", "mined:kos"));
    assert_eq!(labels(&rows), expected);
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(dataset.join("dataset.json")).expect("dataset.json"),
    )
    .expect("JSON");
    assert_eq!(
        json["label_kinds"],
        serde_json::json!({"human": 2, "pseudo": pseudo_rows})
    );
    let st = stats(&dataset);
    assert_eq!(st["pseudo_below_threshold"], below, "{st}");
    assert_eq!(st["pseudo_out_of_order"], out_of_order, "{st}");

    // Without pseudo_labels (the default) the same archive gives the human labels only.
    let config = s.config_on("get", "", &node.storage(), &s.db.url);
    let humans_only = work.join("dataset-humans");
    assert_exit(&mine(&config, &humans_only, &[]), 0);
    let (_, rows) = manifest(&humans_only);
    assert!(
        rows.iter().all(|r| r["label_source"].starts_with("mined:")),
        "{rows:?}"
    );
    assert_eq!(rows.len(), 2);
    node.kill9();
}

#[test]
fn exit_codes_for_usage_an_unreachable_archive_the_time_window_and_sigterm() {
    let s = Setup::new();
    let work = s.work();
    let all = [series(work, 0), series(work, 1), series(work, 2)];
    for (i, x) in all.iter().enumerate() {
        s.orthanc.upload_all(&x.files);
        let note = Note {
            code: Some(LUNG),
            ..Note::default()
        };
        s.orthanc
            .upload_all(&[kos(work, &[x.instance(i + 1)], note)]);
    }
    let expected: BTreeSet<_> = all
        .iter()
        .enumerate()
        .map(|(i, x)| expect(&x.sops[i + 1], "lungs", "mined:kos"))
        .collect();
    let config = s.config("get", "");
    let out = work.join("dataset");

    // 2: configuration (a short secret), or an --out folder mine did not write.
    let short = mine(
        &config,
        &out,
        &[("ANATOMY_MINE__PATIENT_KEY_SECRET", "short")],
    );
    assert_exit(&short, 2);
    assert!(
        common::text(&short).contains("patient_key_secret"),
        "{}",
        common::text(&short)
    );
    let foreign = work.join("not-a-dataset");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let refused = mine(&config, &foreign, &[]);
    assert_exit(&refused, 2);
    assert!(
        common::text(&refused).contains("no mine.json"),
        "{}",
        common::text(&refused)
    );

    // 1: the archive does not answer.
    let closed = free_port().to_string();
    let down = mine(&config, &out, &[("ANATOMY_ARCHIVE__PORT", closed.as_str())]);
    assert_exit(&down, 1);
    assert!(
        common::text(&down).contains("cannot associate"),
        "{}",
        common::text(&down)
    );

    // 4: outside mine.window nothing is done at all.
    let now = chrono::Utc::now();
    let hour = |h: i64| {
        (now + chrono::Duration::hours(h))
            .format("%H:00")
            .to_string()
    };
    let window = format!("{}-{}", hour(2), hour(3));
    let later = mine(
        &config,
        &work.join("dataset-window"),
        &[("TZ", "UTC"), ("ANATOMY_MINE__WINDOW", window.as_str())],
    );
    assert_exit(&later, 4);
    assert!(
        common::text(&later).contains("outside mine.window"),
        "{}",
        common::text(&later)
    );
    assert!(
        !work.join("dataset-window").exists(),
        "nothing written outside the window"
    );

    // 3: the archive cannot reach our C-MOVE destination (it knows MINER at another port):
    // every study fails, is recorded as failed, and is tried again by the next runs; after
    // mine.max_attempts failed runs it is left alone (given up) until it changes.
    // (RIS rows name two images per series, so lists of UIDs are refused.)
    let mut rows = String::from("sop_instance_uid,label\n");
    let mut ris_expected = BTreeSet::new();
    for x in &all {
        for i in [3, 4] {
            rows.push_str(&format!("{},legs\n", x.sops[i]));
            ris_expected.insert(expect(&x.sops[i], "legs", "mined:ris"));
        }
    }
    let ris = s.ris_csv("ris.csv", &rows);
    let by_move = s.config(
        "move",
        &format!("kos = false\nris_csv = \"{}\"", ris.display()),
    );
    let moved = work.join("dataset-move");
    let elsewhere = free_port().to_string();
    let wrong_port = [("ANATOMY_ARCHIVE__MOVE_PORT", elsewhere.as_str())];
    let failing = mine(&by_move, &moved, &wrong_port);
    assert_exit(&failing, 3);
    let st = stats(&moved);
    assert_eq!(
        (st["studies_failed"].as_u64(), st["rows_added"].as_u64()),
        (Some(3), Some(0)),
        "{st}"
    );
    assert!(!st["errors"].as_array().unwrap().is_empty(), "{st}");
    let given_up = mine(
        &by_move,
        &moved,
        &[wrong_port[0], ("ANATOMY_MINE__MAX_ATTEMPTS", "1")],
    );
    assert_exit(&given_up, 0);
    let st = stats(&moved);
    assert_eq!(st["studies_given_up"], 3, "{st}");
    assert_eq!(
        st["timing"]["archive_requests"], 2,
        "only the RIS rows located and the studies queried: {st}"
    );
    let fixed = mine(&by_move, &moved, &[]);
    assert_exit(&fixed, 0);
    assert_eq!(labels(&manifest(&moved).1), ris_expected);

    // 4: SIGTERM stops the run after the studies in progress; the next run goes on.
    let paced = [
        ("ANATOMY_MINE__MAX_REQUESTS_PER_SECOND", "2"),
        ("ANATOMY_MINE__MAX_CONCURRENT_RETRIEVES", "1"),
    ];
    let child = spawn(&config, &out, &paced);
    let index = s.index();
    let committed = || -> i64 {
        if !out.join("mine.json").is_file() {
            return 0;
        }
        let id = dataset_id(&out);
        index.count(&format!(
            "SELECT COUNT(*) FROM mine_images WHERE dataset_id = '{id}'"
        ))
    };
    assert!(
        common::wait_until(60, || committed() > 0),
        "no study committed"
    );
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(term.success());
    let stopped = child.wait_with_output().expect("the stopped run");
    assert_exit(&stopped, 4);
    let stdout = String::from_utf8_lossy(&stopped.stdout);
    assert!(stdout.contains("stopped early"), "{stdout}");
    let (_, rows) = manifest(&out);
    assert!(
        (1..3).contains(&rows.len()),
        "the committed rows are in the manifest: {rows:?}"
    );
    let finished = mine(&config, &out, &[]);
    assert_exit(&finished, 0);
    let (_, rows) = manifest(&out);
    assert_eq!(labels(&rows), expected);
}

/// A copy of `series` as another study: its own Study, Series and SOP Instance UIDs (under
/// `root`), Study Date and Study Time (DCMTK's dcmodify).
fn restudied(work: &Path, series: &Series, root: &str, date: &str, time: &str) -> Series {
    let dir = work.join(format!("restudied-{root}"));
    std::fs::create_dir_all(&dir).unwrap();
    let files: Vec<PathBuf> = series
        .files
        .iter()
        .enumerate()
        .map(|(k, src)| {
            let dst = dir.join(format!("{k}.dcm"));
            std::fs::copy(src, &dst).unwrap();
            let out = common::dcmtk(
                "dcmodify",
                &[
                    "-nb",
                    "-m",
                    &format!("StudyInstanceUID={root}"),
                    "-m",
                    &format!("SeriesInstanceUID={root}.1"),
                    "-m",
                    &format!("SOPInstanceUID={root}.1.{}", k + 1),
                    "-m",
                    &format!("StudyDate={date}"),
                    "-m",
                    &format!("StudyTime={time}"),
                    dst.to_str().unwrap(),
                ],
            );
            assert!(out.status.success(), "dcmodify: {}", common::text(&out));
            dst
        })
        .collect();
    Series::from_files(files)
}

/// `mine` over 40 years (1984-2025) with the archive key `query_page_days` at its default
/// and `mine.max_requests_per_second` at its default (10).
fn mine_forty_years(config: &Path, out: &Path, env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_anatomy-node"))
        .args(["mine", "--config"])
        .arg(config)
        .arg("--out")
        .arg(out)
        .args(["--since", "19840101", "--until", "20251231"])
        .env_remove("RUST_LOG")
        .env("ANATOMY_ARCHIVE__QUERY_PAGE_DAYS", "0")
        .env("ANATOMY_MINE__MAX_REQUESTS_PER_SECOND", "10")
        .envs(env.iter().copied())
        .output()
        .expect("run anatomy-node mine")
}

/// Issue #19: studies decades apart are found with one C-FIND for the whole window, not one
/// per day; an archive that caps its answers (Orthanc `LimitFindResults` = 2, five studies,
/// three on one day) still yields every study, its capped ranges bisected by date and the
/// crowded day by Study Time; the counts are in the report and the summary.
#[test]
fn a_forty_year_window_takes_a_handful_of_queries_and_a_capped_archive_loses_no_study() {
    // The first three decades apart; the last three on one day.
    let when = [
        ("19850312", "120000"),
        ("20030701", "080000"),
        ("20240101", "083000"),
        ("20240101", "101500"),
        ("20240101", "161000"),
    ];
    for (limit, studies) in [(0, 3), (2, 5)] {
        let s = Setup::capped(limit);
        let work = s.work();
        let base = synthetic(work, 60);
        let mut uids = BTreeSet::new();
        for (i, (date, time)) in when.iter().take(studies).enumerate() {
            let root = format!("1.2.826.0.1.3680043.10.543.19.{limit}.{i}");
            let copy = restudied(work, &base, &root, date, time);
            s.orthanc.upload_all(&copy.files);
            uids.insert(copy.study_uid);
        }
        assert_eq!(uids.len(), studies);
        let config = s.config("get", "");
        let out = work.join("dataset");
        let started = std::time::Instant::now();
        let run = mine_forty_years(&config, &out, &[]);
        let seconds = started.elapsed().as_secs_f64();
        assert_exit(&run, 0);
        let report = stats(&out);
        let q = &report["queries"];
        assert_eq!(report["studies_found"], studies, "limit {limit}: {report}");
        assert_eq!(q["unresolved"], 0, "{q}");
        let queries = q["queries"].as_u64().expect("queries");
        if limit == 0 {
            // One C-FIND for 42 years (not 15,341, one a day).
            assert_eq!(queries, 1, "{q}");
            assert_eq!(q["capped"], 0, "{q}");
        } else {
            // Capped: split until no answer is capped, the crowded day by Study Time.
            assert!(q["capped"].as_u64().unwrap() >= 2, "{q}");
            assert_eq!(q["days_split_by_time"], 1, "{q}");
            assert!(queries < 60, "{q}");
        }
        let text = common::text(&run);
        assert!(
            text.contains(&format!("study queries: {queries} (")),
            "{text}"
        );
        assert!(seconds < 60.0, "{seconds} s");
        eprintln!(
            "limit {limit}: {studies} studies, {queries} study queries, {seconds:.1} s, timing {}: {q}",
            report["timing"]
        );
        if limit == 0 {
            continue;
        }
        // QIDO-RS: Orthanc's DICOMweb plugin under LimitFindResults = 2 answers 3 of the 5
        // studies, with no Warning header; only archive.find_answer_limit tells.
        let config = s.config("dicomweb", "");
        let silent = work.join("dataset-web-silent");
        let run = mine_forty_years(&config, &silent, &[]);
        assert_exit(&run, 0);
        assert_eq!(stats(&silent)["studies_found"], 3, "{}", stats(&silent));
        let web = work.join("dataset-web");
        let run = mine_forty_years(
            &config,
            &web,
            &[("ANATOMY_ARCHIVE__FIND_ANSWER_LIMIT", "2")],
        );
        assert_exit(&run, 0);
        let report = stats(&web);
        assert_eq!(report["studies_found"], studies, "QIDO-RS: {report}");
        assert_eq!(report["queries"]["unresolved"], 0, "{report}");
        eprintln!("QIDO-RS, find_answer_limit 2: {}", report["queries"]);
    }
}

/// Three studies in the same second of one day, an archive that answers two: the range
/// cannot be split further, and the run says so (counted, in the errors, exit 3), never
/// silently.
#[test]
fn a_range_still_capped_in_one_second_is_reported_and_the_exit_code_is_3() {
    let s = Setup::capped(2);
    let work = s.work();
    let base = synthetic(work, 61);
    for i in 0..3 {
        let root = format!("1.2.826.0.1.3680043.10.543.19.9.{i}");
        let copy = restudied(work, &base, &root, "20100505", "101010");
        s.orthanc.upload_all(&copy.files);
    }
    let config = s.config("get", "");
    let out = work.join("dataset");
    let run = mine_forty_years(&config, &out, &[]);
    assert_exit(&run, 3);
    let report = stats(&out);
    assert_eq!(report["queries"]["unresolved"], 1, "{report}");
    assert_eq!(report["studies_found"], 2, "{report}");
    let errors = report["errors"].to_string();
    assert!(
        errors.contains("20100505 101010-101010.999999") && errors.contains("may be missing"),
        "{errors}"
    );
    let text = common::text(&run);
    assert!(text.contains("studies there may be missing"), "{text}");
}

#[test]
fn mining_by_c_get_and_c_move_from_an_archive_with_dicom_tls() {
    let pki = tempfile::tempdir().unwrap();
    let ca = common::pki::Ca::new(pki.path(), "ca");
    let archive = ca.server("archive");
    let miner = ca.client("miner");
    // The C-MOVE destination's certificate; Orthanc checks it against the same CA.
    let mover = ca.server("mover");
    for retrieve in ["get", "move"] {
        let s = Setup::with(
            0,
            Some((archive.cert.clone(), archive.key.clone(), ca.cert.clone())),
        );
        let work = s.work();
        let c = synthetic(work, 11);
        s.orthanc.upload_all(&c.files);
        let document = kos(
            work,
            &[c.instance(0)],
            Note {
                code: Some(LUNG),
                ..Note::default()
            },
        );
        s.orthanc.upload_all(&[document]);
        // [archive.tls] after [mine]: TOML lets sub-tables of [archive] come later.
        let tls = format!(
            "\n[archive.tls]\nenabled = true\nca_file = \"{ca}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             server_name = \"localhost\"\n\n[archive.move_tls]\nenabled = true\ncert = \"{}\"\n\
             key = \"{}\"\nclient_ca = \"{ca}\"\nrequire_client_cert = true\n",
            miner.cert.display(),
            miner.key.display(),
            mover.cert.display(),
            mover.key.display(),
            ca = ca.cert.display(),
        );
        let config = s.config(retrieve, &tls);
        let out = work.join("out-tls");
        let output = mine(&config, &out, &[]);
        assert_exit(&output, 0);
        let (_, rows) = manifest(&out);
        assert!(
            labels(&rows).contains(&expect(&c.sops[0], "lungs", "mined:kos")),
            "{retrieve}: the labelled image mined over TLS: {rows:?}\n{}",
            s.orthanc.log()
        );

        // Without TLS the archive's TLS-only port gives nothing.
        let plain = s.config(retrieve, "");
        let output = mine(&plain, &work.join("out-plain"), &[]);
        assert!(
            !output.status.success(),
            "{retrieve}: plain DICOM to a TLS-only archive fails"
        );
    }
}
