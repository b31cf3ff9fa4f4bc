//! Routing and forwarding against real peers: a series sent with storescu is labelled (a
//! small test model) and its tagged copies reach DCMTK's storescp (the lung CAD AE) and
//! Orthanc; destinations that are down come back and get everything exactly once, also
//! across a kill -9 of the node; refusals become dead letters with their reason while the
//! other destinations carry on; `forward status` and `forward retry`; decompression for a
//! destination that takes only uncompressed transfer syntaxes; configuration errors.

mod common;

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::db::IndexReader;
use common::node::{Node, NodeOptions};
use common::orthanc::{Orthanc, OrthancOptions};
use common::{data, free_port};

const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";

/// A one-class test model: every image is "lungs" with probability 1, so the routes a
/// series takes do not depend on its pixels.
fn lung_model(dir: &Path) -> PathBuf {
    common::models::make(
        dir,
        "lungs",
        &["--size", "64", "--kind", "stats", "--classes", "lungs"],
    )
    .expect("a Python with onnx (tests/run-all.sh makes .venv-tests)")
}

/// Node options with the classifier on and `forwarding` (raw TOML: [forward],
/// [[destinations]], [[routes]]) after the [classifier] section.
fn options(model: &Path, forwarding: &str) -> NodeOptions {
    NodeOptions {
        stable_after_secs: 1,
        classifier: format!(
            "enabled = true\nmodel = \"{}\"\ndevice = \"cpu\"\nkey_images = 8\n\n{forwarding}\n",
            model.display()
        ),
        ..NodeOptions::default()
    }
}

fn destination(name: &str, ae: &str, port: u16) -> String {
    format!(
        "[[destinations]]\nname = \"{name}\"\nae_title = \"{ae}\"\nhost = \"127.0.0.1\"\nport = {port}\n"
    )
}

/// The series to send: the real chest series when ../shared/data/ct is there, else a
/// synthetic one.
fn a_series(work: &Path) -> Vec<PathBuf> {
    if let Some(dir) = data::ct_data() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("elastix-chest/thorax_2mm"))
            .expect("elastix-chest")
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        return files;
    }
    data::synthetic_series(&work.join("synthetic"), 60, 24, 64).1
}

fn sop_uids(files: &[PathBuf]) -> Vec<String> {
    let mut uids: Vec<String> = files
        .iter()
        .map(|f| data::media_storage_sop_instance_uid(f))
        .collect();
    uids.sort();
    uids
}

/// DCMTK storescp as a CAD module: bit-preserving (the files are the bytes on the wire)
/// and unique file names, so a copy received twice shows up twice.
struct Scp {
    port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl Scp {
    fn start(ae: &str, port: u16, extra: &[&str]) -> Scp {
        let dir = tempfile::tempdir().expect("storescp dir");
        let child = Command::new("storescp")
            .env("TCP_NODELAY", "1")
            .args(["+B", "+uf", "-aet", ae])
            .args(extra)
            .arg("-od")
            .arg(dir.path())
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start storescp (apt package dcmtk)");
        assert!(
            common::wait_until(10, || TcpStream::connect(("127.0.0.1", port)).is_ok()),
            "storescp did not start"
        );
        Scp { port, dir, child }
    }

    /// Files received, as (SOP Instance UID, path), one entry per file.
    fn files(&self) -> Vec<(String, PathBuf)> {
        let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(self.dir.path())
            .expect("storescp dir")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .map(|p| (data::media_storage_sop_instance_uid(&p), p))
            .collect();
        out.sort();
        out
    }

    /// How many times each SOP Instance UID arrived.
    fn counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for (uid, _) in self.files() {
            *counts.entry(uid).or_default() += 1;
        }
        counts
    }
}

impl Drop for Scp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// dcmdump with the node's private dictionary (deploy/anatomy-node-private.dic) besides
/// DCMTK's, so the private block has names and VRs in Implicit VR copies too.
fn dcmdump(path: &Path) -> String {
    let dcmtk = std::fs::read_dir("/usr/share")
        .expect("/usr/share")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libdcmtk"))
                && p.join("dicom.dic").is_file()
        })
        .expect("DCMTK's data dictionary (apt package libdcmtk)");
    let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/anatomy-node-private.dic");
    let dictionaries = format!(
        "{}:{}:{}",
        dcmtk.join("dicom.dic").display(),
        dcmtk.join("private.dic").display(),
        ours.display()
    );
    let out = Command::new("dcmdump")
        .args(["+L"])
        .arg(path)
        .env("DCMDICTPATH", dictionaries)
        .output()
        .expect("dcmdump (apt package dcmtk)");
    assert!(out.status.success(), "dcmdump: {}", common::text(&out));
    common::text(&out)
}

