//! `anatomy-node dataset build`: the folder it writes follows docs/contracts.md, its images
//! hold the HU `anatomy::pixels` computes, and no patient is in two splits. Runs on
//! synthetic series everywhere, and on a subset of the real data when it is present.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use anatomy_node::anatomy::pixels::{hu_frames, preprocess, Framing, Preprocessing};
use anatomy_node::dataset::{
    build, patient_key, read_png_hu, BuildOptions, DatasetError, SplitRatios, LABELS,
};
use anatomy_node::synth::{write_series, SeriesSpec};

const MANIFEST_HEADER: &str =
    "image,patient_key,study_uid,series_uid,sop_instance_uid,z_mm,label,label_source,split";
const LABELS_HEADER: &str =
    "case_id,study_uid,series_uid,sop_instance_uid,file,instance_number,z_mm,label,label_basis";

fn options(from: &Path, labels: &Path, out: &Path, size: usize) -> BuildOptions {
    BuildOptions {
        from: from.to_path_buf(),
        labels: labels.to_path_buf(),
        out: out.to_path_buf(),
        size,
        field_of_view_mm: None,
        framing: Framing::Whole,
        ratios: SplitRatios::default(),
        seed: 7,
        threads: Some(2),
    }
}

/// 12 synthetic patients of 3 slices each, labelled round the label list, plus three rows
/// that must be skipped: a missing file, a corrupt file and an unknown label.
fn synthetic_source(dir: &Path) -> PathBuf {
    let mut lines = vec![LABELS_HEADER.to_string()];
    for patient in 0..12u32 {
        let mut spec = SeriesSpec::new(patient + 1, 3, 48);
        spec.patient_id = format!("case-{patient}");
        let folder = dir.join(format!("case-{patient}"));
        std::fs::create_dir_all(&folder).expect("mkdir");
        write_series(&folder, &spec).expect("synthetic series");
        for slice in 0..3 {
            let label = LABELS[(patient as usize + slice as usize) % LABELS.len()];
            lines.push(format!(
                "case-{patient},{},{},{},case-{patient}/slice{:04}.dcm,{},{:.2},{label},mask",
                spec.study_uid(),
                spec.series_uid(),
                spec.sop_uid(slice),
                slice + 1,
                slice + 1,
                -2.5 * f64::from(slice),
            ));
        }
    }
    std::fs::write(dir.join("corrupt.dcm"), b"DICM? no, garbage").expect("write");
    lines.push("case-x,1.2,1.3,1.4.1,missing/file.dcm,1,0,lungs,mask".into());
    lines.push("case-x,1.2,1.3,1.4.2,corrupt.dcm,2,0,lungs,mask".into());
    lines.push("case-x,1.2,1.3,1.4.3,case-0/slice0001.dcm,3,0,spleen,mask".into());
    let labels = dir.join("labels.csv");
    std::fs::write(&labels, lines.join("\n") + "\n").expect("labels");
    labels
}

fn read_csv(path: &Path) -> Vec<HashMap<String, String>> {
    csv::Reader::from_path(path)
        .expect("csv")
        .deserialize()
        .map(|r| r.expect("row"))
        .collect()
}

/// Every manifest image equals the model input of its source file, HU rounded.
fn assert_images_hold_model_input(out: &Path, from: &Path, labels: &Path, size: usize) {
    assert_images_hold(out, from, labels, &Preprocessing::new(size));
}

fn assert_images_hold(out: &Path, from: &Path, labels: &Path, preprocessing: &Preprocessing) {
    let size = preprocessing.size;
    let sources: HashMap<String, String> = read_csv(labels)
        .into_iter()
        .map(|r| (r["sop_instance_uid"].clone(), r["file"].clone()))
        .collect();
    for row in read_csv(&out.join("manifest.csv")) {
        let source = from.join(&sources[&row["sop_instance_uid"]]);
        let frames = hu_frames(&source).expect("source decodes");
        let expected: Vec<i32> = preprocess(&frames[0], preprocessing)
            .iter()
            .map(|v| (v.round() as i32).clamp(-32768, 32767))
            .collect();
        let (rows, columns, hu) = read_png_hu(&out.join(&row["image"])).expect("png");
        assert_eq!((rows, columns), (size, size), "{}", row["image"]);
        assert!(
            hu == expected,
            "{}: HU differ from the model input",
            row["image"]
        );
    }
}

/// No patient_key in two splits, and every split is one of the contract's.
fn assert_splits_by_patient(out: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut split_of: HashMap<String, String> = HashMap::new();
    let mut patients: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in read_csv(&out.join("manifest.csv")) {
        let (key, split) = (row["patient_key"].clone(), row["split"].clone());
        assert!(
            ["train", "val", "test"].contains(&split.as_str()),
            "{split}"
        );
        let first = split_of.entry(key.clone()).or_insert_with(|| split.clone());
        assert_eq!(*first, split, "patient {key} is in two splits");
        patients.entry(split).or_default().insert(key);
    }
    patients
}

