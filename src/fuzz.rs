//! Fuzzing on stable Rust (issue #18): a small deterministic mutator seeded from real byte
//! streams, targets for every parser that reads peer input, and the streams of the network
//! fuzzer (`tests/hostile.rs`).
//!
//! Each target is a function of a byte slice that must neither panic nor allocate beyond
//! [`ALLOCATION_FLAG`] in one piece; the binary that runs the targets installs
//! [`CountingAlloc`] as its global allocator so the second is seen (`tests/fuzz.rs`).
//! Inputs are mutated from seeds: bit flips, byte stores, truncations, inserted and deleted
//! runs, corrupted 16- and 32-bit length fields (little and big endian), splices of two
//! seeds. Runs are reproducible: the same seed corpus and random seed give the same inputs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextProposed, UserVariableItem};
use dicom_ul::Pdu;

use crate::dimse::command;

/// One allocation at least this large, made while a fuzz input runs, is a finding: no
/// parser here needs 64 MiB in one piece for inputs of a few hundred kilobytes.
pub const ALLOCATION_FLAG: usize = 64 << 20;
/// Allocations this large are refused outright (null), so a `try_reserve` of a declared
/// 4 GiB fails at once instead of zeroing gigabytes; the flag above still records it.
pub const ALLOCATION_REFUSE: usize = 1 << 30;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// Global allocator wrapper that remembers, per thread, the largest allocation asked for.
pub struct CountingAlloc;

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        if layout.size() >= ALLOCATION_REFUSE {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        if layout.size() >= ALLOCATION_REFUSE {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        if new_size >= ALLOCATION_REFUSE {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}

fn note(size: usize) {
    // `try_with`: the thread-local may be gone while a thread exits.
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size)
        }
    });
}

fn take_largest() -> usize {
    LARGEST.with(|l| l.replace(0))
}

/// xorshift64*: small, fast, reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// Lengths that break parsers: zero, odd, just too long, huge, undefined.
const INTERESTING_U32: [u32; 10] = [
    0,
    1,
    0x7F,
    0xFFFF,
    0x1_0000,
    0x0100_0000,
    0x3000_0000,
    0x7FFF_FFFF,
    0xFFFF_FFFE,
    0xFFFF_FFFF,
];

/// One mutation of `input` (several, sometimes), within `max_len` bytes.
pub fn mutate(input: &mut Vec<u8>, rng: &mut Rng, corpus: &[Vec<u8>], max_len: usize) {
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let len = input.len();
        match rng.below(10) {
            // bit flip
            0 | 1 if len > 0 => {
                let at = rng.below(len);
                input[at] ^= 1 << rng.below(8);
            }
            // byte store
            2 if len > 0 => {
                let at = rng.below(len);
                input[at] =
                    [0, 0xFF, 0x7F, 0x80, 0x01][rng.below(5)] ^ (rng.next_u64() as u8 & 0x0F);
            }
            // truncation
            3 if len > 1 => input.truncate(rng.below(len)),
            // corrupted 32-bit length, little or big endian
            4 | 5 if len >= 4 => {
                let at = rng.below(len - 3);
                let value = if rng.chance(3) {
                    // a plausible-looking length: what follows, give or take a little
                    ((len - at) as u32)
                        .wrapping_add(rng.below(64) as u32)
                        .wrapping_sub(32)
                } else {
                    INTERESTING_U32[rng.below(INTERESTING_U32.len())]
                };
                let bytes = if rng.chance(2) {
                    value.to_le_bytes()
                } else {
                    value.to_be_bytes()
                };
                input[at..at + 4].copy_from_slice(&bytes);
            }
            // corrupted 16-bit length
            6 if len >= 2 => {
                let at = rng.below(len - 1);
                let value = [0u16, 1, 0xFF, 0x7FFF, 0xFFFF][rng.below(5)];
                let bytes = if rng.chance(2) {
                    value.to_le_bytes()
                } else {
                    value.to_be_bytes()
                };
                input[at..at + 2].copy_from_slice(&bytes);
            }
            // inserted run (random or repeated)
            7 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(64);
                let fill = rng.next_u64() as u8;
                let run: Vec<u8> = (0..n)
                    .map(|_| {
                        if rng.chance(2) {
                            fill
                        } else {
                            rng.next_u64() as u8
                        }
                    })
                    .collect();
                input.splice(at..at, run);
            }
            // deleted run
            8 if len > 1 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(256));
                input.drain(at..at + n);
            }
            // splice with another seed: the head of one, the tail of the other
            _ if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            _ => {}
        }
    }
    input.truncate(max_len);
}