fn cli(node: &Node, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_anatomy-node"))
        .args(args)
        .arg("--config")
        .arg(node.dir.path().join("config.toml"))
        .env_remove("RUST_LOG")
        .output()
        .expect("run anatomy-node")
}

fn jobs(index: &IndexReader, destination: &str, state: &str) -> i64 {
    index.count(&format!(
        "SELECT COUNT(*) FROM forward_jobs WHERE destination = '{destination}' AND state = '{state}'"
    ))
}

fn wait_for_jobs(node: &Node, destination: &str, state: &str, n: i64, secs: u64) {
    let index = node.index();
    let ok = common::wait_until(secs, || jobs(&index, destination, state) >= n);
    assert!(
        ok,
        "{destination}: {} of {n} jobs {state} after {secs} s: {:?}",
        jobs(&index, destination, state),
        index.rows(&format!(
            "SELECT state, attempts, last_status, last_error FROM forward_jobs \
             WHERE destination = '{destination}' ORDER BY id LIMIT 5"
        ))
    );
}

#[test]
fn a_labelled_series_reaches_storescp_and_orthanc_as_tagged_copies() {
    let work = tempfile::tempdir().unwrap();
    let model = lung_model(work.path());
    let lung = Scp::start("LUNG_CAD", free_port(), &[]);
    let orthanc = Orthanc::start(OrthancOptions::default());
    let never = free_port();
    let node = Node::start_with(options(
        &model,
        &format!(
            "[forward]\nkey_object_selection = true\n\n{}{}{}\
             [[routes]]\nname = \"lung-cad\"\nclasses = [\"lungs\"]\nmin_probability = 0.5\ndestinations = [\"LUNG_CAD\", \"ORTHANC\"]\n\
             [[routes]]\nname = \"liver-cad\"\nclasses = [\"liver\"]\ndestinations = [\"LIVER_CAD\"]\n",
            destination("LUNG_CAD", "LUNG_CAD", lung.port),
            destination("ORTHANC", "ORTHANC", orthanc.dicom_port),
            destination("LIVER_CAD", "LIVER_CAD", never),
        ),
    ));
    let files = a_series(work.path());
    let n = files.len();
    let out = node.storescu(&[], &files);
    assert!(out.status.success(), "{}", common::text(&out));

    // Every instance plus one Key Object Selection document, to each destination.
    wait_for_jobs(&node, "LUNG_CAD", "done", n as i64 + 1, 60);
    wait_for_jobs(&node, "ORTHANC", "done", n as i64 + 1, 60);
    let index = node.index();
    assert_eq!(
        index.count("SELECT COUNT(*) FROM forward_jobs WHERE destination = 'LIVER_CAD'"),
        0,
        "the liver route does not match a lung series"
    );
    assert_eq!(
        index.rows("SELECT DISTINCT routes FROM forward_jobs WHERE destination = 'LUNG_CAD'"),
        [["lung-cad"]]
    );

    // storescp: each instance exactly once, and the document.
    let counts = lung.counts();
    let mut expected = sop_uids(&files);
    let kos: Vec<String> = counts
        .keys()
        .filter(|u| !expected.contains(u))
        .cloned()
        .collect();
    assert_eq!(kos.len(), 1, "one KOS besides the instances: {kos:?}");
    expected.push(kos[0].clone());
    expected.sort();
    let mut got: Vec<String> = counts.keys().cloned().collect();
    got.sort();
    assert_eq!(got, expected);
    assert!(counts.values().all(|c| *c == 1), "each exactly once");

    // The copies carry the tags; what the node stored does not.
    let key_images: Vec<String> = index
        .rows("SELECT sop_instance_uid FROM key_images")
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    assert_eq!(key_images.len(), 8);
    let files_by_uid: HashMap<String, PathBuf> = lung.files().into_iter().collect();
    let key = &files_by_uid[&key_images[0]];
    let dump = dcmdump(key);
    for expected in [
        "(0018,0015) CS [CHEST]",
        "(0008,2218) SQ",
        "(0008,0100) SH [43799004]",
        "(0008,0102) SH [SCT]",
        "(0008,0104) LO [Chest]",
        "(0099,0010) LO [ANATOMY_NODE 1.0]",
        "(0099,1010) LO [test-stats-64]",
        "(0099,1011) LO [lungs]",
        "(0099,1015) LO [lungs]",
        "(0099,1016) FD 1",
        "(0099,1017) CS [IMAGE]",
        "(0099,1019) LO [SCT:43799004]",
        // names from deploy/anatomy-node-private.dic
        "ModelVersion",
        "ClassProbabilities",
        "ProbabilityScope",
        "RegionCodes",
    ] {
        assert!(dump.contains(expected), "{expected} missing in\n{dump}");
    }
    let other = files_by_uid
        .iter()
        .find(|(uid, _)| !key_images.contains(uid) && !kos.contains(uid))
        .map(|(_, p)| p.clone())
        .expect("a non-key image");
    assert!(dcmdump(&other).contains("(0099,1017) CS [SERIES]"));
    let stored = node
        .stored_files()
        .into_iter()
        .find(|p| data::media_storage_sop_instance_uid(p) == key_images[0])
        .expect("stored file");
    let stored_dump = dcmdump(&stored);
    assert!(
        !stored_dump.contains("ANATOMY_NODE"),
        "the stored original is untouched"
    );
    // Apart from the node's elements, the copy is the stored data set, element for element.
    let strip = |dump: &str| -> Vec<String> {
        dump.lines()
            .filter(|l| l.starts_with('('))
            .filter(|l| {
                !["(0018,0015)", "(0008,2218)", "(0099,", "(0002,"]
                    .iter()
                    .any(|p| l.starts_with(p))
            })
            .map(str::to_string)
            .collect()
    };
    let stored_elements = strip(&stored_dump);
    let copy_elements = strip(&dump);
    assert!(
        copy_elements.len() + 3 >= stored_elements.len(),
        "{stored_elements:?}"
    );
    for line in stored_elements.iter().filter(|l| {
        !l.starts_with("(0008,0100)")
            && !l.starts_with("(0008,0102)")
            && !l.starts_with("(0008,0104)")
    }) {
        assert!(copy_elements.contains(line), "{line} not in the copy");
    }

    // The Key Object Selection document flags the key-images with their labels.
    let kos_dump = dcmdump(&files_by_uid[&kos[0]]);
    assert!(
        kos_dump.contains("=KeyObjectSelectionDocumentStorage"),
        "{kos_dump}"
    );
    assert!(kos_dump.contains("(0008,0060) CS [KO]"));
    assert!(kos_dump.contains("Key Object Description"));
    assert_eq!(
        kos_dump.matches("(0040,a040) CS [IMAGE]").count()
            + kos_dump.matches("(0040,A040) CS [IMAGE]").count(),
        8,
        "one IMAGE item per key-image"
    );
    for uid in &key_images {
        assert!(kos_dump.contains(uid.as_str()));
    }
    assert!(kos_dump.contains(": lungs (p = 1.000"), "{kos_dump}");

    // Orthanc has them all, tagged.
    let in_orthanc = orthanc.instances();
    let mut uids: Vec<String> = in_orthanc.iter().map(|(u, _)| u.clone()).collect();
    uids.sort();
    assert_eq!(uids, expected);
    let (_, id) = in_orthanc
        .iter()
        .find(|(u, _)| u == &key_images[0])
        .expect("key-image in Orthanc");
    let tags = orthanc
        .get(&format!("/instances/{id}/simplified-tags"))
        .expect("tags");
    assert_eq!(tags["BodyPartExamined"], "CHEST");

    let metrics = node.http_get("/metrics").1;
    let sent = format!(
        "anatomy_forwarded_total{{destination=\"LUNG_CAD\"}} {}",
        n + 1
    );
    assert!(metrics.contains(&sent), "{metrics}");
    assert!(common::wait_until(10, || node
        .http_get("/metrics")
        .1
        .contains(
            "anatomy_forward_queue_depth{destination=\"LUNG_CAD\",state=\"pending\"} 0"
        )));

    let status = cli(&node, &["forward", "status"]);
    let text = common::text(&status);
    assert!(status.status.success(), "{text}");
    assert!(text.contains("no dead letters"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("LUNG_CAD"))
        .expect("a LUNG_CAD row");
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[3], (n + 1).to_string(), "done: {row}");
}