#[test]
fn synthetic_dataset_follows_the_contract() {
    let src = tempfile::tempdir().expect("tempdir");
    let labels = synthetic_source(src.path());
    let out = src.path().join("dataset");
    let summary = build(&options(src.path(), &labels, &out, 64)).expect("build");

    assert_eq!(summary.images, 36);
    assert_eq!(summary.patients, 12);
    let skipped: BTreeSet<&str> = summary.skipped.iter().map(|s| s.file.as_str()).collect();
    assert_eq!(
        skipped,
        BTreeSet::from(["missing/file.dcm", "corrupt.dcm", "case-0/slice0001.dcm"])
    );
    assert!(summary.skipped.iter().any(|s| s.reason.contains("spleen")));

    let manifest = std::fs::read_to_string(out.join("manifest.csv")).expect("manifest");
    assert_eq!(manifest.lines().next(), Some(MANIFEST_HEADER));
    let rows = read_csv(&out.join("manifest.csv"));
    assert_eq!(rows.len(), 36);
    for row in &rows {
        let case = row["sop_instance_uid"].clone();
        assert!(row["image"].starts_with("images/") && row["image"].ends_with(".png"));
        assert_eq!(row["label_source"], "mask", "{case}");
    }
    let case0 = patient_key("case-0");
    assert_eq!(case0.len(), 16);
    assert!(rows.iter().any(|r| r["patient_key"] == case0));

    assert_images_hold_model_input(&out, src.path(), &labels, 64);
    let patients = assert_splits_by_patient(&out);
    assert_eq!(patients.len(), 3, "12 patients fill train, val and test");

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("dataset.json")).expect("json"))
            .expect("valid json");
    assert_eq!(json["format"], "anatomy-node-dataset/1");
    assert_eq!(json["input_size"], 64);
    assert_eq!(json["hu_offset"], 32768);
    assert_eq!(json["images"], 36);
    assert_eq!(json["patients"], 12);
    let counted: u64 = json["counts"]
        .as_object()
        .expect("counts")
        .values()
        .filter_map(|v| v.as_u64())
        .sum();
    assert_eq!(counted, 36);
}

#[test]
fn a_fixed_field_of_view_is_applied_and_recorded() {
    let src = tempfile::tempdir().expect("tempdir");
    let labels = synthetic_source(src.path());
    let out = src.path().join("dataset");
    let fov = BuildOptions {
        field_of_view_mm: Some(300.0),
        ..options(src.path(), &labels, &out, 32)
    };
    build(&fov).expect("build");
    let preprocessing = Preprocessing::new(32).with_field_of_view(Some(300.0));
    assert_images_hold(&out, src.path(), &labels, &preprocessing);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("dataset.json")).expect("json"))
            .expect("valid json");
    assert_eq!(json["field_of_view_mm"], 300.0);
    // and the whole-image build differs from it (the synthetic images have a Pixel Spacing)
    let whole = src.path().join("whole");
    build(&options(src.path(), &labels, &whole, 32)).expect("build");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(whole.join("dataset.json")).expect("json"))
            .expect("valid json");
    assert!(json["field_of_view_mm"].is_null());
    let image = read_csv(&out.join("manifest.csv"))[0]["image"].clone();
    assert_ne!(
        read_png_hu(&out.join(&image)).expect("png"),
        read_png_hu(&whole.join(&image)).expect("png")
    );
}

#[test]
fn body_framing_is_applied_and_recorded() {
    let src = tempfile::tempdir().expect("tempdir");
    let labels = synthetic_source(src.path());
    let out = src.path().join("dataset");
    let body = BuildOptions {
        framing: Framing::Body,
        ..options(src.path(), &labels, &out, 32)
    };
    build(&body).expect("build");
    let preprocessing = Preprocessing::new(32).with_framing(Framing::Body);
    assert_images_hold(&out, src.path(), &labels, &preprocessing);
    let json = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("dataset.json")).expect("json"))
            .expect("valid json")
    };
    assert_eq!(json(&out)["framing"], "body");
    assert!(json(&out)["field_of_view_mm"].is_null());
    // and the whole-image build differs from it (the synthetic body is a 0.8 × 0.6 ellipse
    // of the image, so framing it enlarges it)
    let whole = src.path().join("whole");
    build(&options(src.path(), &labels, &whole, 32)).expect("build");
    assert_eq!(json(&whole)["framing"], "whole");
    for row in read_csv(&out.join("manifest.csv")) {
        assert_ne!(
            read_png_hu(&out.join(&row["image"])).expect("png"),
            read_png_hu(&whole.join(&row["image"])).expect("png"),
            "{}",
            row["image"]
        );
    }
}