/// What one target's run found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub target: &'static str,
    pub inputs: u64,
    /// Inputs that made the target panic: (input, message).
    pub panics: Vec<(Vec<u8>, String)>,
    /// Inputs that made the target allocate at least [`ALLOCATION_FLAG`] in one piece.
    pub allocations: Vec<(Vec<u8>, usize)>,
    pub largest_allocation: usize,
    pub elapsed: Duration,
}

impl Report {
    pub fn findings(&self) -> usize {
        self.panics.len() + self.allocations.len()
    }
    pub fn line(&self) -> String {
        format!(
            "fuzz {:<11} inputs {:>8}  panics {}  allocations>=64MiB {}  largest allocation {} KiB  {:.1} s",
            self.target,
            self.inputs,
            self.panics.len(),
            self.allocations.len(),
            self.largest_allocation >> 10,
            self.elapsed.as_secs_f64()
        )
    }
}

/// Run budget: at most `inputs` inputs and `time`, whichever ends first.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub inputs: u64,
    pub time: Duration,
    pub seed: u64,
}

/// A fuzz target: a name, its seeds, and the function under test.
pub struct Target {
    pub name: &'static str,
    pub seeds: Vec<Vec<u8>>,
    pub max_len: usize,
    pub run: fn(&[u8]),
}

/// Run `target` within `budget`: every seed once, then mutations of them.
pub fn run(target: &Target, budget: Budget) -> Report {
    let started = Instant::now();
    let mut rng = Rng::new(budget.seed ^ fxhash(target.name.as_bytes()));
    let mut report = Report {
        target: target.name,
        ..Report::default()
    };
    quiet_panics_while_fuzzing();
    FUZZING.with(|f| f.set(true));
    let mut i = 0u64;
    while i < budget.inputs && started.elapsed() < budget.time {
        let input = if (i as usize) < target.seeds.len() {
            target.seeds[i as usize].clone()
        } else if target.seeds.is_empty() {
            (0..rng.below(256)).map(|_| rng.next_u64() as u8).collect()
        } else {
            let mut input = target.seeds[rng.below(target.seeds.len())].clone();
            mutate(&mut input, &mut rng, &target.seeds, target.max_len);
            input
        };
        take_largest();
        let outcome = catch_unwind(AssertUnwindSafe(|| (target.run)(&input)));
        let largest = take_largest();
        report.largest_allocation = report.largest_allocation.max(largest);
        if let Err(panic) = outcome {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            if report.panics.len() < 16 {
                report.panics.push((input.clone(), message));
            }
        }
        if largest >= ALLOCATION_FLAG && report.allocations.len() < 16 {
            report.allocations.push((input, largest));
        }
        i += 1;
    }
    FUZZING.with(|f| f.set(false));
    report.inputs = i;
    report.elapsed = started.elapsed();
    report
}

thread_local! {
    static FUZZING: Cell<bool> = const { Cell::new(false) };
}

/// Panics of a target are findings, counted and reported by [`run`]; they are not printed.
/// The hook is installed once for the process and stays quiet only on threads that fuzz,
/// so other tests running alongside keep their messages.
fn quiet_panics_while_fuzzing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !FUZZING.with(|f| f.get()) {
                previous(info)
            }
        }));
    });
}

fn fxhash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01B3)
    })
}

// ---------------------------------------------------------------------------------------
// Seeds

pub const CT_IMAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
pub const VERIFICATION: &str = "1.2.840.10008.1.1";
pub const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

