//! Classifying files on disk: what `anatomy::select` picks from real DICOM files written
//! here (localizers, reformats, reversed numbering, gantry tilt, Enhanced CT, duplicates),
//! what `anatomy::classify` labels, and `anatomy-node classify` end to end (JSON lines and
//! tables, synthetic and real CT, bad files, bad models, no ONNX Runtime library).
//!
//! Models come from tests/tools/make_test_model.py (`stats`: probabilities the test can
//! compute itself). Without a Python that has `onnx` the model tests fail and say how to get
//! one, unless `ANATOMY_ALLOW_SKIP_PYTHON=1`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anatomy_node::anatomy::classify::{label_images, LabelOptions};
use anatomy_node::anatomy::coverage::{self, CoverageRules, Labelled};
use anatomy_node::anatomy::model::{Device, Model};
use anatomy_node::anatomy::pixels::{self, Preprocessing};
use anatomy_node::anatomy::select::{
    select, Instance, KeyImage, KeyImageCount, Selection, SelectionRules,
};
use anatomy_node::classify_cli::{classify_paths, read_instance, ReadError, Report};
use anatomy_node::config::ClassifierConfig;
use anatomy_node::synth::{self, SeriesSpec};
use dicom_core::value::{DataSetSequence, PixelFragmentSequence};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::{DefaultDicomObject, InMemDicomObject};
use serde_json::Value;

const CLASSES: [&str; 6] = ["neck", "lungs", "liver", "pelvis", "legs", "other"];
/// The input size of the test models; the Enhanced CT frames have it too, so their
/// preprocessing is the identity and expected outputs follow from the HU written.
const SIZE: usize = 64;
const AXIAL: &str = "1\\0\\0\\0\\1\\0";
const CORONAL: &str = "1\\0\\0\\0\\0\\-1";
const SAGITTAL: &str = "0\\1\\0\\0\\0\\-1";
const UID_ROOT: &str = "2.25.99417520413517310214011984211032519";

// ---------------------------------------------------------------------------------------
// Test files

fn text(tag: dicom_core::Tag, vr: VR, value: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(value))
}

fn sequence(tag: dicom_core::Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

fn item(elements: Vec<DataElement<InMemDicomObject>>) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(elements)
}

/// A synthetic slice given a new SOP Instance UID (data set and meta header) and edits.
fn edited_slice(
    spec: &SeriesSpec,
    slice: u32,
    sop_uid: &str,
    edits: Vec<DataElement<InMemDicomObject>>,
) -> DefaultDicomObject {
    let mut obj = synth::ct_slice(spec, slice);
    obj.put(text(tags::SOP_INSTANCE_UID, VR::UI, sop_uid));
    for e in edits {
        obj.put(e);
    }
    obj.update_meta(|m| m.media_storage_sop_instance_uid = sop_uid.to_string());
    obj
}

fn write(obj: &DefaultDicomObject, path: &Path) -> PathBuf {
    obj.write_to_file(path)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path.to_path_buf()
}

/// Series 1 "messy": 10 axial slices numbered bottom-up (file img0001 is the lowest), a
/// coronal localizer, a sagittal and a coronal reformat, and a second image at the
/// position of slice 3.
struct Messy {
    spec: SeriesSpec,
    localizer: PathBuf,
    reformats: Vec<PathBuf>,
    duplicate: PathBuf,
}

fn write_messy_series(dir: &Path) -> Messy {
    std::fs::create_dir_all(dir).expect("dir");
    let spec = SeriesSpec::new(71, 10, 80);
    for slice in 0..spec.slices {
        let name = format!("img{:04}.dcm", spec.slices - slice);
        write(&synth::ct_slice(&spec, slice), &dir.join(name));
    }
    let localizer = write(
        &edited_slice(
            &spec,
            0,
            &format!("{UID_ROOT}.71.100"),
            vec![
                text(tags::IMAGE_TYPE, VR::CS, "ORIGINAL\\PRIMARY\\LOCALIZER"),
                text(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, CORONAL),
                text(tags::INSTANCE_NUMBER, VR::IS, "100"),
            ],
        ),
        &dir.join("localizer.dcm"),
    );
    let reformats = [("sagittal", SAGITTAL, 101), ("coronal", CORONAL, 102)]
        .iter()
        .map(|(name, orientation, n)| {
            write(
                &edited_slice(
                    &spec,
                    5,
                    &format!("{UID_ROOT}.71.{n}"),
                    vec![
                        text(tags::IMAGE_TYPE, VR::CS, "DERIVED\\SECONDARY\\REFORMATTED"),
                        text(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, orientation),
                        text(tags::INSTANCE_NUMBER, VR::IS, &n.to_string()),
                    ],
                ),
                &dir.join(format!("{name}.dcm")),
            )
        })
        .collect();
    let duplicate = write(
        &edited_slice(
            &spec,
            3,
            &format!("{UID_ROOT}.71.103"),
            vec![text(tags::INSTANCE_NUMBER, VR::IS, "103")],
        ),
        &dir.join("duplicate.dcm"),
    );
    Messy {
        spec,
        localizer,
        reformats,
        duplicate,
    }
}

/// Series 2: 6 slices tilted 20° about x (orientation 1\0\0\0\cos\sin).
fn write_tilted_series(dir: &Path) -> SeriesSpec {
    std::fs::create_dir_all(dir).expect("dir");
    let spec = SeriesSpec::new(72, 6, 64);
    let tilt = 20f64.to_radians();
    let orientation = format!("1\\0\\0\\0\\{}\\{}", tilt.cos(), tilt.sin());
    for slice in 0..spec.slices {
        let mut obj = synth::ct_slice(&spec, slice);
        obj.put(text(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, &orientation));
        write(&obj, &dir.join(format!("tilt{slice:02}.dcm")));
    }
    spec
}