#[test]
fn a_destination_down_for_a_while_gets_everything_exactly_once() {
    let work = tempfile::tempdir().unwrap();
    let model = lung_model(work.path());
    let port = free_port();
    let node = Node::start_with(options(
        &model,
        &format!(
            "[forward]\nretry_initial_secs = 1\nretry_max_secs = 2\nmax_attempts = 100\nbatch_size = 16\n\n{}\
             [[routes]]\nclasses = [\"lungs\"]\ndestinations = [\"LUNG_CAD\"]\n",
            destination("LUNG_CAD", "LUNG_CAD", port)
        ),
    ));
    let files = a_series(work.path());
    assert!(node.storescu(&[], &files).status.success());
    let index = node.index();
    let tried = common::wait_until(30, || {
        index.count(
            "SELECT COUNT(*) FROM forward_jobs WHERE attempts >= 2 AND state = 'pending' \
             AND last_error LIKE '%cannot connect%'",
        ) > 0
    });
    assert!(
        tried,
        "retries while down: {:?}",
        index.rows("SELECT state, attempts, last_error FROM forward_jobs LIMIT 3")
    );
    assert_eq!(jobs(&index, "LUNG_CAD", "dead"), 0);

    let scp = Scp::start("LUNG_CAD", port, &[]);
    wait_for_jobs(&node, "LUNG_CAD", "done", files.len() as i64, 60);
    let counts = scp.counts();
    let mut got: Vec<String> = counts.keys().cloned().collect();
    got.sort();
    assert_eq!(got, sop_uids(&files), "nothing lost");
    assert!(
        counts.values().all(|c| *c == 1),
        "nothing twice: {counts:?}"
    );
    let metrics = node.http_get("/metrics").1;
    assert!(
        metrics.contains("anatomy_forward_failures_total{destination=\"LUNG_CAD\"}"),
        "{metrics}"
    );
}

