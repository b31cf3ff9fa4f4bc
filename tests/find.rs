//! C-FIND SCP: DCMTK findscu, Orthanc and a raw SCU query a real node.
//!
//! The fixture sends synthetic CT series with storescu (patients, studies, dates and
//! descriptions chosen for the matching rules), lets them complete, and labels them
//! through the index's own `finish_job`, so the predicted Body Part Examined, the regions
//! and the key-image labels are known exactly. One test labels with the classifier and a
//! test model instead. Every test runs on SQLite, and on PostgreSQL with
//! ANATOMY_TEST_DATABASE_URL.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anatomy_node::index::{Index, KeyImageRow, LabelRecord, LabelStatus};
use anatomy_node::synth::{self, SeriesSpec};
use common::node::{Node, NodeOptions, AE};
use common::orthanc::{Orthanc, OrthancOptions};
use common::scu::{Scu, EXPLICIT, IMPLICIT};
use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::text::{SpecificCharacterSet, TextCodec};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::pdu::PDataValueType;
use dicom_ul::Pdu;

const STUDY_ROOT: &str = "1.2.840.10008.5.1.4.1.2.2.1";
const PATIENT_ROOT: &str = "1.2.840.10008.5.1.4.1.2.1.1";
const CREATOR: &str = "0099,0010=ANATOMY_NODE 1.0";
const MODEL_VERSION: &str = "find-test 1";
const SLICES: u32 = 4;

// ---------------------------------------------------------------------------------------
// The fixture

struct Study {
    key: &'static str,
    patient_id: &'static str,
    patient_name: &'static str,
    date: &'static str,
    time: &'static str,
    accession: &'static str,
    description: &'static str,
}

struct SeriesDef {
    key: &'static str,
    number: u32,
    study: &'static str,
    description: &'static str,
    received_body_part: Option<&'static str>,
    label: Option<LabelDef>,
}

struct LabelDef {
    body_part: &'static str,
    class: &'static str,
    /// (Body Part Examined term, SNOMED CT code, meaning)
    regions: &'static [(&'static str, &'static str, &'static str)],
    /// (slice index, label, probability of that label)
    key_images: &'static [(u32, &'static str, f64)],
}

const CHEST: (&str, &str, &str) = ("CHEST", "43799004", "Chest");
const ABDOMEN: (&str, &str, &str) = ("ABDOMEN", "818981001", "Abdomen");
const PELVIS: (&str, &str, &str) = ("PELVIS", "816092008", "Pelvis");

const STUDIES: &[Study] = &[
    Study {
        key: "A",
        patient_id: "FIND-P1",
        patient_name: "Müller^Jörg",
        date: "20240105",
        time: "083000",
        accession: "ACC-A",
        description: "CT Thorax",
    },
    Study {
        key: "B",
        patient_id: "FIND-P1",
        patient_name: "Müller^Jörg",
        date: "20240220",
        time: "141500",
        accession: "ACC-B",
        description: "CT Abdomen",
    },
    Study {
        key: "C",
        patient_id: "FIND-P2",
        patient_name: "Smith^Anna",
        date: "20231231",
        time: "235900",
        accession: "ACC-C",
        description: "CT Pelvis",
    },
    Study {
        key: "D",
        patient_id: "OTHER-P3",
        patient_name: "SMITH^BOB",
        date: "20240301",
        time: "100000",
        accession: "ACC-D",
        description: "CT Thorax low dose",
    },
];

const SERIES: &[SeriesDef] = &[
    SeriesDef {
        key: "A1",
        number: 501,
        study: "A",
        description: "Thorax 1.0 B31f",
        received_body_part: None,
        label: Some(LabelDef {
            body_part: "CHEST",
            class: "lungs",
            regions: &[CHEST],
            key_images: &[(0, "lungs", 0.91), (2, "liver", 0.62)],
        }),
    },
    SeriesDef {
        key: "A2",
        number: 502,
        study: "A",
        description: "Thorax_Abdomen 50%",
        received_body_part: Some("CHEST"),
        label: Some(LabelDef {
            body_part: "CHESTABDOMEN",
            class: "liver",
            regions: &[CHEST, ABDOMEN],
            key_images: &[],
        }),
    },
    SeriesDef {
        key: "B1",
        number: 503,
        study: "B",
        description: "Abdomen venous",
        // the header is wrong: the reason the node exists
        received_body_part: Some("CHEST"),
        label: Some(LabelDef {
            body_part: "ABDOMEN",
            class: "liver",
            regions: &[ABDOMEN],
            key_images: &[],
        }),
    },
    SeriesDef {
        key: "C1",
        number: 504,
        study: "C",
        description: "Pelvis",
        received_body_part: Some("PELVIS"),
        label: Some(LabelDef {
            body_part: "PELVIS",
            class: "pelvis",
            regions: &[PELVIS],
            key_images: &[],
        }),
    },
    SeriesDef {
        key: "C2",
        number: 505,
        study: "C",
        description: "Scout",
        received_body_part: None,
        // skipped by the classifier
        label: None,
    },
    SeriesDef {
        key: "D1",
        number: 506,
        study: "D",
        description: "thorax low dose",
        received_body_part: None,
        label: Some(LabelDef {
            body_part: "CHEST",
            class: "lungs",
            regions: &[CHEST],
            key_images: &[],
        }),
    },
];

fn study_uid(key: &str) -> String {
    format!("2.25.99001.{}", key.as_bytes()[0])
}

fn series_uid(key: &str) -> String {
    let def = SERIES.iter().find(|s| s.key == key).expect("series key");
    SeriesSpec::new(def.number, SLICES, 16).series_uid()
}

fn sop_uid(key: &str, slice: u32) -> String {
    let def = SERIES.iter().find(|s| s.key == key).expect("series key");
    SeriesSpec::new(def.number, SLICES, 16).sop_uid(slice)
}

struct Fixture {
    node: Node,
    _work: tempfile::TempDir,
}

/// The URL the test writes the node's index with.
fn writable_url(node: &Node) -> String {
    if node.db.url.is_empty() {
        format!(
            "sqlite://{}",
            node.storage().join("index.sqlite3").display()
        )
    } else {
        node.db.url.clone()
    }
}

fn write_fixture_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for def in SERIES {
        let study = STUDIES.iter().find(|s| s.key == def.study).expect("study");
        let mut spec = SeriesSpec::new(def.number, SLICES, 16);
        spec.patient_id = study.patient_id.to_string();
        for slice in 0..SLICES {
            let mut obj = synth::ct_slice(&spec, slice);
            let mut put = |tag: Tag, vr: VR, v: &str| {
                obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
            };
            put(tags::STUDY_INSTANCE_UID, VR::UI, &study_uid(study.key));
            put(tags::PATIENT_NAME, VR::PN, study.patient_name);
            put(tags::STUDY_DATE, VR::DA, study.date);
            put(tags::STUDY_TIME, VR::TM, study.time);
            put(tags::ACCESSION_NUMBER, VR::SH, study.accession);
            put(tags::STUDY_DESCRIPTION, VR::LO, study.description);
            put(tags::SERIES_DESCRIPTION, VR::LO, def.description);
            if let Some(bpe) = def.received_body_part {
                put(tags::BODY_PART_EXAMINED, VR::CS, bpe);
            }
            let path = dir.join(format!("{}-{slice}.dcm", def.key));
            obj.write_to_file(&path).expect("write fixture file");
            files.push(path);
        }
    }
    files
}