/// HU of frame `k` of the Enhanced CT: −100 HU everywhere but one quadrant, whose
/// brightness and place depend on `k`, so no two frames give the same probabilities.
fn enhanced_frame_hu(k: usize) -> Vec<i16> {
    let bright = -100 + 50 * (k as i16 + 1);
    (0..SIZE * SIZE)
        .map(|i| {
            let (row, col) = (i / SIZE, i % SIZE);
            if (row / (SIZE / 2)) * 2 + col / (SIZE / 2) == k % 4 {
                bright
            } else {
                -100
            }
        })
        .collect()
}

/// z of frame `k`: frames are stored bottom-up (frame 0 is the lowest).
fn enhanced_frame_z(k: usize) -> f64 {
    -20.0 + 5.0 * k as f64
}

const ENHANCED_FRAMES: usize = 5;

fn enhanced_series_uid() -> String {
    format!("{UID_ROOT}.73")
}

fn enhanced_sop_uid() -> String {
    format!("{UID_ROOT}.73.1")
}

/// A multi-frame Enhanced CT Image (SOP class 1.2.840.10008.5.1.4.1.1.2.1): geometry,
/// rescale and frame type in the functional groups, pixel data of all frames.
fn write_enhanced_ct(path: &Path) -> PathBuf {
    let shared = item(vec![
        sequence(
            tags::PIXEL_MEASURES_SEQUENCE,
            vec![item(vec![
                text(tags::PIXEL_SPACING, VR::DS, "1\\1"),
                text(tags::SLICE_THICKNESS, VR::DS, "5"),
            ])],
        ),
        sequence(
            tags::PLANE_ORIENTATION_SEQUENCE,
            vec![item(vec![text(
                tags::IMAGE_ORIENTATION_PATIENT,
                VR::DS,
                AXIAL,
            )])],
        ),
        sequence(
            tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE,
            vec![item(vec![
                text(tags::RESCALE_INTERCEPT, VR::DS, "0"),
                text(tags::RESCALE_SLOPE, VR::DS, "1"),
                text(tags::RESCALE_TYPE, VR::LO, "HU"),
            ])],
        ),
        sequence(
            tags::CT_IMAGE_FRAME_TYPE_SEQUENCE,
            vec![item(vec![text(
                tags::FRAME_TYPE,
                VR::CS,
                "ORIGINAL\\PRIMARY\\AXIAL\\NONE",
            )])],
        ),
    ]);
    let per_frame: Vec<InMemDicomObject> = (0..ENHANCED_FRAMES)
        .map(|k| {
            item(vec![sequence(
                tags::PLANE_POSITION_SEQUENCE,
                vec![item(vec![text(
                    tags::IMAGE_POSITION_PATIENT,
                    VR::DS,
                    &format!("-32\\-32\\{}", enhanced_frame_z(k)),
                )])],
            )])
        })
        .collect();
    let pixels: Vec<u8> = (0..ENHANCED_FRAMES)
        .flat_map(enhanced_frame_hu)
        .flat_map(i16::to_le_bytes)
        .collect();
    let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
    let obj = InMemDicomObject::from_element_iter([
        text(tags::IMAGE_TYPE, VR::CS, "ORIGINAL\\PRIMARY\\AXIAL\\NONE"),
        text(tags::SOP_CLASS_UID, VR::UI, uids::ENHANCED_CT_IMAGE_STORAGE),
        text(tags::SOP_INSTANCE_UID, VR::UI, &enhanced_sop_uid()),
        text(tags::MODALITY, VR::CS, "CT"),
        text(tags::PATIENT_ID, VR::LO, "ENHANCED"),
        text(
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            &format!("{UID_ROOT}.73.0"),
        ),
        text(tags::SERIES_INSTANCE_UID, VR::UI, &enhanced_series_uid()),
        text(tags::INSTANCE_NUMBER, VR::IS, "1"),
        sequence(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, vec![shared]),
        text(tags::NUMBER_OF_FRAMES, VR::IS, &ENHANCED_FRAMES.to_string()),
        sequence(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, per_frame),
        us(tags::SAMPLES_PER_PIXEL, 1),
        text(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        us(tags::ROWS, SIZE as u16),
        us(tags::COLUMNS, SIZE as u16),
        us(tags::BITS_ALLOCATED, 16),
        us(tags::BITS_STORED, 16),
        us(tags::HIGH_BIT, 15),
        us(tags::PIXEL_REPRESENTATION, 1),
        DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(pixels)),
    ]);
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(uids::ENHANCED_CT_IMAGE_STORAGE)
        .media_storage_sop_instance_uid(enhanced_sop_uid())
        .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
        .build()
        .expect("meta");
    write(&obj.with_exact_meta(meta), path)
}

/// The three series above in one folder (sub-folders per series).
struct Folder {
    _dir: tempfile::TempDir,
    root: PathBuf,
    messy: Messy,
    tilted: SeriesSpec,
    enhanced: PathBuf,
}

fn write_folder() -> Folder {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let messy = write_messy_series(&root.join("messy"));
    let tilted = write_tilted_series(&root.join("tilted"));
    std::fs::create_dir_all(root.join("enhanced")).expect("dir");
    let enhanced = write_enhanced_ct(&root.join("enhanced/enhanced.dcm"));
    Folder {
        _dir: dir,
        root,
        messy,
        tilted,
        enhanced,
    }
}