#[test]
fn pending_jobs_survive_a_kill_9_of_the_node() {
    let work = tempfile::tempdir().unwrap();
    let model = lung_model(work.path());
    let port = free_port();
    let mut node = Node::start_with(options(
        &model,
        &format!(
            "[forward]\nretry_initial_secs = 1\nretry_max_secs = 2\nmax_attempts = 100\nclaim_timeout_secs = 5\n\n{}\
             [[routes]]\nclasses = [\"lungs\"]\ndestinations = [\"LUNG_CAD\"]\n",
            destination("LUNG_CAD", "LUNG_CAD", port)
        ),
    ));
    let files = a_series(work.path());
    assert!(node.storescu(&[], &files).status.success());
    {
        let index = node.index();
        let queued = common::wait_until(30, || {
            index.count(
                "SELECT COUNT(*) FROM forward_jobs WHERE state = 'pending' AND attempts >= 1",
            ) > 0
        });
        assert!(queued, "jobs waiting for the destination");
        assert_eq!(
            index.count("SELECT COUNT(*) FROM forward_jobs"),
            files.len() as i64
        );
    }
    node.kill9();
    let scp = Scp::start("LUNG_CAD", port, &[]);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        scp.files().is_empty(),
        "nothing sent while the node is down"
    );
    node.spawn();
    wait_for_jobs(&node, "LUNG_CAD", "done", files.len() as i64, 60);
    let counts = scp.counts();
    let mut got: Vec<String> = counts.keys().cloned().collect();
    got.sort();
    assert_eq!(got, sop_uids(&files), "nothing lost");
    assert!(
        counts.values().all(|c| *c == 1),
        "nothing twice: {counts:?}"
    );
    assert_eq!(
        node.index().count("SELECT COUNT(*) FROM forward_jobs"),
        files.len() as i64,
        "the restart created no second set of jobs"
    );
}

/// A storescp configuration that accepts only MR images (so it refuses CT), or CT only in
/// uncompressed transfer syntaxes.
fn scp_profile(dir: &Path, contexts: &str) -> PathBuf {
    let path = dir.join("storescp.cfg");
    std::fs::write(
        &path,
        format!(
            "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LocalEndianExplicit\n\
             TransferSyntax2 = LittleEndianImplicit\n\n[[PresentationContexts]]\n[Contexts]\n{contexts}\n\
             [[Profiles]]\n[Default]\nPresentationContexts = Contexts\n"
        ),
    )
    .expect("storescp.cfg");
    path
}