fn encode(obj: &InMemDicomObject, ts_uid: &str) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(ts) = TransferSyntaxRegistry.get(ts_uid) {
        let _ = obj.write_dataset_with_ts(&mut out, ts);
    }
    out
}

fn element(tag: Tag, vr: VR, value: PrimitiveValue) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, value)
}

/// Request command sets: C-ECHO-RQ, C-STORE-RQ, C-FIND-RQ, C-CANCEL-RQ.
pub fn command_seeds() -> Vec<Vec<u8>> {
    let us = |tag, v: u16| element(tag, VR::US, PrimitiveValue::from(v));
    let ui = |tag, v: &str| element(tag, VR::UI, PrimitiveValue::from(v));
    vec![
        command::encode_command(vec![
            ui(tags::AFFECTED_SOP_CLASS_UID, VERIFICATION),
            us(tags::COMMAND_FIELD, command::C_ECHO_RQ),
            us(tags::MESSAGE_ID, 1),
            us(tags::COMMAND_DATA_SET_TYPE, command::NO_DATASET),
        ]),
        store_rq(2, "1.2.826.0.1.3680043.8.498.1.1"),
        command::encode_command(vec![
            ui(tags::AFFECTED_SOP_CLASS_UID, STUDY_ROOT_FIND),
            us(tags::COMMAND_FIELD, command::C_FIND_RQ),
            us(tags::MESSAGE_ID, 3),
            us(tags::PRIORITY, 0),
            us(tags::COMMAND_DATA_SET_TYPE, 0),
        ]),
        command::encode_command(vec![
            us(tags::COMMAND_FIELD, command::C_CANCEL_RQ),
            us(tags::MESSAGE_ID_BEING_RESPONDED_TO, 3),
            us(tags::COMMAND_DATA_SET_TYPE, command::NO_DATASET),
        ]),
    ]
}

/// A C-STORE-RQ command set for a CT image.
pub fn store_rq(message_id: u16, sop_instance_uid: &str) -> Vec<u8> {
    command::encode_command(vec![
        element(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(CT_IMAGE),
        ),
        element(
            tags::COMMAND_FIELD,
            VR::US,
            PrimitiveValue::from(command::C_STORE_RQ),
        ),
        element(tags::MESSAGE_ID, VR::US, PrimitiveValue::from(message_id)),
        element(tags::PRIORITY, VR::US, PrimitiveValue::from(0u16)),
        element(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(0u16),
        ),
        element(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(sop_instance_uid),
        ),
    ])
}

/// C-FIND identifiers (Study Root), in Explicit and Implicit VR LE.
pub fn identifier_seeds() -> Vec<(Vec<u8>, &'static str)> {
    let cs = |tag, v: &str| element(tag, VR::CS, PrimitiveValue::from(v));
    let lo = |tag, v: &str| element(tag, VR::LO, PrimitiveValue::from(v));
    let study = InMemDicomObject::from_element_iter([
        cs(tags::QUERY_RETRIEVE_LEVEL, "STUDY"),
        element(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("DOE*")),
        lo(tags::PATIENT_ID, "12345"),
        element(
            tags::STUDY_DATE,
            VR::DA,
            PrimitiveValue::from("20200101-20201231"),
        ),
        element(tags::STUDY_TIME, VR::TM, PrimitiveValue::from("080000-")),
        cs(tags::MODALITIES_IN_STUDY, "CT"),
        element(tags::STUDY_INSTANCE_UID, VR::UI, PrimitiveValue::from("")),
        element(
            tags::NUMBER_OF_STUDY_RELATED_SERIES,
            VR::IS,
            PrimitiveValue::from(""),
        ),
    ]);
    let region = InMemDicomObject::from_element_iter([
        element(tags::CODE_VALUE, VR::SH, PrimitiveValue::from("T-D3000")),
        element(
            tags::CODING_SCHEME_DESIGNATOR,
            VR::SH,
            PrimitiveValue::from("SRT"),
        ),
    ]);
    let series = InMemDicomObject::from_element_iter([
        cs(tags::QUERY_RETRIEVE_LEVEL, "SERIES"),
        element(
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("1.2.3\\1.2.4"),
        ),
        cs(tags::BODY_PART_EXAMINED, "CHEST"),
        cs(tags::MODALITY, "CT"),
        element(tags::SERIES_NUMBER, VR::IS, PrimitiveValue::from("")),
        DataElement::new(
            tags::ANATOMIC_REGION_SEQUENCE,
            VR::SQ,
            dicom_core::value::DataSetSequence::from(vec![region]),
        ),
    ]);
    let image = InMemDicomObject::from_element_iter([
        cs(tags::QUERY_RETRIEVE_LEVEL, "IMAGE"),
        element(
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("1.2.3"),
        ),
        element(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("1.2.3.4"),
        ),
        element(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from("")),
        element(tags::INSTANCE_NUMBER, VR::IS, PrimitiveValue::from("1-10")),
    ]);
    let mut out = Vec::new();
    for obj in [&study, &series, &image] {
        out.push((encode(obj, EXPLICIT_VR_LE), EXPLICIT_VR_LE));
        out.push((encode(obj, IMPLICIT_VR_LE), IMPLICIT_VR_LE));
    }
    out
}