#[test]
fn body_framing_and_a_field_of_view_are_refused_together() {
    let src = tempfile::tempdir().expect("tempdir");
    let labels = synthetic_source(src.path());
    let out = src.path().join("dataset");
    let both = BuildOptions {
        framing: Framing::Body,
        field_of_view_mm: Some(500.0),
        ..options(src.path(), &labels, &out, 32)
    };
    match build(&both) {
        Err(DatasetError::InvalidOption(message)) => assert!(
            message.contains("--framing body") && message.contains("--field-of-view 500"),
            "{message}"
        ),
        other => panic!("both framings were accepted: {other:?}"),
    }
    assert!(!out.join("dataset.json").exists());
    // the same on the command line, and an unknown framing
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_anatomy-node"))
            .args(["dataset", "build", "--size", "32", "--from"])
            .arg(src.path())
            .arg("--labels")
            .arg(&labels)
            .arg("--out")
            .arg(&out)
            .args(args)
            .output()
            .expect("anatomy-node runs")
    };
    let both = cli(&["--framing", "body", "--field-of-view", "500"]);
    assert!(!both.status.success());
    let stderr = String::from_utf8_lossy(&both.stderr);
    assert!(
        stderr.contains("--framing body") && stderr.contains("--field-of-view 500"),
        "{stderr}"
    );
    let unknown = cli(&["--framing", "tight"]);
    assert!(!unknown.status.success());
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        stderr.contains("tight") && stderr.contains("body"),
        "{stderr}"
    );
    assert!(!out.join("dataset.json").exists());
}

#[test]
fn same_seed_builds_the_same_dataset() {
    let src = tempfile::tempdir().expect("tempdir");
    let labels = synthetic_source(src.path());
    let (a, b) = (src.path().join("a"), src.path().join("b"));
    build(&options(src.path(), &labels, &a, 32)).expect("build a");
    let mut other_threads = options(src.path(), &labels, &b, 32);
    other_threads.threads = Some(1);
    build(&other_threads).expect("build b");
    let manifest = |dir: &Path| std::fs::read(dir.join("manifest.csv")).expect("manifest");
    assert_eq!(manifest(&a), manifest(&b));
    for row in read_csv(&a.join("manifest.csv")) {
        let image = |dir: &Path| std::fs::read(dir.join(&row["image"])).expect("png");
        assert_eq!(image(&a), image(&b), "{}", row["image"]);
    }
}

#[test]
fn existing_output_is_never_mixed_into() {
    let src = tempfile::tempdir().expect("tempdir");
    let labels = synthetic_source(src.path());
    let out = src.path().join("dataset");
    std::fs::create_dir_all(&out).expect("mkdir");
    std::fs::write(out.join("old.txt"), b"x").expect("write");
    let result = build(&options(src.path(), &labels, &out, 32));
    assert!(
        matches!(result, Err(DatasetError::OutNotEmpty(_))),
        "{result:?}"
    );
}

#[test]
fn cli_fails_only_when_nothing_was_written() {
    let src = tempfile::tempdir().expect("tempdir");
    let labels = src.path().join("labels.csv");
    std::fs::write(
        &labels,
        format!("{LABELS_HEADER}\ncase-x,1.2,1.3,1.4,missing.dcm,1,0,lungs,mask\n"),
    )
    .expect("labels");
    let cli = |out: &str, labels: &Path| {
        Command::new(env!("CARGO_BIN_EXE_anatomy-node"))
            .args(["dataset", "build", "--size", "32", "--from"])
            .arg(src.path())
            .arg("--labels")
            .arg(labels)
            .arg("--out")
            .arg(src.path().join(out))
            .output()
            .expect("anatomy-node runs")
    };
    let failed = cli("empty", &labels);
    assert!(!failed.status.success());
    let stdout = String::from_utf8_lossy(&failed.stdout);
    assert!(stdout.contains("skipped missing.dcm"), "{stdout}");
    assert!(String::from_utf8_lossy(&failed.stderr).contains("no image written"));

    let good_labels = synthetic_source(src.path());
    let ok = cli("full", &good_labels);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("wrote 36 images of 12 patients"));
}

/// A few real files per case of a handful of cases, including the JPEG 2000, RLE and UN
/// files: images equal the node's model input.
#[test]
fn real_subset_builds() {
    let data = std::env::var_os("ANATOMY_CT_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/ct"));
    if !data.join("labels.csv").is_file() {
        eprintln!(
            "SKIPPED: no real CT data at {} (set ANATOMY_CT_DATA)",
            data.display()
        );
        return;
    }
    let text = std::fs::read_to_string(data.join("labels.csv")).expect("labels");
    let mut per_case: HashMap<String, usize> = HashMap::new();
    let subset: Vec<&str> = text
        .lines()
        .skip(1)
        .filter(|line| {
            let case = line.split(',').next().unwrap_or_default().to_string();
            let keep = case.starts_with("pydicom")
                || case.starts_with("nema")
                || case.starts_with("vtk")
                || case.starts_with("ctmed-tcga-50")
                || case.starts_with("sts-01")
                || case == "elastix-chest"
                || case == "vhp-female";
            let n = per_case.entry(case).or_default();
            *n += 1;
            keep && *n <= 2
        })
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let labels = dir.path().join("subset.csv");
    std::fs::write(&labels, format!("{LABELS_HEADER}\n{}\n", subset.join("\n"))).expect("subset");
    let out = dir.path().join("dataset");
    let summary = build(&options(&data, &labels, &out, 96)).expect("build");
    assert!(summary.skipped.is_empty(), "{:?}", summary.skipped);
    assert_eq!(summary.images, subset.len());
    assert_images_hold_model_input(&out, &data, &labels, 96);
    assert_splits_by_patient(&out);
}