/// Key-images whose label decoded along z differs from the model's own (series key, slice,
/// decoded label): the index keeps both, and C-FIND answers both.
const DECODED: &[(&str, u32, &str)] = &[("A1", 2, "lungs")];

fn decoded_label(series: &str, slice: u32) -> Option<&'static str> {
    DECODED
        .iter()
        .find(|(s, i, _)| *s == series && *i == slice)
        .map(|(_, _, l)| *l)
}

/// The result the classifier would store for `def`.
fn record_for(def: &SeriesDef) -> LabelRecord {
    let Some(label) = &def.label else {
        return LabelRecord::without_labels(LabelStatus::Skipped, "no axial CT image");
    };
    let mut record = LabelRecord::without_labels(LabelStatus::Labelled, "");
    record.reason = None;
    record.dominant_class = Some(label.class.into());
    record.body_part_examined = Some(label.body_part.into());
    record.anatomic_regions = Some(
        serde_json::to_string(
            &label
                .regions
                .iter()
                .map(|(bp, code, meaning)| {
                    serde_json::json!({"body_part": bp, "code_value": code,
                        "coding_scheme": "SCT", "code_meaning": meaning})
                })
                .collect::<Vec<_>>(),
        )
        .expect("regions JSON"),
    );
    record.model_version = Some(MODEL_VERSION.into());
    record.classes = Some(r#"["neck","lungs","liver","pelvis","legs","other"]"#.into());
    record.key_images = label
        .key_images
        .iter()
        .map(|(slice, label, p)| KeyImageRow {
            sop_instance_uid: sop_uid(def.key, *slice),
            frame: 0,
            z_mm: -2.5 * f64::from(*slice),
            label: label.to_string(),
            smoothed_label: decoded_label(def.key, *slice).unwrap_or(label).to_string(),
            probabilities: serde_json::json!({ *label: p, "other": 1.0 - p }).to_string(),
        })
        .collect();
    record
}

fn fixture() -> Fixture {
    let work = tempfile::tempdir().expect("work dir");
    let node = Node::start_with(NodeOptions {
        stable_after_secs: 1,
        ..NodeOptions::default()
    });
    let files = write_fixture_files(work.path());
    let out = node.storescu(&["-aet", "TESTSCU"], &files);
    assert!(out.status.success(), "{}", common::text(&out));
    let index = node.index();
    let queued = common::wait_until(30, || {
        index.count("SELECT COUNT(*) FROM work_queue") == SERIES.len() as i64
    });
    assert!(queued, "series did not complete");
    drop(index);

    // Label every series through the index's own code, as a classifier node would.
    let url = writable_url(&node);
    common::runtime().block_on(async {
        let index = Index::connect(&url, 2, false).await.expect("index");
        let now = anatomy_node::store::now_millis();
        while let Some(job) = index.claim_job("find-test", now, 0).await.expect("claim") {
            let def = SERIES
                .iter()
                .find(|d| series_uid(d.key) == job.series_uid)
                .expect("a fixture series");
            let stored = index
                .finish_job(&job, "find-test", &record_for(def), now)
                .await
                .expect("finish job");
            assert!(stored);
        }
        index.close().await;
    });
    Fixture { node, _work: work }
}

// ---------------------------------------------------------------------------------------
// findscu

/// Run findscu (`-S` Study Root or `-P` Patient Root) with `keys`; the response
/// identifiers, after checking the final status was Success.
fn findscu(node: &Node, model: &str, keys: &[&str]) -> Vec<InMemDicomObject> {
    let (answers, log) = findscu_raw(node, model, keys, &[]);
    assert!(
        log.contains("Received Final Find Response (Success)"),
        "findscu {keys:?}:\n{log}"
    );
    answers
}

fn findscu_raw(
    node: &Node,
    model: &str,
    keys: &[&str],
    extra: &[&str],
) -> (Vec<InMemDicomObject>, String) {
    let dir = tempfile::tempdir().expect("findscu dir");
    let port = node.dicom_port.to_string();
    let dir_arg = dir.path().display().to_string();
    let mut args: Vec<&str> = vec![
        "-v", model, "-aet", "TESTSCU", "-aec", AE, "-X", "-od", &dir_arg,
    ];
    args.extend_from_slice(extra);
    args.extend(["127.0.0.1", port.as_str()]);
    for k in keys {
        args.extend(["-k", k]);
    }
    // DCMTK needs the VRs of our private keys to encode values for them (README).
    let out = Command::new("findscu")
        .args(&args)
        .env("TCP_NODELAY", "1")
        .env(
            "DCMDICTPATH",
            format!("{}:{}", dcmtk_dictionary(), private_dictionary().display()),
        )
        .output()
        .expect("run findscu (apt package dcmtk)");
    let log = common::text(&out);
    assert!(out.status.success(), "findscu {keys:?}:\n{log}");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .expect("findscu output")
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    let answers = files
        .iter()
        .map(|f| {
            dicom_object::open_file(f)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
                .into_inner()
        })
        .collect();
    (answers, log)
}

/// Our private block for DCMTK's data dictionary (src/private_block.rs, README "The private
/// block").
fn private_dictionary() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/anatomy-node-private.dic")
}

/// DCMTK's own data dictionary (DCMDICTPATH replaces it, so it is named first).
fn dcmtk_dictionary() -> String {
    std::fs::read_dir("/usr/share")
        .expect("/usr/share")
        .flatten()
        .map(|e| e.path().join("dicom.dic"))
        .find(|p| p.to_string_lossy().contains("dcmtk") && p.is_file())
        .map(|p| p.display().to_string())
        .expect("DCMTK's dicom.dic (apt package libdcmtk17)")
}

fn text_of(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.element(tag)
        .ok()
        .and_then(|e| {
            e.to_str()
                .ok()
                .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        })
        .unwrap_or_default()
}

fn set_of(answers: &[InMemDicomObject], tag: Tag) -> BTreeSet<String> {
    answers.iter().map(|a| text_of(a, tag)).collect()
}

fn series_keys(answers: &[InMemDicomObject]) -> BTreeSet<&'static str> {
    let uids = set_of(answers, tags::SERIES_INSTANCE_UID);
    assert_eq!(uids.len(), answers.len(), "one answer per series");
    SERIES
        .iter()
        .filter(|d| uids.contains(&series_uid(d.key)))
        .map(|d| d.key)
        .collect::<BTreeSet<_>>()
        .tap(|found| assert_eq!(found.len(), uids.len(), "only fixture series: {uids:?}"))
}

fn study_keys(answers: &[InMemDicomObject]) -> BTreeSet<&'static str> {
    let uids = set_of(answers, tags::STUDY_INSTANCE_UID);
    assert_eq!(uids.len(), answers.len(), "one answer per study");
    STUDIES
        .iter()
        .filter(|s| uids.contains(&study_uid(s.key)))
        .map(|s| s.key)
        .collect::<BTreeSet<_>>()
        .tap(|found| assert_eq!(found.len(), uids.len(), "only fixture studies: {uids:?}"))
}

trait Tap: Sized {
    fn tap(self, f: impl FnOnce(&Self)) -> Self {
        f(&self);
        self
    }
}
impl<T> Tap for T {}