/// A synthetic CT slice (`src/synth.rs`) as a PS3.10 file.
pub fn synthetic_file(size: u16, bits_stored: u16) -> Vec<u8> {
    let mut spec = crate::synth::SeriesSpec::new(1, 1, size);
    spec.bits_stored = bits_stored;
    let mut out = Vec::new();
    let _ = crate::synth::ct_slice(&spec, 0).write_all(&mut out);
    out
}

/// The data set of a PS3.10 file and its transfer syntax.
pub fn dataset_of(file: &[u8]) -> Option<(Vec<u8>, String)> {
    let meta = crate::web::stow::read_file_meta(file).ok()?;
    let offset = usize::try_from(meta.dataset_offset).ok()?;
    Some((file.get(offset..)?.to_vec(), meta.transfer_syntax_uid))
}

/// Up to `n` real CT files from `../shared/data/ct` and `ct-extra` (relative to the
/// project root), one per series folder, for as many transfer syntaxes as they hold.
pub fn real_files(root: &Path, n: usize) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for data in ["ct", "ct-extra"] {
        let Ok(entries) = std::fs::read_dir(root.join("../shared/data").join(data)) else {
            continue;
        };
        let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        dirs.sort();
        for dir in dirs {
            if let Some(file) = first_dicom_under(&dir, 3) {
                out.push(file);
            }
            if out.len() >= n {
                return out;
            }
        }
    }
    out
}

fn first_dicom_under(dir: &Path, depth: usize) -> Option<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in &entries {
        if path.is_file() && path.extension().is_some_and(|e| e == "dcm") {
            return Some(path.clone());
        }
    }
    if depth == 0 {
        return None;
    }
    entries
        .iter()
        .filter(|p| p.is_dir())
        .find_map(|p| first_dicom_under(p, depth - 1))
}