/// The instances of every file under `dir`, by series, the way the CLI reads them.
fn instances_by_series(dir: &Path) -> HashMap<String, Vec<Instance>> {
    let mut series: HashMap<String, Vec<Instance>> = HashMap::new();
    for file in common::files_under(dir) {
        let found = read_instance(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        series
            .entry(found.series_uid)
            .or_default()
            .push(found.instance);
    }
    series
}

fn all_rules() -> SelectionRules {
    SelectionRules {
        key_images: KeyImageCount::All,
        axial_tolerance_deg: 35.0,
    }
}

fn selected(selection: Selection) -> Vec<KeyImage> {
    match selection {
        Selection::Selected { key_images, .. } => key_images,
        Selection::Skipped { reason } => panic!("skipped: {reason}"),
    }
}

// ---------------------------------------------------------------------------------------
// Models and the CLI

/// `<dir>/<name>.onnx` (and its `.json` parameters) at this file's input size.
fn make_model(dir: &Path, name: &str, args: &[&str]) -> Option<PathBuf> {
    let size = SIZE.to_string();
    let mut all = vec!["--size", size.as_str()];
    all.extend_from_slice(args);
    common::models::make(dir, name, &all)
}

/// The `stats` model's probabilities for one windowed `SIZE × SIZE` input, from its
/// parameters (see make_test_model.py).
fn stats_probabilities(params: &Value, input: &[f32]) -> Vec<f32> {
    let half = SIZE / 2;
    let mut quadrants = [0f64; 4];
    for (i, v) in input.iter().enumerate() {
        let (row, col) = (i / SIZE, i % SIZE);
        quadrants[(row / half) * 2 + col / half] += f64::from(*v);
    }
    quadrants
        .iter_mut()
        .for_each(|q| *q /= (half * half) as f64);
    let w = params["W"].as_array().expect("W");
    let b = params["b"].as_array().expect("b");
    let t = params["temperature"].as_f64().expect("temperature");
    let logits: Vec<f64> = (0..b.len())
        .map(|c| {
            let dot: f64 = (0..4)
                .map(|f| quadrants[f] * w[f][c].as_f64().expect("w"))
                .sum();
            (dot + b[c].as_f64().expect("b")) / t
        })
        .collect();
    let max = logits.iter().cloned().fold(f64::MIN, f64::max);
    let exp: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|e| (e / sum) as f32).collect()
}

fn window(hu: &[f32]) -> Vec<f32> {
    hu.iter()
        .map(|&v| pixels::window_unit(v, -100.0, 200.0))
        .collect()
}

/// What the stats model must say about frame `frame` of `file`, through the preprocessing
/// of the contract.
fn expected_for_file(params: &Value, file: &Path, frame: u32) -> Vec<f32> {
    let frames = pixels::hu_frames(file).unwrap_or_else(|e| panic!("{e}"));
    let hu = pixels::preprocess(&frames[frame as usize], &Preprocessing::new(SIZE));
    stats_probabilities(params, &window(&hu))
}

fn params_of(model: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(model.with_extension("json")).expect("params"))
        .expect("params json")
}

fn assert_close(got: &[f32], expected: &[f32], what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}");
    for (g, e) in got.iter().zip(expected) {
        assert!(
            (g - e).abs() < 1e-4,
            "{what}: got {got:?}, expected {expected:?}"
        );
    }
}

fn settings(model: &Path) -> ClassifierConfig {
    ClassifierConfig {
        model: model.to_path_buf(),
        device: Device::Cpu,
        threads: 2,
        max_batch: 4,
        ..ClassifierConfig::default()
    }
}

/// A config file for the CLI: the model, the CPU, small batches (several per run), and
/// `extra` lines of the [classifier] section.
fn write_config(dir: &Path, model: &Path, extra: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[classifier]\nmodel = \"{}\"\ndevice = \"cpu\"\nthreads = 2\nmax_batch = 4\n{extra}\n",
            model.display()
        ),
    )
    .expect("config");
    path
}

fn run_cli(config: &Path, args: &[&Path], envs: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_anatomy-node"));
    command
        .arg("classify")
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG");
    for (k, v) in envs {
        command.env(k, v);
    }
    command.output().expect("run anatomy-node classify")
}

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn records<'a>(lines: &'a [Value], record: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["record"] == record).collect()
}

/// The error line of `file`, which must exist.
fn error_of<'a>(lines: &'a [Value], file: &Path) -> &'a str {
    let name = file.display().to_string();
    lines
        .iter()
        .find(|l| l["record"] == "error" && l["file"] == name.as_str())
        .and_then(|l| l["error"].as_str())
        .unwrap_or_else(|| panic!("no error line for {name}: {lines:#?}"))
}

