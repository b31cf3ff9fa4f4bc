//! Receiving: a PACS administrator's view. DCMTK sends real CT series; every image lands
//! byte for byte, indexed once, in every transfer syntax the node accepts.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;

use common::data::{self, dataset_bytes};
use common::node::Node;
use common::scu::Scu;
use common::StoreScp;
use dicom_dictionary_std::tags;

#[test]
fn echoscu_succeeds() {
    let node = Node::start();
    let out = node.echoscu("ECHOSCU", "ANATOMY");
    assert!(out.status.success(), "{}", common::text(&out));
}

/// Files whose SOP Class UID DCMTK cannot read (every element VR UN): storescu refuses
/// them ("missing SOP class"), so the raw SCU sends them, exactly as stored.
fn dcmtk_cannot_send(path: &std::path::Path) -> bool {
    dicom_object::open_file(path)
        .ok()
        .and_then(|o| {
            o.element(tags::SOP_CLASS_UID)
                .ok()
                .map(|e| e.vr() == dicom_core::VR::UN)
        })
        .unwrap_or(false)
}

/// Send files with storescu, one run per transfer syntax so nothing is transcoded, to the
/// node and to the bit-preserving reference storescp (files storescu cannot propose, and
/// files it cannot parse, go through the raw SCU as they are). Returns the reference files.
fn send_files(node: &Node, files: &[PathBuf]) -> HashMap<String, PathBuf> {
    let reference = StoreScp::start("ANATOMY");
    for (ts, group) in data::by_transfer_syntax(files) {
        let flags = data::storescu_flags_for(&ts);
        let (raw, dcmtk): (Vec<PathBuf>, Vec<PathBuf>) = group
            .into_iter()
            .partition(|f| flags.is_none() || dcmtk_cannot_send(f));
        for file in &raw {
            send_raw(node, file);
        }
        let Some(flags) = flags else { continue };
        if dcmtk.is_empty() {
            continue;
        }
        let group = dcmtk;
        for port in [node.dicom_port, reference.port] {
            let out = storescu(port, flags, &group);
            let log = common::text(&out);
            assert!(
                out.status.success(),
                "storescu ({ts}, {} files) failed:\n{log}",
                group.len()
            );
            assert!(
                !log.contains("E: "),
                "storescu reported errors ({ts}):\n{log}"
            );
        }
    }
    let received = reference.received();
    // keep the reference files beyond the storescp process
    let keep = tempfile::tempdir().unwrap().keep();
    received
        .into_iter()
        .map(|(uid, p)| {
            let dst = keep.join(p.file_name().unwrap());
            std::fs::copy(&p, &dst).unwrap();
            (uid, dst)
        })
        .collect()
}

/// C-STORE a file's data set exactly as it is in the file.
fn send_raw(node: &Node, file: &std::path::Path) {
    let ts = data::transfer_syntax(file);
    let class = data::sop_class(file);
    let uid = data::media_storage_sop_instance_uid(file);
    let mut scu = Scu::connect(node.dicom_port, "TESTSCU", &[(&class, &ts)]).expect("association");
    let r = scu.store(&ts, &class, &uid, &dataset_bytes(file));
    assert_eq!(r.status, 0, "{}: {:?}", file.display(), r);
    scu.release();
}