/// `file` transcoded by DCMTK into the compressed and deflated syntaxes it writes (JPEG
/// lossless and baseline, JPEG-LS, RLE, Deflated Explicit VR LE), for the syntaxes whose
/// tool is installed; none where DCMTK is absent.
pub fn dcmtk_transcodes(file: &[u8]) -> Vec<Vec<u8>> {
    const TOOLS: [(&str, &str); 7] = [
        ("dcmcjpeg", "+e1"),
        ("dcmcjpeg", "+eb"),
        ("dcmcjpeg", "+ee"),
        ("dcmcjpls", "+el"),
        ("dcmcjpls", "+en"),
        ("dcmcrle", "+e"),
        ("dcmconv", "+td"),
    ];
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("anatomy-fuzz-{}-{call}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_err() {
        return vec![];
    }
    let src = dir.join("source.dcm");
    if std::fs::write(&src, file).is_err() {
        return vec![];
    }
    let mut out = vec![];
    for (i, (tool, option)) in TOOLS.iter().enumerate() {
        let dst = dir.join(format!("out{i}.dcm"));
        let ok = std::process::Command::new(tool)
            .arg(option)
            .arg(&src)
            .arg(&dst)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if let (true, Ok(bytes)) = (ok, std::fs::read(&dst)) {
            out.push(bytes);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// A multipart/related body of PS3.10 parts with `boundary`.
pub fn multipart_body(parts: &[&[u8]], boundary: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(part);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

/// QIDO-RS query strings, with the level and scope given by the first byte.
pub fn qido_seeds() -> Vec<Vec<u8>> {
    [
        "\x00PatientID=12345&StudyDate=20200101-20201231&includefield=00081030&limit=10&offset=5",
        "\x01BodyPartExamined=CHEST&Modality=CT&includefield=all&fuzzymatching=false",
        "\x0100100010=DOE*&0020000D=1.2.3,1.2.4&AnatomicRegionSequence.CodeValue=T-D3000",
        "\x02SOPInstanceUID=1.2.3.4.5&InstanceNumber=1&limit=1000000",
        "\x0100091001=CHEST&StudyTime=080000-120000&offset=18446744073709551615",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// A dataset manifest (`dataset build`'s contract).
pub fn manifest_seeds() -> Vec<Vec<u8>> {
    let header =
        "image,patient_key,study_uid,series_uid,sop_instance_uid,z_mm,label,label_source,split\n";
    vec![
        format!("{header}images/a.png,k1,1,2,3,0.5,neck,mask,test\nimages/b.png,k2,1,2,4,-12.25,lungs,ris,train\n").into_bytes(),
        format!("{header}images/c.png,k3,1.2,2.3,3.4,1e3,\"liver\",pseudo,validation\n").into_bytes(),
    ]
}

// ---------------------------------------------------------------------------------------
// Association byte streams (the network fuzzer's seeds; the PDU target's too)

/// The A-ASSOCIATE-RQ a storescu/findscu/echoscu-like peer sends.
pub fn associate_rq(calling: &str, called: &str) -> Vec<u8> {
    let contexts = [(1u8, VERIFICATION), (3, CT_IMAGE), (5, STUDY_ROOT_FIND)];
    let rq = Pdu::AssociationRQ(dicom_ul::pdu::AssociationRQ {
        protocol_version: 1,
        calling_ae_title: calling.into(),
        called_ae_title: called.into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: contexts
            .iter()
            .map(|(id, uid)| PresentationContextProposed {
                id: *id,
                abstract_syntax: (*uid).into(),
                transfer_syntaxes: vec![EXPLICIT_VR_LE.into(), IMPLICIT_VR_LE.into()],
            })
            .collect(),
        user_variables: vec![
            UserVariableItem::MaxLength(16_384),
            UserVariableItem::ImplementationClassUID(
                "1.2.826.0.1.3680043.2.1143.107.104.103.115".into(),
            ),
            UserVariableItem::ImplementationVersionName("FUZZ_1".into()),
        ],
    });
    pdu_bytes(&rq)
}

fn pdu_bytes(pdu: &Pdu) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = dicom_ul::write_pdu(&mut out, pdu);
    out
}

fn pdata(pc: u8, value_type: PDataValueType, is_last: bool, data: &[u8]) -> Vec<u8> {
    pdu_bytes(&Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: pc,
            value_type,
            is_last,
            data: data.to_vec(),
        }],
    })
}

/// Whole association streams as DCMTK's tools send them: A-ASSOCIATE-RQ, then C-ECHO, a
/// small C-STORE (the data set split over PDUs) or a C-FIND, then A-RELEASE-RQ.
pub fn association_streams(calling: &str, called: &str, dataset: &[u8]) -> Vec<Vec<u8>> {
    let rq = associate_rq(calling, called);
    let release = pdu_bytes(&Pdu::ReleaseRQ);
    let commands = command_seeds();
    let echo = pdata(1, PDataValueType::Command, true, &commands[0]);
    let mut store = pdata(
        3,
        PDataValueType::Command,
        true,
        &store_rq(2, "1.2.826.0.1.3680043.8.498.99"),
    );
    let chunks: Vec<&[u8]> = dataset.chunks(dataset.len().div_ceil(3).max(1)).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        store.extend(pdata(3, PDataValueType::Data, i + 1 == chunks.len(), chunk));
    }
    let identifier = identifier_seeds()
        .into_iter()
        .next()
        .map(|(bytes, _)| bytes)
        .unwrap_or_default();
    let mut find = pdata(5, PDataValueType::Command, true, &commands[2]);
    find.extend(pdata(5, PDataValueType::Data, true, &identifier));
    [echo, store, find]
        .into_iter()
        .map(|message| [rq.clone(), message, release.clone()].concat())
        .collect()
}

// ---------------------------------------------------------------------------------------
// Targets

/// PDU parsing: the stream is read PDU by PDU as the node reads it (strict, its maximum
/// PDU length), until it ends or fails.
fn pdu_target(input: &[u8]) {
    let mut buf = bytes::BytesMut::from(input);
    for _ in 0..64 {
        let mut cursor = std::io::Cursor::new(&buf[..]);
        match dicom_ul::pdu::read_pdu(&mut cursor, 256 * 1024, true) {
            Ok(Some(_)) => {
                let used = cursor.position() as usize;
                bytes::Buf::advance(&mut buf, used);
                if used == 0 {
                    return;
                }
            }
            _ => return,
        }
    }
}

/// Association negotiation: the bytes arrive on a loopback socket and the node's own
/// server options (`dimse::association::server_options`: strict, its maximum PDU length,
/// its AE title and access control) negotiate, within 500 ms; then one more PDU is read as
/// the association loop reads it.
fn association_target(input: &[u8]) {
    use tokio::io::AsyncWriteExt;
    let input = input.to_vec();
    RUNTIME.with(|rt| {
        let Some(rt) = rt else { return };
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await else {
                return;
            };
            let Ok(addr) = listener.local_addr() else {
                return;
            };
            let writer = tokio::spawn(async move {
                if let Ok(mut client) = tokio::net::TcpStream::connect(addr).await {
                    let _ = client.write_all(&input).await;
                    let _ = client.shutdown().await;
                    // Keep the connection until the server is done with it.
                    let mut sink = Vec::new();
                    let _ = tokio::time::timeout(
                        Duration::from_millis(600),
                        tokio::io::AsyncReadExt::read_to_end(&mut client, &mut sink),
                    )
                    .await;
                }
            });
            let Ok(Ok((socket, peer))) =
                tokio::time::timeout(Duration::from_millis(500), listener.accept()).await
            else {
                return;
            };
            let dicom = crate::config::DicomConfig::default();
            let peers = std::sync::Arc::new(vec![crate::config::AllowedPeer {
                ae_title: "TESTSCU".into(),
                ..Default::default()
            }]);
            let access = crate::dimse::access::PeerAccess::new(false, peers, peer.ip());
            let options = crate::dimse::association::server_options(&dicom, access);
            let established =
                tokio::time::timeout(Duration::from_millis(500), options.establish_async(socket))
                    .await;
            if let Ok(Ok(mut association)) = established {
                let _ =
                    tokio::time::timeout(Duration::from_millis(200), association.receive()).await;
            }
            let _ = writer.await;
        })
    });
}