/// A CLI run that failed as a program should: exit status 1, no panic.
fn assert_clean_failure(out: &Output) -> String {
    let text = common::text(out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    text
}

// ---------------------------------------------------------------------------------------
// 1. Selection on real files, and what classify labels

#[test]
fn select_picks_the_axial_originals_of_files_on_disk() {
    let folder = write_folder();
    let series = instances_by_series(&folder.root);
    assert_eq!(series.len(), 3, "three series");

    // Messy: the 10 axial slices, head first although numbered bottom-up; no localizer,
    // no reformat, and the duplicate position keeps the lower instance number.
    let messy = &series[&folder.messy.spec.series_uid()];
    assert_eq!(messy.len(), 14);
    let picked = select(messy, &all_rules());
    let Selection::Selected {
        ref key_images,
        candidates,
        derived_only,
    } = picked
    else {
        panic!("{picked:?}")
    };
    assert_eq!((candidates, derived_only), (10, false));
    let zs: Vec<f64> = key_images.iter().map(|k| k.z_mm).collect();
    let expected_z: Vec<f64> = (0..10).map(|i| -2.5 * f64::from(i)).collect();
    assert_eq!(zs, expected_z);
    let uids: Vec<&str> = key_images
        .iter()
        .map(|k| k.sop_instance_uid.as_str())
        .collect();
    let expected_uids: Vec<String> = (0..10).map(|i| folder.messy.spec.sop_uid(i)).collect();
    assert_eq!(
        uids, expected_uids,
        "originals only, the duplicate left out"
    );
    let files: Vec<&Path> = key_images.iter().map(|k| k.path.as_path()).collect();
    assert!(files[0].ends_with("img0010.dcm") && files[9].ends_with("img0001.dcm"));

    // K key-images still spread over z.
    let four = selected(select(
        messy,
        &SelectionRules {
            key_images: KeyImageCount::Count(4),
            ..all_rules()
        },
    ));
    let four_z: Vec<f64> = four.iter().map(|k| k.z_mm).collect();
    assert_eq!(four_z, [0.0, -7.5, -15.0, -22.5]);

    // Gantry tilt of 20° is axial.
    let tilted = selected(select(&series[&folder.tilted.series_uid()], &all_rules()));
    assert_eq!(tilted.len(), 6);

    // Enhanced CT: one key image per frame, head first, frame numbers kept.
    let enhanced = selected(select(&series[&enhanced_series_uid()], &all_rules()));
    let frames: Vec<(u32, f64)> = enhanced.iter().map(|k| (k.frame, k.z_mm)).collect();
    assert_eq!(
        frames,
        [(4, 0.0), (3, -5.0), (2, -10.0), (1, -15.0), (0, -20.0)]
    );
    assert!(enhanced.iter().all(|k| k.path == folder.enhanced));
}

#[test]
fn a_file_that_is_not_a_ct_instance_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("notes.txt");
    std::fs::write(&junk, "not DICOM").expect("write");
    assert!(matches!(read_instance(&junk), Err(ReadError::NotDicom(_))));
    let spec = SeriesSpec::new(74, 1, 32);
    let sc = edited_slice(
        &spec,
        0,
        &spec.sop_uid(0),
        vec![
            text(
                tags::SOP_CLASS_UID,
                VR::UI,
                uids::SECONDARY_CAPTURE_IMAGE_STORAGE,
            ),
            text(tags::MODALITY, VR::CS, "OT"),
        ],
    );
    let path = write(&sc, &dir.path().join("sc.dcm"));
    let err = read_instance(&path).expect_err("secondary capture");
    assert!(
        matches!(&err, ReadError::NotCt { sop_class, .. } if sop_class == uids::SECONDARY_CAPTURE_IMAGE_STORAGE),
        "{err}"
    );
    assert!(matches!(
        read_instance(&dir.path().join("missing.dcm")),
        Err(ReadError::Io(_))
    ));
}

#[test]
fn classify_labels_exactly_what_select_picks() {
    let folder = write_folder();
    let models = tempfile::tempdir().expect("tempdir");
    let Some(model_path) = make_model(models.path(), "classify-lib", &[]) else {
        return;
    };
    let params = params_of(&model_path);
    let model = Model::load(&model_path, Device::Cpu, 2)
        .expect("model")
        .with_max_batch(4);
    let report: Report = classify_paths(
        &model,
        std::slice::from_ref(&folder.root),
        &settings(&model_path),
    )
    .expect("classify");
    assert_eq!(report.classes, CLASSES);
    assert_eq!(report.files, 14 + 6 + 1);
    assert_eq!(report.labelled_images(), 10 + 6 + 5);

    let instances = instances_by_series(&folder.root);
    for series in &report.series {
        let picked = selected(select(&instances[&series.series_uid], &all_rules()));
        let labelled: Vec<(&str, u32, f64)> = series
            .images
            .iter()
            .map(|i| {
                (
                    i.image.sop_instance_uid.as_str(),
                    i.image.frame,
                    i.image.z_mm,
                )
            })
            .collect();
        let expected: Vec<(&str, u32, f64)> = picked
            .iter()
            .map(|k| (k.sop_instance_uid.as_str(), k.frame, k.z_mm))
            .collect();
        assert_eq!(labelled, expected, "series {}", series.series_uid);
        for i in &series.images {
            let want = expected_for_file(&params, &i.image.path, i.image.frame);
            assert_close(&i.image.probabilities, &want, &i.image.sop_instance_uid);
        }
        assert!(series.coverage.is_some());
    }

    // Every other file of the messy series is reported with the selection's reason.
    let reason = |file: &Path| {
        report
            .unusable
            .iter()
            .find(|u| u.file == file)
            .map(|u| u.reason.clone())
            .unwrap_or_else(|| panic!("{} not reported", file.display()))
    };
    assert!(reason(&folder.messy.localizer).contains("localizer"));
    for reformat in &folder.messy.reformats {
        assert!(
            reason(reformat).contains("not axial"),
            "{}",
            reason(reformat)
        );
    }
    let duplicate = reason(&folder.messy.duplicate);
    assert!(
        duplicate.contains("same position") && duplicate.contains(&folder.messy.spec.sop_uid(3)),
        "{duplicate}"
    );
    assert_eq!(report.unusable.len(), 4, "{:#?}", report.unusable);

    // Enhanced CT frames: the probabilities follow from the HU written, frame by frame
    // (a frame mix-up or a transposed image would change them), and the file is decoded
    // once for its five frames.
    let key_images = selected(select(&instances[&enhanced_series_uid()], &all_rules()));
    let labelling = label_images(&model, &key_images, &LabelOptions::new(2)).expect("label");
    assert!(labelling.failed.is_empty());
    assert_eq!(labelling.timings.files, 1);
    assert_eq!(labelling.timings.images, ENHANCED_FRAMES);
    for image in &labelling.labelled {
        let hu: Vec<f32> = enhanced_frame_hu(image.frame as usize)
            .into_iter()
            .map(f32::from)
            .collect();
        let want = stats_probabilities(&params, &window(&hu));
        assert_close(
            &image.probabilities,
            &want,
            &format!("frame {}", image.frame),
        );
        assert_eq!(image.z_mm, enhanced_frame_z(image.frame as usize));
    }
}