fn keys<const N: usize>(items: [&'static str; N]) -> BTreeSet<&'static str> {
    items.into_iter().collect()
}

fn by_key<'a>(answers: &'a [InMemDicomObject], key: &str) -> &'a InMemDicomObject {
    let uid = series_uid(key);
    answers
        .iter()
        .find(|a| text_of(a, tags::SERIES_INSTANCE_UID) == uid)
        .unwrap_or_else(|| panic!("no answer for series {key}"))
}

fn series_query(node: &Node, filter: &[&str]) -> BTreeSet<&'static str> {
    let mut k = vec!["QueryRetrieveLevel=SERIES", "SeriesInstanceUID"];
    k.extend_from_slice(filter);
    series_keys(&findscu(node, "-S", &k))
}

fn study_query(node: &Node, filter: &[&str]) -> BTreeSet<&'static str> {
    let mut k = vec!["QueryRetrieveLevel=STUDY", "StudyInstanceUID"];
    k.extend_from_slice(filter);
    study_keys(&findscu(node, "-S", &k))
}

// ---------------------------------------------------------------------------------------
// findscu: matching and return keys

#[test]
fn studies_by_patient_id_with_computed_keys() {
    let f = fixture();
    let answers = findscu(
        &f.node,
        "-S",
        &[
            "QueryRetrieveLevel=STUDY",
            "PatientID=FIND-P1",
            "StudyInstanceUID",
            "PatientName",
            "StudyDate",
            "AccessionNumber",
            "NumberOfStudyRelatedSeries",
            "NumberOfStudyRelatedInstances",
            "ModalitiesInStudy",
            "RetrieveAETitle",
        ],
    );
    assert_eq!(study_keys(&answers), keys(["A", "B"]));
    for a in &answers {
        let (series, instances) = if text_of(a, tags::STUDY_INSTANCE_UID) == study_uid("A") {
            ("2", "8")
        } else {
            ("1", "4")
        };
        assert_eq!(text_of(a, tags::NUMBER_OF_STUDY_RELATED_SERIES), series);
        assert_eq!(
            text_of(a, tags::NUMBER_OF_STUDY_RELATED_INSTANCES),
            instances
        );
        assert_eq!(text_of(a, tags::MODALITIES_IN_STUDY), "CT");
        assert_eq!(text_of(a, tags::RETRIEVE_AE_TITLE), AE);
        assert_eq!(text_of(a, tags::QUERY_RETRIEVE_LEVEL), "STUDY");
        assert_eq!(text_of(a, tags::PATIENT_ID), "FIND-P1");
        // a name outside ASCII comes back in UTF-8, and says so
        assert_eq!(text_of(a, tags::PATIENT_NAME), "Müller^Jörg");
        assert_eq!(text_of(a, tags::SPECIFIC_CHARACTER_SET), "ISO_IR 192");
    }
    // ASCII-only answers carry no Specific Character Set
    let smith = findscu(
        &f.node,
        "-S",
        &[
            "QueryRetrieveLevel=STUDY",
            "PatientID=FIND-P2",
            "PatientName",
        ],
    );
    assert_eq!(smith.len(), 1);
    assert!(smith[0].element(tags::SPECIFIC_CHARACTER_SET).is_err());

    // Patient Root: the patient, with its counts, then its studies
    let patients = findscu(
        &f.node,
        "-P",
        &[
            "QueryRetrieveLevel=PATIENT",
            "PatientID=FIND-P1",
            "PatientName",
            "NumberOfPatientRelatedStudies",
            "NumberOfPatientRelatedSeries",
            "NumberOfPatientRelatedInstances",
        ],
    );
    assert_eq!(patients.len(), 1);
    let p = &patients[0];
    assert_eq!(text_of(p, tags::NUMBER_OF_PATIENT_RELATED_STUDIES), "2");
    assert_eq!(text_of(p, tags::NUMBER_OF_PATIENT_RELATED_SERIES), "3");
    assert_eq!(text_of(p, tags::NUMBER_OF_PATIENT_RELATED_INSTANCES), "12");
    let studies = findscu(
        &f.node,
        "-P",
        &[
            "QueryRetrieveLevel=STUDY",
            "PatientID=FIND-P1",
            "StudyInstanceUID",
        ],
    );
    assert_eq!(study_keys(&studies), keys(["A", "B"]));
    // nothing for an unknown patient
    assert!(study_query(&f.node, &["PatientID=NOBODY"]).is_empty());
}

#[test]
fn series_by_predicted_body_part_and_private_keys() {
    let f = fixture();
    let n = &f.node;
    // the predicted term, not what the headers said (B1 said CHEST, A1 and D1 nothing)
    assert_eq!(
        series_query(n, &["BodyPartExamined=CHEST"]),
        keys(["A1", "D1"])
    );
    assert_eq!(series_query(n, &["BodyPartExamined=ABDOMEN"]), keys(["B1"]));
    assert_eq!(
        series_query(n, &["BodyPartExamined=CHEST*"]),
        keys(["A1", "A2", "D1"])
    );
    // the received value stays queryable in the private block
    assert_eq!(
        series_query(n, &[CREATOR, "0099,1013=CHEST"]),
        keys(["A2", "B1"])
    );
    assert_eq!(
        series_query(n, &[CREATOR, "0099,1011=liver"]),
        keys(["A2", "B1"])
    );
    assert_eq!(
        series_query(n, &[CREATOR, "0099,1012=SKIPPED"]),
        keys(["C2"])
    );
    assert_eq!(
        series_query(n, &[CREATOR, "0099,1010=find-test*"]),
        keys(["A1", "A2", "B1", "C1", "D1"])
    );
    // DT range on the labelling time
    assert_eq!(series_query(n, &[CREATOR, "0099,1014=20000101-"]).len(), 6);
    assert!(series_query(n, &[CREATOR, "0099,1014=-20000101"]).is_empty());
    // combined with a study date range
    assert_eq!(
        series_query(n, &["BodyPartExamined=CHEST", "StudyDate=20240201-"]),
        keys(["D1"])
    );

    let answers = findscu(
        n,
        "-S",
        &[
            "QueryRetrieveLevel=SERIES",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "PatientID=FIND-P1",
            "BodyPartExamined",
            "SeriesDescription",
            "NumberOfSeriesRelatedInstances",
            CREATOR,
            "0099,1010",
            "0099,1011",
            "0099,1012",
            "0099,1013",
            "0099,1014",
        ],
    );
    assert_eq!(series_keys(&answers), keys(["A1", "A2", "B1"]));
    let b1 = by_key(&answers, "B1");
    assert_eq!(text_of(b1, tags::BODY_PART_EXAMINED), "ABDOMEN");
    assert_eq!(text_of(b1, Tag(0x0099, 0x0010)), "ANATOMY_NODE 1.0");
    assert_eq!(text_of(b1, Tag(0x0099, 0x1010)), MODEL_VERSION);
    assert_eq!(text_of(b1, Tag(0x0099, 0x1011)), "liver");
    assert_eq!(text_of(b1, Tag(0x0099, 0x1012)), "LABELLED");
    assert_eq!(text_of(b1, Tag(0x0099, 0x1013)), "CHEST");
    let labelled_at = text_of(b1, Tag(0x0099, 0x1014));
    assert!(
        labelled_at.len() == 23 && labelled_at.ends_with("+0000"),
        "{labelled_at}"
    );
    assert_eq!(text_of(b1, tags::SERIES_DESCRIPTION), "Abdomen venous");
    assert_eq!(text_of(b1, tags::NUMBER_OF_SERIES_RELATED_INSTANCES), "4");
    assert_eq!(text_of(b1, tags::STUDY_INSTANCE_UID), study_uid("B"));
    let a1 = by_key(&answers, "A1");
    assert_eq!(text_of(a1, Tag(0x0099, 0x1013)), "");
    assert_eq!(text_of(a1, tags::BODY_PART_EXAMINED), "CHEST");
}

