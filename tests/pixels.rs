//! `anatomy::pixels` against real CT files (../shared/data/ct, or `ANATOMY_CT_DATA`):
//! HU must equal those of an independent reader (pydicom, tests/tools/hu_reference.py), and
//! must not change when DCMTK (or pydicom, for JPEG 2000) re-encodes a file in another
//! lossless transfer syntax. Tests that lack the data, Python packages or DCMTK say so and
//! pass; CI has all three.
//!
//! `ANATOMY_PIXELS_ALL=1` compares every file of labels.csv instead of one per case.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anatomy_node::anatomy::pixels::{hu_frames, HuImage, PixelErrorKind};

const QUIRKY_FILES: [&str; 3] = [
    "pydicom-j2k-head/CT/J2K_pixelrep_mismatch.dcm",
    "pydicom-data-abdomen/CT/explicit_VR-UN.dcm",
    "nema-ct1-chest/CT/D_CLUNIE_CT1_RLE_FRAGS.dcm",
];

fn data_dir() -> Option<PathBuf> {
    common::data::ct_data()
}

/// A Python with the packages of tests/tools/requirements.txt: `ANATOMY_TEST_PYTHON`,
/// else `.venv-tests/bin/python`, else `target/test-python/bin/python`, else `python3`.
fn reference_python() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        std::env::var_os("ANATOMY_TEST_PYTHON").map(PathBuf::from),
        Some(root.join(".venv-tests/bin/python")),
        Some(root.join("target/test-python/bin/python")),
        Some(PathBuf::from("python3")),
    ];
    let found = candidates.into_iter().flatten().find(|python| {
        Command::new(python)
            .args(["-c", "import pydicom, numpy, pylibjpeg, openjpeg, rle"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        eprintln!(
            "SKIPPED: no Python with tests/tools/requirements.txt installed \
             (python3 -m venv .venv-tests && .venv-tests/bin/pip install -r \
             tests/tools/requirements.txt, or set ANATOMY_TEST_PYTHON)"
        );
    }
    found
}

fn dcmtk_available() -> bool {
    let ok = ["dcmconv", "dcmcjpeg", "dcmcjpls", "dcmcrle", "dcmdrle"]
        .iter()
        .all(|tool| Command::new(tool).arg("--version").output().is_ok());
    if !ok {
        eprintln!("SKIPPED: DCMTK tools (apt package dcmtk) are not installed");
    }
    ok
}

fn labelled_files(data: &Path) -> Vec<(String, String)> {
    let mut reader = csv::Reader::from_path(data.join("labels.csv")).expect("labels.csv");
    reader
        .deserialize::<std::collections::HashMap<String, String>>()
        .map(|row| {
            let row = row.expect("labels.csv row");
            (row["case_id"].clone(), row["file"].clone())
        })
        .collect()
}

/// One file per case (the first listed), plus the files with known quirks.
fn files_to_compare(data: &Path) -> Vec<PathBuf> {
    let all = std::env::var_os("ANATOMY_PIXELS_ALL").is_some();
    let mut seen = BTreeSet::new();
    let mut files: BTreeSet<String> = labelled_files(data)
        .into_iter()
        .filter(|(case, _)| all || seen.insert(case.clone()))
        .map(|(_, file)| file)
        .collect();
    files.extend(QUIRKY_FILES.iter().map(|f| f.to_string()));
    files.into_iter().map(|f| data.join(f)).collect()
}

/// HU of each file according to pydicom: frames × rows × columns, or its error.
fn reference_hu(python: &Path, files: &[PathBuf]) -> Vec<Result<Vec<HuImage>, String>> {
    let out = tempfile::tempdir().expect("tempdir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/hu_reference.py");
    let output = Command::new(python)
        .arg(&script)
        .arg(out.path())
        .args(files)
        .output()
        .expect("running hu_reference.py");
    assert!(
        output.status.success(),
        "hu_reference.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), files.len(), "one line per file");
    lines
        .iter()
        .map(|line| read_reference(out.path(), line))
        .collect()
}

fn read_reference(dir: &Path, line: &serde_json::Value) -> Result<Vec<HuImage>, String> {
    if let Some(e) = line["error"].as_str() {
        return Err(e.to_string());
    }
    let field = |k: &str| line[k].as_u64().expect("numeric field") as usize;
    let (frames, rows, columns) = (field("frames"), field("rows"), field("columns"));
    let bytes = std::fs::read(dir.join(format!("{}.f32", field("index")))).expect("f32 file");
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(values.len(), frames * rows * columns);
    Ok(values
        .chunks_exact(rows * columns)
        .enumerate()
        .map(|(frame, hu)| HuImage {
            rows,
            columns,
            hu: hu.to_vec(),
            frame: frame as u32,
            pixel_spacing: None,
            orientation: None,
        })
        .collect())
}

/// Exact equality of HU, frame by frame; the first difference when they differ.
fn same_hu(ours: &[HuImage], theirs: &[HuImage]) -> Result<(), String> {
    if ours.len() != theirs.len() {
        return Err(format!("{} frames vs {}", ours.len(), theirs.len()));
    }
    for (a, b) in ours.iter().zip(theirs) {
        if (a.rows, a.columns) != (b.rows, b.columns) {
            return Err(format!(
                "frame {}: {}×{} vs {}×{}",
                a.frame, a.rows, a.columns, b.rows, b.columns
            ));
        }
        let diffs = a.hu.iter().zip(&b.hu).filter(|(x, y)| x != y).count();
        if let Some(i) = a.hu.iter().zip(&b.hu).position(|(x, y)| x != y) {
            return Err(format!(
                "frame {}: {diffs} pixels differ, first at ({}, {}): {} vs {}",
                a.frame,
                i / a.columns,
                i % a.columns,
                a.hu[i],
                b.hu[i]
            ));
        }
    }
    Ok(())
}

#[test]
fn real_files_match_pydicom() {
    let (Some(data), Some(python)) = (data_dir(), reference_python()) else {
        return;
    };
    let files = files_to_compare(&data);
    let reference = reference_hu(&python, &files);
    let mut failures = vec![];
    for (file, theirs) in files.iter().zip(reference) {
        let ours = hu_frames(file).map_err(|e| e.to_string());
        let verdict = match (ours, theirs) {
            (Ok(ours), Ok(theirs)) => same_hu(&ours, &theirs),
            (Err(ours), Ok(_)) => Err(format!("only pydicom decodes it; we say: {ours}")),
            (Ok(_), Err(theirs)) => Err(format!("only we decode it; pydicom says: {theirs}")),
            (Err(ours), Err(theirs)) => Err(format!("neither decodes: {ours} / {theirs}")),
        };
        if let Err(why) = verdict {
            failures.push(format!("{}: {why}", file.display()));
        }
    }
    eprintln!("compared {} real files with pydicom", files.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn run(tool: &str, args: &[&Path]) {
    let output = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(
        output.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn run_with(tool: &str, option: &str, input: &Path, output: &Path) {
    let out = Command::new(tool)
        .arg(option)
        .arg(input)
        .arg(output)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {option} {}: {}",
        input.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Real files of different pixel formats: 12-bit unsigned implicit VR (TCGA), 16-bit
/// signed explicit VR with Pixel Padding Value (GE head), converted NIfTI (signed), and
/// one with the padding value written as US 63536 for a signed image.
fn transcode_sources(data: &Path) -> Vec<PathBuf> {
    let first_of = |case: &str| {
        labelled_files(data)
            .into_iter()
            .find(|(c, _)| c == case)
            .map(|(_, f)| data.join(f))
            .unwrap_or_else(|| panic!("case {case} in labels.csv"))
    };
    vec![
        first_of("ctmed-tcga-17-z011"),
        first_of("dcmqa-ge-head"),
        first_of("sts-004"),
        first_of("ctmed-tcga-50-5044"),
    ]
}

/// (transfer syntax, tool, option): the lossless syntaxes DCMTK writes.
const DCMTK_LOSSLESS: [(&str, &str, &str); 6] = [
    ("1.2.840.10008.1.2", "dcmconv", "+ti"),
    ("1.2.840.10008.1.2.1.99", "dcmconv", "+td"),
    ("1.2.840.10008.1.2.4.57", "dcmcjpeg", "+el"),
    ("1.2.840.10008.1.2.4.70", "dcmcjpeg", "+e1"),
    ("1.2.840.10008.1.2.4.80", "dcmcjpls", "+el"),
    ("1.2.840.10008.1.2.5", "dcmcrle", "+e"),
];

#[test]
fn lossless_transcodes_keep_hu() {
    let Some(data) = data_dir() else { return };
    if !dcmtk_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for source in transcode_sources(&data) {
        let original = hu_frames(&source).expect("original decodes");
        for (ts, tool, option) in DCMTK_LOSSLESS {
            if tool == "dcmcjpls" && !cfg!(any(feature = "charls", feature = "gdcm")) {
                eprintln!("SKIPPED {ts}: this build has no JPEG-LS decoder");
                continue;
            }
            let out = dir.path().join(format!("{ts}.dcm"));
            run_with(tool, option, &source, &out);
            let decoded =
                hu_frames(&out).unwrap_or_else(|e| panic!("{ts} of {}: {e}", source.display()));
            if let Err(why) = same_hu(&decoded, &original) {
                panic!("{ts} of {}: {why}", source.display());
            }
        }
        // and back: RLE decoded by DCMTK must still be the same image
        let rle = dir.path().join("rle.dcm");
        let back = dir.path().join("back.dcm");
        run_with("dcmcrle", "+e", &source, &rle);
        run("dcmdrle", &[&rle, &back]);
        same_hu(&hu_frames(&back).expect("decodes"), &original).expect("dcmdrle round trip");
    }
}

/// JPEG 2000 (lossless, .4.90) written by pydicom + OpenJPEG, as DCMTK has no encoder.
#[test]
fn jpeg2000_transcode_keeps_hu() {
    let (Some(data), Some(python)) = (data_dir(), reference_python()) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/to_jpeg2000.py");
    for source in transcode_sources(&data) {
        let out = dir.path().join("j2k.dcm");
        let status = Command::new(&python)
            .arg(&script)
            .arg(&source)
            .arg(&out)
            .output()
            .expect("to_jpeg2000.py");
        assert!(
            status.status.success(),
            "to_jpeg2000.py {}: {}",
            source.display(),
            String::from_utf8_lossy(&status.stderr)
        );
        let original = hu_frames(&source).expect("original decodes");
        let decoded = hu_frames(&out).unwrap_or_else(|e| panic!("{e}"));
        same_hu(&decoded, &original)
            .unwrap_or_else(|why| panic!("JPEG 2000 of {}: {why}", source.display()));
    }
}

/// Lossy syntaxes: HU close to the original, or (12-bit JPEG without GDCM) a precise error.
#[test]
fn lossy_transcodes_decode_or_say_why() {
    let Some(data) = data_dir() else { return };
    if !dcmtk_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let source = &transcode_sources(&data)[0];
    let original = hu_frames(source).expect("original decodes");
    for (name, tool, option) in [
        ("jpeg-baseline", "dcmcjpeg", "+eb"),
        ("jpeg-extended", "dcmcjpeg", "+ee"),
        ("jpeg-ls-near", "dcmcjpls", "+en"),
    ] {
        let out = dir.path().join(format!("{name}.dcm"));
        run_with(tool, option, source, &out);
        match hu_frames(&out) {
            Ok(decoded) => {
                let mean_abs = mean_abs_difference(&decoded[0].hu, &original[0].hu);
                eprintln!("{name}: mean |ΔHU| = {mean_abs:.2}");
                // 8-bit baseline keeps about 256 grey levels of a ~4000 HU range.
                assert!(mean_abs < 20.0, "{name}: mean |ΔHU| = {mean_abs}");
            }
            Err(e) => {
                eprintln!("{name}: {e}");
                // Only a missing codec may refuse, and it must say which build has one.
                let missing_codec = match name {
                    "jpeg-extended" => !cfg!(feature = "gdcm"),
                    "jpeg-ls-near" => !cfg!(any(feature = "charls", feature = "gdcm")),
                    _ => false,
                };
                assert!(
                    missing_codec
                        && matches!(e.kind, PixelErrorKind::UnsupportedTransferSyntax { .. })
                        && e.to_string().contains("gdcm"),
                    "{name}: {e}"
                );
            }
        }
    }
}

fn mean_abs_difference(a: &[f32], b: &[f32]) -> f64 {
    let total: f64 = a.iter().zip(b).map(|(x, y)| f64::from((x - y).abs())).sum();
    total / a.len() as f64
}

/// A real JPEG 2000 file with its codestream header damaged: an error naming the file and
/// the frame. (Damage inside the tile data is not detectable: JPEG 2000 decodes it to noise.)
#[test]
fn corrupt_codestream_is_reported() {
    let Some(data) = data_dir() else { return };
    let source = data.join(QUIRKY_FILES[0]);
    let mut bytes = std::fs::read(&source).expect("read");
    let soc_siz = [0xFF, 0x4F, 0xFF, 0x51];
    let start = bytes
        .windows(4)
        .position(|w| w == soc_siz)
        .expect("a JPEG 2000 codestream");
    for (i, b) in bytes[start + 4..start + 200].iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3];
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("broken.dcm");
    std::fs::write(&broken, &bytes).expect("write");
    match hu_frames(&broken) {
        Ok(_) => panic!("a garbage codestream header must not decode"),
        Err(e) => {
            assert!(
                matches!(e.kind, PixelErrorKind::CorruptPixelData { frame: 0, .. }),
                "{e}"
            );
            assert!(e.to_string().contains("broken.dcm"), "{e}");
        }
    }
}

/// Truncated native pixel data: the error says how many bytes there are and are needed.
#[test]
fn truncated_native_pixel_data_is_reported() {
    let Some(data) = data_dir() else { return };
    let source = transcode_sources(&data)[2].clone();
    let bytes = std::fs::read(&source).expect("read");
    let dir = tempfile::tempdir().expect("tempdir");
    let cut = dir.path().join("cut.dcm");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).expect("write");
    let Err(e) = hu_frames(&cut) else {
        panic!("a truncated file must not decode");
    };
    assert!(e.to_string().contains("cut.dcm"), "{e}");
    assert!(
        matches!(
            e.kind,
            PixelErrorKind::Open(_) | PixelErrorKind::CorruptPixelData { .. }
        ),
        "{e}"
    );
}