// ---------------------------------------------------------------------------------------
// 2. The CLI end to end

#[test]
fn cli_writes_a_json_line_per_image_and_per_series() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (spec_a, _) = common::data::synthetic_series(&data.join("a"), 81, 24, 80);
    let (spec_b, _) = common::data::synthetic_series(&data.join("b"), 82, 12, 48);
    let junk = data.join("README.txt");
    std::fs::write(&junk, "not a DICOM file").expect("write");
    let Some(model) = make_model(dir.path(), "cli", &["--temperature", "0.5"]) else {
        return;
    };
    let params = params_of(&model);
    // An old configuration (smoothing_window, replaced by decoding) still runs, and says so.
    let config = write_config(dir.path(), &model, "smoothing_window = 3");
    let out = run_cli(&config, &[Path::new("--json"), &data], &[]);
    assert!(out.status.success(), "{}", common::text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("classifier.smoothing_window is no longer used")
            && stderr.contains("classifier.decoding"),
        "{stderr}"
    );
    let lines = json_lines(&out);

    assert!(error_of(&lines, &junk).contains("not a DICOM file"));
    let images = records(&lines, "image");
    assert_eq!(images.len(), 24 + 12);
    let mut by_series: HashMap<String, Vec<Labelled>> = HashMap::new();
    let mut decoded: HashMap<String, Vec<String>> = HashMap::new();
    for line in &images {
        for key in [
            "sop_instance_uid",
            "series_uid",
            "file",
            "label",
            "decoded_label",
        ] {
            assert!(line[key].is_string(), "{key} in {line}");
        }
        let file = PathBuf::from(line["file"].as_str().expect("file"));
        let frame = line["frame"].as_u64().expect("frame") as u32;
        let probabilities: Vec<f32> = CLASSES
            .iter()
            .map(|c| {
                line["probabilities"][c]
                    .as_f64()
                    .expect("probability keyed by class") as f32
            })
            .collect();
        assert_eq!(line["probabilities"].as_object().expect("map").len(), 6);
        let want = expected_for_file(&params, &file, frame);
        assert_close(&probabilities, &want, &file.display().to_string());
        let best = coverage::argmax(&probabilities);
        assert_eq!(line["label"], CLASSES[best], "{line}");
        decoded
            .entry(line["series_uid"].as_str().expect("uid").to_string())
            .or_default()
            .push(line["decoded_label"].as_str().expect("decoded").to_string());
        by_series
            .entry(line["series_uid"].as_str().expect("uid").to_string())
            .or_default()
            .push(Labelled {
                z_mm: line["z_mm"].as_f64().expect("z"),
                probabilities,
            });
    }

    // One series line each, and what it says is anatomy::coverage of the image lines.
    let series = records(&lines, "series");
    assert_eq!(series.len(), 2);
    let classes: Vec<String> = CLASSES.map(String::from).to_vec();
    for (spec, line) in [(&spec_a, series[0]), (&spec_b, series[1])] {
        let uid = spec.series_uid();
        assert_eq!(line["series_uid"], uid.as_str());
        let labelled = &by_series[&uid];
        assert_eq!(line["images"].as_u64(), Some(u64::from(spec.slices)));
        let zs: Vec<f64> = labelled.iter().map(|l| l.z_mm).collect();
        assert!(zs.windows(2).all(|w| w[0] > w[1]), "head to foot: {zs:?}");
        let want = coverage::coverage(labelled, &classes, &CoverageRules::default());
        assert_eq!(decoded[&uid], want.labels, "decoded labels are coverage's");
        assert_eq!(line["decoding"], "order");
        assert!(line.get("decoding_note").is_none(), "{line}");
        let ranges: Vec<(String, f64, f64, u64)> = line["coverage"]
            .as_array()
            .expect("coverage")
            .iter()
            .map(|r| {
                (
                    r["class"].as_str().expect("class").to_string(),
                    r["z_from_mm"].as_f64().expect("from"),
                    r["z_to_mm"].as_f64().expect("to"),
                    r["images"].as_u64().expect("images"),
                )
            })
            .collect();
        let want_ranges: Vec<(String, f64, f64, u64)> = want
            .ranges
            .iter()
            .map(|r| (r.class.clone(), r.z_from_mm, r.z_to_mm, r.images as u64))
            .collect();
        assert_eq!(ranges, want_ranges);
        assert_eq!(
            line["dominant_class"].as_str(),
            want.dominant_class.as_deref()
        );
        assert_eq!(
            line["body_part_examined"].as_str(),
            want.body_part_examined.map(|r| r.body_part)
        );
        let regions: Vec<(&str, &str, &str)> = line["anatomic_regions"]
            .as_array()
            .expect("regions")
            .iter()
            .map(|r| {
                (
                    r["code_value"].as_str().expect("code value"),
                    r["coding_scheme"].as_str().expect("scheme"),
                    r["code_meaning"].as_str().expect("meaning"),
                )
            })
            .collect();
        let want_regions: Vec<(&str, &str, &str)> = want
            .regions
            .iter()
            .map(|r| (r.code_value, r.coding_scheme, r.code_meaning))
            .collect();
        assert_eq!(regions, want_regions);
    }

    // Without --json: a table per series on stdout, unusable files on stderr.
    let out = run_cli(&config, &[&data], &[]);
    assert!(out.status.success(), "{}", common::text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for spec in [&spec_a, &spec_b] {
        assert!(
            stdout.contains(&format!("series {}", spec.series_uid())),
            "{stdout}"
        );
    }
    assert!(
        stdout.contains("24 images labelled, head to foot"),
        "{stdout}"
    );
    assert!(stdout.contains("Body Part Examined:"), "{stdout}");
    assert!(stdout.contains("z from (mm)"), "{stdout}");
    assert!(
        stderr.contains(&format!(
            "not labelled: {}: not a DICOM file",
            junk.display()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("labelled 36 images of 2 series"),
        "{stderr}"
    );
}

#[test]
fn cli_labels_real_ct_files() {
    let Some(data) = common::data::ct_data() else {
        eprintln!(
            "NOTE: cli_labels_real_ct_files skipped: no real CT data (the synthetic end-to-end \
             test, cli_writes_a_json_line_per_image_and_per_series, still runs)"
        );
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(model) = make_model(dir.path(), "real", &[]) else {
        return;
    };
    // A gantry-tilted head series (GE), an RLE file, an Explicit VR file with UN attributes,
    // a JPEG 2000 file, a chest series and a sarcoma crop.
    let folders = [
        "dcmqa-ge-head",
        "nema-ct1-chest",
        "pydicom-data-abdomen",
        "pydicom-j2k-head",
        "elastix-chest",
        "sts-004",
    ];
    let paths: Vec<PathBuf> = folders.iter().map(|f| data.join(f)).collect();
    let known: HashMap<String, common::data::Labelled> = common::data::labels(&data)
        .into_iter()
        .filter(|l| folders.iter().any(|f| l.file.starts_with(data.join(f))))
        .map(|l| (l.sop_uid.clone(), l))
        .collect();
    let config = write_config(dir.path(), &model, "");
    let mut args: Vec<&Path> = vec![Path::new("--json")];
    args.extend(paths.iter().map(PathBuf::as_path));
    let out = run_cli(&config, &args, &[]);
    assert!(out.status.success(), "{}", common::text(&out));
    let lines = json_lines(&out);
    let errors = records(&lines, "error");
    assert!(
        errors.is_empty(),
        "every listed file is usable: {errors:#?}"
    );
    let images = records(&lines, "image");
    assert_eq!(
        images.len(),
        known.len(),
        "every labelled file of labels.csv"
    );
    let z_of_csv: HashMap<String, f64> = std::fs::read_to_string(data.join("labels.csv"))
        .expect("labels.csv")
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Some((f.get(3)?.to_string(), f.get(6)?.parse().ok()?))
        })
        .collect();
    for line in &images {
        let uid = line["sop_instance_uid"].as_str().expect("uid");
        let row = known
            .get(uid)
            .unwrap_or_else(|| panic!("{uid} not in labels.csv"));
        assert_eq!(line["series_uid"], row.series_uid.as_str());
        assert_eq!(line["file"], row.file.display().to_string().as_str());
        let z = line["z_mm"].as_f64().expect("z");
        assert!(
            (z - z_of_csv[uid]).abs() < 0.01,
            "{uid}: z {z} vs labels.csv"
        );
        let sum: f32 = CLASSES
            .iter()
            .map(|c| line["probabilities"][c].as_f64().expect("p") as f32)
            .sum();
        assert!((sum - 1.0).abs() < 1e-4, "{line}");
    }
    let series = records(&lines, "series");
    let mut uids: Vec<&str> = known.values().map(|l| l.series_uid.as_str()).collect();
    uids.sort();
    uids.dedup();
    assert_eq!(series.len(), uids.len());
    for line in series {
        let n = line["images"].as_u64().expect("images");
        let in_ranges: u64 = line["coverage"]
            .as_array()
            .expect("coverage")
            .iter()
            .map(|r| r["images"].as_u64().expect("n"))
            .sum();
        assert_eq!(n, in_ranges, "{line}");
        assert!(line["dominant_class"].is_string(), "{line}");
    }
}

// ---------------------------------------------------------------------------------------
// 3. Bad input: a clear reason, never a crash, never a label

#[test]
fn a_series_without_axial_images_is_reported_and_nothing_is_labelled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("dir");
    let spec = SeriesSpec::new(91, 3, 32);
    let mut files = Vec::new();
    for (slice, image_type, orientation) in [
        (0, "ORIGINAL\\PRIMARY\\LOCALIZER", CORONAL),
        (1, "DERIVED\\SECONDARY\\REFORMATTED", SAGITTAL),
        (2, "DERIVED\\SECONDARY\\REFORMATTED", CORONAL),
    ] {
        let obj = edited_slice(
            &spec,
            slice,
            &spec.sop_uid(slice),
            vec![
                text(tags::IMAGE_TYPE, VR::CS, image_type),
                text(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, orientation),
            ],
        );
        files.push(write(&obj, &data.join(format!("{slice}.dcm"))));
    }
    let Some(model) = make_model(dir.path(), "no-axial", &[]) else {
        return;
    };
    let config = write_config(dir.path(), &model, "");
    let out = run_cli(&config, &[Path::new("--json"), &data], &[]);
    let text = assert_clean_failure(&out);
    assert!(text.contains("no image was labelled"), "{text}");
    let lines = json_lines(&out);
    assert!(records(&lines, "image").is_empty());
    assert!(error_of(&lines, &files[0]).contains("localizers"));
    assert!(error_of(&lines, &files[1]).contains("not axial"));
    assert!(error_of(&lines, &files[2]).contains("not axial"));
    let series = records(&lines, "series");
    assert_eq!(series.len(), 1);
    assert_eq!(series[0]["images"], 0);
    let reason = series[0]["error"].as_str().expect("series error");
    assert!(
        reason.contains("no axial CT image") && reason.contains("1 localizers"),
        "{reason}"
    );
}