fn storescu(port: u16, flags: &[&str], files: &[PathBuf]) -> std::process::Output {
    let port = port.to_string();
    let mut args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    args.extend(["-aec".into(), "ANATOMY".into(), "127.0.0.1".into(), port]);
    args.extend(files.iter().map(|p| p.display().to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    common::dcmtk("storescu", &refs)
}

/// Assert that every file is in the index once, stored with exactly the data set bytes
/// that were sent: those DCMTK's bit-preserving storescp recorded from the same storescu
/// run (`reference`), or the file itself where it was sent by the raw SCU.
fn assert_stored_identically(
    node: &Node,
    files: &[(PathBuf, String)],
    reference: &HashMap<String, PathBuf>,
) {
    let index = node.index();
    let mut same_as_source = 0;
    for (file, sop_uid) in files {
        let rows = index.rows(&format!(
            "SELECT file_path, transfer_syntax_uid FROM instances WHERE sop_instance_uid = '{sop_uid}'"
        ));
        assert_eq!(
            rows.len(),
            1,
            "{} ({sop_uid}) not indexed once",
            file.display()
        );
        let stored = node.storage().join(&rows[0][0]);
        assert_eq!(
            rows[0][1],
            data::transfer_syntax(file),
            "{}: transfer syntax changed",
            file.display()
        );
        let stored_bytes = dataset_bytes(&stored);
        let sent = reference.get(sop_uid).unwrap_or(file);
        assert!(
            stored_bytes == dataset_bytes(sent),
            "{}: stored data set differs from what was sent ({})",
            file.display(),
            sent.display()
        );
        if stored_bytes == dataset_bytes(file) {
            same_as_source += 1;
        }
    }
    eprintln!(
        "{} of {} stored data sets are byte-identical to their source file; the rest were re-encoded by storescu itself",
        same_as_source,
        files.len()
    );
    let total = index.count("SELECT COUNT(*) FROM instances");
    assert_eq!(total as usize, files.len(), "index rows");
    assert_eq!(node.stored_files().len(), files.len(), "stored files");
}

#[test]
fn every_real_series_lands_byte_identical() {
    let Some(dir) = data::ct_data() else {
        eprintln!("every_real_series_lands_byte_identical: covered by every_transfer_syntax_lands_byte_identical on synthetic series");
        return;
    };
    let rows = data::labels(&dir);
    let uids: HashSet<&str> = rows.iter().map(|r| r.sop_uid.as_str()).collect();
    assert_eq!(
        uids.len(),
        rows.len(),
        "labels.csv lists each instance once"
    );
    let node = Node::start();
    let files: Vec<PathBuf> = rows.iter().map(|r| r.file.clone()).collect();
    let reference = send_files(&node, &files);
    let raw = files.len() - reference.len();
    let expected: Vec<(PathBuf, String)> = rows
        .iter()
        .map(|r| (r.file.clone(), r.sop_uid.clone()))
        .collect();
    assert_stored_identically(&node, &expected, &reference);
    let index = node.index();
    let studies = rows
        .iter()
        .map(|r| r.study_uid.as_str())
        .collect::<HashSet<_>>()
        .len();
    let series = rows
        .iter()
        .map(|r| r.series_uid.as_str())
        .collect::<HashSet<_>>()
        .len();
    assert_eq!(
        index.count("SELECT COUNT(*) FROM studies") as usize,
        studies
    );
    assert_eq!(index.count("SELECT COUNT(*) FROM series") as usize, series);
    eprintln!(
        "stored {} real instances ({} via the raw SCU) of {series} series on {}",
        rows.len(),
        raw,
        node.db.label()
    );
}

/// The node accepts and stores, unchanged, every transfer syntax it negotiates; the
/// compressed copies are made here with DCMTK from a synthetic series.
#[test]
fn every_transfer_syntax_lands_byte_identical() {
    let work = tempfile::tempdir().unwrap();
    let (_, sixteen) = data::synthetic_series(&work.path().join("s16"), 1, 4, 64);
    let mut twelve_spec = anatomy_node::synth::SeriesSpec::new(2, 2, 64);
    twelve_spec.bits_stored = 12;
    let twelve = write(&work.path().join("s12"), &twelve_spec);
    let mut eight_spec = anatomy_node::synth::SeriesSpec::new(3, 2, 64);
    eight_spec.bits_stored = 8;
    let eight = write(&work.path().join("s8"), &eight_spec);

    let variants: &[(&str, &[&str], &[PathBuf], &str)] = &[
        ("dcmconv", &["+ti"], &sixteen, "1.2.840.10008.1.2"),
        ("dcmconv", &["+te"], &sixteen, "1.2.840.10008.1.2.1"),
        ("dcmconv", &["+td"], &sixteen, "1.2.840.10008.1.2.1.99"),
        ("dcmcrle", &[], &sixteen, "1.2.840.10008.1.2.5"),
        ("dcmcjpeg", &["+e1"], &sixteen, "1.2.840.10008.1.2.4.70"),
        ("dcmcjpeg", &["+el"], &sixteen, "1.2.840.10008.1.2.4.57"),
        ("dcmcjpls", &["+el"], &sixteen, "1.2.840.10008.1.2.4.80"),
        ("dcmcjpls", &["+en"], &twelve, "1.2.840.10008.1.2.4.81"),
        ("dcmcjpeg", &["+ee"], &twelve, "1.2.840.10008.1.2.4.51"),
        ("dcmcjpeg", &["+eb"], &eight, "1.2.840.10008.1.2.4.50"),
    ];
    let mut files = Vec::new();
    for (i, (tool, flags, sources, ts)) in variants.iter().enumerate() {
        for (j, src) in sources.iter().enumerate() {
            let dst = work.path().join(format!("v{i}-{j}.dcm"));
            data::dcmtk_convert(tool, flags, src, &dst);
            // new SOP Instance UIDs, so every variant is its own instance
            let out = common::dcmtk(
                "dcmodify",
                &[
                    "-nb",
                    "-m",
                    &format!("(0008,0018)={}.{i}.{j}", "2.25.4242"),
                    dst.to_str().unwrap(),
                ],
            );
            assert!(out.status.success(), "{}", common::text(&out));
            assert_eq!(&data::transfer_syntax(&dst), ts, "{tool} {flags:?}");
            files.push(dst);
        }
    }
    let node = Node::start();
    let reference = send_files(&node, &files);
    let expected: Vec<(PathBuf, String)> = files
        .iter()
        .map(|f| {
            let o = dicom_object::open_file(f).unwrap();
            (
                f.clone(),
                o.element(tags::SOP_INSTANCE_UID)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    assert_stored_identically(&node, &expected, &reference);
}

fn write(dir: &std::path::Path, spec: &anatomy_node::synth::SeriesSpec) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    anatomy_node::synth::write_series(dir, spec).unwrap()
}

#[test]
fn four_storescu_processes_at_once_lose_nothing() {
    let work = tempfile::tempdir().unwrap();
    let node = Node::start();
    let mut all = Vec::new();
    let mut children = Vec::new();
    for n in 0..4u32 {
        let (spec, files) =
            data::synthetic_series(&work.path().join(format!("s{n}")), 10 + n, 40, 128);
        all.extend(
            files
                .iter()
                .enumerate()
                .map(|(i, f)| (f.clone(), spec.sop_uid(i as u32))),
        );
        let port = node.dicom_port.to_string();
        children.push(std::thread::spawn(move || {
            Command::new("storescu")
                .env("TCP_NODELAY", "1")
                .args(["-aec", "ANATOMY", "127.0.0.1", &port])
                .args(&files)
                .output()
        }));
    }
    for child in children {
        let out = child.join().unwrap().expect("storescu ran");
        assert!(out.status.success(), "{}", common::text(&out));
    }
    assert_stored_identically(&node, &all, &HashMap::new());
    assert_eq!(node.index().count("SELECT COUNT(*) FROM series"), 4);
}