#[test]
fn refusals_become_dead_letters_with_the_reason_and_the_others_carry_on() {
    let work = tempfile::tempdir().unwrap();
    let model = lung_model(work.path());
    let good = Scp::start("GOOD_CAD", free_port(), &[]);
    let mr_only = scp_profile(
        work.path(),
        "PresentationContext1 = MRImageStorage\\Uncompressed\n",
    );
    let no_ct_port = free_port();
    let no_ct = Scp::start(
        "NO_CT",
        no_ct_port,
        &["-xf", mr_only.to_str().unwrap(), "Default"],
    );
    let orthanc = Orthanc::start(OrthancOptions::default());
    // Accepts connections and never answers: a hung destination.
    let hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_port = hole.local_addr().unwrap().port();
    let node = Node::start_with(options(
        &model,
        &format!(
            "[forward]\nconnect_timeout_secs = 60\n\n{}{}{}{}\
             [[routes]]\nclasses = [\"lungs\"]\ndestinations = [\"GOOD_CAD\", \"NO_CT\", \"BAD_AE\", \"HUNG\"]\n",
            destination("GOOD_CAD", "GOOD_CAD", good.port),
            destination("NO_CT", "NO_CT", no_ct.port),
            destination("BAD_AE", "NOT_ORTHANC", orthanc.dicom_port),
            destination("HUNG", "HUNG", hole_port),
        ),
    ));
    let files = a_series(work.path());
    let n = files.len() as i64;
    assert!(node.storescu(&[], &files).status.success());

    wait_for_jobs(&node, "GOOD_CAD", "done", n, 60);
    wait_for_jobs(&node, "NO_CT", "dead", n, 30);
    wait_for_jobs(&node, "BAD_AE", "dead", n, 30);
    let index = node.index();
    assert!(
        jobs(&index, "HUNG", "sending") > 0,
        "the hung destination is still waiting, and held up nobody"
    );
    assert_eq!(good.counts().len() as i64, n);
    assert!(no_ct.files().is_empty());
    assert!(orthanc.instances().is_empty());
    let reasons = |d: &str| -> Vec<Vec<String>> {
        index.rows(&format!(
            "SELECT DISTINCT attempts, last_error FROM forward_jobs WHERE destination = '{d}'"
        ))
    };
    let no_ct_reasons = reasons("NO_CT");
    assert_eq!(no_ct_reasons.len(), 1, "{no_ct_reasons:?}");
    assert_eq!(no_ct_reasons[0][0], "1", "dead at once, not retried");
    assert!(
        no_ct_reasons[0][1].contains("accepted none of the proposed presentation contexts")
            && no_ct_reasons[0][1].contains("CT Image Storage"),
        "{no_ct_reasons:?}"
    );
    let bad_ae = reasons("BAD_AE");
    assert!(
        bad_ae[0][1].contains("association rejected (permanent): called AE title not recognized"),
        "{bad_ae:?}"
    );

    let status = cli(&node, &["forward", "status", "--limit", "1000"]);
    let text = common::text(&status);
    assert!(status.status.success(), "{text}");
    for d in ["GOOD_CAD", "NO_CT", "BAD_AE", "HUNG"] {
        assert!(text.lines().any(|l| l.starts_with(d)), "{d} row in\n{text}");
    }
    assert!(text.contains("called AE title not recognized"), "{text}");
    assert!(text.contains("NO_CT  instance"), "{text}");
    let json = cli(
        &node,
        &["forward", "status", "--json", "--destination", "NO_CT"],
    );
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("forward status --json");
    let no_ct_row = v["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["destination"] == "NO_CT")
        .expect("NO_CT");
    assert_eq!(no_ct_row["dead"], n);
    assert!(v["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["destination"] == "NO_CT"));
    let metrics = node.http_get("/metrics").1;
    assert!(
        metrics.contains(&format!(
            "anatomy_forward_dead_letters_total{{destination=\"BAD_AE\"}} {n}"
        )),
        "{metrics}"
    );

    // The CAD module is fixed (it takes CT now); its dead letters go back and arrive.
    drop(no_ct);
    let fixed = Scp::start("NO_CT", no_ct_port, &[]);
    let retry = cli(&node, &["forward", "retry", "--destination", "NO_CT"]);
    assert!(retry.status.success(), "{}", common::text(&retry));
    assert!(
        common::text(&retry).contains(&format!("{n} dead letters of NO_CT back in the queue")),
        "{}",
        common::text(&retry)
    );
    wait_for_jobs(&node, "NO_CT", "done", n, 30);
    assert_eq!(fixed.counts().len() as i64, n);
    assert_eq!(jobs(&index, "BAD_AE", "dead"), n, "others stay dead");
    drop(hole);
}

#[test]
fn compressed_series_is_decompressed_only_for_a_destination_that_needs_it() {
    let work = tempfile::tempdir().unwrap();
    let model = lung_model(work.path());
    let (_, plain) = data::synthetic_series(&work.path().join("plain"), 61, 6, 64);
    let rle: Vec<PathBuf> = plain
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let dst = work.path().join(format!("rle{i}.dcm"));
            data::dcmtk_convert("dcmcrle", &[], f, &dst);
            dst
        })
        .collect();
    let uncompressed_only = scp_profile(
        work.path(),
        "PresentationContext1 = CTImageStorage\\Uncompressed\n",
    );
    let plain_cad = Scp::start(
        "PLAIN_CAD",
        free_port(),
        &["-xf", uncompressed_only.to_str().unwrap(), "Default"],
    );
    let any_cad = Scp::start("ANY_CAD", free_port(), &["+xa"]);
    let node = Node::start_with(options(
        &model,
        &format!(
            "{}{}[[routes]]\nclasses = [\"lungs\"]\ndestinations = [\"PLAIN_CAD\", \"ANY_CAD\"]\n",
            destination("PLAIN_CAD", "PLAIN_CAD", plain_cad.port),
            destination("ANY_CAD", "ANY_CAD", any_cad.port),
        ),
    ));
    let out = node.storescu(&["-R", "-xr"], &rle);
    assert!(out.status.success(), "{}", common::text(&out));
    wait_for_jobs(&node, "PLAIN_CAD", "done", 6, 60);
    wait_for_jobs(&node, "ANY_CAD", "done", 6, 60);

    let originals: HashMap<String, &PathBuf> = plain
        .iter()
        .map(|p| (data::media_storage_sop_instance_uid(p), p))
        .collect();
    for (uid, path) in plain_cad.files() {
        let ts = data::transfer_syntax(&path);
        assert!(
            ts == "1.2.840.10008.1.2.1" || ts == "1.2.840.10008.1.2",
            "uncompressed for PLAIN_CAD: {ts}"
        );
        // Lossless: the decoded pixels are the original ones.
        let pixels = |p: &Path| {
            dicom_object::open_file(p)
                .unwrap()
                .element(dicom_dictionary_std::tags::PIXEL_DATA)
                .unwrap()
                .to_bytes()
                .unwrap()
                .to_vec()
        };
        assert_eq!(pixels(&path), pixels(originals[&uid]), "{uid}");
        assert!(dcmdump(&path).contains("(0018,0015) CS [CHEST]"));
    }
    for (_, path) in any_cad.files() {
        assert_eq!(
            data::transfer_syntax(&path),
            "1.2.840.10008.1.2.5",
            "sent as stored (RLE) where accepted"
        );
        assert!(dcmdump(&path).contains("(0099,0010) LO [ANATOMY_NODE 1.0]"));
    }
    assert_eq!(data::sop_class(&any_cad.files()[0].1), CT_IMAGE_STORAGE);
}

#[test]
fn forwarding_configuration_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[[routes]]\nclasses = [\"lungs\"]\ndestinations = [\"LUNG_CAD\"]\n",
            "routes[0].destinations: \"LUNG_CAD\" is not the name of a destination",
        ),
        (
            "[[destinations]]\nname = \"A\"\nae_title = \"THIS_TITLE_IS_TOO_LONG\"\nhost = \"h\"\nport = 104\n",
            "destinations[0].ae_title",
        ),
        (
            "[[destinations]]\nname = \"A\"\nae_title = \"A\"\nhost = \"h\"\nport = 104\n\
             [[routes]]\nclasses = [\"lungs\"]\nmin_probability = 2.0\ndestinations = [\"A\"]\n",
            "routes[0].min_probability must be between 0 and 1",
        ),
        (
            "[[destinations]]\nname = \"A\"\nae_title = \"A\"\nhost = \"h\"\nport = 104\n\
             [[routes]]\nbody_parts = [\"THORAX\"]\ndestinations = [\"A\"]\n",
            "routes[0].body_parts: \"THORAX\" is not a Body Part Examined term",
        ),
        (
            "[forward]\nmax_attempts = 0\n",
            "forward.max_attempts must be at least 1",
        ),
        (
            "[[destinations]]\nname = \"A\"\nae_title = \"A\"\nhost = \"h\"\nport = 104\nretries = 3\n",
            "unknown field `retries`",
        ),
        (
            "[[destinations]]\nname = \"A\"\nae_title = \"A\"\nhost = \"h\"\nport = 2762\n\
             [destinations.tls]\nenabled = true\n",
            "destinations[0].tls.ca_file is required",
        ),
    ];
    for (toml, expected) in cases {
        let config = dir.path().join("bad.toml");
        std::fs::write(
            &config,
            format!("[storage]\npath = \"{}\"\n{toml}", dir.path().display()),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_anatomy-node"))
            .args(["forward", "status", "--config"])
            .arg(&config)
            .output()
            .expect("run anatomy-node");
        assert!(!out.status.success(), "{toml} accepted");
        assert!(
            common::text(&out).contains(expected),
            "{expected:?} not in {}",
            common::text(&out)
        );
    }
}

