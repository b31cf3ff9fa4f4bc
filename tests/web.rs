//! DICOMweb and the web page, over real HTTP against a real node: QIDO-RS matched as C-FIND
//! matches (and checked against findscu), STOW-RS through the C-STORE ingest path (stored
//! byte for byte, indexed, queryable; malformed bodies store nothing), WADO-RS (the stored
//! bytes, rendered PNGs), and the HTML page of recent series, screenshot by headless
//! Chromium. Every test runs on SQLite, and on PostgreSQL with ANATOMY_TEST_DATABASE_URL.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anatomy_node::index::{Index, KeyImageRow, LabelRecord, LabelStatus};
use anatomy_node::synth::{self, SeriesSpec};
use common::data;
use common::node::{Node, NodeOptions, AE};
use common::pki::openssl;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use serde_json::Value;

// ---------------------------------------------------------------------------------------
// HTTP

struct Reply {
    status: u16,
    content_type: String,
    warnings: Vec<String>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}), status {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
    let mut r = r.expect("HTTP request");
    let header = |name: &str| -> Vec<String> {
        r.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect()
    };
    let content_type = header("content-type").pop().unwrap_or_default();
    let warnings = header("warning");
    let status = r.status().as_u16();
    let body = r
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .expect("response body");
    Reply {
        status,
        content_type,
        warnings,
        body,
    }
}

fn url(node: &Node, path: &str) -> String {
    format!("http://127.0.0.1:{}{path}", node.http_port)
}

fn get(node: &Node, path: &str, accept: Option<&str>) -> Reply {
    let mut req = agent().get(&url(node, path));
    if let Some(a) = accept {
        req = req.header("Accept", a);
    }
    reply(req.call())
}

fn post(node: &Node, path: &str, content_type: &str, body: &[u8]) -> Reply {
    reply(
        agent()
            .post(&url(node, path))
            .header("Content-Type", content_type)
            .send(body),
    )
}

/// POST where the node may answer before it has read the whole body (413): the body is
/// written as far as the node takes it, then the answer is read. (status, body)
fn post_early_answer(node: &Node, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", node.http_port)).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    // A Content-Type that carries "Transfer-Encoding: chunked" sends the body chunked.
    let length = if content_type.contains("chunked") {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n\
         {length}Connection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).expect("request head");
    let _ = s.write_all(body);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, answer)
}

/// GET a QIDO-RS search: 200 and the results.
fn qido(node: &Node, path: &str) -> Vec<Value> {
    let r = get(node, path, Some("application/dicom+json"));
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    assert_eq!(r.content_type, "application/dicom+json", "{path}");
    match r.json() {
        Value::Array(results) => results,
        other => panic!("{path}: not a list: {other}"),
    }
}

/// The values of an attribute of a DICOM JSON object, as text (PN: the alphabetic group).
fn values(obj: &Value, tag: &str) -> Vec<String> {
    obj[tag]["Value"]
        .as_array()
        .map(|vs| {
            vs.iter()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    Value::Object(pn) => pn["Alphabetic"].as_str().unwrap_or("").to_string(),
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn value(obj: &Value, tag: &str) -> String {
    values(obj, tag).into_iter().next().unwrap_or_default()
}

const STUDY_UID: &str = "0020000D";
const SERIES_UID: &str = "0020000E";
const SOP_UID: &str = "00080018";

fn set(results: &[Value], tag: &str) -> BTreeSet<String> {
    let s: BTreeSet<String> = results.iter().map(|r| value(r, tag)).collect();
    assert_eq!(s.len(), results.len(), "one result per entity: {results:?}");
    s
}

/// A multipart/related body of `parts` (Content-Type, bytes).
fn multipart(boundary: &str, parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (ct, bytes) in parts {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Type: {ct}\r\n\r\n").as_bytes());
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

const BOUNDARY: &str = "stow-test-boundary-3f1c";

fn stow_type(boundary: &str) -> String {
    format!("multipart/related; type=\"application/dicom\"; boundary={boundary}")
}

fn stow(node: &Node, path: &str, files: &[PathBuf]) -> Reply {
    let contents: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(f).expect("file"))
        .collect();
    let parts: Vec<(&str, &[u8])> = contents
        .iter()
        .map(|c| ("application/dicom", c.as_slice()))
        .collect();
    post(
        node,
        path,
        &stow_type(BOUNDARY),
        &multipart(BOUNDARY, &parts),
    )
}

/// The one part of a multipart/related response.
fn single_part(r: &Reply) -> (String, Vec<u8>) {
    let boundary = r
        .content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .unwrap_or_else(|| panic!("no boundary in {}", r.content_type))
        .trim_matches('"')
        .to_string();
    assert!(
        r.content_type.starts_with("multipart/related")
            && r.content_type.contains("type=\"application/dicom\""),
        "{}",
        r.content_type
    );
    let start = format!("--{boundary}\r\n");
    assert!(r.body.starts_with(start.as_bytes()));
    let head_end = r
        .body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("part headers");
    let headers = String::from_utf8_lossy(&r.body[start.len()..head_end]).to_string();
    let end = format!("\r\n--{boundary}--\r\n");
    assert!(r.body.ends_with(end.as_bytes()), "closing boundary");
    (
        headers,
        r.body[head_end + 4..r.body.len() - end.len()].to_vec(),
    )
}

fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>, png::ColorType) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("PNG size")];
    let info = reader.next_frame(&mut buf).expect("PNG frame");
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf, info.color_type)
}

fn distinct(bytes: &[u8]) -> usize {
    bytes.iter().collect::<BTreeSet<_>>().len()
}

// ---------------------------------------------------------------------------------------
// A fixture: three studies, four series sent with storescu, labelled through the index

struct StudyDef {
    key: &'static str,
    patient_id: &'static str,
    patient_name: &'static str,
    date: &'static str,
    description: &'static str,
}

/// (Body Part Examined term, SNOMED CT code, meaning)
type Region = (&'static str, &'static str, &'static str);
/// (Body Part Examined, dominant class, regions)
type Label = (&'static str, &'static str, &'static [Region]);

struct SeriesDef {
    key: &'static str,
    number: u32,
    study: &'static str,
    description: &'static str,
    received: Option<&'static str>,
    /// What the classifier found; None: skipped.
    label: Option<Label>,
}

const CHEST: Region = ("CHEST", "43799004", "Chest");
const ABDOMEN: Region = ("ABDOMEN", "818981001", "Abdomen");
const SLICES: u32 = 3;
const MODEL_VERSION: &str = "web-test 1";

const STUDIES: &[StudyDef] = &[
    StudyDef {
        key: "A",
        patient_id: "WEB-P1",
        patient_name: "Doe^Jane",
        date: "20200315",
        description: "CT Thorax",
    },
    StudyDef {
        key: "B",
        patient_id: "WEB-P1",
        patient_name: "Doe^Jane",
        date: "20210620",
        description: "CT Abdomen",
    },
    StudyDef {
        key: "C",
        patient_id: "OTHER-P2",
        patient_name: "Roe^Richard",
        date: "20201111",
        description: "CT Pelvis",
    },
];

const SERIES: &[SeriesDef] = &[
    SeriesDef {
        key: "A1",
        number: 701,
        study: "A",
        description: "Thorax low-dose chest",
        received: None,
        label: Some(("CHEST", "lungs", &[CHEST])),
    },
    SeriesDef {
        key: "A2",
        number: 702,
        study: "A",
        description: "Chest CT",
        received: Some("CHEST"),
        label: Some(("CHESTABDOMEN", "liver", &[CHEST, ABDOMEN])),
    },
    SeriesDef {
        key: "B1",
        number: 703,
        study: "B",
        description: "Abdomen",
        received: Some("ABDOMEN"),
        label: Some(("ABDOMEN", "liver", &[ABDOMEN])),
    },
    SeriesDef {
        key: "C1",
        number: 704,
        study: "C",
        description: "Pelvis",
        received: Some("PELVIS"),
        label: None,
    },
];

fn study_uid(key: &str) -> String {
    format!("2.25.88001.{}", key.as_bytes()[0])
}

fn series_def(key: &str) -> &'static SeriesDef {
    SERIES.iter().find(|s| s.key == key).expect("series key")
}

fn series_uid(key: &str) -> String {
    SeriesSpec::new(series_def(key).number, SLICES, 16).series_uid()
}

fn sop_uid(key: &str, slice: u32) -> String {
    SeriesSpec::new(series_def(key).number, SLICES, 16).sop_uid(slice)
}

fn keys_of(uids: &BTreeSet<String>) -> BTreeSet<&'static str> {
    let found: BTreeSet<&'static str> = SERIES
        .iter()
        .filter(|s| uids.contains(&series_uid(s.key)))
        .map(|s| s.key)
        .chain(
            STUDIES
                .iter()
                .filter(|s| uids.contains(&study_uid(s.key)))
                .map(|s| s.key),
        )
        .collect();
    assert_eq!(found.len(), uids.len(), "only fixture entities: {uids:?}");
    found
}

fn keys<const N: usize>(k: [&'static str; N]) -> BTreeSet<&'static str> {
    k.into_iter().collect()
}

fn write_fixture(dir: &Path) -> Vec<PathBuf> {
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
            put(tags::STUDY_DESCRIPTION, VR::LO, study.description);
            put(tags::SERIES_DESCRIPTION, VR::LO, def.description);
            if let Some(bpe) = def.received {
                put(tags::BODY_PART_EXAMINED, VR::CS, bpe);
            }
            let path = dir.join(format!("{}-{slice}.dcm", def.key));
            obj.write_to_file(&path).expect("write fixture file");
            files.push(path);
        }
    }
    files
}