fn command_target(input: &[u8]) {
    if let Ok(rq) = command::Request::parse(input) {
        let _ = command::encode_response(&rq, &crate::dimse::status::Status::success());
    }
}

fn transfer_syntax_of(selector: u8) -> &'static str {
    [
        IMPLICIT_VR_LE,
        EXPLICIT_VR_LE,
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.5",
    ][usize::from(selector) % 5]
}

/// `store::inspect` of a received data set; the first byte picks the transfer syntax.
fn inspect_target(input: &[u8]) {
    let Some((&selector, dataset)) = input.split_first() else {
        return;
    };
    let ts = transfer_syntax_of(selector);
    if let Ok(summary) = crate::store::inspect::inspect_file(std::io::Cursor::new(dataset), 0, ts) {
        let _ = summary.expected_native_pixel_bytes();
    }
}

fn with_selector(selector: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 1);
    out.push(selector);
    out.extend_from_slice(bytes);
    out
}

/// C-FIND identifiers: parsing, the SQL built for both databases, and the matching rules.
fn identifier_target(input: &[u8]) {
    use crate::dimse::find::{identifier, keys::Model, matching, sql};
    let Some((&selector, bytes)) = input.split_first() else {
        return;
    };
    let ts = transfer_syntax_of(selector % 3);
    let model = if selector & 0x80 == 0 {
        Model::StudyRoot
    } else {
        Model::PatientRoot
    };
    let Ok(query) = identifier::parse(bytes, ts, model) else {
        return;
    };
    for backend in [
        crate::index::Backend::Sqlite,
        crate::index::Backend::Postgres,
    ] {
        let _ = sql::build(&query, backend);
    }
    for key in &query.keys {
        for value in [None, Some("DOE^JOHN"), Some("CHEST"), Some("20200615")] {
            let _ = matching::text_matches(&key.condition, value);
        }
    }
}