#[test]
fn nodes_sharing_one_postgresql_forward_each_instance_once() {
    if common::db::postgres_admin_url().is_none() {
        eprintln!("nodes_sharing_one_postgresql_forward_each_instance_once: PostgreSQL only (set ANATOMY_TEST_DATABASE_URL)");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let model = lung_model(work.path());
    let scp = Scp::start("LUNG_CAD", free_port(), &[]);
    let db = std::sync::Arc::new(common::db::TestDb::create());
    let storage = work.path().join("shared-storage");
    let forwarding = format!(
        "[forward]\nbatch_size = 4\n\n{}[[routes]]\nclasses = [\"lungs\"]\ndestinations = [\"LUNG_CAD\"]\n",
        destination("LUNG_CAD", "LUNG_CAD", scp.port)
    );
    let nodes: Vec<Node> = (0..3)
        .map(|_| {
            Node::start_sharing(
                NodeOptions {
                    storage: Some(storage.clone()),
                    ..options(&model, &forwarding)
                },
                db.clone(),
            )
        })
        .collect();
    let mut all = Vec::new();
    for s in 0..3u32 {
        let (_, files) = data::synthetic_series(&work.path().join(format!("s{s}")), 70 + s, 12, 32);
        assert!(nodes[s as usize].storescu(&[], &files).status.success());
        all.extend(files);
    }
    wait_for_jobs(&nodes[0], "LUNG_CAD", "done", all.len() as i64, 60);
    std::thread::sleep(Duration::from_secs(2));
    let index = nodes[0].index();
    assert_eq!(
        index.count("SELECT COUNT(*) FROM forward_jobs"),
        all.len() as i64,
        "each label routed once"
    );
    let counts = scp.counts();
    let mut got: Vec<String> = counts.keys().cloned().collect();
    got.sort();
    assert_eq!(got, sop_uids(&all));
    assert!(
        counts.values().all(|c| *c == 1),
        "nothing twice: {counts:?}"
    );
    let senders = index.count("SELECT COUNT(DISTINCT claimed_by) FROM forward_jobs");
    eprintln!("jobs sent by {senders} nodes");
}

#[test]
fn a_large_instance_is_streamed_from_disk_to_the_destination() {
    let work = tempfile::tempdir().unwrap();
    let model = lung_model(work.path());
    let scp = Scp::start("LUNG_CAD", free_port(), &[]);
    let node = Node::start_with(options(
        &model,
        &format!(
            "{}[[routes]]\nclasses = [\"lungs\"]\ndestinations = [\"LUNG_CAD\"]\n",
            destination("LUNG_CAD", "LUNG_CAD", scp.port)
        ),
    ));
    // Two 2300 × 2300 16-bit slices: about 10.6 MB each, above what is read into memory.
    let (_, files) = data::synthetic_series(&work.path().join("big"), 62, 2, 2300);
    assert!(node.storescu(&[], &files).status.success());
    wait_for_jobs(&node, "LUNG_CAD", "done", 2, 60);
    let pixels = |p: &Path| {
        dicom_object::open_file(p)
            .unwrap()
            .element(dicom_dictionary_std::tags::PIXEL_DATA)
            .unwrap()
            .to_bytes()
            .unwrap()
            .to_vec()
    };
    let originals: HashMap<String, &PathBuf> = files
        .iter()
        .map(|p| (data::media_storage_sop_instance_uid(p), p))
        .collect();
    let received = scp.files();
    assert_eq!(received.len(), 2);
    for (uid, path) in received {
        assert_eq!(pixels(&path), pixels(originals[&uid]), "{uid}");
        assert!(dcmdump(&path).contains("(0018,0015) CS [CHEST]"));
    }
}

#[test]
fn a_tls_destination_gets_every_instance_over_mutual_tls() {
    let work = tempfile::tempdir().unwrap();
    let model = lung_model(work.path());
    let ca = common::pki::Ca::new(work.path(), "ca");
    let cad = ca.server("cad");
    let node_cert = ca.client("anatomy");
    let path = |p: &Path| p.display().to_string();
    // storescp requires and verifies our client certificate (-rc is its default).
    let scp = Scp::start(
        "TLS_CAD",
        free_port(),
        &[
            "+tls",
            &path(&cad.key),
            &path(&cad.cert),
            "+cf",
            &path(&ca.cert),
        ],
    );
    let node = Node::start_with(options(
        &model,
        &format!(
            "{}[destinations.tls]\nenabled = true\nca_file = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             server_name = \"localhost\"\n\n[[routes]]\nclasses = [\"lungs\"]\ndestinations = [\"TLS_CAD\"]\n",
            destination("TLS_CAD", "TLS_CAD", scp.port),
            path(&ca.cert),
            path(&node_cert.cert),
            path(&node_cert.key),
        ),
    ));
    let (_, files) = data::synthetic_series(&work.path().join("s"), 63, 6, 64);
    assert!(node.storescu(&[], &files).status.success());
    wait_for_jobs(&node, "TLS_CAD", "done", files.len() as i64, 60);
    let counts = scp.counts();
    for uid in sop_uids(&files) {
        assert_eq!(counts.get(&uid), Some(&1), "{uid} arrived once over TLS");
    }
}

/// The last fragment of a copy waits for its gate (issue #18): the forward worker commits
/// the previous copy's outcome there, so a destination never has a copy complete before its
/// predecessor's outcome is recorded; a gate that fails sends nothing more of the copy.
#[test]
fn a_copy_is_not_complete_at_the_destination_before_its_gate_opens() {
    use anatomy_node::forward::scu::{self, Association, Payload, Peer, ScuError, Timeouts};

    let work = tempfile::tempdir().unwrap();
    let (_, files) = data::synthetic_series(&work.path().join("s"), 77, 2, 256);
    let scp_dir = work.path().join("scp");
    std::fs::create_dir_all(&scp_dir).unwrap();
    let port = free_port();
    // Without +B storescp keeps a data set in memory until its last fragment, then writes.
    let mut scp = Command::new("storescp")
        .env("TCP_NODELAY", "1")
        .args(["-aet", "CAD", "-od"])
        .arg(&scp_dir)
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("storescp (apt package dcmtk)");
    assert!(
        common::wait_until(10, || TcpStream::connect(("127.0.0.1", port)).is_ok()),
        "storescp did not start"
    );
    let class = data::sop_class(&files[0]);
    let ts = data::transfer_syntax(&files[0]);
    let payload = |f: &PathBuf| Payload {
        head: data::dataset_bytes(f),
        tail: None,
    };
    let uids: Vec<String> = files
        .iter()
        .map(|f| data::media_storage_sop_instance_uid(f))
        .collect();
    common::runtime().block_on(async {
        let peer = Peer {
            ae_title: "CAD".into(),
            host: "127.0.0.1".into(),
            port,
            calling_ae_title: "ANATOMY".into(),
            tls: Default::default(),
        };
        let timeouts = Timeouts {
            connect: Duration::from_secs(5),
            dimse: Duration::from_secs(10),
        };
        let proposals = scu::proposals(&[(class.clone(), ts.clone())]);
        let mut assoc = Association::open(&peer, &proposals, 65_536, timeouts)
            .await
            .expect("association with storescp");
        let context = assoc.choose(&class, &ts).expect("context accepted").id;

        // A gate that opens after 500 ms: nothing is complete at the destination before.
        let dir = scp_dir.clone();
        let gate = async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            match common::files_under(&dir).len() {
                0 => Ok(()),
                n => Err(format!(
                    "{n} files at the destination before the gate opened"
                )),
            }
        };
        let rsp = assoc
            .store_gated(context, &class, &uids[0], payload(&files[0]), gate)
            .await
            .expect("stored once the gate opened");
        assert_eq!(rsp.status, 0);

        // A gate that fails: the copy is held back, its last fragment never sent.
        let err = assoc
            .store_gated(context, &class, &uids[1], payload(&files[1]), async {
                Err("the index cannot record the previous outcome".to_string())
            })
            .await
            .expect_err("held back");
        assert!(matches!(err, ScuError::Held(_)), "{err}");
        assoc.abort().await;
    });
    std::thread::sleep(Duration::from_millis(500));
    let stored: Vec<String> = common::files_under(&scp_dir)
        .iter()
        .map(|p| data::media_storage_sop_instance_uid(p))
        .collect();
    let _ = scp.kill();
    let _ = scp.wait();
    assert_eq!(
        stored,
        vec![uids[0].clone()],
        "only the copy whose gate opened"
    );
}