#[test]
fn anatomic_region_sequence_matching() {
    let f = fixture();
    let n = &f.node;
    let query = |item: &[&str]| {
        let mut k = vec![
            "QueryRetrieveLevel=SERIES".to_string(),
            "SeriesInstanceUID".to_string(),
        ];
        if item.is_empty() {
            k.push("AnatomicRegionSequence".into());
        }
        for i in item {
            k.push(format!("AnatomicRegionSequence[0].{i}"));
        }
        let refs: Vec<&str> = k.iter().map(String::as_str).collect();
        findscu(n, "-S", &refs)
    };
    let chest = query(&[
        "CodeValue=43799004",
        "CodingSchemeDesignator=SCT",
        "CodeMeaning",
    ]);
    assert_eq!(series_keys(&chest), keys(["A1", "A2", "D1"]));
    // only the matching items come back, with the keys asked for
    let a2 = by_key(&chest, "A2");
    let items = a2
        .element(tags::ANATOMIC_REGION_SEQUENCE)
        .expect("sequence")
        .items()
        .expect("items")
        .to_vec();
    assert_eq!(items.len(), 1);
    assert_eq!(text_of(&items[0], tags::CODE_VALUE), "43799004");
    assert_eq!(text_of(&items[0], tags::CODING_SCHEME_DESIGNATOR), "SCT");
    assert_eq!(text_of(&items[0], tags::CODE_MEANING), "Chest");

    let abdomen = query(&["CodeValue=818981001", "CodingSchemeDesignator=SCT"]);
    assert_eq!(series_keys(&abdomen), keys(["A2", "B1"]));
    // the scheme is part of the match
    assert!(query(&["CodeValue=818981001", "CodingSchemeDesignator=SRT"]).is_empty());

    // universal: every series, each with all its regions, whole
    let all = query(&[]);
    assert_eq!(all.len(), 6);
    let a2 = by_key(&all, "A2");
    let items = a2
        .element(tags::ANATOMIC_REGION_SEQUENCE)
        .expect("sequence")
        .items()
        .expect("items")
        .to_vec();
    let codes: Vec<String> = items.iter().map(|i| text_of(i, tags::CODE_VALUE)).collect();
    assert_eq!(codes, ["43799004", "818981001"]);
    assert_eq!(text_of(&items[1], tags::CODE_MEANING), "Abdomen");
    let c2 = by_key(&all, "C2");
    let none = c2
        .element(tags::ANATOMIC_REGION_SEQUENCE)
        .expect("sequence");
    assert!(
        none.items().is_none_or(|i| i.is_empty()),
        "skipped: no regions"
    );
}

#[test]
fn date_and_time_ranges() {
    let f = fixture();
    let n = &f.node;
    assert_eq!(
        study_query(n, &["StudyDate=20240101-20240229"]),
        keys(["A", "B"])
    );
    assert_eq!(study_query(n, &["StudyDate=-20231231"]), keys(["C"]));
    assert_eq!(study_query(n, &["StudyDate=20240301-"]), keys(["D"]));
    assert_eq!(study_query(n, &["StudyDate=20240105"]), keys(["A"]));
    assert!(study_query(n, &["StudyDate=20240106"]).is_empty());
    assert_eq!(study_query(n, &["StudyTime=0800-0900"]), keys(["A"]));
    assert_eq!(study_query(n, &["StudyTime=2359"]), keys(["C"]));
    assert_eq!(study_query(n, &["StudyTime=-1000"]), keys(["A", "D"]));
    assert_eq!(
        study_query(n, &["StudyDate=20240101-20240229", "StudyTime=1400-"]),
        keys(["B"])
    );
    // the same ranges at series level select the series of those studies
    assert_eq!(
        series_query(n, &["StudyDate=20240101-20240229"]),
        keys(["A1", "A2", "B1"])
    );
    // a range in the wrong order, or no date at all, is a bad identifier
    let (_, log) = findscu_raw(
        n,
        "-S",
        &["QueryRetrieveLevel=STUDY", "StudyDate=20240229-20240101"],
        &[],
    );
    assert!(log.contains("DataSetDoesNotMatchSOPClass"), "{log}");
}

#[test]
fn wildcards_and_uid_lists() {
    let f = fixture();
    let n = &f.node;
    // case-sensitive for LO ...
    assert_eq!(
        series_query(n, &["SeriesDescription=Thorax*"]),
        keys(["A1", "A2"])
    );
    assert_eq!(
        series_query(n, &["SeriesDescription=*thorax*"]),
        keys(["D1"])
    );
    assert_eq!(
        series_query(n, &["SeriesDescription=Thorax?1.0*"]),
        keys(["A1"])
    );
    // ... and '%' and '_' are characters, not SQL wild cards
    assert_eq!(series_query(n, &["SeriesDescription=*50%"]), keys(["A2"]));
    assert_eq!(series_query(n, &["SeriesDescription=*_*"]), keys(["A2"]));
    assert!(series_query(n, &["SeriesDescription=Thorax%"]).is_empty());
    // "*" is universal matching: empty values match too
    assert_eq!(series_query(n, &["BodyPartExamined=*"]).len(), 6);
    // PN: case-insensitive
    assert_eq!(study_query(n, &["PatientName=smith*"]), keys(["C", "D"]));
    assert_eq!(study_query(n, &["PatientName=SMITH^ANNA"]), keys(["C"]));
    assert_eq!(
        study_query(
            n,
            &["SpecificCharacterSet=ISO_IR 192", "PatientName=müller*"]
        ),
        keys(["A", "B"])
    );
    assert_eq!(study_query(n, &["AccessionNumber=ACC-?"]).len(), 4);
    assert_eq!(study_query(n, &["PatientID=FIND-*"]), keys(["A", "B", "C"]));

    // List of UID Matching
    let list = format!(
        "SeriesInstanceUID={}\\{}",
        series_uid("A1"),
        series_uid("C1")
    );
    let answers = findscu(n, "-S", &["QueryRetrieveLevel=SERIES", &list]);
    assert_eq!(series_keys(&answers), keys(["A1", "C1"]));
    let studies = format!("StudyInstanceUID={}\\{}", study_uid("A"), study_uid("D"));
    assert_eq!(series_query(n, &[&studies]), keys(["A1", "A2", "D1"]));
    let images = format!(
        "SOPInstanceUID={}\\{}\\1.2.3.4",
        sop_uid("B1", 0),
        sop_uid("D1", 3)
    );
    let answers = findscu(n, "-S", &["QueryRetrieveLevel=IMAGE", &images]);
    assert_eq!(
        set_of(&answers, tags::SOP_INSTANCE_UID),
        [sop_uid("B1", 0), sop_uid("D1", 3)].into_iter().collect()
    );
}

