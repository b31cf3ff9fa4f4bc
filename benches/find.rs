//! C-FIND response times: an index of 100,000 labelled series (rows inserted directly),
//! queried at SERIES level (Study Root) through a running node, each query on its own
//! association as a PACS or findscu would; prints median and p95 per kind of query.
//!
//!     cargo bench --bench find                      # SQLite index
//!     ANATOMY_BENCH_DATABASE_URL=postgres://... cargo bench --bench find
//!
//! Environment: ANATOMY_BENCH_SERIES (default 100000), ANATOMY_BENCH_RUNS (queries per
//! kind, default 60), ANATOMY_BENCH_DIR (default /tmp). Target: median < 50 ms.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::association::client::ClientAssociationOptions;
use dicom_ul::pdu::{PDataValue, PDataValueType};
use dicom_ul::Pdu;

const STUDY_ROOT: &str = "1.2.840.10008.5.1.4.1.2.2.1";
const EXPLICIT: &str = "1.2.840.10008.1.2.1";
const IMPLICIT: &str = "1.2.840.10008.1.2";
/// 2020-01-01 .. 2024-12-31
const DAYS: u64 = 1827;

/// (term, SNOMED CT code, meaning)
type Region = (&'static str, &'static str, &'static str);
/// Builds the identifier of one query.
type MakeQuery = Box<dyn Fn(&mut Rng) -> Vec<u8>>;

/// (Body Part Examined, its regions), with weights.
const BODY_PARTS: &[(Option<&str>, &[Region], u64)] = &[
    (Some("CHEST"), &[("CHEST", "43799004", "Chest")], 25),
    (
        Some("CHESTABDOMEN"),
        &[
            ("CHEST", "43799004", "Chest"),
            ("ABDOMEN", "818981001", "Abdomen"),
        ],
        15,
    ),
    (Some("ABDOMEN"), &[("ABDOMEN", "818981001", "Abdomen")], 20),
    (Some("PELVIS"), &[("PELVIS", "816092008", "Pelvis")], 10),
    (
        Some("ABDOMENPELVIS"),
        &[
            ("ABDOMEN", "818981001", "Abdomen"),
            ("PELVIS", "816092008", "Pelvis"),
        ],
        10,
    ),
    (Some("NECK"), &[("NECK", "45048000", "Neck")], 5),
    (None, &[], 15),
];

const DESCRIPTIONS: &[&str] = &[
    "Thorax 1.0 B31f",
    "Thorax low dose",
    "Abdomen venous",
    "Abdomen arterial",
    "Pelvis",
    "Topogram",
];

fn main() {
    let series: u64 = env_or("ANATOMY_BENCH_SERIES", 100_000);
    let runs: usize = env_or("ANATOMY_BENCH_RUNS", 60);
    let db = std::env::var("ANATOMY_BENCH_DATABASE_URL").unwrap_or_default();
    let postgres = db.starts_with("postgres");
    let work =
        tempfile::tempdir_in(std::env::var("ANATOMY_BENCH_DIR").unwrap_or_else(|_| "/tmp".into()))
            .expect("bench directory");
    if postgres {
        reset_postgres(&db);
    }
    // Schema first, rows next, node last: the fill does not compete with a running node.
    let config = write_config(work.path(), &db);
    let migrated = Command::new(env!("CARGO_BIN_EXE_anatomy-node"))
        .args(["db", "migrate", "--config"])
        .arg(&config.0)
        .status()
        .expect("anatomy-node db migrate");
    assert!(migrated.success(), "anatomy-node db migrate failed");
    let url = if postgres {
        db.clone()
    } else {
        format!(
            "sqlite://{}",
            work.path().join("storage/index.sqlite3").display()
        )
    };
    let started = Instant::now();
    let shape = fill(&url, series, postgres);
    println!(
        "index: {} ({}), {} patients, {} studies, {series} series ({} labelled), filled in {:.1} s",
        if postgres { "PostgreSQL" } else { "SQLite" },
        if postgres {
            "ANALYZE after the load, as autovacuum would do"
        } else {
            "planner statistics from the node's own background ANALYZE"
        },
        shape.patients,
        shape.studies,
        shape.labelled,
        started.elapsed().as_secs_f64()
    );
    let mut node = start_node(&config);
    // The first query starts the node's refresh of SQLite's planner statistics; let it end.
    find(
        node.port,
        &series_query(vec![text(tags::PATIENT_ID, VR::LO, "P000000")]),
    );
    std::thread::sleep(Duration::from_secs(3));

    let mut rng = Rng(42);
    let queries: Vec<(&str, MakeQuery)> = vec![
        (
            "BodyPartExamined=CHEST + 7-day StudyDate range",
            Box::new(|r| {
                let (a, b) = week(r);
                series_query(vec![
                    text(tags::BODY_PART_EXAMINED, VR::CS, "CHEST"),
                    text(tags::STUDY_DATE, VR::DA, &format!("{a}-{b}")),
                ])
            }),
        ),
        (
            "PatientID=<one patient>",
            Box::new(move |r| {
                let p = r.below(shape.patients);
                series_query(vec![text(tags::PATIENT_ID, VR::LO, &format!("P{p:06}"))])
            }),
        ),
        (
            "StudyInstanceUID=<one study>",
            Box::new(move |r| {
                let s = r.below(shape.studies);
                series_query(vec![text(tags::STUDY_INSTANCE_UID, VR::UI, &study_uid(s))])
            }),
        ),
        (
            "SeriesDescription=<prefix>* wildcard",
            Box::new(|r| {
                let d = DESCRIPTIONS[r.below(DESCRIPTIONS.len() as u64) as usize];
                let n = r.below(100);
                series_query(vec![text(
                    tags::SERIES_DESCRIPTION,
                    VR::LO,
                    &format!("{d} {n}*"),
                )])
            }),
        ),
        (
            "SeriesDescription=*<infix> + 7-day StudyDate range",
            Box::new(|r| {
                let (a, b) = week(r);
                series_query(vec![
                    text(tags::SERIES_DESCRIPTION, VR::LO, "*low dose*"),
                    text(tags::STUDY_DATE, VR::DA, &format!("{a}-{b}")),
                ])
            }),
        ),
        (
            "AnatomicRegionSequence=Chest (SCT) + 7-day StudyDate range",
            Box::new(|r| {
                let (a, b) = week(r);
                let item = InMemDicomObject::from_element_iter([
                    text(tags::CODE_VALUE, VR::SH, "43799004"),
                    text(tags::CODING_SCHEME_DESIGNATOR, VR::SH, "SCT"),
                    text(tags::CODE_MEANING, VR::LO, ""),
                ]);
                series_query(vec![
                    DataElement::new(
                        tags::ANATOMIC_REGION_SEQUENCE,
                        VR::SQ,
                        DataSetSequence::from(vec![item]),
                    ),
                    text(tags::STUDY_DATE, VR::DA, &format!("{a}-{b}")),
                ])
            }),
        ),
    ];

    println!(
        "{runs} queries per kind, SERIES level, each on a new association (raw SCU, TCP_NODELAY):"
    );
    println!(
        "  {:<58} {:>9} {:>9} {:>9}",
        "query", "median", "p95", "answers"
    );
    let mut worst_median: f64 = 0.0;
    for (name, make) in &queries {
        // one warm-up query
        find(node.port, &make(&mut rng));
        let mut times = Vec::with_capacity(runs);
        let mut answers = 0;
        for _ in 0..runs {
            let identifier = make(&mut rng);
            let t = Instant::now();
            answers += find(node.port, &identifier);
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let p95 = times[(times.len() * 95 / 100).min(times.len() - 1)];
        worst_median = worst_median.max(median);
        println!(
            "  {name:<58} {median:7.1}ms {p95:7.1}ms {:9.1}",
            answers as f64 / runs as f64
        );
    }
    // the same as DCMTK sees it, process start included
    let (a, b) = week(&mut rng);
    let mut times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let out = Command::new("findscu")
            .env("TCP_NODELAY", "1")
            .args(["-S", "-aet", "BENCHSCU", "-aec", "ANATOMY", "127.0.0.1"])
            .arg(node.port.to_string())
            .args(["-k", "QueryRetrieveLevel=SERIES", "-k", "SeriesInstanceUID"])
            .args(["-k", "BodyPartExamined=CHEST", "-k"])
            .arg(format!("StudyDate={a}-{b}"))
            .output()
            .expect("findscu (apt package dcmtk)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "  {:<58} {:7.1}ms {:7.1}ms",
        "findscu process, BodyPartExamined=CHEST + date range",
        times[times.len() / 2],
        times[times.len() * 95 / 100]
    );
    println!(
        "worst median {worst_median:.1} ms (target < 50 ms): {}",
        if worst_median < 50.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    node.stop();
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64*: the same index on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn date(day: u64) -> String {
    // days since 2020-01-01 → YYYYMMDD
    let mut y = 2020;
    let mut d = day;
    loop {
        let len = if y % 4 == 0 { 366 } else { 365 };
        if d < len {
            break;
        }
        d -= len;
        y += 1;
    }
    let months = [
        31,
        if y % 4 == 0 { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let mut m = 0;
    while d >= months[m] {
        d -= months[m];
        m += 1;
    }
    format!("{y:04}{:02}{:02}", m + 1, d + 1)
}

fn week(r: &mut Rng) -> (String, String) {
    let start = r.below(DAYS - 7);
    (date(start), date(start + 6))
}

fn study_uid(n: u64) -> String {
    format!("2.25.8800.1.{n}")
}

fn text(tag: Tag, vr: VR, v: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(v))
}

/// A SERIES-level identifier: `filter` plus the usual return keys.
fn series_query(filter: Vec<DataElement<InMemDicomObject>>) -> Vec<u8> {
    let mut obj = InMemDicomObject::from_element_iter([
        text(tags::QUERY_RETRIEVE_LEVEL, VR::CS, "SERIES"),
        text(tags::STUDY_INSTANCE_UID, VR::UI, ""),
        text(tags::SERIES_INSTANCE_UID, VR::UI, ""),
        text(tags::PATIENT_ID, VR::LO, ""),
        text(tags::STUDY_DATE, VR::DA, ""),
        text(tags::MODALITY, VR::CS, ""),
        text(tags::SERIES_DESCRIPTION, VR::LO, ""),
        text(tags::BODY_PART_EXAMINED, VR::CS, ""),
    ]);
    for e in filter {
        obj.put(e);
    }
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, TransferSyntaxRegistry.get(EXPLICIT).expect("ts"))
        .expect("identifier");
    out
}

fn command(elements: &[(Tag, VR, PrimitiveValue)]) -> Vec<u8> {
    let obj = InMemDicomObject::from_element_iter(
        elements
            .iter()
            .map(|(t, vr, v)| DataElement::new(*t, *vr, v.clone())),
    );
    let mut body = Vec::new();
    obj.write_dataset_with_ts(&mut body, TransferSyntaxRegistry.get(IMPLICIT).expect("ts"))
        .expect("command");
    let mut out = vec![0, 0, 0, 0, 4, 0, 0, 0];
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// One C-FIND on a new association; returns the number of answers.
fn find(port: u16, identifier: &[u8]) -> usize {
    let mut assoc = ClientAssociationOptions::new()
        .calling_ae_title("BENCHSCU")
        .called_ae_title("ANATOMY")
        .with_presentation_context(STUDY_ROOT, vec![EXPLICIT])
        .establish(("127.0.0.1", port))
        .expect("association");
    let pc = assoc.presentation_contexts()[0].id;
    let rq = command(&[
        (
            Tag(0x0000, 0x0002),
            VR::UI,
            PrimitiveValue::from(STUDY_ROOT),
        ),
        (Tag(0x0000, 0x0100), VR::US, PrimitiveValue::from(0x0020u16)),
        (Tag(0x0000, 0x0110), VR::US, PrimitiveValue::from(1u16)),
        (Tag(0x0000, 0x0700), VR::US, PrimitiveValue::from(0u16)),
        (Tag(0x0000, 0x0800), VR::US, PrimitiveValue::from(0u16)),
    ]);
    // Command and identifier in one PDU: one write, so Nagle cannot hold the second back.
    assoc
        .send(&Pdu::PData {
            data: vec![
                PDataValue {
                    presentation_context_id: pc,
                    value_type: PDataValueType::Command,
                    is_last: true,
                    data: rq,
                },
                PDataValue {
                    presentation_context_id: pc,
                    value_type: PDataValueType::Data,
                    is_last: true,
                    data: identifier.to_vec(),
                },
            ],
        })
        .expect("send C-FIND-RQ");
    let mut answers = 0;
    let mut command_bytes = Vec::new();
    loop {
        let Pdu::PData { data } = assoc.receive().expect("response") else {
            panic!("unexpected PDU");
        };
        for pdv in data {
            if pdv.value_type != PDataValueType::Command {
                continue;
            }
            command_bytes.extend_from_slice(&pdv.data);
            if !pdv.is_last {
                continue;
            }
            let obj = InMemDicomObject::read_dataset_with_ts(
                &command_bytes[..],
                TransferSyntaxRegistry.get(IMPLICIT).expect("ts"),
            )
            .expect("response command");
            command_bytes.clear();
            let status = obj
                .element(Tag(0x0000, 0x0900))
                .ok()
                .and_then(|e| e.to_int::<u16>().ok())
                .unwrap_or(0xFFFF);
            match status {
                0xFF00 | 0xFF01 => answers += 1,
                0x0000 => {
                    assoc.release().expect("release");
                    return answers;
                }
                other => panic!("C-FIND failed with status {other:04X}"),
            }
        }
    }
}

struct Node {
    child: Child,
    port: u16,
}

impl Node {
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn write_config(dir: &std::path::Path, db: &str) -> (std::path::PathBuf, u16) {
    let port = free_port();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[dicom]\nae_title = \"ANATOMY\"\nbind = \"127.0.0.1\"\nport = {port}\nmax_associations = 64\n\
             allowed_peers = \"BENCHSCU@127.0.0.1\"\n[http]\nenabled = false\n[storage]\npath = \"{}\"\n\
             [database]\nurl = \"{db}\"\n[classifier]\nenabled = false\n[log]\nlevel = \"warn\"\n",
            dir.join("storage").display()
        ),
    )
    .expect("config");
    (config, port)
}

fn start_node((config, port): &(std::path::PathBuf, u16)) -> Node {
    let port = *port;
    let child = Command::new(env!("CARGO_BIN_EXE_anatomy-node"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start anatomy-node");
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "anatomy-node did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Node { child, port }
}

#[derive(Clone, Copy)]
struct Shape {
    patients: u64,
    studies: u64,
    labelled: u64,
}

/// Insert the index rows directly: 5 series per 2 studies, 2 studies per patient.
fn fill(url: &str, series: u64, postgres: bool) -> Shape {
    let studies = series * 2 / 5;
    let patients = studies / 2;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(url).await.expect("index database");
        let mut tx = pool.begin().await.expect("transaction");
        let mut rng = Rng(7);
        insert_rows(&mut tx, "patients", &["id", "patient_key", "patient_id", "patient_name", "patient_birth_date", "patient_sex", "updated_at"], patients, |i| {
            vec![
                Value::Int(i as i64 + 1),
                Value::Text(format!("P{i:06}\\")),
                Value::Text(format!("P{i:06}")),
                Value::Text(format!("Name{i}^Given")),
                Value::Text(date(i % DAYS)),
                Value::Text(if i % 2 == 0 { "F" } else { "M" }.into()),
                Value::Int(0),
            ]
        })
        .await;
        insert_rows(&mut tx, "studies", &["id", "study_uid", "patient_ref", "study_date", "study_time", "accession_number", "study_description", "updated_at"], studies, |i| {
            let day = rng.below(DAYS);
            vec![
                Value::Int(i as i64 + 1),
                Value::Text(study_uid(i)),
                Value::Int((i / 2) as i64 + 1),
                Value::Text(date(day)),
                Value::Text(format!("{:02}{:02}00", 7 + rng.below(12), rng.below(60))),
                Value::Text(format!("A{i:08}")),
                Value::Text("CT".into()),
                Value::Int(0),
            ]
        })
        .await;
        let total_weight: u64 = BODY_PARTS.iter().map(|b| b.2).sum();
        let mut parts = Vec::with_capacity(series as usize);
        for _ in 0..series {
            let mut w = rng.below(total_weight);
            let mut k = 0;
            while w >= BODY_PARTS[k].2 {
                w -= BODY_PARTS[k].2;
                k += 1;
            }
            parts.push(k);
        }
        insert_rows(&mut tx, "series", &["id", "series_uid", "study_ref", "series_number", "modality", "series_description", "body_part_examined", "first_received_at", "last_received_at", "state", "label_status", "label_generation", "predicted_class", "predicted_body_part"], series, |i| {
            let (bpe, _, _) = BODY_PARTS[parts[i as usize]];
            let description = format!("{} {}", DESCRIPTIONS[(i % DESCRIPTIONS.len() as u64) as usize], i % 100);
            vec![
                Value::Int(i as i64 + 1),
                Value::Text(format!("2.25.8800.2.{i}")),
                Value::Int((i * 2 / 5) as i64 + 1),
                Value::Int((i % 5) as i64 + 1),
                Value::Text("CT".into()),
                Value::Text(description),
                // what the modality wrote: often nothing
                if i % 3 == 0 { Value::Text("CHEST".into()) } else { Value::Null },
                Value::Int(0),
                Value::Int(0),
                Value::Text("complete".into()),
                Value::Text(if bpe.is_some() { "labelled" } else { "skipped" }.into()),
                Value::Int(1),
                bpe.map_or(Value::Null, |_| Value::Text("lungs".into())),
                bpe.map_or(Value::Null, |b| Value::Text(b.into())),
            ]
        })
        .await;
        insert_rows(&mut tx, "series_labels", &["id", "series_ref", "generation", "status", "dominant_class", "body_part_examined", "anatomic_regions", "model_version", "labelled_at"], series, |i| {
            let (bpe, regions, _) = BODY_PARTS[parts[i as usize]];
            let json: Vec<String> = regions
                .iter()
                .map(|(b, c, m)| format!(r#"{{"body_part":"{b}","code_value":"{c}","coding_scheme":"SCT","code_meaning":"{m}"}}"#))
                .collect();
            vec![
                Value::Int(i as i64 + 1),
                Value::Int(i as i64 + 1),
                Value::Int(1),
                Value::Text(if bpe.is_some() { "labelled" } else { "skipped" }.into()),
                bpe.map_or(Value::Null, |_| Value::Text("lungs".into())),
                bpe.map_or(Value::Null, |b| Value::Text(b.into())),
                Value::Text(format!("[{}]", json.join(","))),
                Value::Text("bench 1".into()),
                Value::Int(1_700_000_000_000),
            ]
        })
        .await;
        let region_rows: Vec<(u64, usize, &Region)> = (0..series)
            .flat_map(|i| {
                BODY_PARTS[parts[i as usize]]
                    .1
                    .iter()
                    .enumerate()
                    .map(move |(p, r)| (i, p, r))
            })
            .collect();
        insert_rows(&mut tx, "series_regions", &["series_ref", "position", "body_part", "code_value", "coding_scheme", "code_meaning"], region_rows.len() as u64, |i| {
            let (s, p, (b, c, m)) = region_rows[i as usize];
            vec![
                Value::Int(s as i64 + 1),
                Value::Int(p as i64),
                Value::Text((*b).into()),
                Value::Text((*c).into()),
                Value::Text("SCT".into()),
                Value::Text((*m).into()),
            ]
        })
        .await;
        tx.commit().await.expect("commit");
        mark_handled_downstream(&pool, postgres).await;
        if postgres {
            // What autovacuum does soon after a bulk load.
            sqlx::query("ANALYZE").execute(&pool).await.expect("analyze");
        }
        pool.close().await;
        Shape {
            patients,
            studies,
            labelled: parts.iter().filter(|k| BODY_PARTS[**k].0.is_some()).count() as u64,
        }
    })
}

/// A steady state: labels stored long ago were routed long ago. Where the index has
/// forwarding's bookkeeping column, mark them so, or the node would start routing 100,000
/// fresh labels while it is being measured.
async fn mark_handled_downstream(pool: &sqlx::AnyPool, postgres: bool) {
    let exists = if postgres {
        "SELECT COUNT(*) FROM information_schema.columns \
         WHERE table_name = 'series_labels' AND column_name = 'routed_at'"
    } else {
        "SELECT COUNT(*) FROM pragma_table_info('series_labels') WHERE name = 'routed_at'"
    };
    let found: i64 = sqlx::query(exists)
        .fetch_one(pool)
        .await
        .map(|r| sqlx::Row::get(&r, 0))
        .unwrap_or(0);
    if found > 0 {
        sqlx::query("UPDATE series_labels SET routed_at = labelled_at")
            .execute(pool)
            .await
            .expect("mark labels routed");
    }
}

enum Value {
    Int(i64),
    Text(String),
    Null,
}

async fn insert_rows(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    table: &str,
    columns: &[&str],
    rows: u64,
    mut row: impl FnMut(u64) -> Vec<Value>,
) {
    let t = Instant::now();
    // Small statements: SQLite binds numbered parameters in time that grows with their count.
    let per_statement = (1_000 / columns.len()) as u64;
    let mut start = 0;
    while start < rows {
        let end = (start + per_statement).min(rows);
        let mut sql = format!("INSERT INTO {table} ({}) VALUES ", columns.join(", "));
        let mut values = Vec::new();
        for i in start..end {
            let base = values.len();
            let placeholders: Vec<String> = (1..=columns.len())
                .map(|c| format!("${}", base + c))
                .collect();
            if i > start {
                sql.push_str(", ");
            }
            sql.push_str(&format!("({})", placeholders.join(", ")));
            values.extend(row(i));
        }
        let mut q = sqlx::query(&sql);
        for v in values {
            q = match v {
                Value::Int(n) => q.bind(n),
                Value::Text(t) => q.bind(t),
                Value::Null => q.bind(Option::<String>::None),
            };
        }
        q.execute(&mut **tx)
            .await
            .unwrap_or_else(|e| panic!("insert into {table}: {e}"));
        start = end;
    }
    if std::env::var_os("ANATOMY_BENCH_VERBOSE").is_some() {
        eprintln!(
            "  {table}: {rows} rows in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
}

/// Empty the bench database so every run starts from nothing.
fn reset_postgres(url: &str) {
    let status = Command::new("psql")
        .arg(url)
        .args([
            "-q",
            "-c",
            "DROP SCHEMA public CASCADE; CREATE SCHEMA public;",
        ])
        .stdout(Stdio::null())
        .status();
    assert!(matches!(status, Ok(s) if s.success()), "cannot reset {url}");
}