/// A slice whose Pixel Data is replaced by an encapsulated fragment of junk, under a
/// transfer syntax no decoder of this build handles.
fn claiming_transfer_syntax(spec: &SeriesSpec, slice: u32, ts: &str) -> DefaultDicomObject {
    let mut obj = synth::ct_slice(spec, slice);
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PixelFragmentSequence::new(Vec::<u32>::new(), vec![vec![0xFFu8, 0x0A, 1, 2, 3, 4]]),
    ));
    obj.update_meta(|m| m.transfer_syntax = ts.to_string());
    obj
}

#[test]
fn undecodable_files_are_reported_and_the_rest_of_the_series_is_labelled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (spec, files) = common::data::synthetic_series(&data, 92, 8, 48);
    // Slice 2: Pixel Data cut in half.
    let mut truncated = synth::ct_slice(&spec, 2);
    let half = truncated
        .element(tags::PIXEL_DATA)
        .expect("pixel data")
        .to_bytes()
        .expect("bytes")
        .len()
        / 2;
    truncated.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::from(vec![0u8; half]),
    ));
    write(&truncated, &files[2]);
    // Slices 4 and 6: JPEG XL and MPEG2 (known syntaxes, no decoder).
    const JPEG_XL: &str = "1.2.840.10008.1.2.4.112";
    const MPEG2: &str = "1.2.840.10008.1.2.4.100";
    write(&claiming_transfer_syntax(&spec, 4, JPEG_XL), &files[4]);
    write(&claiming_transfer_syntax(&spec, 6, MPEG2), &files[6]);
    // Slice 7: a transfer syntax nobody knows (the meta header's UID swapped in place for
    // one of the same length), so not even the data set can be parsed.
    const UNKNOWN: &str = "1.2.840.99999.1.2.1";
    let mut bytes = std::fs::read(&files[7]).expect("read");
    let at = bytes
        .windows(uids::EXPLICIT_VR_LITTLE_ENDIAN.len())
        .position(|w| w == uids::EXPLICIT_VR_LITTLE_ENDIAN.as_bytes())
        .expect("transfer syntax in the meta header");
    bytes[at..at + UNKNOWN.len()].copy_from_slice(UNKNOWN.as_bytes());
    std::fs::write(&files[7], bytes).expect("write");

    let Some(model) = make_model(dir.path(), "bad-pixels", &[]) else {
        return;
    };
    let config = write_config(dir.path(), &model, "");
    let out = run_cli(&config, &[Path::new("--json"), &data], &[]);
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(!common::text(&out).contains("panicked"));
    let lines = json_lines(&out);
    let corrupt = error_of(&lines, &files[2]);
    assert!(corrupt.contains("corrupt pixel data"), "{corrupt}");
    for (file, ts) in [(&files[4], JPEG_XL), (&files[6], MPEG2)] {
        let reason = error_of(&lines, file);
        assert!(
            reason.contains(&format!("transfer syntax {ts}"))
                && reason.contains("cannot be decoded"),
            "{reason}"
        );
    }
    let unknown = error_of(&lines, &files[7]);
    assert!(
        unknown.contains(&format!("transfer syntax {UNKNOWN} cannot be read")),
        "{unknown}"
    );
    let labelled: Vec<&str> = records(&lines, "image")
        .iter()
        .map(|l| l["file"].as_str().expect("file"))
        .collect();
    assert_eq!(labelled.len(), 4);
    for bad in [2, 4, 6, 7] {
        assert!(!labelled.contains(&files[bad].display().to_string().as_str()));
    }
    let series = records(&lines, "series");
    assert_eq!(series.len(), 1);
    assert_eq!(series[0]["images"], 4);
}