#[test]
fn image_level_lists_key_images_with_their_labels() {
    let f = fixture();
    let n = &f.node;
    let series = format!("SeriesInstanceUID={}", series_uid("A1"));
    let study = format!("StudyInstanceUID={}", study_uid("A"));
    let answers = findscu(
        n,
        "-P",
        &[
            "QueryRetrieveLevel=IMAGE",
            "PatientID=FIND-P1",
            &study,
            &series,
            "SOPInstanceUID",
            "InstanceNumber",
            "Rows",
            CREATOR,
            "0099,1020",
            "0099,1021",
            "0099,1022",
            "0099,1023",
        ],
    );
    assert_eq!(answers.len(), SLICES as usize);
    let by_sop: BTreeMap<String, &InMemDicomObject> = answers
        .iter()
        .map(|a| (text_of(a, tags::SOP_INSTANCE_UID), a))
        .collect();
    let first = by_sop[&sop_uid("A1", 0)];
    assert_eq!(text_of(first, tags::INSTANCE_NUMBER), "1");
    assert_eq!(text_of(first, tags::ROWS), "16");
    assert_eq!(text_of(first, Tag(0x0099, 0x1020)), "lungs");
    assert_eq!(text_of(first, Tag(0x0099, 0x1021)), "0.91");
    assert_eq!(text_of(first, Tag(0x0099, 0x1022)), "lungs");
    assert_eq!(text_of(first, Tag(0x0099, 0x1023)), "1");
    let third = by_sop[&sop_uid("A1", 2)];
    assert_eq!(text_of(third, Tag(0x0099, 0x1020)), "liver");
    assert_eq!(text_of(third, Tag(0x0099, 0x1021)), "0.62");
    assert_eq!(
        text_of(third, Tag(0x0099, 0x1022)),
        "lungs",
        "decoded along z: not the model's own label (0099,1020)"
    );
    let second = by_sop[&sop_uid("A1", 1)];
    assert_eq!(text_of(second, Tag(0x0099, 0x1020)), "", "not a key-image");

    // only the key-images of the series: a label of at least one character
    let key_images = findscu(
        n,
        "-S",
        &[
            "QueryRetrieveLevel=IMAGE",
            &series,
            "SOPInstanceUID",
            CREATOR,
            "0099,1020=?*",
        ],
    );
    assert_eq!(
        set_of(&key_images, tags::SOP_INSTANCE_UID),
        [sop_uid("A1", 0), sop_uid("A1", 2)].into_iter().collect()
    );
    let liver = findscu(
        n,
        "-S",
        &[
            "QueryRetrieveLevel=IMAGE",
            &series,
            "SOPInstanceUID",
            CREATOR,
            "0099,1020=liver",
        ],
    );
    assert_eq!(
        set_of(&liver, tags::SOP_INSTANCE_UID),
        [sop_uid("A1", 2)].into_iter().collect()
    );
    // Implicit VR: the private values travel as bytes and still match
    let (implicit, log) = findscu_raw(
        n,
        "-S",
        &[
            "QueryRetrieveLevel=IMAGE",
            &series,
            "SOPInstanceUID",
            CREATOR,
            "0099,1020=lungs",
        ],
        &["-xi"],
    );
    assert!(log.contains("Final Find Response (Success)"), "{log}");
    assert_eq!(implicit.len(), 1);
    // Matching on the decoded label (0099,1022) finds the image the model called liver.
    let decoded_lungs = findscu(
        n,
        "-S",
        &[
            "QueryRetrieveLevel=IMAGE",
            &series,
            "SOPInstanceUID",
            CREATOR,
            "0099,1022=lungs",
        ],
    );
    assert_eq!(
        set_of(&decoded_lungs, tags::SOP_INSTANCE_UID),
        [sop_uid("A1", 0), sop_uid("A1", 2)].into_iter().collect()
    );
}

// ---------------------------------------------------------------------------------------
// Raw SCU: C-CANCEL, character sets, bad identifiers

/// A response as the raw SCU reads it.
struct FindResponse {
    status: u16,
    comment: String,
    identifier: Option<InMemDicomObject>,
}

fn command_bytes(elements: &[(Tag, VR, PrimitiveValue)]) -> Vec<u8> {
    let obj = InMemDicomObject::from_element_iter(
        elements
            .iter()
            .map(|(t, vr, v)| DataElement::new(*t, *vr, v.clone())),
    );
    let mut body = Vec::new();
    obj.write_dataset_with_ts(&mut body, TransferSyntaxRegistry.get(IMPLICIT).unwrap())
        .expect("encode command");
    let mut out = vec![0, 0, 0, 0, 4, 0, 0, 0];
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn find_rq(message_id: u16, sop_class: &str, with_identifier: bool) -> Vec<u8> {
    command_bytes(&[
        (Tag(0x0000, 0x0002), VR::UI, PrimitiveValue::from(sop_class)),
        (Tag(0x0000, 0x0100), VR::US, PrimitiveValue::from(0x0020u16)),
        (
            Tag(0x0000, 0x0110),
            VR::US,
            PrimitiveValue::from(message_id),
        ),
        (Tag(0x0000, 0x0700), VR::US, PrimitiveValue::from(0u16)),
        (
            Tag(0x0000, 0x0800),
            VR::US,
            PrimitiveValue::from(if with_identifier { 0x0000u16 } else { 0x0101 }),
        ),
    ])
}

fn cancel_rq(message_id: u16) -> Vec<u8> {
    command_bytes(&[
        (Tag(0x0000, 0x0100), VR::US, PrimitiveValue::from(0x0FFFu16)),
        (
            Tag(0x0000, 0x0120),
            VR::US,
            PrimitiveValue::from(message_id),
        ),
        (Tag(0x0000, 0x0800), VR::US, PrimitiveValue::from(0x0101u16)),
    ])
}

fn identifier(ts: &str, elements: Vec<DataElement<InMemDicomObject>>) -> Vec<u8> {
    let obj = InMemDicomObject::from_element_iter(elements);
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, TransferSyntaxRegistry.get(ts).unwrap())
        .expect("encode identifier");
    out
}

fn el(tag: Tag, vr: VR, v: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(v))
}

fn find_scu(node: &Node) -> Scu {
    Scu::connect(
        node.dicom_port,
        "TESTSCU",
        &[
            (STUDY_ROOT, EXPLICIT),
            (STUDY_ROOT, IMPLICIT),
            (PATIENT_ROOT, EXPLICIT),
            ("1.2.840.10008.1.1", IMPLICIT),
        ],
    )
    .expect("association")
}

/// Read one response (command and, if announced, its identifier).
fn read_response(scu: &mut Scu, ts: &str) -> FindResponse {
    let mut command = Vec::new();
    let mut data = Vec::new();
    let mut parsed: Option<(u16, String, bool)> = None;
    loop {
        let pdu = scu.receive_pdu().expect("a response PDU");
        let Pdu::PData { data: pdvs } = pdu else {
            panic!("expected P-DATA, got {pdu:?}");
        };
        for pdv in pdvs {
            match pdv.value_type {
                PDataValueType::Command => {
                    command.extend_from_slice(&pdv.data);
                    if pdv.is_last {
                        let obj = InMemDicomObject::read_dataset_with_ts(
                            &command[..],
                            TransferSyntaxRegistry.get(IMPLICIT).unwrap(),
                        )
                        .expect("response command");
                        let int = |t: Tag| {
                            obj.element(t)
                                .ok()
                                .and_then(|e| e.to_int::<u16>().ok())
                                .unwrap_or(0xFFFF)
                        };
                        let status = int(Tag(0x0000, 0x0900));
                        let has_data = int(Tag(0x0000, 0x0800)) != 0x0101;
                        let comment = text_of(&obj, Tag(0x0000, 0x0902));
                        if !has_data {
                            return FindResponse {
                                status,
                                comment,
                                identifier: None,
                            };
                        }
                        parsed = Some((status, comment, has_data));
                    }
                }
                PDataValueType::Data => {
                    data.extend_from_slice(&pdv.data);
                    if pdv.is_last {
                        let (status, comment, _) = parsed.take().expect("command first");
                        let obj = InMemDicomObject::read_dataset_with_ts(
                            &data[..],
                            TransferSyntaxRegistry.get(ts).unwrap(),
                        )
                        .expect("identifier");
                        return FindResponse {
                            status,
                            comment,
                            identifier: Some(obj),
                        };
                    }
                }
            }
        }
    }
}