thread_local! {
    static RUNTIME: Option<tokio::runtime::Runtime> = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok();
}

/// STOW-RS bodies: the multipart parser as the node drives it (whole-stream limit, part
/// headers bounded), then each part's file meta information.
fn stow_target(input: &[u8]) {
    let body = bytes::Bytes::copy_from_slice(input);
    RUNTIME.with(|rt| {
        let Some(rt) = rt else { return };
        rt.block_on(async move {
            let stream = futures_util::stream::iter(
                body.chunks(4096)
                    .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
                    .collect::<Vec<_>>(),
            );
            let stream = crate::web::stow::bounded_part_headers(stream, "FUZZ-BOUNDARY");
            let constraints = multer::Constraints::new()
                .size_limit(multer::SizeLimit::new().whole_stream(16 << 20));
            let mut multipart =
                multer::Multipart::with_constraints(stream, "FUZZ-BOUNDARY", constraints);
            for _ in 0..64 {
                let Ok(Some(mut field)) = multipart.next_field().await else {
                    return;
                };
                let mut part = Vec::new();
                while let Ok(Some(chunk)) = field.chunk().await {
                    part.extend_from_slice(&chunk);
                    if part.len() > 16 << 20 {
                        return;
                    }
                }
                let _ = crate::web::stow::read_file_meta(&part[..]);
            }
        })
    });
}

/// QIDO-RS query strings: the first byte picks the level, the rest is `a=b&c=d`.
fn qido_target(input: &[u8]) {
    use crate::dimse::find::keys::Level;
    use crate::web::qido;
    let Some((&selector, query)) = input.split_first() else {
        return;
    };
    let level = [Level::Study, Level::Series, Level::Image][usize::from(selector) % 3];
    let scope = qido::Scope {
        study: (selector & 0x10 != 0).then(|| "1.2.3".to_string()),
        series: (selector & 0x20 != 0).then(|| "1.2.3.4".to_string()),
    };
    let params = query_pairs(query);
    if let Ok(search) = qido::parse(level, &scope, &params, 1000) {
        if let Ok(query) = qido::find_query(&search) {
            let _ = crate::dimse::find::sql::build(&query, crate::index::Backend::Sqlite);
        }
    }
}