fn record_for(def: &SeriesDef) -> LabelRecord {
    let Some((body_part, class, regions)) = def.label else {
        return LabelRecord::without_labels(LabelStatus::Skipped, "no axial CT image");
    };
    let mut record = LabelRecord::without_labels(LabelStatus::Labelled, "");
    record.reason = None;
    record.dominant_class = Some(class.into());
    record.body_part_examined = Some(body_part.into());
    record.anatomic_regions = Some(
        serde_json::to_string(
            &regions
                .iter()
                .map(|(bp, code, meaning)| {
                    serde_json::json!({"body_part": bp, "code_value": code,
                        "coding_scheme": "SCT", "code_meaning": meaning})
                })
                .collect::<Vec<_>>(),
        )
        .expect("regions JSON"),
    );
    record.coverage = Some(
        serde_json::json!([{"class": class, "z_from_mm": 0.0, "z_to_mm": -5.0, "images": SLICES}])
            .to_string(),
    );
    record.model_version = Some(MODEL_VERSION.into());
    record.classes = Some(r#"["neck","lungs","liver","pelvis","legs","other"]"#.into());
    record.key_images = (0..SLICES)
        .map(|slice| {
            // One image of A1 the model called neck, decoded along z as the series' class.
            let odd = def.key == "A1" && slice == 1;
            KeyImageRow {
                sop_instance_uid: sop_uid(def.key, slice),
                frame: 0,
                z_mm: -2.5 * f64::from(slice),
                label: if odd { "neck".into() } else { class.into() },
                smoothed_label: class.into(),
                probabilities: if odd {
                    serde_json::json!({ "neck": 0.6, class: 0.3, "other": 0.1 })
                } else {
                    serde_json::json!({ class: 0.9, "other": 0.1 })
                }
                .to_string(),
            }
        })
        .collect();
    record
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

struct Fixture {
    node: Node,
    _work: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let work = tempfile::tempdir().expect("work dir");
    let node = Node::start_with(NodeOptions {
        stable_after_secs: 1,
        ..NodeOptions::default()
    });
    let files = write_fixture(work.path());
    let out = node.storescu(&["-aet", "TESTSCU"], &files);
    assert!(out.status.success(), "{}", common::text(&out));
    let index = node.index();
    let queued = common::wait_until(30, || {
        index.count("SELECT COUNT(*) FROM work_queue") == SERIES.len() as i64
    });
    assert!(queued, "series did not complete");
    drop(index);
    // Labelled through the index's own code, as a classifier node would.
    let url = writable_url(&node);
    common::runtime().block_on(async {
        let index = Index::connect(&url, 2, false).await.expect("index");
        let now = anatomy_node::store::now_millis();
        while let Some(job) = index.claim_job("web-test", now, 0).await.expect("claim") {
            let def = SERIES
                .iter()
                .find(|d| series_uid(d.key) == job.series_uid)
                .expect("a fixture series");
            let stored = index
                .finish_job(&job, "web-test", &record_for(def), now)
                .await
                .expect("finish job");
            assert!(stored);
        }
        index.close().await;
    });
    Fixture { node, _work: work }
}

/// findscu -S at SERIES level with `filter`: the Series Instance UIDs answered.
fn findscu_series(node: &Node, filter: &[&str]) -> BTreeSet<String> {
    let dir = tempfile::tempdir().expect("findscu dir");
    let port = node.dicom_port.to_string();
    let dir_arg = dir.path().display().to_string();
    let mut args: Vec<&str> = vec![
        "-S",
        "-aet",
        "TESTSCU",
        "-aec",
        AE,
        "-X",
        "-od",
        &dir_arg,
        "127.0.0.1",
        &port,
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        "SeriesInstanceUID",
    ];
    for f in filter {
        args.extend(["-k", f]);
    }
    let out = common::dcmtk("findscu", &args);
    assert!(
        out.status.success(),
        "findscu {filter:?}: {}",
        common::text(&out)
    );
    std::fs::read_dir(dir.path())
        .expect("findscu output")
        .flatten()
        .map(|e| {
            let obj = dicom_object::open_file(e.path()).expect("a findscu answer");
            obj.element(tags::SERIES_INSTANCE_UID)
                .ok()
                .and_then(|e| {
                    e.to_str()
                        .ok()
                        .map(|s| s.trim_end_matches('\0').to_string())
                })
                .unwrap_or_default()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// QIDO-RS

#[test]
fn qido_searches_match_as_c_find_does() {
    let f = fixture();
    let node = &f.node;

    // Studies, with the default attributes.
    let all = qido(node, "/dicom-web/studies");
    assert_eq!(keys_of(&set(&all, STUDY_UID)), keys(["A", "B", "C"]));
    let a = all
        .iter()
        .find(|s| value(s, STUDY_UID) == study_uid("A"))
        .expect("study A");
    assert_eq!(value(a, "00100010"), "Doe^Jane");
    assert_eq!(a["00100010"]["vr"], "PN");
    assert_eq!(value(a, "00100020"), "WEB-P1");
    assert_eq!(value(a, "00080020"), "20200315");
    assert_eq!(values(a, "00080061"), ["CT"]);
    assert_eq!(
        a["00201206"]["Value"][0], 2,
        "NumberOfStudyRelatedSeries as a number"
    );
    assert_eq!(a["00201208"]["Value"][0], 2 * SLICES);
    assert_eq!(value(a, "00080056"), "ONLINE");
    assert_eq!(a["00081190"]["vr"], "UR");
    assert!(value(a, "00081190").ends_with(&format!("/dicom-web/studies/{}", study_uid("A"))));
    assert!(
        a.get("00080052").is_none(),
        "no Query/Retrieve Level in QIDO results"
    );

    // Single value, wild cards, ranges, UID lists, tags for keywords.
    let studies = |q: &str| {
        keys_of(&set(
            &qido(node, &format!("/dicom-web/studies?{q}")),
            STUDY_UID,
        ))
    };
    assert_eq!(studies("PatientID=WEB-P1"), keys(["A", "B"]));
    assert_eq!(studies("00100020=OTHER-P2"), keys(["C"]));
    assert_eq!(studies("PatientID=WEB-*"), keys(["A", "B"]));
    assert_eq!(studies("PatientID=OTHER-P?"), keys(["C"]));
    assert_eq!(
        studies("PatientName=doe*"),
        keys(["A", "B"]),
        "PN: case-insensitive"
    );
    assert_eq!(studies("StudyDate=20200101-20201231"), keys(["A", "C"]));
    assert_eq!(studies("StudyDate=-20201231"), keys(["A", "C"]));
    assert_eq!(studies("StudyDate=20210620"), keys(["B"]));
    assert_eq!(
        studies(&format!(
            "StudyInstanceUID={},{}",
            study_uid("A"),
            study_uid("C")
        )),
        keys(["A", "C"])
    );
    assert_eq!(studies("StudyDescription=CT%20Thorax"), keys(["A"]));
    assert_eq!(studies("PatientID=*"), keys(["A", "B", "C"]), "universal");
    assert!(qido(node, "/dicom-web/studies?PatientID=NOBODY").is_empty());

    // Series: what the node decided is matched and returned.
    let series = |q: &str| {
        keys_of(&set(
            &qido(node, &format!("/dicom-web/series?{q}")),
            SERIES_UID,
        ))
    };
    assert_eq!(series(""), keys(["A1", "A2", "B1", "C1"]));
    assert_eq!(series("BodyPartExamined=CHEST"), keys(["A1"]));
    assert_eq!(series("BodyPartExamined=CHEST*"), keys(["A1", "A2"]));
    assert_eq!(
        series("SeriesDescription=*chest*"),
        keys(["A1"]),
        "case-sensitive"
    );
    assert_eq!(
        series("AnatomicRegionSequence.CodeValue=818981001"),
        keys(["A2", "B1"])
    );
    assert_eq!(series("ReceivedBodyPartExamined=CHEST"), keys(["A2"]));
    assert_eq!(series("00991013=ABDOMEN"), keys(["B1"]));
    assert_eq!(series("LabelStatus=SKIPPED"), keys(["C1"]));
    assert_eq!(
        series("PatientID=WEB-P1&BodyPartExamined=ABDOMEN"),
        keys(["B1"])
    );
    // The same matching as C-FIND: findscu gets the same series.
    for (qido_filter, find_filter) in [
        ("BodyPartExamined=CHEST*", "BodyPartExamined=CHEST*"),
        ("SeriesDescription=*chest*", "SeriesDescription=*chest*"),
        (
            "StudyInstanceUID=2.25.88001.65",
            "StudyInstanceUID=2.25.88001.65",
        ),
    ] {
        let via_qido = set(
            &qido(node, &format!("/dicom-web/series?{qido_filter}")),
            SERIES_UID,
        );
        assert_eq!(
            via_qido,
            findscu_series(node, &[find_filter]),
            "{qido_filter}"
        );
    }

    let s = qido(
        node,
        &format!("/dicom-web/series?SeriesInstanceUID={}", series_uid("A2")),
    );
    let a2 = &s[0];
    assert_eq!(
        value(a2, "00180015"),
        "CHESTABDOMEN",
        "predicted Body Part Examined"
    );
    let regions = a2["00082218"]["Value"]
        .as_array()
        .expect("Anatomic Region Sequence");
    let codes: Vec<String> = regions.iter().map(|r| value(r, "00080100")).collect();
    assert_eq!(codes, ["43799004", "818981001"]);
    assert_eq!(value(&regions[0], "00080102"), "SCT");
    assert_eq!(value(&regions[1], "00080104"), "Abdomen");
    assert_eq!(value(a2, "00990010"), "ANATOMY_NODE 1.0", "private creator");
    assert_eq!(value(a2, "00991010"), MODEL_VERSION, "model version");
    assert_eq!(value(a2, "00991011"), "liver", "dominant class");
    assert_eq!(value(a2, "00991012"), "LABELLED", "label status");
    assert_eq!(
        value(a2, "00991013"),
        "CHEST",
        "received Body Part Examined"
    );
    assert_eq!(
        value(a2, "00100010"),
        "Doe^Jane",
        "/series returns study attributes"
    );
    assert!(value(a2, "00081190").ends_with(&format!(
        "/studies/{}/series/{}",
        study_uid("A"),
        series_uid("A2")
    )));

    // Searches within a study and a series.
    let in_a = qido(
        node,
        &format!("/dicom-web/studies/{}/series", study_uid("A")),
    );
    assert_eq!(keys_of(&set(&in_a, SERIES_UID)), keys(["A1", "A2"]));
    assert!(
        in_a[0].get("00100010").is_none(),
        "study attributes not repeated"
    );
    let with_name = qido(
        node,
        &format!(
            "/dicom-web/studies/{}/series?includefield=PatientName",
            study_uid("A")
        ),
    );
    assert_eq!(value(&with_name[0], "00100010"), "Doe^Jane", "includefield");
    let instances = qido(
        node,
        &format!(
            "/dicom-web/studies/{}/series/{}/instances",
            study_uid("A"),
            series_uid("A1")
        ),
    );
    assert_eq!(set(&instances, SOP_UID).len(), SLICES as usize);
    let i0 = instances
        .iter()
        .find(|i| value(i, SOP_UID) == sop_uid("A1", 0))
        .expect("first instance");
    assert_eq!(i0["00280010"]["Value"][0], 16, "Rows (US) as a number");
    // Both labels of a key-image: the model's own (0099,1020) and decoded along z (0099,1022).
    let labels = qido(
        node,
        &format!(
            "/dicom-web/studies/{}/series/{}/instances?SOPInstanceUID={}\
             &includefield=00990010&includefield=00991020&includefield=00991022",
            study_uid("A"),
            series_uid("A1"),
            sop_uid("A1", 1)
        ),
    );
    assert_eq!(labels.len(), 1, "{labels:?}");
    assert_eq!(
        value(&labels[0], "00991020"),
        "neck",
        "the model's own label"
    );
    assert_eq!(
        value(&labels[0], "00991022"),
        "lungs",
        "decoded along z: the series' class"
    );
    assert_eq!(value(i0, "00080016"), "1.2.840.10008.5.1.4.1.1.2");
    assert!(value(i0, "00081190").ends_with(&format!("/instances/{}", sop_uid("A1", 0))));
    let one = qido(
        node,
        &format!("/dicom-web/instances?SOPInstanceUID={}", sop_uid("B1", 2)),
    );
    assert_eq!(one.len(), 1);
    assert_eq!(value(&one[0], SERIES_UID), series_uid("B1"));
    let in_study = qido(
        node,
        &format!("/dicom-web/studies/{}/instances", study_uid("A")),
    );
    assert_eq!(in_study.len(), 2 * SLICES as usize);

    // An unknown study is an empty result, not an error (PS3.18 2026a: 200 and []).
    let unknown = get(node, "/dicom-web/studies/2.25.404/series", None);
    assert_eq!(unknown.status, 200);
    assert_eq!(unknown.json(), serde_json::json!([]));
    assert!(qido(
        node,
        "/dicom-web/studies/2.25.404/series/2.25.405/instances"
    )
    .is_empty());
    assert!(qido(node, "/dicom-web/studies?StudyInstanceUID=2.25.404").is_empty());

    // Paging: the same order every time, a warning while more remain.
    let first = get(node, "/dicom-web/series?limit=3", None);
    assert_eq!(first.status, 200);
    assert!(
        first
            .warnings
            .iter()
            .any(|w| w.starts_with("299 ") && w.contains("additional results")),
        "{:?}",
        first.warnings
    );
    let page1 = set(first.json().as_array().expect("list"), SERIES_UID);
    assert_eq!(page1.len(), 3);
    let second = get(node, "/dicom-web/series?limit=3&offset=3", None);
    assert!(second.warnings.is_empty(), "{:?}", second.warnings);
    let page2 = set(second.json().as_array().expect("list"), SERIES_UID);
    assert_eq!(page2.len(), 1);
    assert!(page1.is_disjoint(&page2));
    assert_eq!(
        set(&qido(node, "/dicom-web/series?limit=3"), SERIES_UID),
        page1,
        "idempotent"
    );
    assert!(qido(node, "/dicom-web/series?offset=10").is_empty());

    // What is ignored is said, not silently dropped.
    let fuzzy = get(
        node,
        "/dicom-web/studies?PatientName=doe*&fuzzymatching=true",
        None,
    );
    assert_eq!(fuzzy.status, 200);
    assert!(
        fuzzy.warnings.iter().any(|w| w.contains("fuzzymatching")),
        "{:?}",
        fuzzy.warnings
    );
    let unsupported = get(node, "/dicom-web/studies?ReferringPhysicianName=X", None);
    assert_eq!(unsupported.status, 200);
    assert!(
        unsupported.warnings.iter().any(|w| w.contains("00080090")),
        "{:?}",
        unsupported.warnings
    );
    // An element of the private block that only tagged copies carry is no search key.
    let copy_only = get(node, "/dicom-web/series?ClassProbabilities=0.5", None);
    assert_eq!(copy_only.status, 200);
    assert!(
        copy_only.warnings.iter().any(|w| w.contains("00991016")),
        "{:?}",
        copy_only.warnings
    );
    let all_fields = qido(
        node,
        &format!(
            "/dicom-web/series?SeriesInstanceUID={}&includefield=all",
            series_uid("A1")
        ),
    );
    assert_eq!(
        value(&all_fields[0], "00991014").len(),
        23,
        "LabelledDateTime (DT)"
    );

    // Bad parameters: 400 and why.
    for (path, says) in [
        ("/dicom-web/studies?limit=ten", "limit"),
        ("/dicom-web/studies?offset=-1", "offset"),
        ("/dicom-web/studies?StudyDate=2020", "date"),
        ("/dicom-web/studies?StudyDate=20201301", "date"),
        ("/dicom-web/studies?PatientIdentity=1", "unknown attribute"),
        (
            "/dicom-web/studies?PatientID=a&PatientID=b",
            "more than once",
        ),
        ("/dicom-web/series?AnatomicRegionSequence=CHEST", "sequence"),
        ("/dicom-web/studies/*/series", "not a UID"),
        (
            &format!(
                "/dicom-web/studies/{}/series?StudyInstanceUID=1.2",
                study_uid("A")
            ),
            "in the path",
        ),
    ] {
        let r = get(node, path, None);
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert!(r.text().contains(says), "{path}: {}", r.text());
    }
    let xml = get(
        node,
        "/dicom-web/studies",
        Some("multipart/related; type=\"application/dicom+xml\""),
    );
    assert_eq!(xml.status, 406, "{}", xml.text());
}

// ---------------------------------------------------------------------------------------
// STOW-RS and WADO-RS

/// Files to send: real CT (several transfer syntaxes) when ../shared/data/ct is there,
/// else a synthetic series.
fn stow_files(work: &Path) -> Vec<PathBuf> {
    if let Some(dir) = data::ct_data() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("elastix-chest/thorax_2mm"))
            .expect("elastix-chest")
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        files.truncate(4);
        files.push(dir.join("pydicom-j2k-head/CT/J2K_pixelrep_mismatch.dcm"));
        return files;
    }
    data::synthetic_series(&work.join("synthetic"), 801, 5, 64).1
}

fn referenced(response: &Value) -> Vec<Value> {
    response["00081199"]["Value"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn failed(response: &Value) -> Vec<(String, u64)> {
    response["00081198"]["Value"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| {
                    (
                        value(i, "00081155"),
                        i["00081197"]["Value"][0].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn stow_stores_byte_for_byte_and_is_queryable_then_retrievable() {
    let work = tempfile::tempdir().expect("work");
    let node = Node::start_with(NodeOptions {
        stable_after_secs: 1,
        ..NodeOptions::default()
    });
    let files = stow_files(work.path());
    let r = stow(&node, "/dicom-web/studies", &files);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.content_type, "application/dicom+json");
    let response = r.json();
    let refs = referenced(&response);
    assert_eq!(refs.len(), files.len(), "{response}");
    assert!(failed(&response).is_empty());

    let index = node.index();
    assert_eq!(
        index.count("SELECT COUNT(*) FROM instances"),
        files.len() as i64
    );
    assert_eq!(
        index.rows("SELECT DISTINCT calling_ae FROM instances"),
        [["STOW-RS".to_string()]]
    );
    assert!(
        node.temporary_files().is_empty(),
        "spool and temporary files removed"
    );
    for f in &files {
        let sop = data::media_storage_sop_instance_uid(f);
        let item = refs
            .iter()
            .find(|i| value(i, "00081155") == sop)
            .unwrap_or_else(|| panic!("{sop} not in the response"));
        assert_eq!(value(item, "00081150"), data::sop_class(f));
        let rows = index.rows(&format!(
            "SELECT i.file_path, s.series_uid, st.study_uid, i.transfer_syntax_uid FROM instances i \
             JOIN series s ON s.id = i.series_ref JOIN studies st ON st.id = s.study_ref \
             WHERE i.sop_instance_uid = '{sop}'"
        ));
        let [file_path, series, study, ts] = rows[0].clone().try_into().expect("4 columns");
        assert_eq!(ts, data::transfer_syntax(f));
        let stored = node.storage().join(&file_path);
        assert_eq!(
            data::dataset_bytes(&stored),
            data::dataset_bytes(f),
            "{}: the data set is stored byte for byte",
            f.display()
        );
        let retrieve_url = value(item, "00081190");
        assert!(
            retrieve_url.ends_with(&format!("/studies/{study}/series/{series}/instances/{sop}"))
        );

        // WADO-RS: the stored file as it is.
        let path = format!("/dicom-web/studies/{study}/series/{series}/instances/{sop}");
        let wado = get(
            &node,
            &path,
            Some("multipart/related; type=\"application/dicom\""),
        );
        assert_eq!(wado.status, 200, "{}", wado.text());
        let (headers, bytes) = single_part(&wado);
        assert!(
            headers.contains(&format!("transfer-syntax={ts}")),
            "{headers}"
        );
        assert_eq!(
            bytes,
            std::fs::read(&stored).expect("stored file"),
            "WADO-RS returns the stored file"
        );
        let bare = get(&node, &path, Some("application/dicom"));
        assert_eq!(bare.status, 200);
        assert_eq!(bare.body, bytes);

        // Rendered: a PNG of at most 512 px, not blank.
        let png = get(&node, &format!("{path}/rendered"), Some("image/png"));
        assert_eq!(png.status, 200, "{}", png.text());
        assert_eq!(png.content_type, "image/png");
        let (w, h, pixels, color) = decode_png(&png.body);
        assert!(w <= 512 && h <= 512 && w > 0 && h > 0);
        assert_eq!(color, png::ColorType::Grayscale);
        assert!(
            distinct(&pixels) > 8,
            "{}: the rendered image is blank",
            f.display()
        );
        let frame = get(
            &node,
            &format!("{path}/frames/1/rendered?viewport=64,64&window=-600,1500"),
            Some("image/png"),
        );
        assert_eq!(frame.status, 200, "{}", frame.text());
        let (w, h, lung_window, _) = decode_png(&frame.body);
        assert!(w <= 64 && h <= 64);
        assert_ne!(
            lung_window, pixels,
            "the window parameter changes the image"
        );
    }

    // Queryable by QIDO-RS and by C-FIND.
    let series: BTreeSet<String> = index
        .rows("SELECT series_uid FROM series")
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    for s in &series {
        let found = qido(&node, &format!("/dicom-web/series?SeriesInstanceUID={s}"));
        assert_eq!(found.len(), 1, "QIDO finds {s}");
        assert_eq!(
            findscu_series(&node, &[&format!("SeriesInstanceUID={s}")]),
            [s.clone()].into()
        );
    }
    let instances = qido(&node, "/dicom-web/instances");
    assert_eq!(instances.len(), files.len());

    // Sent again: identical, a success that changes nothing.
    let again = stow(&node, "/dicom-web/studies", &files[..1]);
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(
        index.count("SELECT COUNT(*) FROM instances"),
        files.len() as i64
    );

    // WADO-RS refusals.
    let f0 = &files[0];
    let sop = data::media_storage_sop_instance_uid(f0);
    let row = index.rows(&format!(
        "SELECT s.series_uid, st.study_uid FROM instances i JOIN series s ON s.id = i.series_ref \
         JOIN studies st ON st.id = s.study_ref WHERE i.sop_instance_uid = '{sop}'"
    ));
    let (series, study) = (&row[0][0], &row[0][1]);
    let base = format!("/dicom-web/studies/{study}/series/{series}/instances");
    assert_eq!(get(&node, &format!("{base}/2.25.404"), None).status, 404);
    assert_eq!(
        get(
            &node,
            &format!("/dicom-web/studies/2.25.404/series/{series}/instances/{sop}"),
            None
        )
        .status,
        404
    );
    let other_ts = get(
        &node,
        &format!("{base}/{sop}"),
        Some(
            "multipart/related; type=\"application/dicom\"; transfer-syntax=1.2.840.10008.1.2.4.50",
        ),
    );
    assert_eq!(
        other_ts.status,
        406,
        "never transcoded: {}",
        other_ts.text()
    );
    assert_eq!(
        get(&node, &format!("{base}/{sop}/frames/2/rendered"), None).status,
        404
    );
    assert_eq!(
        get(&node, &format!("{base}/{sop}/frames/0/rendered"), None).status,
        400
    );
    assert_eq!(
        get(&node, &format!("{base}/{sop}/rendered?window=40"), None).status,
        400
    );
    assert_eq!(
        get(&node, &format!("{base}/{sop}/rendered"), Some("image/jpeg")).status,
        406
    );
}

/// A synthetic CT slice as a Part-10 file's bytes, with changes.
fn slice_bytes(
    spec: &SeriesSpec,
    slice: u32,
    change: impl FnOnce(&mut dicom_object::DefaultDicomObject),
) -> Vec<u8> {
    let mut obj = synth::ct_slice(spec, slice);
    change(&mut obj);
    let mut out = Vec::new();
    obj.write_all(&mut out).expect("encode");
    out
}

#[test]
fn stow_outcomes_per_instance_are_mapped_from_the_store() {
    let node = Node::start();
    let spec = SeriesSpec::new(811, 3, 32);
    let good = slice_bytes(&spec, 0, |_| {});
    // The file meta says one SOP Instance UID, the data set another: A900, as for C-STORE.
    let mismatch = slice_bytes(&spec, 1, |obj| {
        obj.update_meta(|m| m.media_storage_sop_instance_uid = "2.25.111".into());
    });
    // Not a storage class of this node: 0122.
    let unknown_class = slice_bytes(&spec, 2, |obj| {
        obj.update_meta(|m| m.media_storage_sop_class_uid = "1.2.3.4.5".into());
    });
    let body = multipart(
        BOUNDARY,
        &[
            ("application/dicom", &good),
            ("application/dicom", &mismatch),
            (
                "application/dicom; transfer-syntax=1.2.840.10008.1.2.1",
                &unknown_class,
            ),
        ],
    );
    let r = post(&node, "/dicom-web/studies", &stow_type(BOUNDARY), &body);
    assert_eq!(r.status, 202, "some stored, some not: {}", r.text());
    let response = r.json();
    assert_eq!(referenced(&response).len(), 1);
    assert_eq!(
        value(&referenced(&response)[0], "00081155"),
        spec.sop_uid(0)
    );
    let failures = failed(&response);
    assert_eq!(
        failures,
        [("2.25.111".to_string(), 0xA900), (spec.sop_uid(2), 0x0122)]
    );
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("2.25.111") && w.contains("A900")),
        "{:?}",
        r.warnings
    );
    assert_eq!(node.index().count("SELECT COUNT(*) FROM instances"), 1);

    // To one study: an instance of another study is refused (409 when none is stored).
    let r = post(
        &node,
        "/dicom-web/studies/2.25.999",
        &stow_type(BOUNDARY),
        &multipart(BOUNDARY, &[("application/dicom", &good)]),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(failed(&r.json()), [(spec.sop_uid(0), 0xA900)]);
    let r = post(
        &node,
        &format!("/dicom-web/studies/{}", spec.study_uid()),
        &stow_type(BOUNDARY),
        &multipart(
            BOUNDARY,
            &[("application/dicom", &slice_bytes(&spec, 2, |_| {}))],
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(value(&r.json(), "00081190").ends_with(&format!("/studies/{}", spec.study_uid())));
    assert_eq!(node.index().count("SELECT COUNT(*) FROM instances"), 2);
    assert!(node.temporary_files().is_empty());
}

#[test]
fn malformed_stow_bodies_store_nothing() {
    let node = Node::start_with(NodeOptions {
        env: vec![("ANATOMY_HTTP__STOW_MAX_MB".into(), "1".into())],
        ..NodeOptions::default()
    });
    let spec = SeriesSpec::new(821, 2, 32);
    let (a, b) = (slice_bytes(&spec, 0, |_| {}), slice_bytes(&spec, 1, |_| {}));
    let good = multipart(
        BOUNDARY,
        &[("application/dicom", &a), ("application/dicom", &b)],
    );
    let ct = stow_type(BOUNDARY);
    let mut cut_in_part_two = good.clone();
    cut_in_part_two.truncate(good.len() - b.len() / 2);
    let mut no_closing = good.clone();
    no_closing.truncate(good.len() - format!("--{BOUNDARY}--\r\n").len());
    let mut garbage = vec![0u8; 128];
    garbage.extend_from_slice(b"DICM not really");
    let big = vec![7u8; 1024 * 1024 + 1];
    let cases: Vec<(&str, String, Vec<u8>, u16, &str)> = vec![
        (
            "no boundary",
            "multipart/related; type=\"application/dicom\"".into(),
            good.clone(),
            400,
            "boundary",
        ),
        (
            "not multipart",
            "application/dicom".into(),
            a.clone(),
            415,
            "multipart/related",
        ),
        (
            "metadata form",
            "multipart/related; type=\"application/dicom+json\"; boundary=x".into(),
            good.clone(),
            415,
            "application/dicom",
        ),
        (
            "another boundary",
            stow_type("not-the-boundary"),
            good.clone(),
            400,
            "closing boundary",
        ),
        (
            "truncated part",
            ct.clone(),
            cut_in_part_two,
            400,
            "truncated",
        ),
        (
            "no closing boundary",
            ct.clone(),
            no_closing,
            400,
            "closing boundary",
        ),
        ("empty body", ct.clone(), Vec::new(), 400, "boundary"),
        (
            "no parts",
            ct.clone(),
            format!("--{BOUNDARY}--\r\n").into_bytes(),
            400,
            "no parts",
        ),
        (
            "text part",
            ct.clone(),
            multipart(
                BOUNDARY,
                &[("application/dicom", &a), ("text/plain", b"hello")],
            ),
            415,
            "text/plain",
        ),
        (
            "not a PS3.10 file",
            ct.clone(),
            multipart(
                BOUNDARY,
                &[
                    ("application/dicom", &a),
                    ("application/dicom", b"hello, this is not DICOM at all"),
                ],
            ),
            400,
            "part 2",
        ),
        (
            "no file meta",
            ct.clone(),
            multipart(
                BOUNDARY,
                &[("application/dicom", &a), ("application/dicom", &garbage)],
            ),
            400,
            "part 2",
        ),
        (
            "over http.stow_max_mb",
            ct.clone(),
            multipart(
                BOUNDARY,
                &[("application/dicom", &a), ("application/dicom", &big)],
            ),
            413,
            "stow_max_mb",
        ),
    ];
    for (what, content_type, body, status, says) in cases {
        let (got, text) = post_early_answer(&node, "/dicom-web/studies", &content_type, &body);
        assert_eq!(got, status, "{what}: {text}");
        assert!(text.contains(says), "{what}: {text}");
        assert!(
            node.stored_files().is_empty(),
            "{what}: something was stored"
        );
        assert!(
            node.temporary_files().is_empty(),
            "{what}: files left in .incoming"
        );
    }
    // Without a Content-Length (chunked), the limit holds as the body streams in.
    let mut chunked = Vec::new();
    let big_body = multipart(
        BOUNDARY,
        &[("application/dicom", &a), ("application/dicom", &big)],
    );
    for chunk in big_body.chunks(64 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (got, text) = post_early_answer(
        &node,
        "/dicom-web/studies",
        &format!("{ct}\r\nTransfer-Encoding: chunked"),
        &chunked,
    );
    assert_eq!(got, 413, "chunked: {text}");
    assert!(node.stored_files().is_empty() && node.temporary_files().is_empty());
    assert_eq!(node.index().count("SELECT COUNT(*) FROM instances"), 0);
    // The node still takes a good body afterwards.
    let r = post(&node, "/dicom-web/studies", &ct, &good);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(node.stored_files().len(), 2);
}

// ---------------------------------------------------------------------------------------
// The page, in a browser

/// Headless Chromium, when installed. Where ANATOMY_REQUIRE_BROWSER_TESTS is set (CI, via
/// tests/run-all.sh) a missing browser fails the test instead of skipping its browser part.
fn chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .map(|name| {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
        .find_map(|p| p);
    if found.is_none() {
        assert!(
            std::env::var_os("ANATOMY_REQUIRE_BROWSER_TESTS").is_none(),
            "Chromium is not installed (apt package chromium; deploy/install-deps.sh --test) \
             and ANATOMY_REQUIRE_BROWSER_TESTS is set"
        );
        eprintln!(
            "SKIPPED the browser check: Chromium is not installed (apt package chromium, \
             installed by deploy/install-deps.sh --test); the page's HTML is still checked"
        );
    }
    found
}

fn screenshot(browser: &Path, url: &str, out: &Path) {
    let profile = tempfile::tempdir().expect("profile dir");
    let status = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", out.display()))
        .arg("--window-size=1280,900")
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.is_file(),
        "Chromium wrote no screenshot: {}",
        common::text(&status)
    );
}

#[test]
fn the_page_shows_a_labelled_series_in_a_browser() {
    let work = tempfile::tempdir().expect("work");
    let Some(model) =
        common::models::make(work.path(), "model", &["--size", "64", "--kind", "stats"])
    else {
        return;
    };
    let node = Node::start_with(NodeOptions {
        stable_after_secs: 1,
        classifier: format!(
            "enabled = true\nmodel = \"{}\"\ndevice = \"cpu\"\nkey_images = 8\n",
            model.display()
        ),
        ..NodeOptions::default()
    });
    let (spec, files) = data::synthetic_series(&work.path().join("series"), 831, 24, 64);
    let out = node.storescu(&[], &files);
    assert!(out.status.success(), "{}", common::text(&out));
    let index = node.index();
    let labelled = common::wait_until(60, || {
        index.count("SELECT COUNT(*) FROM series_labels WHERE status = 'labelled'") == 1
    });
    assert!(
        labelled,
        "the series was not labelled: {:?}",
        index.rows("SELECT status, reason FROM series_labels")
    );
    let row = index.rows("SELECT predicted_body_part, predicted_class FROM series");
    let (body_part, class) = (row[0][0].clone(), row[0][1].clone());

    let page = get(&node, "/", None);
    assert_eq!(page.status, 200);
    assert!(
        page.content_type.starts_with("text/html"),
        "{}",
        page.content_type
    );
    let html = page.text();
    assert!(
        html.contains(&spec.series_uid()),
        "the page names the series"
    );
    assert!(html.contains("Synthetic series 831"));
    assert!(
        html.contains(&format!("<dd class=\"predicted\">{body_part}</dd>")),
        "predicted Body Part Examined {body_part}"
    );
    assert!(
        html.contains("<dd class=\"received\">–</dd>"),
        "no Body Part Examined was received"
    );
    assert!(
        html.contains(&format!("<dd>{class}</dd>")),
        "dominant class {class}"
    );
    assert!(html.contains("<svg class=\"bar\""), "the coverage bar");
    assert!(html.contains("class=\"series labelled\""));
    assert!(!html.contains("<script"), "no JavaScript");
    // Every thumbnail on the page is a PNG the node renders.
    let thumbs: Vec<&str> = html
        .split("<img src=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .collect();
    assert!(!thumbs.is_empty() && thumbs.len() <= 4, "{thumbs:?}");
    for t in &thumbs {
        let r = get(&node, &t.replace("&amp;", "&"), None);
        assert_eq!(r.status, 200, "{t}: {}", r.text());
        let (w, h, _, _) = decode_png(&r.body);
        assert!(w <= 112 && h <= 112);
    }
    assert_eq!(get(&node, "/ui?page=2", None).status, 200);
    assert_eq!(get(&node, "/?page=x", None).status, 400);

    let Some(browser) = chromium() else { return };
    let shot = work.path().join("page.png");
    screenshot(&browser, &url(&node, "/"), &shot);
    let (w, h, pixels, color) = decode_png(&std::fs::read(&shot).expect("screenshot"));
    assert_eq!((w, h), (1280, 900));
    let channels = match color {
        png::ColorType::Rgba => 4,
        png::ColorType::Rgb => 3,
        other => panic!("screenshot colour type {other:?}"),
    };
    let colours: BTreeSet<&[u8]> = pixels.chunks(channels).collect();
    assert!(
        colours.len() > 50,
        "the screenshot is (nearly) blank: {} colours",
        colours.len()
    );
    if let Ok(dir) = std::env::var("ANATOMY_KEEP_SCREENSHOT") {
        let _ = std::fs::copy(&shot, Path::new(&dir).join("web-page.png"));
    }
}

// ---------------------------------------------------------------------------------------
// Security: credentials and roles, the login cookie, JWTs, HTTPS, no PHI in the log

/// `anatomy-node token`: (the token, its hash); what it prints holds no token in the config lines.
fn make_token(name: &str, roles: &str) -> (String, String) {
    let (token, hash, text) = common::make_token(name, roles);
    assert!(
        !text.contains(&format!("\"{token}\"")),
        "the config holds no token"
    );
    assert!(text.contains(&format!("name = \"{name}\"")), "{text}");
    (token, hash)
}

fn get_with(node: &Node, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = agent().get(&url(node, path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    reply(req.call())
}

/// The response headers of `name` for a GET.
fn header_of(node: &Node, path: &str, headers: &[(&str, &str)], name: &str) -> Vec<String> {
    let mut req = agent().get(&url(node, path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.call().expect("HTTP request");
    r.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn post_login(node: &Node, token: &str) -> ureq::http::Response<ureq::Body> {
    agent()
        .post(&url(node, "/login"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .send(format!("token={token}").as_bytes())
        .expect("login")
}

/// POST /login with a form: (status, Set-Cookie, body).
fn login(node: &Node, token: &str) -> (u16, Vec<String>, String) {
    let mut r = post_login(node, token);
    let cookies = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    let status = r.status().as_u16();
    let body = r.body_mut().read_to_string().unwrap_or_default();
    (status, cookies, body)
}

/// POST /login from this test's address: (status, Retry-After).
fn login_retry_after(node: &Node, token: &str) -> (u16, Option<u64>) {
    let r = post_login(node, token);
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (r.status().as_u16(), retry)
}

#[test]
fn failed_sign_ins_lock_the_address_out_of_login_for_a_while() {
    let (reader, hash) = make_token("viewer", "read");
    let node = Node::start_with(NodeOptions {
        extra_http: format!(
            "anonymous = false\ntokens = \"viewer:{hash}:read\"\n\
             login_max_failures = 3\nlogin_window_secs = 60\nlogin_lockout_secs = 3\n"
        ),
        ..NodeOptions::default()
    });
    // A success clears the count: two failures, a success, two more failures stay below 3.
    for _ in 0..2 {
        assert_eq!(login_retry_after(&node, "anp_wrong").0, 401);
    }
    assert_eq!(login_retry_after(&node, &reader).0, 200);
    for _ in 0..2 {
        assert_eq!(login_retry_after(&node, "anp_wrong").0, 401);
    }
    assert_eq!(
        login_retry_after(&node, "anp_wrong").0,
        401,
        "the third failure"
    );
    // Locked out: 429 with Retry-After, even with the right token.
    let (status, retry) = login_retry_after(&node, &reader);
    assert_eq!(status, 429);
    assert!(retry.is_some_and(|s| (1..=3).contains(&s)), "{retry:?}");
    // Bearer requests are not affected.
    let r = get_with(
        &node,
        "/dicom-web/studies",
        &[("Authorization", &bearer(&reader))],
    );
    assert_eq!(r.status, 200);
    let refused = || {
        node.index().count(
            "SELECT COUNT(*) FROM audit_events WHERE event_type = 'auth_failure' \
             AND outcome = 'refused' AND detail LIKE 'status 429%'",
        )
    };
    assert!(
        common::wait_until(10, || refused() >= 1),
        "the lockout is audited"
    );
    // After the lockout the right token signs in again.
    assert!(common::wait_until(8, || login_retry_after(&node, &reader)
        .0
        == 200));
}

/// Headless Chromium's DOM of `url` after scripts and navigations (5 s of virtual time).
fn dump_dom(browser: &Path, url: &str) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--allow-file-access-from-files",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .expect("run chromium");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn tokens_and_roles_guard_every_route_and_the_page_signs_in() {
    let work = tempfile::tempdir().expect("work");
    let (reader, reader_hash) = make_token("viewer", "read");
    let (writer, writer_hash) = make_token("modality", "write");
    let (scraper, scraper_hash) = make_token("prometheus", "metrics");
    let node = Node::start_with(NodeOptions {
        stable_after_secs: 1,
        extra_http: "anonymous = false".into(),
        // Two tokens in the configuration, one in the environment's text form.
        http_tables: format!(
            "[[http.tokens]]\nname = \"viewer\"\nsha256 = \"{reader_hash}\"\nroles = [\"read\"]\n\
             [[http.tokens]]\nname = \"modality\"\nsha256 = \"{writer_hash}\"\nroles = [\"write\"]\n"
        ),
        env: vec![(
            "ANATOMY_HTTP__TOKENS".into(),
            format!(
                "viewer:{reader_hash}:read,modality:{writer_hash}:write,prometheus:{scraper_hash}:metrics"
            ),
        )],
        ..NodeOptions::default()
    });
    let (spec, files) = data::synthetic_series(&work.path().join("series"), 612, 3, 32);
    let auth = |t: &str| bearer(t);

    // /healthz is open; everything else needs credentials.
    assert_eq!(get(&node, "/healthz", None).status, 200);
    for path in ["/dicom-web/studies", "/dicom-web/series", "/metrics", "/ui"] {
        let r = get(&node, path, None);
        assert_eq!(r.status, 401, "{path}: {}", r.text());
        let challenge = header_of(&node, path, &[], "www-authenticate");
        assert!(
            challenge.iter().any(|c| c.starts_with("Bearer realm=")),
            "{path}: {challenge:?}"
        );
    }
    let r = get(&node, "/dicom-web/studies", None);
    assert!(r.text().contains("authentication required"), "{}", r.text());

    // STOW-RS needs write: the reader gets 403, the writer stores.
    let body = multipart(
        BOUNDARY,
        &[(
            "application/dicom",
            &std::fs::read(&files[0]).expect("file"),
        )],
    );
    let stow_as = |token: &str| {
        reply(
            agent()
                .post(&url(&node, "/dicom-web/studies"))
                .header("Content-Type", &stow_type(BOUNDARY))
                .header("Authorization", &auth(token))
                .send(&body[..]),
        )
    };
    let r = stow_as(&reader);
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("\"write\""), "{}", r.text());
    assert!(node.stored_files().is_empty());
    let r = stow_as(&writer);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(node.stored_files().len(), 1);
    let out = node.storescu(&[], &files[1..]);
    assert!(out.status.success(), "{}", common::text(&out));

    // QIDO-RS, WADO-RS and rendered images need read.
    let study = format!("/dicom-web/studies?StudyInstanceUID={}", spec.study_uid());
    let r = get_with(&node, &study, &[("Authorization", &auth(&reader))]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().as_array().map(Vec::len), Some(1));
    let instance = format!(
        "/dicom-web/studies/{}/series/{}/instances/{}",
        spec.study_uid(),
        spec.series_uid(),
        spec.sop_uid(0)
    );
    let r = get_with(
        &node,
        &format!("{instance}/rendered"),
        &[("Authorization", &auth(&reader)), ("Accept", "image/png")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get_with(&node, &study, &[("Authorization", &auth(&writer))]);
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("token modality"), "{}", r.text());

    // /metrics needs metrics.
    let r = get_with(&node, "/metrics", &[("Authorization", &auth(&reader))]);
    assert_eq!(r.status, 403);
    let r = get_with(&node, "/metrics", &[("Authorization", &auth(&scraper))]);
    assert_eq!(r.status, 200);
    assert!(r.text().contains("instances"), "{}", r.text());

    // Unknown tokens and other schemes: 401 with the reason.
    let r = get_with(
        &node,
        &study,
        &[("Authorization", &auth("anp_not-a-token"))],
    );
    assert_eq!(r.status, 401);
    assert!(r.text().contains("unknown API token"), "{}", r.text());
    let challenge = header_of(
        &node,
        &study,
        &[("Authorization", "Bearer anp_x")],
        "www-authenticate",
    );
    assert!(
        challenge.iter().any(|c| c.contains("invalid_token")),
        "{challenge:?}"
    );
    let r = get_with(&node, &study, &[("Authorization", "Basic dXNlcjpwYXNz")]);
    assert_eq!(r.status, 401);

    // The page: the login form without credentials; the form's cookie opens it.
    let page = get(&node, "/", None);
    assert_eq!(page.status, 401);
    assert!(page.content_type.starts_with("text/html"));
    assert!(page
        .text()
        .contains("<form class=\"login\" method=\"post\" action=\"/login\""));
    assert!(!page.text().contains(&spec.series_uid()));
    let (status, cookies, body) = login(&node, "anp_wrong");
    assert_eq!(status, 401, "{body}");
    assert!(cookies.is_empty());
    let (status, _, body) = login(&node, &writer);
    assert_eq!(status, 403, "a token without read: {body}");
    let (status, cookies, _) = login(&node, &reader);
    assert_eq!(status, 200);
    let cookie = cookies.first().expect("Set-Cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains("Secure"),
        "plain HTTP: no Secure flag: {cookie}"
    );
    let pair = cookie.split(';').next().expect("name=value").to_string();
    let page = get_with(&node, "/", &[("Cookie", &pair)]);
    assert_eq!(page.status, 200, "{}", page.text());
    assert!(page.text().contains(&spec.series_uid()));
    assert!(page.text().contains("signed in: token viewer"));
    assert!(page.text().contains("action=\"/logout\""));
    let no_redirects: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let r = no_redirects
        .post(&url(&node, "/logout"))
        .header("Cookie", &pair)
        .send(&[][..])
        .expect("logout");
    let cleared: Vec<String> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    assert_eq!(r.status().as_u16(), 303);
    assert!(
        cleared
            .iter()
            .any(|c| c.starts_with("anatomy_token=;") && c.contains("Max-Age=0")),
        "{cleared:?}"
    );

    // In a browser: without the cookie the login form, after signing in the series.
    let Some(browser) = chromium() else { return };
    let dom = dump_dom(&browser, &url(&node, "/"));
    assert!(dom.contains("action=\"/login\""), "no login form: {dom}");
    assert!(!dom.contains(&spec.series_uid()));
    // The form is filled and sent by a page of the test's own (the node's page has no
    // script); the node's answer then takes the browser to / with the cookie.
    let launcher = work.path().join("sign-in.html");
    std::fs::write(
        &launcher,
        format!(
            "<!DOCTYPE html><html><body><form method=\"post\" action=\"{}\">\
             <input name=\"token\" value=\"{reader}\"></form>\
             <script>document.forms[0].submit()</script></body></html>",
            url(&node, "/login")
        ),
    )
    .expect("launcher page");
    let dom = dump_dom(&browser, &format!("file://{}", launcher.display()));
    assert!(
        dom.contains(&spec.series_uid()) && dom.contains("Synthetic series 612"),
        "the page after signing in does not show the series: {dom}"
    );
}

// JWTs and HTTPS: keys, certificates and tokens are made here, at run time, with openssl.

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn path_arg(p: &Path) -> String {
    p.display().to_string()
}

fn rsa_key(dir: &Path, name: &str) -> PathBuf {
    let key = dir.join(format!("{name}.pem"));
    openssl(&["genrsa", "-out", &path_arg(&key), "2048"]);
    key
}

fn rsa_jwk(key: &Path, kid: &str) -> Value {
    let out = openssl(&["rsa", "-in", &path_arg(key), "-noout", "-modulus"]);
    let text = String::from_utf8_lossy(&out);
    let modulus = text.trim().strip_prefix("Modulus=").expect("Modulus=");
    let n = hex::decode(modulus).expect("hex modulus");
    serde_json::json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
                       "n": b64url(&n), "e": "AQAB"})
}

fn ec_key(dir: &Path, name: &str) -> PathBuf {
    let key = dir.join(format!("{name}.pem"));
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        &path_arg(&key),
    ]);
    key
}

fn ec_jwk(key: &Path, kid: &str) -> Value {
    let der = openssl(&["ec", "-in", &path_arg(key), "-pubout", "-outform", "DER"]);
    let point = &der[der.len() - 65..];
    assert_eq!(point[0], 4, "an uncompressed point");
    serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid,
                       "x": b64url(&point[1..33]), "y": b64url(&point[33..])})
}

/// A JWS compact token signed with `key` (RS256 or ES256).
fn sign_jwt(key: &Path, alg: &str, kid: &str, claims: &Value) -> String {
    let header = serde_json::json!({"alg": alg, "typ": "JWT", "kid": kid});
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let dir = tempfile::tempdir().expect("signing dir");
    let file = dir.path().join("input");
    std::fs::write(&file, &input).expect("signing input");
    let mut sig = openssl(&["dgst", "-sha256", "-sign", &path_arg(key), &path_arg(&file)]);
    if alg == "ES256" {
        // DER SEQUENCE { INTEGER r, INTEGER s } → r || s, 32 bytes each (RFC 7518, 3.4).
        let int = |at: usize| -> (Vec<u8>, usize) {
            assert_eq!(sig[at], 2, "an INTEGER");
            let len = sig[at + 1] as usize;
            let v: Vec<u8> = sig[at + 2..at + 2 + len]
                .iter()
                .copied()
                .skip_while(|&b| b == 0)
                .collect();
            let mut out = vec![0u8; 32 - v.len()];
            out.extend(v);
            (out, at + 2 + len)
        };
        let (r, next) = int(2);
        let (s, _) = int(next);
        sig = [r, s].concat();
    }
    format!("{input}.{}", b64url(&sig))
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

#[test]
fn jwts_are_checked_against_the_jwks() {
    let keys = tempfile::tempdir().expect("keys");
    let rsa = rsa_key(keys.path(), "idp-rsa");
    let ec = ec_key(keys.path(), "idp-ec");
    let stranger = rsa_key(keys.path(), "stranger");
    let jwks = keys.path().join("jwks.json");
    let set = serde_json::json!({"keys": [rsa_jwk(&rsa, "rsa-1"), ec_jwk(&ec, "ec-1")]});
    std::fs::write(&jwks, set.to_string()).expect("jwks");
    let issuer = "https://idp.example.test/realms/hospital";
    let node = Node::start_with(NodeOptions {
        extra_http: "anonymous = false".into(),
        http_tables: format!(
            "[http.jwt]\njwks_file = \"{}\"\nissuer = \"{issuer}\"\naudience = \"anatomy-node\"\n\
             roles_claim = \"realm_access.roles\"\nleeway_secs = 5\n",
            jwks.display()
        ),
        ..NodeOptions::default()
    });
    let now = now_secs();
    let claims = |roles: &[&str]| {
        serde_json::json!({
            "iss": issuer, "aud": ["account", "anatomy-node"], "sub": "u-123",
            "preferred_username": "radiologist", "iat": now, "nbf": now - 10, "exp": now + 300,
            "realm_access": {"roles": roles}
        })
    };
    let status = |token: &str| -> (u16, String) {
        let r = get_with(
            &node,
            "/dicom-web/studies",
            &[("Authorization", &bearer(token))],
        );
        (r.status, r.text())
    };

    let good = sign_jwt(&rsa, "RS256", "rsa-1", &claims(&["read", "offline_access"]));
    assert_eq!(status(&good).0, 200, "{}", status(&good).1);
    let ec_token = sign_jwt(&ec, "ES256", "ec-1", &claims(&["read"]));
    assert_eq!(status(&ec_token).0, 200, "ES256: {}", status(&ec_token).1);

    // Valid, without the role: 403.
    let (code, text) = status(&sign_jwt(&rsa, "RS256", "rsa-1", &claims(&["write"])));
    assert_eq!(code, 403, "{text}");
    assert!(text.contains("jwt radiologist"), "{text}");
    // STOW-RS takes the write role from the same claim.
    let r = reply(
        agent()
            .post(&url(&node, "/dicom-web/studies"))
            .header("Content-Type", &stow_type(BOUNDARY))
            .header(
                "Authorization",
                &bearer(&sign_jwt(&rsa, "RS256", "rsa-1", &claims(&["read"]))),
            )
            .send(&multipart(BOUNDARY, &[])[..]),
    );
    assert_eq!(r.status, 403, "{}", r.text());

    let refused = |token: String, why: &str| {
        let (code, text) = status(&token);
        assert_eq!(code, 401, "{why}: {text}");
        assert!(text.contains(why), "expected {why:?}: {text}");
    };
    let mut expired = claims(&["read"]);
    expired["exp"] = (now - 60).into();
    refused(sign_jwt(&rsa, "RS256", "rsa-1", &expired), "expired");
    let mut early = claims(&["read"]);
    early["nbf"] = (now + 600).into();
    refused(sign_jwt(&rsa, "RS256", "rsa-1", &early), "not valid yet");
    let mut no_exp = claims(&["read"]);
    no_exp.as_object_mut().expect("object").remove("exp");
    refused(sign_jwt(&rsa, "RS256", "rsa-1", &no_exp), "no exp");
    let mut other_aud = claims(&["read"]);
    other_aud["aud"] = "another-service".into();
    refused(sign_jwt(&rsa, "RS256", "rsa-1", &other_aud), "audience");
    let mut other_iss = claims(&["read"]);
    other_iss["iss"] = "https://evil.example.test".into();
    refused(sign_jwt(&rsa, "RS256", "rsa-1", &other_iss), "issuer");
    // Signed by a key that is not in the set (under a kid that is).
    refused(
        sign_jwt(&stranger, "RS256", "rsa-1", &claims(&["read"])),
        "signature is not valid",
    );
    // A payload changed after signing.
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    parts[1] = b64url(claims(&["read", "admin"]).to_string().as_bytes());
    refused(parts.join("."), "signature is not valid");
    // alg "none" and HMAC are never accepted.
    let unsigned = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(claims(&["read"]).to_string().as_bytes())
    );
    refused(unsigned, "not accepted");
    refused(
        format!(
            "{}.{}.c2ln",
            b64url(br#"{"alg":"HS256","typ":"JWT","kid":"rsa-1"}"#),
            b64url(claims(&["read"]).to_string().as_bytes())
        ),
        "not accepted",
    );
}

/// A tiny HTTP server for a JWKS: it answers every GET with the current document (or 500
/// when it is empty) and counts the requests.
struct JwksServer {
    port: u16,
    document: std::sync::Arc<std::sync::Mutex<String>>,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Read one request on `stream`, answer it with the document (500 when empty), count it.
fn answer(
    stream: &mut (impl std::io::Read + std::io::Write),
    doc: &std::sync::Mutex<String>,
    count: &std::sync::atomic::AtomicUsize,
) {
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    while !request.ends_with(b"\r\n\r\n") && stream.read_exact(&mut byte).is_ok() {
        request.push(byte[0]);
    }
    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let body = doc.lock().expect("document").clone();
    let status = if body.is_empty() {
        "500 Internal Server Error"
    } else {
        "200 OK"
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
}

impl JwksServer {
    fn start(document: &Value) -> JwksServer {
        JwksServer::start_tls(document, None)
    }

    /// With `tls` (a certificate and its key), HTTPS.
    fn start_tls(document: &Value, tls: Option<(&Path, &Path)>) -> JwksServer {
        let tls = tls.map(|(cert, key)| {
            std::sync::Arc::new(
                anatomy_node::net::tls::single_cert_server(cert, key).expect("server TLS"),
            )
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("JWKS server");
        let port = listener.local_addr().expect("address").port();
        let shared = std::sync::Arc::new(std::sync::Mutex::new(document.to_string()));
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (doc, count) = (shared.clone(), hits.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut tcp) = stream else { return };
                match &tls {
                    Some(config) => {
                        let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                            return;
                        };
                        answer(&mut rustls::StreamOwned::new(conn, tcp), &doc, &count);
                    }
                    None => answer(&mut tcp, &doc, &count),
                }
            }
        });
        JwksServer {
            port,
            document: shared,
            hits,
        }
    }

    fn serve(&self, document: Option<&Value>) {
        *self.document.lock().expect("document") =
            document.map(Value::to_string).unwrap_or_default();
    }

    fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Two RSA keys (their directory, old, new) and a JWKS server with the old one as "k1".
fn rotation_keys() -> (tempfile::TempDir, PathBuf, PathBuf, JwksServer) {
    let keys = tempfile::tempdir().expect("keys");
    let (old, new) = (rsa_key(keys.path(), "old"), rsa_key(keys.path(), "new"));
    let server = JwksServer::start(&serde_json::json!({"keys": [rsa_jwk(&old, "k1")]}));
    (keys, old, new, server)
}

/// A node that takes JWTs checked against `server`'s key set.
fn jwks_url_node(server: &JwksServer, issuer: &str, refresh: u64, min_refresh: u64) -> Node {
    Node::start_with(NodeOptions {
        extra_http: "anonymous = false".into(),
        http_tables: format!(
            "[http.jwt]\njwks_url = \"http://127.0.0.1:{}/certs\"\nissuer = \"{issuer}\"\n\
             audience = \"anatomy-node\"\njwks_refresh_secs = {refresh}\n\
             jwks_min_refresh_secs = {min_refresh}\n",
            server.port
        ),
        ..NodeOptions::default()
    })
}

#[test]
fn jwks_from_a_url_follows_key_rotation_with_rate_limited_fetches() {
    let (_keys, old, new, server) = rotation_keys();
    let issuer = "https://idp.example.test/realms/hospital";
    let node = jwks_url_node(&server, issuer, 3600, 30);
    let now = now_secs();
    let claims = serde_json::json!({
        "iss": issuer, "aud": "anatomy-node", "sub": "u-1", "exp": now + 300,
        "realm_access": {"roles": ["read"]}
    });
    let status = |key: &Path, kid: &str| {
        let token = sign_jwt(key, "RS256", kid, &claims);
        let r = get_with(
            &node,
            "/dicom-web/studies",
            &[("Authorization", &bearer(&token))],
        );
        (r.status, r.text())
    };
    assert_eq!(status(&old, "k1").0, 200, "the key fetched at start-up");
    let fetched = server.hits();

    // The provider rotates in a new key: a token naming it makes the node fetch the set.
    server.serve(Some(&serde_json::json!({"keys": [rsa_jwk(&new, "k2")]})));
    let (code, text) = status(&new, "k2");
    assert_eq!(code, 200, "the rotated key: {text}");
    assert_eq!(server.hits(), fetched + 1, "one fetch for the unknown kid");
    assert_eq!(status(&old, "k1").0, 401, "the retired key is gone");

    // Unknown kids again within jwks_min_refresh_secs: no fetch (a flood of made-up kids
    // cannot make the node hammer the provider).
    for kid in ["zz1", "zz2", "zz3"] {
        assert_eq!(status(&new, kid).0, 401);
    }
    assert_eq!(
        server.hits(),
        fetched + 1,
        "unknown-kid fetches are rate-limited"
    );
    assert_eq!(status(&new, "k2").0, 200);
}

#[test]
fn jwks_over_https_is_verified_against_the_ca_file() {
    let pki = tempfile::tempdir().expect("pki");
    let ca = common::pki::Ca::new(pki.path(), "idp-ca");
    let idp = ca.server("idp");
    let key = rsa_key(pki.path(), "idp-key");
    let server = JwksServer::start_tls(
        &serde_json::json!({"keys": [rsa_jwk(&key, "k1")]}),
        Some((&idp.cert, &idp.key)),
    );
    let issuer = "https://idp.example.test";
    let node = Node::start_with(NodeOptions {
        extra_http: "anonymous = false".into(),
        http_tables: format!(
            "[http.jwt]\njwks_url = \"https://localhost:{}/certs\"\njwks_ca_file = \"{}\"\n\
             issuer = \"{issuer}\"\naudience = \"anatomy-node\"\n",
            server.port,
            ca.cert.display()
        ),
        ..NodeOptions::default()
    });
    let claims = serde_json::json!({
        "iss": issuer, "aud": "anatomy-node", "sub": "u-1", "exp": now_secs() + 300,
        "realm_access": {"roles": ["read"]}
    });
    let token = sign_jwt(&key, "RS256", "k1", &claims);
    let r = get_with(
        &node,
        "/dicom-web/studies",
        &[("Authorization", &bearer(&token))],
    );
    assert_eq!(r.status, 200, "{}\n{}", r.text(), node.log());
    assert!(server.hits() >= 1);
}

#[test]
fn a_failing_jwks_url_keeps_the_last_good_set_and_periodic_refresh_recovers() {
    let (_keys, old, new, server) = rotation_keys();
    let issuer = "https://idp.example.test";
    let node = jwks_url_node(&server, issuer, 1, 3600);
    let claims = serde_json::json!({
        "iss": issuer, "aud": "anatomy-node", "sub": "u-1", "exp": now_secs() + 300,
        "realm_access": {"roles": ["read"]}
    });
    let status = |key: &Path, kid: &str| {
        let token = sign_jwt(key, "RS256", kid, &claims);
        get_with(
            &node,
            "/dicom-web/studies",
            &[("Authorization", &bearer(&token))],
        )
        .status
    };
    assert_eq!(status(&old, "k1"), 200);
    server.serve(None);
    // The one unknown-kid fetch an hour is spent here (and fails): what recovers below is
    // the periodic refresh.
    assert_eq!(status(&new, "k2"), 401);
    let failing_since = server.hits();
    assert!(common::wait_until(10, || server.hits() >= failing_since + 2));
    assert_eq!(status(&old, "k1"), 200, "the last good set stays in use");
    assert!(
        node.log().contains("JWKS fetch failed"),
        "the failure is logged"
    );
    server.serve(Some(&serde_json::json!({"keys": [rsa_jwk(&new, "k2")]})));
    assert!(
        common::wait_until(10, || status(&new, "k2") == 200),
        "the periodic refresh picks up the new set"
    );
}

/// A test CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, cert, key).
fn test_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca = common::pki::Ca::new(dir, "anatomy-node-test-ca");
    let server = ca.server("server");
    (ca.cert, server.cert, server.key)
}

fn curl(args: &[&str]) -> std::process::Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("run curl (apt package curl)")
}

/// A node speaking HTTPS with a test CA in `pki` and one token `name` of role read:
/// (the CA file, the token, the node).
fn https_node(pki: &Path, name: &str) -> (PathBuf, String, Node) {
    let (ca, cert, key) = test_pki(pki);
    let (reader, hash) = make_token(name, "read");
    let node = Node::start_with(NodeOptions {
        extra_http: format!(
            "anonymous = false\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntokens = \"{name}:{hash}:read\"\n",
            cert.display(),
            key.display()
        ),
        ..NodeOptions::default()
    });
    (ca, reader, node)
}

#[test]
fn https_with_a_test_ca_tls12_and_13_only() {
    let pki = tempfile::tempdir().expect("pki");
    let (ca, reader, node) = https_node(pki.path(), "viewer");
    let base = format!("https://127.0.0.1:{}", node.http_port);
    let ca_arg = path_arg(&ca);
    let auth = format!("Authorization: Bearer {reader}");

    let out = curl(&["--cacert", &ca_arg, &format!("{base}/healthz")]);
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok"));
    // QIDO-RS with the token; without it 401.
    let qido = format!("{base}/dicom-web/studies");
    let out = curl(&[
        "--cacert",
        &ca_arg,
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        "-H",
        &auth,
        &qido,
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "{}",
        common::text(&out)
    );
    let out = curl(&[
        "--cacert",
        &ca_arg,
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &qido,
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");
    // TLS 1.3 and 1.2 are spoken; 1.1 is not.
    for (flags, ok) in [
        (&["--tlsv1.3"][..], true),
        (&["--tlsv1.2", "--tls-max", "1.2"][..], true),
        (&["--tlsv1.1", "--tls-max", "1.1"][..], false),
    ] {
        let mut args = vec!["--cacert", &ca_arg, "-o", "/dev/null"];
        args.extend(flags);
        let target = format!("{base}/healthz");
        args.push(&target);
        let out = curl(&args);
        assert_eq!(
            out.status.success(),
            ok,
            "curl {flags:?}: {}",
            common::text(&out)
        );
    }
    // A client that does not trust the test CA refuses the certificate.
    let out = curl(&["-o", "/dev/null", &format!("{base}/healthz")]);
    assert!(
        !out.status.success(),
        "an untrusted certificate was accepted"
    );
    // The login cookie is Secure over HTTPS.
    let out = curl(&[
        "--cacert",
        &ca_arg,
        "-i",
        "-o",
        "-",
        "--data-urlencode",
        &format!("token={reader}"),
        &format!("{base}/login"),
    ]);
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    let cookie = head
        .lines()
        .find(|l| l.starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no Set-Cookie: {head}"));
    assert!(
        cookie.contains("; secure")
            && cookie.contains("httponly")
            && cookie.contains("samesite=strict"),
        "{cookie}"
    );
}

#[test]
fn the_mining_dicomweb_client_sends_its_token_and_checks_the_archive_certificate() {
    use anatomy_node::mine::web::{DicomWeb, WebSecurity};
    use anatomy_node::mine::ArchiveConfig;
    let pki = tempfile::tempdir().expect("pki");
    let (ca, reader, node) = https_node(pki.path(), "miner");
    let other_ca = common::pki::Ca::new(pki.path(), "other-ca");
    let token_file = pki.path().join("archive-token");
    std::fs::write(&token_file, format!("{reader}\n")).expect("token file");
    let archive = |token_file: Option<&Path>, ca: &Path| ArchiveConfig {
        dicomweb_url: format!("https://localhost:{}/dicom-web", node.http_port),
        dicomweb_token_file: token_file.map(Path::to_path_buf),
        dicomweb_ca_file: Some(ca.to_path_buf()),
        ..ArchiveConfig::default()
    };
    let search = |config: &ArchiveConfig| {
        let security: WebSecurity = config.web_security().expect("web security");
        let client = DicomWeb::new(
            &config.dicomweb_url,
            std::time::Duration::from_secs(5),
            std::time::Duration::from_secs(10),
            anatomy_node::mine::web::Limits {
                search_mb: config.dicomweb_max_search_mb,
                instance_mb: config.dicomweb_max_instance_mb,
            },
            security,
        );
        client.search("studies", &[], &[], 100).map(|a| a.len())
    };
    assert_eq!(
        search(&archive(Some(&token_file), &ca)).expect("QIDO-RS with the token over HTTPS"),
        0
    );
    let err = search(&archive(None, &ca)).expect_err("no token");
    assert!(err.to_string().contains("401"), "{err}");
    let err = search(&archive(Some(&token_file), &other_ca.cert)).expect_err("another CA");
    assert!(!err.to_string().contains("HTTP 200"), "{err}");
}

/// One HTTPS connection that stays open (keep-alive), trusting `ca` only.
fn https_connection(
    port: u16,
    ca: &Path,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use anatomy_node::net::{ClientTls, ClientTlsConfig};
    let settings = ClientTlsConfig {
        enabled: true,
        ca_file: Some(ca.to_path_buf()),
        ..ClientTlsConfig::default()
    };
    let tls = ClientTls::build(&settings, "localhost")
        .expect("client TLS")
        .expect("enabled");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(tls.config, name).expect("client connection");
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    rustls::StreamOwned::new(conn, tcp)
}

/// `GET /healthz` on an open connection, leaving it open: the status.
fn healthz_keep_alive<S: std::io::Read + std::io::Write>(stream: &mut S) -> u16 {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("response");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).expect("body");
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn https_certificate_reloads_on_sighup_and_a_bad_file_keeps_the_old_one() {
    let pki = tempfile::tempdir().expect("pki");
    let old_ca = common::pki::Ca::new(pki.path(), "old-ca");
    let new_ca = common::pki::Ca::new(pki.path(), "new-ca");
    let (old, new) = (old_ca.server("old"), new_ca.server("new"));
    let live_cert = pki.path().join("live.crt");
    let live_key = pki.path().join("live.key");
    std::fs::copy(&old.cert, &live_cert).expect("cert");
    std::fs::copy(&old.key, &live_key).expect("key");
    let node = Node::start_with(NodeOptions {
        extra_http: format!(
            "anonymous = true\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            live_cert.display(),
            live_key.display()
        ),
        ..NodeOptions::default()
    });
    let base = format!("https://127.0.0.1:{}/healthz", node.http_port);
    let trusts = |ca: &Path| {
        curl(&["--cacert", &path_arg(ca), "-o", "/dev/null", &base])
            .status
            .success()
    };
    let mut open = https_connection(node.http_port, &old_ca.cert);
    assert_eq!(healthz_keep_alive(&mut open), 200);
    assert!(trusts(&old_ca.cert) && !trusts(&new_ca.cert));

    std::fs::copy(&new.cert, &live_cert).expect("cert");
    std::fs::copy(&new.key, &live_key).expect("key");
    node.sighup();
    assert!(
        common::wait_until(10, || node.log().contains("HTTPS certificate reloaded")),
        "reload logged:\n{}",
        node.log()
    );
    // The connection opened before the reload goes on; new handshakes get the new certificate.
    assert_eq!(healthz_keep_alive(&mut open), 200);
    assert!(trusts(&new_ca.cert), "the new certificate after SIGHUP");
    assert!(!trusts(&old_ca.cert), "the old certificate is gone");

    // A broken file keeps the current certificate, and the failure is logged and audited.
    std::fs::write(&live_cert, "not a certificate").expect("break");
    node.sighup();
    assert!(common::wait_until(10, || node
        .log()
        .contains("HTTPS reload failed")));
    assert!(trusts(&new_ca.cert), "still the last good certificate");
    let audited = |outcome: &str| {
        node.index().count(&format!(
            "SELECT COUNT(*) FROM audit_events WHERE event_type = 'config_reload' \
             AND outcome = '{outcome}' AND object LIKE 'http.tls_cert %'"
        ))
    };
    assert!(common::wait_until(10, || audited("success") == 1 && audited("failure") == 1));
}

/// `serve` with `config` (plus free ports on loopback for DICOM): it must refuse to start,
/// and the error names `expected`.
fn refuses_to_start(http: &str, expected: &[&str]) {
    refuses_to_start_with(http, &[], expected);
}

fn refuses_to_start_with(http: &str, env: &[(&str, &str)], expected: &[&str]) {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[dicom]\nbind = \"127.0.0.1\"\nport = {}\n[http]\nport = {}\n{http}\n\
             [storage]\npath = \"storage\"\n[classifier]\nenabled = false\n",
            common::free_port(),
            common::free_port()
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_anatomy-node"))
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start anatomy-node");
    let exited = common::wait_until(20, || child.try_wait().ok().flatten().is_some());
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("output");
    assert!(
        exited && !out.status.success(),
        "the node started with {http:?}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    for e in expected {
        assert!(err.contains(e), "the error does not name {e:?}: {err}");
    }
}

#[test]
fn anonymous_access_only_on_loopback_and_credentials_are_required_otherwise() {
    refuses_to_start(
        "bind = \"0.0.0.0\"",
        &[
            "http.anonymous",
            "http.bind",
            "0.0.0.0",
            "ANATOMY_HTTP__ANONYMOUS",
        ],
    );
    refuses_to_start(
        "anonymous = false",
        &[
            "http.anonymous = false",
            "http.tokens",
            "anatomy-node token",
        ],
    );
    refuses_to_start(
        "anonymous = false\ntokens = \"viewer:not-a-hash:read\"",
        &["sha256 must be 64 hex digits"],
    );
    refuses_to_start("tls_cert = \"cert.pem\"", &["http.tls_key"]);
    // The keys of [http.jwt] come from the environment too.
    refuses_to_start_with(
        "",
        &[
            ("ANATOMY_HTTP__ANONYMOUS", "false"),
            ("ANATOMY_HTTP__JWT__JWKS_FILE", "/nonexistent/jwks.json"),
            ("ANATOMY_HTTP__JWT__ISSUER", "https://idp.example.test"),
            ("ANATOMY_HTTP__JWT__AUDIENCE", "anatomy-node"),
        ],
        &["http.jwt.jwks_file", "/nonexistent/jwks.json"],
    );
    refuses_to_start_with(
        "",
        &[("ANATOMY_HTTP__JWT__JWKS_FILE", "/nonexistent/jwks.json")],
        &["http.jwt.issuer"],
    );
    refuses_to_start(
        "tls_cert = \"missing.pem\"\ntls_key = \"missing.key\"",
        &["http.tls_cert", "missing.pem"],
    );
    // The default: anonymous on 127.0.0.1 (the README's first run) serves without a token.
    let node = Node::start();
    assert_eq!(get(&node, "/dicom-web/studies", None).status, 200);
    // Credentials that are sent are checked even then.
    let r = get_with(
        &node,
        "/dicom-web/studies",
        &[("Authorization", "Bearer anp_x")],
    );
    assert_eq!(r.status, 401);
}

#[test]
fn patient_data_stays_out_of_the_log() {
    let work = tempfile::tempdir().expect("work");
    let model = common::models::make(work.path(), "model", &["--size", "32", "--kind", "stats"]);
    let classifier = match &model {
        Some(m) => format!(
            "enabled = true\nmodel = \"{}\"\ndevice = \"cpu\"\nkey_images = 4\n",
            m.display()
        ),
        None => "enabled = false".into(),
    };
    let node = Node::start_with(NodeOptions {
        stable_after_secs: 1,
        classifier,
        ..NodeOptions::default()
    });
    let mut spec = SeriesSpec::new(4711, 6, 32);
    spec.patient_id = "PHIPAT9031".into();
    let dir = work.path().join("series");
    std::fs::create_dir_all(&dir).expect("dir");
    let files = synth::write_series(&dir, &spec).expect("series");
    // A C-STORE, a STOW-RS (the same instance again), C-FIND and QIDO-RS by patient.
    let out = node.storescu(&[], &files);
    assert!(out.status.success(), "{}", common::text(&out));
    let r = stow(&node, "/dicom-web/studies", &files[..1]);
    assert_eq!(r.status, 200, "{}", r.text());
    let found = findscu_series(&node, &["PatientName=Phantom^4711", "PatientID=PHIPAT9031"]);
    assert_eq!(found.len(), 1);
    assert_eq!(
        qido(
            &node,
            "/dicom-web/series?PatientName=Phantom%5E4711&PatientID=PHIPAT9031"
        )
        .len(),
        1
    );
    let index = node.index();
    let done = common::wait_until(60, || {
        let sql = if model.is_some() {
            "SELECT COUNT(*) FROM series_labels WHERE status = 'labelled'"
        } else {
            "SELECT COUNT(*) FROM work_queue"
        };
        index.count(sql) == 1
    });
    assert!(done, "the series was not completed or labelled");
    node.sigterm();
    let mut node = node;
    node.wait_exit(30);
    let log = node.log();
    // The log was captured, with the debug lines of the node (tests/common/node.rs).
    assert!(
        log.contains("C-STORE status=0000") && log.contains("STOW-RS"),
        "{log}"
    );
    for phi in [
        "Phantom^4711",
        "Phantom",
        "PHIPAT9031",
        "ACC4711",
        "19700101",
    ] {
        let line = log.lines().find(|l| l.contains(phi));
        assert!(line.is_none(), "{phi:?} is in the log: {line:?}");
    }
    if model.is_some() {
        assert!(log.contains("classifier ready"), "{log}");
        // ONNX Runtime's start-up chatter stays out (warnings and errors only).
        let chatter: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" ort") && !l.contains("WARN") && !l.contains("ERROR"))
            .collect();
        assert!(chatter.is_empty(), "ONNX Runtime INFO lines: {chatter:?}");
    }
}