/// One C-FIND on the raw SCU: (pending responses, final response).
fn raw_find(
    scu: &mut Scu,
    sop_class: &str,
    ts: &str,
    identifier: Option<&[u8]>,
) -> (Vec<FindResponse>, FindResponse) {
    let pc = scu.context(sop_class, ts);
    let id = scu.next_id();
    scu.send_command(
        pc,
        &find_rq(id, sop_class, identifier.is_some()),
        usize::MAX,
    );
    if let Some(bytes) = identifier {
        scu.send_data(pc, bytes, 4096, Duration::ZERO);
    }
    let mut pending = Vec::new();
    loop {
        let r = read_response(scu, ts);
        if r.status == 0xFF00 || r.status == 0xFF01 {
            pending.push(r);
        } else {
            return (pending, r);
        }
    }
}

/// Insert `n` series under study A directly, for queries with many answers.
fn insert_many_series(node: &Node, n: usize) {
    let url = writable_url(node);
    common::runtime().block_on(async {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&url).await.expect("index");
        let study: i64 = sqlx::Row::get(
            &sqlx::query("SELECT id FROM studies WHERE study_uid = $1")
                .bind(study_uid("A"))
                .fetch_one(&pool)
                .await
                .expect("study A"),
            0,
        );
        let mut tx = pool.begin().await.expect("transaction");
        for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
            let mut sql = String::from(
                "INSERT INTO series (series_uid, study_ref, modality, series_description, \
                 first_received_at, last_received_at) VALUES ",
            );
            let rows: Vec<String> = (0..chunk.len())
                .map(|i| format!("(${}, ${}, 'CT', 'bulk', 0, 0)", 2 * i + 1, 2 * i + 2))
                .collect();
            sql.push_str(&rows.join(", "));
            let mut q = sqlx::query(&sql);
            for i in chunk {
                q = q.bind(format!("2.25.77.{i}")).bind(study);
            }
            q.execute(&mut *tx).await.expect("insert series");
        }
        tx.commit().await.expect("commit");
        pool.close().await;
    });
}