/// `application/x-www-form-urlencoded` pairs, as axum's `Query` decodes them.
pub fn query_pairs(query: &[u8]) -> Vec<(String, String)> {
    fn decode(part: &[u8]) -> String {
        let mut out = Vec::with_capacity(part.len());
        let mut i = 0;
        while i < part.len() {
            match part[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < part.len() => {
                    let hex = std::str::from_utf8(&part[i + 1..i + 3]).ok();
                    match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                        Some(b) => {
                            out.push(b);
                            i += 2;
                        }
                        None => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    query
        .split(|b| *b == b'&')
        .filter(|p| !p.is_empty())
        .take(256)
        .map(|pair| {
            let mut it = pair.splitn(2, |b| *b == b'=');
            let key = decode(it.next().unwrap_or_default());
            let value = decode(it.next().unwrap_or_default());
            (key, value)
        })
        .collect()
}

/// Pixel decoding as the node does it: the file is inspected when received (so only data
/// sets whose lengths fit reach the decoder), then opened and decoded to HU.
fn pixels_target(input: &[u8]) {
    let Some((dataset, ts)) = dataset_of(input) else {
        return;
    };
    if crate::store::inspect::inspect_file(std::io::Cursor::new(&dataset), 0, &ts).is_err() {
        return;
    }
    let Ok(obj) = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(input)
    else {
        return;
    };
    if let Ok(frames) = crate::anatomy::pixels::hu_frames_of(obj) {
        if let Some(frame) = frames.first() {
            let _ = crate::anatomy::pixels::to_model_input(frame, 32);
        }
    }
}

fn manifest_target(input: &[u8]) {
    let _ = crate::eval::data::parse_manifest(Path::new("manifest.csv"), input);
}

/// Every fuzz target with its seeds. `root` is the project root (for `../shared/data`).
pub fn targets(root: &Path) -> Vec<Target> {
    let real: Vec<Vec<u8>> = real_files(root, 6)
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect();
    let mut files = vec![synthetic_file(16, 12), synthetic_file(24, 16)];
    files.extend(dcmtk_transcodes(&synthetic_file(16, 12)));
    files.extend(real.iter().cloned());
    let small = synthetic_file(8, 12);
    let small_dataset = dataset_of(&small).map(|(d, _)| d).unwrap_or_default();

    let mut pdu_seeds = association_streams("TESTSCU", "ANATOMY", &small_dataset);
    pdu_seeds.push(pdu_bytes(&Pdu::AbortRQ {
        source: dicom_ul::pdu::AbortRQSource::ServiceUser,
    }));

    let inspect_seeds: Vec<Vec<u8>> = files
        .iter()
        .filter_map(|f| dataset_of(f))
        .map(|(d, ts)| {
            let selector = match ts.as_str() {
                IMPLICIT_VR_LE => 0,
                "1.2.840.10008.1.2.1.99" => 2,
                t if t.starts_with("1.2.840.10008.1.2.4.") => 3,
                "1.2.840.10008.1.2.5" => 4,
                _ => 1,
            };
            with_selector(selector, &d)
        })
        .collect();

    let identifier_seeds: Vec<Vec<u8>> = identifier_seeds()
        .into_iter()
        .map(|(bytes, ts)| with_selector(u8::from(ts == EXPLICIT_VR_LE), &bytes))
        .collect();

    let stow_seeds = vec![
        multipart_body(&[&files[0]], "FUZZ-BOUNDARY"),
        multipart_body(&[&files[0], &files[1]], "FUZZ-BOUNDARY"),
    ];

    vec![
        Target {
            name: "pdu",
            seeds: pdu_seeds,
            max_len: 64 * 1024,
            run: pdu_target,
        },
        Target {
            name: "association",
            seeds: association_streams("TESTSCU", "ANATOMY", &small_dataset),
            max_len: 64 * 1024,
            run: association_target,
        },
        Target {
            name: "command",
            seeds: command_seeds(),
            max_len: 4096,
            run: command_target,
        },
        Target {
            name: "inspect",
            seeds: inspect_seeds,
            max_len: 2 << 20,
            run: inspect_target,
        },
        Target {
            name: "identifier",
            seeds: identifier_seeds,
            max_len: 16 * 1024,
            run: identifier_target,
        },
        Target {
            name: "stow",
            seeds: stow_seeds,
            max_len: 256 * 1024,
            run: stow_target,
        },
        Target {
            name: "qido",
            seeds: qido_seeds(),
            max_len: 4096,
            run: qido_target,
        },
        Target {
            name: "pixels",
            seeds: files,
            max_len: 2 << 20,
            run: pixels_target,
        },
        Target {
            name: "manifest",
            seeds: manifest_seeds(),
            max_len: 16 * 1024,
            run: manifest_target,
        },
    ]
}