#[test]
fn model_problems_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    common::data::synthetic_series(&data, 93, 2, 32);
    let cases: [(&str, &[&str], &str); 4] = [
        (
            "no-window",
            &["--drop-key", "hu_window"],
            "metadata `hu_window` is missing",
        ),
        (
            "two-classes",
            &["--set-key", "classes=[\"neck\",\"legs\"]"],
            "metadata `classes` names 2 classes but output `probabilities` has 6",
        ),
        (
            "wrong-size",
            &["--set-key", "input_size=128"],
            "metadata `input_size` is 128",
        ),
        // A model that loads but answers NaN: refused at the first batch, nothing printed.
        (
            "nan",
            &["--kind", "nan"],
            "output `probabilities` is not finite",
        ),
    ];
    for (name, args, expected) in cases {
        let Some(model) = make_model(dir.path(), name, args) else {
            return;
        };
        let config = write_config(dir.path(), &model, "");
        let out = run_cli(&config, &[Path::new("--json"), &data], &[]);
        let text = assert_clean_failure(&out);
        assert!(text.contains(expected), "{name}: {text}");
        assert!(
            text.contains(&model.display().to_string()),
            "{name}: {text}"
        );
        assert!(out.stdout.is_empty(), "{name}: nothing labelled");
    }
    let missing = dir.path().join("missing.onnx");
    let config = write_config(dir.path(), &missing, "");
    let out = run_cli(&config, &[&data], &[]);
    let text = assert_clean_failure(&out);
    assert!(
        text.contains(&format!(
            "{}: cannot open the model: no such file",
            missing.display()
        )),
        "{text}"
    );
}

