//! Training and the node agree: a short CPU training run (a few epochs on a small subset of
//! ../shared/data/ct, or on synthetic series where that folder is absent) through the real
//! tools — `anatomy-node dataset build`, `python -m training pack|train|export`,
//! training/tools/parity_fixture.py — produces an ONNX file that the node's loader accepts
//! (the metadata contract) and whose outputs through the node's inference path match
//! PyTorch's within 1e-4.
//!
//! Needs training/.venv (`bash training/install.sh`; tests/run-all.sh does it). Without it
//! the test fails and says so, unless ANATOMY_ALLOW_SKIP_PYTHON=1.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use anatomy_node::anatomy::model::{Device, Model};
use common::npy::read_npy;

const SIZE: usize = 64;

fn training_python() -> Option<PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("training/.venv/bin/python");
    if python.is_file() {
        return Some(python);
    }
    let how =
        "training/.venv is missing: run `bash training/install.sh` (tests/run-all.sh does it)";
    if std::env::var("ANATOMY_ALLOW_SKIP_PYTHON").as_deref() == Ok("1") {
        eprintln!("SKIPPED: {how}");
        None
    } else {
        panic!("{how}; ANATOMY_ALLOW_SKIP_PYTHON=1 skips this test instead");
    }
}

fn run(program: &Path, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{}",
        program.display(),
        common::text(&out)
    );
}

/// A labels CSV (the format of ../shared/data/ct/labels.csv) for a small subset: a few
/// cases of every class, so the patient-level split has something in each part.
fn small_real_subset(data: &Path, out: &Path) -> PathBuf {
    let text = std::fs::read_to_string(data.join("labels.csv")).expect("labels.csv");
    let mut lines = text.lines();
    let header = lines.next().expect("header");
    let wanted = [
        "okbp-pt13",
        "okbp-pt2",
        "okbp-pt20",
        "elastix-chest",
        "ctmed-tcga-17-z011",
        "ctmed-tcga-17-z021",
        "ctmed-tcga-51-4079",
        "sts-012",
        "sts-014",
        "sts-026",
        "vhp-male",
        "dcmqa-ge-head",
    ];
    let rows: Vec<&str> = lines
        .filter(|l| wanted.iter().any(|c| l.starts_with(&format!("{c},"))))
        .collect();
    let csv = out.join("labels.csv");
    std::fs::write(&csv, format!("{header}\n{}\n", rows.join("\n"))).expect("write labels");
    csv
}

/// Synthetic series labelled by position (upper half "lungs", lower half "liver"), for
/// machines without the real data.
fn synthetic_subset(dir: &Path) -> PathBuf {
    let mut rows = vec![
        "case_id,study_uid,series_uid,sop_instance_uid,file,instance_number,z_mm,label,label_basis"
            .to_string(),
    ];
    for case in 0..6u32 {
        let folder = dir.join(format!("case{case}"));
        let (spec, files) = common::data::synthetic_series(&folder, 90 + case, 8, 64);
        for (i, f) in files.iter().enumerate() {
            let label = if i < 4 { "lungs" } else { "liver" };
            rows.push(format!(
                "case{case},{},{},{},{},{},{},{label},synthetic",
                spec.study_uid(),
                spec.series_uid(),
                spec.sop_uid(i as u32),
                f.strip_prefix(dir).unwrap().display(),
                i + 1,
                -(i as f64) * 2.5
            ));
        }
    }
    let csv = dir.join("labels.csv");
    std::fs::write(&csv, rows.join("\n") + "\n").expect("write labels");
    csv
}

#[test]
fn a_short_training_run_makes_a_model_the_node_loads_and_that_matches_pytorch() {
    let Some(python) = training_python() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let w = |name: &str| work.path().join(name).display().to_string();
    let (from, labels) = match common::data::ct_data() {
        Some(data) => (data.clone(), small_real_subset(&data, work.path())),
        None => {
            let src = work.path().join("synthetic");
            std::fs::create_dir_all(&src).unwrap();
            let csv = synthetic_subset(&src);
            (src, csv)
        }
    };
    run(
        Path::new(env!("CARGO_BIN_EXE_anatomy-node")),
        &[
            "dataset",
            "build",
            "--from",
            from.to_str().unwrap(),
            "--labels",
            labels.to_str().unwrap(),
            "--out",
            &w("dataset"),
            "--size",
            &SIZE.to_string(),
            "--seed",
            "7",
            "--split",
            "60,20,20",
        ],
    );
    run(
        &python,
        &["-m", "training", "pack", &w("dataset"), &w("dataset.npz")],
    );
    run(
        &python,
        &[
            "-m",
            "training",
            "train",
            "--data",
            &w("dataset.npz"),
            "--out",
            &w("run"),
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--width",
            "8",
            "--blocks",
            "1,1,1,1",
            "--threads",
            "2",
            "--seed",
            "7",
            "--no-nonaxial",
            "--model-version",
            "ci-short-run",
        ],
    );
    run(
        &python,
        &[
            "-m",
            "training",
            "export",
            &w("run/model.pt"),
            &w("model.onnx"),
        ],
    );
    run(
        &python,
        &[
            "training/tools/parity_fixture.py",
            "--checkpoint",
            &w("run/model.pt"),
            "--onnx",
            &w("model.onnx"),
            "--data",
            &w("dataset.npz"),
            "--count",
            "8",
            "--out",
            &w("fixture"),
        ],
    );

    // The node's loader checks the metadata contract; then its inference path runs.
    let model = Model::load(&work.path().join("model.onnx"), Device::Cpu, 2)
        .unwrap_or_else(|e| panic!("the node refuses the trained model: {e}"));
    let info = model.info();
    assert_eq!(info.input_size, SIZE);
    assert_eq!(info.model_version, "ci-short-run");
    assert_eq!(
        info.classes,
        ["neck", "lungs", "liver", "pelvis", "legs", "other"]
    );
    assert!(info.temperature.is_some(), "temperature scaling recorded");

    let (hu_shape, hu) = read_npy(&work.path().join("fixture/hu.npy"));
    let (input_shape, input) = read_npy(&work.path().join("fixture/input.npy"));
    let (prob_shape, torch) = read_npy(&work.path().join("fixture/probabilities.npy"));
    let n = hu_shape[0];
    assert_eq!(input_shape, [n, 1, SIZE, SIZE]);
    assert_eq!(prob_shape, [n, info.classes.len()]);
    let windowed = info.to_input(&hu);
    let max_input = windowed
        .iter()
        .zip(&input)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        max_input < 1e-6,
        "the node windows HU as training does: {max_input}"
    );
    let ours = model.predict(&windowed, n).expect("predict");
    let max = ours
        .iter()
        .flatten()
        .zip(&torch)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-4, "node vs PyTorch: max |difference| {max}");
    eprintln!("{n} images: node vs PyTorch max |difference| {max:.2e}");
}