#[test]
fn c_cancel_stops_the_answers_and_the_association_goes_on() {
    let f = fixture();
    let total = 5000;
    insert_many_series(&f.node, total);
    let mut scu = find_scu(&f.node);
    let pc = scu.context(STUDY_ROOT, EXPLICIT);
    let id = scu.next_id();
    let query = identifier(
        EXPLICIT,
        vec![
            el(tags::QUERY_RETRIEVE_LEVEL, VR::CS, "SERIES"),
            el(tags::SERIES_INSTANCE_UID, VR::UI, ""),
            el(tags::SERIES_DESCRIPTION, VR::LO, ""),
        ],
    );
    scu.send_command(pc, &find_rq(id, STUDY_ROOT, true), usize::MAX);
    scu.send_data(pc, &query, 4096, Duration::ZERO);
    let first = read_response(&mut scu, EXPLICIT);
    assert_eq!(first.status, 0xFF00);
    scu.send_command(pc, &cancel_rq(id), usize::MAX);
    let mut pending = 1;
    let last = loop {
        let r = read_response(&mut scu, EXPLICIT);
        if r.status != 0xFF00 {
            break r;
        }
        pending += 1;
    };
    eprintln!("C-CANCEL after the first answer: {pending} answers of {total}");
    assert_eq!(last.status, 0xFE00, "final status after C-CANCEL-RQ");
    assert!(
        pending < total,
        "the node stopped early: {pending} of {total} answers"
    );
    // the association is still in step: another query, then C-ECHO
    let (answers, done) = raw_find(
        &mut scu,
        STUDY_ROOT,
        EXPLICIT,
        Some(&identifier(
            EXPLICIT,
            vec![
                el(tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY"),
                el(tags::PATIENT_ID, VR::LO, "FIND-P2"),
            ],
        )),
    );
    assert_eq!((answers.len(), done.status), (1, 0x0000));
    assert_eq!(scu.echo().status, 0x0000);
    scu.release();
    assert!(f.node.log().contains("status=FE00"), "{}", f.node.log());

    // DCMTK's own C-CANCEL
    let (answers, log) = findscu_raw(
        &f.node,
        "-S",
        &["QueryRetrieveLevel=SERIES", "SeriesInstanceUID"],
        &["--cancel", "3"],
    );
    assert!(answers.len() < total, "{} answers", answers.len());
    assert!(log.contains("Cancel"), "{log}");
}

#[test]
fn character_sets_of_requests_and_answers() {
    let f = fixture();
    let mut scu = find_scu(&f.node);
    // A Latin-1 request (ISO_IR 100) matches the name stored from Latin-1 files ...
    let latin1 = SpecificCharacterSet::from_code("ISO_IR 100").unwrap();
    assert_eq!(latin1.encode("Müller*").unwrap().len(), 7);
    let query = identifier(
        EXPLICIT,
        vec![
            el(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100"),
            el(tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY"),
            el(tags::PATIENT_NAME, VR::PN, "Müller*"),
            el(tags::STUDY_INSTANCE_UID, VR::UI, ""),
        ],
    );
    let (answers, done) = raw_find(&mut scu, STUDY_ROOT, EXPLICIT, Some(&query));
    assert_eq!((answers.len(), done.status), (2, 0x0000));
    // ... and the answer is UTF-8, declared as such
    for a in &answers {
        let id = a.identifier.as_ref().expect("identifier");
        assert_eq!(text_of(id, tags::SPECIFIC_CHARACTER_SET), "ISO_IR 192");
        assert_eq!(text_of(id, tags::PATIENT_NAME), "Müller^Jörg");
    }
    // a character set this SCP cannot decode is refused, not guessed
    let query = identifier(
        EXPLICIT,
        vec![
            el(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 999"),
            el(tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY"),
        ],
    );
    let (answers, done) = raw_find(&mut scu, STUDY_ROOT, EXPLICIT, Some(&query));
    assert!(answers.is_empty());
    assert_eq!(done.status, 0xC001, "{}", done.comment);
    scu.release();
}

#[test]
fn bad_identifiers_get_a_status_and_the_association_stays_usable() {
    let f = fixture();
    let mut scu = find_scu(&f.node);
    let level = |l: &str| el(tags::QUERY_RETRIEVE_LEVEL, VR::CS, l);
    let mut check = |sop_class: &str, ts: &str, bytes: Option<Vec<u8>>, status: u16, says: &str| {
        let (answers, done) = raw_find(&mut scu, sop_class, ts, bytes.as_deref());
        assert!(answers.is_empty(), "{says}: no answers");
        assert_eq!(done.status, status, "{says}: {}", done.comment);
        assert!(
            done.comment.to_lowercase().contains(&says.to_lowercase()),
            "comment {:?} should say {says:?}",
            done.comment
        );
    };
    check(
        STUDY_ROOT,
        EXPLICIT,
        Some(identifier(
            EXPLICIT,
            vec![el(tags::PATIENT_ID, VR::LO, "X")],
        )),
        0xA900,
        "Query/Retrieve Level (0008,0052) is missing",
    );
    check(
        STUDY_ROOT,
        EXPLICIT,
        Some(identifier(EXPLICIT, vec![level("FRAME")])),
        0xA900,
        "unknown Query/Retrieve Level",
    );
    check(
        STUDY_ROOT,
        IMPLICIT,
        Some(identifier(IMPLICIT, vec![level("PATIENT")])),
        0xA900,
        "not in the Study Root model",
    );
    check(
        STUDY_ROOT,
        EXPLICIT,
        Some(identifier(
            EXPLICIT,
            vec![level("STUDY"), el(tags::STUDY_DATE, VR::DA, "yesterday")],
        )),
        0xA900,
        "StudyDate",
    );
    check(
        STUDY_ROOT,
        EXPLICIT,
        Some(identifier(
            EXPLICIT,
            vec![level("SERIES"), el(tags::SERIES_NUMBER, VR::IS, "one")],
        )),
        0xA900,
        "SeriesNumber",
    );
    check(
        STUDY_ROOT,
        EXPLICIT,
        Some(b"\x08\x00\x52\x00garbage".to_vec()),
        0xC000,
        "cannot be parsed",
    );
    // a length that promises gigabytes, and sequences nested thousands deep
    let mut huge = vec![0x10, 0x00, 0x10, 0x00, 0xF0, 0xFF, 0xFF, 0xFF];
    huge.extend_from_slice(b"ABCD");
    check(STUDY_ROOT, IMPLICIT, Some(huge), 0xC000, "claims");
    let mut nested = Vec::new();
    for _ in 0..5000 {
        nested.extend_from_slice(&[0x08, 0x00, 0x15, 0x11, 0xFF, 0xFF, 0xFF, 0xFF]);
        nested.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
    }
    check(STUDY_ROOT, IMPLICIT, Some(nested), 0xC000, "nested deeper");
    // more than 1 MiB
    let big = identifier(
        IMPLICIT,
        vec![
            level("STUDY"),
            el(
                tags::STUDY_INSTANCE_UID,
                VR::UI,
                &vec!["1.2.3"; 200_000].join("\\"),
            ),
        ],
    );
    check(STUDY_ROOT, IMPLICIT, Some(big), 0xA700, "larger than 1 MiB");
    // no identifier at all
    check(STUDY_ROOT, EXPLICIT, None, 0xA900, "without an identifier");
    // a SOP class other than the context's
    {
        let pc = scu.context(STUDY_ROOT, EXPLICIT);
        let id = scu.next_id();
        scu.send_command(pc, &find_rq(id, PATIENT_ROOT, true), usize::MAX);
        scu.send_data(
            pc,
            &identifier(EXPLICIT, vec![level("STUDY")]),
            4096,
            Duration::ZERO,
        );
        let r = read_response(&mut scu, EXPLICIT);
        assert_eq!(r.status, 0x0122, "{}", r.comment);
    }
    // keys the SCP does not support: answered, with FF01 and without them
    let (answers, done) = raw_find(
        &mut scu,
        STUDY_ROOT,
        EXPLICIT,
        Some(&identifier(
            EXPLICIT,
            vec![
                level("STUDY"),
                el(tags::PATIENT_ID, VR::LO, "FIND-P2"),
                el(tags::REFERRING_PHYSICIAN_NAME, VR::PN, ""),
                el(tags::SERIES_INSTANCE_UID, VR::UI, ""),
            ],
        )),
    );
    assert_eq!(done.status, 0x0000);
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].status, 0xFF01);
    let id = answers[0].identifier.as_ref().expect("identifier");
    assert!(id.element(tags::REFERRING_PHYSICIAN_NAME).is_err());
    assert_eq!(text_of(id, tags::PATIENT_ID), "FIND-P2");
    // after all that, the association still answers
    assert_eq!(scu.echo().status, 0x0000);
    scu.release();

    // an association that did not negotiate C-FIND cannot use it
    let mut store_only = Scu::ct(f.node.dicom_port);
    let pc = store_only.context(common::scu::CT, EXPLICIT);
    let id = store_only.next_id();
    store_only.send_command(pc, &find_rq(id, STUDY_ROOT, true), usize::MAX);
    store_only.send_data(
        pc,
        &identifier(EXPLICIT, vec![level("STUDY")]),
        4096,
        Duration::ZERO,
    );
    let r = read_response(&mut store_only, EXPLICIT);
    assert_eq!(r.status, 0x0122, "{}", r.comment);
    store_only.release();
}

/// The identifier as sent is parsed in the context's transfer syntax: one query in both.
#[test]
fn identifiers_in_implicit_and_explicit_vr() {
    let f = fixture();
    let mut scu = find_scu(&f.node);
    for ts in [EXPLICIT, IMPLICIT] {
        let item = InMemDicomObject::from_element_iter([
            el(tags::CODE_VALUE, VR::SH, "43799004"),
            el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, "SCT"),
        ]);
        let query = identifier(
            ts,
            vec![
                el(tags::QUERY_RETRIEVE_LEVEL, VR::CS, "SERIES"),
                el(tags::SERIES_INSTANCE_UID, VR::UI, ""),
                DataElement::new(
                    tags::ANATOMIC_REGION_SEQUENCE,
                    VR::SQ,
                    DataSetSequence::from(vec![item]),
                ),
                el(Tag(0x0099, 0x0010), VR::LO, "ANATOMY_NODE 1.0"),
                el(Tag(0x0099, 0x1012), VR::CS, "LABELLED"),
            ],
        );
        let (answers, done) = raw_find(&mut scu, STUDY_ROOT, ts, Some(&query));
        assert_eq!(done.status, 0x0000, "{ts}: {}", done.comment);
        let found: BTreeSet<String> = answers
            .iter()
            .map(|a| text_of(a.identifier.as_ref().unwrap(), tags::SERIES_INSTANCE_UID))
            .collect();
        assert_eq!(
            found,
            ["A1", "A2", "D1"].iter().map(|k| series_uid(k)).collect(),
            "{ts}"
        );
    }
    scu.release();
}

// ---------------------------------------------------------------------------------------
// Orthanc queries the node

fn start_orthanc(node: &Node) -> Orthanc {
    Orthanc::start(OrthancOptions {
        ae_title: "TESTSCU".into(),
        check_called_ae_title: false,
        modalities: vec![("anatomy".into(), AE.into(), node.dicom_port)],
        ..OrthancOptions::default()
    })
}

#[test]
fn orthanc_queries_the_node() {
    let f = fixture();
    let o = start_orthanc(&f.node);
    let answers = o.query(
        "anatomy",
        "Series",
        serde_json::json!({"BodyPartExamined": "CHEST", "SeriesDescription": ""}),
    );
    let uids: BTreeSet<String> = answers
        .iter()
        .map(|a| a["SeriesInstanceUID"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        uids,
        [series_uid("A1"), series_uid("D1")].into_iter().collect(),
        "{answers:?}"
    );
    let studies = o.query(
        "anatomy",
        "Study",
        serde_json::json!({"PatientID": "FIND-P1", "StudyDate": "20240101-20240131",
            "PatientName": ""}),
    );
    assert_eq!(studies.len(), 1, "{studies:?}");
    assert_eq!(studies[0]["StudyInstanceUID"], study_uid("A").as_str());
    assert_eq!(studies[0]["PatientName"], "Müller^Jörg");
    let patients = o.query(
        "anatomy",
        "Patient",
        serde_json::json!({"PatientName": "smith*"}),
    );
    let ids: BTreeSet<String> = patients
        .iter()
        .map(|p| p["PatientID"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        ids,
        ["FIND-P2", "OTHER-P3"]
            .map(String::from)
            .into_iter()
            .collect()
    );
}

// ---------------------------------------------------------------------------------------
// Labels from the classifier

#[test]
fn labels_from_the_classifier_are_queryable() {
    let work = tempfile::tempdir().expect("work dir");
    let model = common::models::make(work.path(), "model", &["--size", "64", "--kind", "stats"])
        .expect("a Python with onnx (tests/run-all.sh makes .venv-tests)");
    let node = Node::start_with(NodeOptions {
        stable_after_secs: 1,
        classifier: format!(
            "enabled = true\nmodel = \"{}\"\ndevice = \"cpu\"\nkey_images = 8\n",
            model.display()
        ),
        ..NodeOptions::default()
    });
    let (spec, files) = common::data::synthetic_series(&work.path().join("series"), 77, 24, 64);
    let out = node.storescu(&[], &files);
    assert!(out.status.success(), "{}", common::text(&out));
    let index = node.index();
    let labelled = common::wait_until(60, || {
        index.count("SELECT COUNT(*) FROM series WHERE label_status IS NOT NULL") == 1
    });
    assert!(labelled, "the series was not labelled");
    let row = &index.rows(
        "SELECT s.label_status, s.predicted_body_part, l.anatomic_regions, l.model_version \
         FROM series s JOIN series_labels l ON l.series_ref = s.id",
    )[0];
    assert_eq!(row[0], "labelled", "{row:?}");
    let regions: Vec<serde_json::Value> = serde_json::from_str(&row[2]).unwrap_or_default();
    // the regions the index holds for matching are those of the label
    assert_eq!(
        index.count("SELECT COUNT(*) FROM series_regions"),
        regions.len() as i64
    );

    let series = format!("SeriesInstanceUID={}", spec.series_uid());
    let answers = findscu(
        &node,
        "-S",
        &[
            "QueryRetrieveLevel=SERIES",
            &series,
            "BodyPartExamined",
            "AnatomicRegionSequence",
            CREATOR,
            "0099,1012",
            "0099,1010",
        ],
    );
    assert_eq!(answers.len(), 1);
    let a = &answers[0];
    assert_eq!(text_of(a, tags::BODY_PART_EXAMINED), row[1]);
    assert_eq!(text_of(a, Tag(0x0099, 0x1012)), "LABELLED");
    assert_eq!(text_of(a, Tag(0x0099, 0x1010)), row[3]);
    let items = a
        .element(tags::ANATOMIC_REGION_SEQUENCE)
        .ok()
        .and_then(|e| e.items().map(<[_]>::to_vec))
        .unwrap_or_default();
    assert_eq!(items.len(), regions.len());
    if !row[1].is_empty() {
        let by_term = format!("BodyPartExamined={}", row[1]);
        assert_eq!(
            findscu(&node, "-S", &["QueryRetrieveLevel=SERIES", &by_term]).len(),
            1
        );
    }
    for r in &regions {
        let code = format!(
            "AnatomicRegionSequence[0].CodeValue={}",
            r["code_value"].as_str().unwrap_or("")
        );
        let found = findscu(
            &node,
            "-S",
            &[
                "QueryRetrieveLevel=SERIES",
                "SeriesInstanceUID",
                &code,
                "AnatomicRegionSequence[0].CodingSchemeDesignator=SCT",
            ],
        );
        assert_eq!(found.len(), 1, "region {r}");
    }
    // key-images of the series, with their labels
    let key_images = findscu(
        &node,
        "-S",
        &[
            "QueryRetrieveLevel=IMAGE",
            &series,
            "SOPInstanceUID",
            CREATOR,
            "0099,1020=?*",
            "0099,1021",
        ],
    );
    assert_eq!(key_images.len(), 8);
    for k in &key_images {
        let p: f64 = text_of(k, Tag(0x0099, 0x1021))
            .parse()
            .expect("a probability");
        assert!((0.0..=1.0).contains(&p));
    }
}

/// `finish_job` writes the regions with the series row: a late result for an older
/// generation of the series changes neither.
#[test]
fn a_late_result_of_an_older_generation_keeps_the_newer_regions() {
    let work = tempfile::tempdir().expect("work dir");
    let node = Node::start_with(NodeOptions {
        stable_after_secs: 1,
        ..NodeOptions::default()
    });
    let spec = SeriesSpec::new(88, 5, 16);
    let mut files = Vec::new();
    for slice in 0..5 {
        let path = work.path().join(format!("{slice}.dcm"));
        synth::ct_slice(&spec, slice)
            .write_to_file(&path)
            .expect("write");
        files.push(path);
    }
    let index = node.index();
    // generation 1: four slices; generation 2: a late fifth one re-opens the series
    let out = node.storescu(&[], &files[..4]);
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(common::wait_until(30, || index
        .count("SELECT COUNT(*) FROM work_queue")
        == 1));
    let out = node.storescu(&[], &files[4..]);
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(common::wait_until(30, || index
        .count("SELECT COUNT(*) FROM work_queue")
        == 2));

    let def =
        |body_part: &'static str,
         regions: &'static [(&'static str, &'static str, &'static str)]| SeriesDef {
            key: "G",
            number: 88,
            study: "A",
            description: "",
            received_body_part: None,
            label: Some(LabelDef {
                body_part,
                class: "liver",
                regions,
                key_images: &[],
            }),
        };
    let url = writable_url(&node);
    common::runtime().block_on(async {
        let index = Index::connect(&url, 2, false).await.expect("index");
        let now = anatomy_node::store::now_millis();
        let first = index
            .claim_job("t", now, 0)
            .await
            .expect("claim")
            .expect("job 1");
        let second = index
            .claim_job("t", now, 0)
            .await
            .expect("claim")
            .expect("job 2");
        assert_eq!((first.generation, second.generation), (1, 2));
        let newer = record_for(&def("ABDOMEN", &[ABDOMEN]));
        assert!(index
            .finish_job(&second, "t", &newer, now)
            .await
            .expect("finish 2"));
        let older = record_for(&def("CHEST", &[CHEST]));
        assert!(index
            .finish_job(&first, "t", &older, now)
            .await
            .expect("finish 1"));
        index.close().await;
    });
    let query = |code: &str| {
        let code = format!("AnatomicRegionSequence[0].CodeValue={code}");
        findscu(
            &node,
            "-S",
            &[
                "QueryRetrieveLevel=SERIES",
                "SeriesInstanceUID",
                "BodyPartExamined",
                &code,
            ],
        )
    };
    let abdomen = query(ABDOMEN.1);
    assert_eq!(abdomen.len(), 1);
    assert_eq!(text_of(&abdomen[0], tags::BODY_PART_EXAMINED), "ABDOMEN");
    assert!(
        query(CHEST.1).is_empty(),
        "the older generation's regions are not the series'"
    );
    assert_eq!(index.count("SELECT COUNT(*) FROM series_regions"), 1);
}