#[test]
fn a_missing_onnx_runtime_library_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    common::data::synthetic_series(&data, 94, 2, 32);
    // The model is never opened: the library comes first.
    let model = dir.path().join("model.onnx");
    let from_config = "/nonexistent/config/libonnxruntime.so";
    let config = write_config(
        dir.path(),
        &model,
        &format!("onnxruntime_library = \"{from_config}\""),
    );
    let out = run_cli(&config, &[&data], &[]);
    let text = assert_clean_failure(&out);
    assert!(text.contains(from_config), "{text}");
    assert!(
        text.contains("bash deploy/install-onnxruntime.sh"),
        "{text}"
    );

    let from_env = "/nonexistent/env/libonnxruntime.so";
    let config = write_config(dir.path(), &model, "");
    let out = run_cli(&config, &[&data], &[("ORT_DYLIB_PATH", from_env)]);
    let text = assert_clean_failure(&out);
    assert!(
        text.contains(from_env) && text.contains("no such file"),
        "{text}"
    );
}

/// Issue #16: a real series of ../shared/data/ct with pelvis key-images, labelled by the
/// shipped model; one pelvis image's probabilities are made to say *neck* (what models do on
/// scanners they never saw), and the decoding along the series' real z positions must give
/// it back its region, while that image's own label stays *neck*.
#[test]
fn a_real_pelvis_image_made_to_say_neck_is_decoded_as_pelvis() {
    let Some(data) = common::data::ct_data() else {
        eprintln!("NOTE: no real CT data: the decoder's unit tests (anatomy::order) still run");
        return;
    };
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/anatomy.onnx");
    if !shipped.is_file() {
        eprintln!("NOTE: no shipped model ({}): skipped", shipped.display());
        return;
    }
    // The series with the most pelvis images (ties: the first case by name).
    let rows = common::data::labels(&data);
    let mut pelvis: HashMap<(String, String), usize> = HashMap::new();
    for r in rows.iter().filter(|r| r.label == "pelvis") {
        *pelvis
            .entry((r.case_id.clone(), r.series_uid.clone()))
            .or_default() += 1;
    }
    let ((case, series_uid), count) = pelvis
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
        .expect("labels.csv has pelvis images");
    assert!(count >= 4, "{case}: {count} pelvis images");
    let label_of: HashMap<&str, &str> = rows
        .iter()
        .map(|r| (r.sop_uid.as_str(), r.label.as_str()))
        .collect();

    let model = Model::load(&shipped, Device::Cpu, 2).expect("the shipped model");
    let report =
        classify_paths(&model, &[data.join(&case)], &settings(&shipped)).expect("classify");
    let series = report
        .series
        .iter()
        .find(|s| s.series_uid == series_uid)
        .expect("the series is labelled");
    let mut images: Vec<Labelled> = series
        .images
        .iter()
        .map(|i| Labelled {
            z_mm: i.image.z_mm,
            probabilities: i.image.probabilities.clone(),
        })
        .collect();
    let truth: Vec<&str> = series
        .images
        .iter()
        .map(|i| label_of[i.image.sop_instance_uid.as_str()])
        .collect();
    let pelvis_images: Vec<usize> = (0..truth.len()).filter(|&i| truth[i] == "pelvis").collect();
    let chosen = pelvis_images[pelvis_images.len() / 2];
    let classes = &report.classes;
    let neck = classes
        .iter()
        .position(|c| c == "neck")
        .expect("neck class");
    for (c, p) in images[chosen].probabilities.iter_mut().enumerate() {
        *p = if c == neck {
            0.97
        } else {
            0.03 / (classes.len() - 1) as f32
        };
    }

    let raw = coverage::coverage(
        &images,
        classes,
        &CoverageRules {
            decoding: coverage::Decoding::None,
            ..CoverageRules::default()
        },
    );
    assert_eq!(raw.labels[chosen], "neck", "the image's own label");
    let decoded = coverage::coverage(&images, classes, &CoverageRules::default());
    eprintln!(
        "{case}: labelled {truth:?}\n  own {:?}\n  decoded {:?}",
        raw.labels, decoded.labels
    );
    assert_eq!(decoded.decoding, coverage::Decoding::Order);
    assert_eq!(
        decoded.labels[chosen], "pelvis",
        "{case} z = {} mm: decoded {:?}, labelled {truth:?}",
        images[chosen].z_mm, decoded.labels
    );
    // The same with the images listed foot to head (feet-first order).
    let reversed: Vec<Labelled> = images.iter().rev().cloned().collect();
    let mut again = coverage::coverage(&reversed, classes, &CoverageRules::default()).labels;
    again.reverse();
    assert_eq!(again, decoded.labels);
}
