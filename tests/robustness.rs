//! Breaking things: unknown peers, garbage, hostile UIDs, a full disk, kill -9 in the
//! middle of a series, SIGTERM in the middle of an instance, too many associations, silent
//! peers. Nothing acknowledged is ever lost and the node keeps serving.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::data::{self, dataset_bytes};
use common::node::{Node, NodeOptions};
use common::scu::{self, Scu, CT, EXPLICIT};
use common::smallfs::SmallFs;
use dicom_core::Tag;
use dicom_ul::Pdu;

const SOP_INSTANCE_UID: Tag = Tag(0x0008, 0x0018);

/// A small synthetic series and its data sets.
fn series(
    dir: &Path,
    number: u32,
    slices: u32,
    size: u16,
) -> (anatomy_node::synth::SeriesSpec, Vec<PathBuf>) {
    data::synthetic_series(&dir.join(format!("series{number}")), number, slices, size)
}

#[test]
fn unknown_calling_or_called_ae_is_rejected_with_the_reason() {
    let node = Node::start();
    let out = node.echoscu("STRANGER", "ANATOMY");
    assert!(!out.status.success());
    assert!(
        common::text(&out).contains("Calling AE Title Not Recognized"),
        "{}",
        common::text(&out)
    );
    let out = node.echoscu("ECHOSCU", "SOMEONE_ELSE");
    assert!(!out.status.success());
    assert!(
        common::text(&out).contains("Called AE Title Not Recognized"),
        "{}",
        common::text(&out)
    );
    let metrics = node.http_get("/metrics").1;
    assert!(
        metrics.contains(r#"anatomy_associations_total{outcome="rejected_calling_ae"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"anatomy_associations_total{outcome="rejected_called_ae"} 1"#),
        "{metrics}"
    );
}

#[test]
fn garbage_and_truncated_data_sets_get_an_error_status_and_the_association_stays_usable() {
    let work = tempfile::tempdir().unwrap();
    let (spec, files) = series(work.path(), 1, 3, 64);
    let node = Node::start();
    let mut scu = Scu::ct(node.dicom_port);

    let garbage: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let r = scu.store(EXPLICIT, CT, &spec.sop_uid(0), &garbage);
    assert_eq!(r.status, 0xC000, "garbage: {r:?}");
    assert!(r.comment.is_some(), "an error comment says why");

    let whole = dataset_bytes(&files[0]);
    let r = scu.store(EXPLICIT, CT, &spec.sop_uid(0), &whole[..whole.len() - 1001]);
    assert_eq!(r.status, 0xC000, "cut inside the pixel data: {r:?}");

    let pixel_data_at = whole
        .windows(4)
        .rposition(|w| w == [0xE0, 0x7F, 0x10, 0x00])
        .unwrap();
    let r = scu.store(EXPLICIT, CT, &spec.sop_uid(0), &whole[..pixel_data_at]);
    assert_eq!(r.status, 0xA900, "cut before the pixel data: {r:?}");

    let other = dataset_bytes(&files[1]);
    let r = scu.store(EXPLICIT, CT, &spec.sop_uid(0), &other);
    assert_eq!(
        r.status, 0xA900,
        "data set of another instance than announced: {r:?}"
    );
    assert!(
        r.comment
            .as_deref()
            .unwrap_or("")
            .contains("SOP Instance UID"),
        "{r:?}"
    );

    let r = scu.store(EXPLICIT, CT, &spec.sop_uid(0), &whole);
    assert_eq!(r.status, 0, "the same association still stores: {r:?}");
    assert_eq!(scu.echo().status, 0);
    scu.release();

    assert_eq!(node.index().count("SELECT COUNT(*) FROM instances"), 1);
    assert_eq!(node.stored_files().len(), 1);
    assert!(
        node.temporary_files().is_empty(),
        "partial files left: {:?}",
        node.temporary_files()
    );
}

#[test]
fn hostile_uids_never_escape_the_storage_directory() {
    let work = tempfile::tempdir().unwrap();
    let (_, files) = series(work.path(), 2, 1, 32);
    let node = Node::start();
    let marker = format!("anatomy-escape-{}", std::process::id());
    let hostile_sop = format!("../../../../../../../../tmp/{marker}");
    let mut set = scu::with_replaced_uid(&dataset_bytes(&files[0]), SOP_INSTANCE_UID, &hostile_sop);
    set = scu::with_replaced_uid(&set, Tag(0x0020, 0x000D), "../../..");
    set = scu::with_replaced_uid(&set, Tag(0x0020, 0x000E), "/etc");
    let mut scu = Scu::ct(node.dicom_port);
    let r = scu.store(EXPLICIT, CT, &hostile_sop, &set);
    assert_eq!(r.status, 0, "{r:?}");
    // an anonymiser-style hex "UID" is accepted too
    let hex = "a3f9c0de11b2";
    let r = scu.store(
        EXPLICIT,
        CT,
        hex,
        &scu::with_replaced_uid(&dataset_bytes(&files[0]), SOP_INSTANCE_UID, hex),
    );
    assert_eq!(r.status, 0, "{r:?}");
    scu.release();

    assert!(!Path::new("/tmp").join(&marker).exists());
    assert!(!Path::new("/tmp").join(format!("{marker}.dcm")).exists());
    let storage = node.storage().canonicalize().unwrap();
    for f in node.stored_files() {
        assert!(
            f.canonicalize().unwrap().starts_with(&storage),
            "{} outside storage",
            f.display()
        );
    }
    let index = node.index();
    let rows = index.rows(&format!(
        "SELECT file_path FROM instances WHERE sop_instance_uid = '{hostile_sop}'"
    ));
    assert_eq!(rows.len(), 1, "the original UID is kept in the index");
    assert!(!rows[0][0].contains(".."), "{}", rows[0][0]);
    assert_eq!(
        index
            .rows("SELECT series_uid FROM series WHERE series_uid = '/etc'")
            .len(),
        1
    );
    assert_eq!(
        index.count(&format!(
            "SELECT COUNT(*) FROM instances WHERE sop_instance_uid = '{hex}'"
        )),
        1
    );
}

#[test]
fn below_the_free_space_reserve_the_answer_is_out_of_resources() {
    let work = tempfile::tempdir().unwrap();
    let (spec, files) = series(work.path(), 3, 1, 32);
    let node = Node::start_with(NodeOptions {
        min_free_mb: 1 << 40,
        ..NodeOptions::default()
    });
    let mut scu = Scu::ct(node.dicom_port);
    let r = scu.store(EXPLICIT, CT, &spec.sop_uid(0), &dataset_bytes(&files[0]));
    assert_eq!(r.status, 0xA700, "{r:?}");
    assert!(r.comment.unwrap_or_default().contains("min_free_mb"));
    assert_eq!(scu.echo().status, 0, "the association stays usable");
    scu.release();
}

#[test]
fn a_full_filesystem_answers_a700_and_the_node_keeps_running() {
    if !common::require_root("a_full_filesystem_answers_a700_and_the_node_keeps_running") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (spec, files) = series(work.path(), 4, 40, 256); // 40 × 128 KiB
    let fs = SmallFs::mount(&work.path().join("small"), "3m");
    let mut node = Node::start_with(NodeOptions {
        storage: Some(fs.0.join("storage")),
        ..NodeOptions::default()
    });
    let mut scu = Scu::ct(node.dicom_port);
    let statuses: Vec<u16> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            scu.store(EXPLICIT, CT, &spec.sop_uid(i as u32), &dataset_bytes(f))
                .status
        })
        .collect();
    assert!(statuses.contains(&0), "some instances fit: {statuses:x?}");
    assert!(
        statuses.contains(&0xA700),
        "the disk filled up: {statuses:x?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 0 || *s == 0xA700),
        "{statuses:x?}"
    );
    assert_eq!(scu.echo().status, 0, "association still usable");
    scu.release();
    assert!(node.exited().is_none(), "node still running");
    assert!(
        node.temporary_files().is_empty(),
        "partial files removed: {:?}",
        node.temporary_files()
    );

    // Room again: everything refused before is accepted now.
    fs.resize("64m");
    let mut scu = Scu::ct(node.dicom_port);
    for (i, f) in files.iter().enumerate() {
        let r = scu.store(EXPLICIT, CT, &spec.sop_uid(i as u32), &dataset_bytes(f));
        assert_eq!(r.status, 0, "slice {i} after freeing space: {r:?}");
    }
    scu.release();
    assert_eq!(
        node.index().count("SELECT COUNT(*) FROM instances"),
        files.len() as i64
    );
    for f in node.stored_files() {
        dicom_object::open_file(&f).unwrap_or_else(|e| panic!("{} unreadable: {e}", f.display()));
    }
    node.kill9();
}

/// Files storescu -v reports as acknowledged with success, in order.
fn acknowledged(storescu_log: &str) -> Vec<PathBuf> {
    let mut current = None;
    let mut out = Vec::new();
    for line in storescu_log.lines() {
        if let Some(f) = line.strip_prefix("I: Sending file: ") {
            current = Some(PathBuf::from(f.trim()));
        } else if line.contains("Received Store Response (Success)") {
            if let Some(f) = current.take() {
                out.push(f);
            }
        }
    }
    out
}

#[test]
fn kill_9_in_the_middle_of_a_series_loses_nothing_acknowledged() {
    let work = tempfile::tempdir().unwrap();
    let (spec, files) = series(work.path(), 5, 150, 256);
    let mut node = Node::start_with(NodeOptions {
        stable_after_secs: 2,
        ..NodeOptions::default()
    });
    let sender = Command::new("storescu")
        .env("TCP_NODELAY", "1")
        .args([
            "-v",
            "-aec",
            "ANATOMY",
            "127.0.0.1",
            &node.dicom_port.to_string(),
        ])
        .args(&files)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("storescu");
    let index = node.index();
    let started = common::wait_until(60, || index.count("SELECT COUNT(*) FROM instances") >= 25);
    assert!(started, "the series did not start arriving");
    node.kill9();
    drop(index);
    let out = sender.wait_with_output().expect("storescu ended");
    let acked = acknowledged(&common::text(&out));
    assert!(
        !acked.is_empty() && acked.len() < files.len(),
        "killed mid-series: {} acknowledged",
        acked.len()
    );

    node.spawn();
    assert!(
        node.temporary_files().is_empty(),
        "partial files are cleaned at start-up"
    );
    let index = node.index();
    for f in &acked {
        let i = files.iter().position(|x| x == f).unwrap() as u32;
        let rows = index.rows(&format!(
            "SELECT file_path FROM instances WHERE sop_instance_uid = '{}'",
            spec.sop_uid(i)
        ));
        assert_eq!(rows.len(), 1, "acknowledged {} is indexed", f.display());
        assert!(
            dataset_bytes(&node.storage().join(&rows[0][0])) == dataset_bytes(f),
            "{} intact",
            f.display()
        );
    }
    for f in node.stored_files() {
        let bytes = std::fs::read(&f).unwrap();
        let offset = data::dataset_offset(&bytes);
        assert!(
            files
                .iter()
                .any(|src| dataset_bytes(src) == bytes[offset..]),
            "{} is a complete copy",
            f.display()
        );
    }
    for path in index.rows("SELECT file_path FROM instances") {
        assert!(
            node.storage().join(&path[0]).is_file(),
            "indexed {} exists",
            path[0]
        );
    }

    // The sender retries the whole series; it completes.
    let out = node.storescu(&[], &files);
    assert!(out.status.success(), "{}", common::text(&out));
    assert_eq!(
        index.count("SELECT COUNT(*) FROM instances"),
        files.len() as i64
    );
    let complete = common::wait_until(20, || {
        index.count("SELECT COUNT(*) FROM series WHERE state = 'complete'") == 1
    });
    assert!(complete, "series completes after the restart");
}

#[test]
fn sigterm_finishes_the_c_store_in_flight_then_exits() {
    let work = tempfile::tempdir().unwrap();
    let (spec, files) = series(work.path(), 6, 1, 256);
    let mut node = Node::start();
    let mut scu = Scu::ct(node.dicom_port);
    let pc = scu.context(CT, EXPLICIT);
    let id = scu.next_id();
    scu.send_command(pc, &scu::store_rq(id, CT, &spec.sop_uid(0)), usize::MAX);
    let set = dataset_bytes(&files[0]);
    let (first, rest) = set.split_at(set.len() / 2);
    scu.send_data_start(pc, first, 4096);
    node.sigterm();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        TcpStream::connect(("127.0.0.1", node.dicom_port)).is_err(),
        "no new associations once shutting down"
    );
    scu.send_data(pc, rest, 4096, Duration::from_millis(5));
    let r = scu.receive_response();
    assert_eq!(r.status, 0, "the in-flight C-STORE completes: {r:?}");
    assert_eq!(r.message_id, id);
    assert!(
        matches!(scu.receive_pdu(), Ok(Pdu::AbortRQ { .. }) | Err(_)),
        "then the association is aborted"
    );
    let status = node.wait_exit(20);
    assert!(status.success(), "clean exit: {status:?}");
    assert_eq!(node.index().count("SELECT COUNT(*) FROM instances"), 1);
}

#[test]
fn beyond_max_associations_the_rejection_is_transient() {
    let node = Node::start_with(NodeOptions {
        max_associations: 1,
        ..NodeOptions::default()
    });
    // The readiness probe's TCP connection may still hold the only slot for a moment.
    let mut held = None;
    common::wait_until(5, || {
        held = Scu::connect(node.dicom_port, "TESTSCU", &[(CT, EXPLICIT)]).ok();
        held.is_some()
    });
    let scu = held.expect("the single slot frees up after the readiness probe");
    let out = node.echoscu("ECHOSCU", "ANATOMY");
    assert!(!out.status.success());
    let text = common::text(&out);
    assert!(
        text.contains("Rejected Transient") && text.contains("Local Limit Exceeded"),
        "{text}"
    );
    scu.release();
    let ok = common::wait_until(5, || node.echoscu("ECHOSCU", "ANATOMY").status.success());
    assert!(ok, "a slot frees up after release");
}

#[test]
fn silent_connections_and_idle_associations_are_closed() {
    let node = Node::start_with(NodeOptions {
        artim_timeout_secs: 1,
        idle_timeout_secs: 1,
        ..NodeOptions::default()
    });
    // ARTIM: a TCP connection that never sends A-ASSOCIATE-RQ
    let mut silent = TcpStream::connect(("127.0.0.1", node.dicom_port)).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(silent.read(&mut buf).unwrap_or(0), 0, "closed by ARTIM");
    // idle: an association that stops talking gets A-ABORT
    let mut scu = Scu::ct(node.dicom_port);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(matches!(
        scu.receive_pdu(),
        Ok(Pdu::AbortRQ { .. }) | Err(_)
    ));
    assert!(node.echoscu("ECHOSCU", "ANATOMY").status.success());
}

#[test]
fn commands_and_data_split_over_many_pdus_are_reassembled_and_message_ids_echoed() {
    let work = tempfile::tempdir().unwrap();
    let (spec, files) = series(work.path(), 7, 1, 64);
    let node = Node::start();
    let mut scu = Scu::ct(node.dicom_port);
    let pc = scu.context(CT, EXPLICIT);
    scu.send_command(pc, &scu::store_rq(4242, CT, &spec.sop_uid(0)), 7);
    scu.send_data(pc, &dataset_bytes(&files[0]), 333, Duration::ZERO);
    let r = scu.receive_response();
    assert_eq!(
        (r.status, r.message_id, r.command_field),
        (0, 4242, 0x8001),
        "{r:?}"
    );
    scu.release();
}

#[test]
fn duplicate_policy_keep_first_is_the_default() {
    duplicate_case("keep-first", 0x0000, false);
}

#[test]
fn duplicate_policy_reject_answers_0111() {
    duplicate_case("reject", 0x0111, false);
}

#[test]
fn duplicate_policy_overwrite_replaces() {
    duplicate_case("overwrite", 0x0000, true);
}

/// Store an instance, resend it identically (always a success), then send different
/// content under the same SOP Instance UID.
fn duplicate_case(policy: &'static str, status_for_different: u16, replaced: bool) {
    let work = tempfile::tempdir().unwrap();
    let (spec, files) = series(work.path(), 8, 1, 32);
    let node = Node::start_with(NodeOptions {
        duplicates: policy,
        ..NodeOptions::default()
    });
    let first = dataset_bytes(&files[0]);
    let second = scu::with_replaced_uid(&first, Tag(0x0008, 0x1155), "1.2.3.4.5.6.7");
    let uid = spec.sop_uid(0);
    let mut scu = Scu::ct(node.dicom_port);
    assert_eq!(scu.store(EXPLICIT, CT, &uid, &first).status, 0);
    assert_eq!(
        scu.store(EXPLICIT, CT, &uid, &first).status,
        0,
        "identical resend"
    );
    let r = scu.store(EXPLICIT, CT, &uid, &second);
    assert_eq!(r.status, status_for_different, "{policy}: {r:?}");
    scu.release();
    let stored = node.stored_files();
    assert_eq!(stored.len(), 1);
    let expect = if replaced { &second } else { &first };
    assert!(
        dataset_bytes(&stored[0]) == *expect,
        "{policy}: stored content"
    );
    assert_eq!(node.index().count("SELECT COUNT(*) FROM instances"), 1);
    let metrics = node.http_get("/metrics").1;
    assert!(
        metrics.contains(r#"anatomy_duplicate_instances_total{outcome="identical"} 1"#),
        "{metrics}"
    );
}

/// Peak resident memory of a process, from /proc (kB → bytes).
fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmHWM")
}

#[test]
fn a_300_mb_instance_is_streamed_to_disk_not_held_in_memory() {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    const MF_WORD_SC: &str = "1.2.840.10008.5.1.4.1.1.7.3";
    let (rows, cols, frames) = (512u16, 512u16, 600u32);
    let pixel_bytes = u32::from(rows) * u32::from(cols) * 2 * frames;
    let uid = "2.25.77.1.1";
    let text = |g, e, vr, v: &str| DataElement::new(Tag(g, e), vr, PrimitiveValue::from(v));
    let us = |g, e, v: u16| DataElement::new(Tag(g, e), VR::US, PrimitiveValue::from(v));
    let header = dicom_object::InMemDicomObject::from_element_iter([
        text(0x0008, 0x0016, VR::UI, MF_WORD_SC),
        text(0x0008, 0x0018, VR::UI, uid),
        text(0x0008, 0x0060, VR::CS, "OT"),
        text(0x0020, 0x000D, VR::UI, "2.25.77.1"),
        text(0x0020, 0x000E, VR::UI, "2.25.77.1.0"),
        us(0x0028, 0x0002, 1),
        text(0x0028, 0x0004, VR::CS, "MONOCHROME2"),
        text(0x0028, 0x0008, VR::IS, &frames.to_string()),
        us(0x0028, 0x0010, rows),
        us(0x0028, 0x0011, cols),
        us(0x0028, 0x0100, 16),
        us(0x0028, 0x0101, 16),
        us(0x0028, 0x0102, 15),
        us(0x0028, 0x0103, 0),
    ]);
    let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry;
    let explicit = dicom_encoding::TransferSyntaxIndex::get(&ts, EXPLICIT).unwrap();
    let mut head = Vec::new();
    header.write_dataset_with_ts(&mut head, explicit).unwrap();
    head.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0]);
    head.extend_from_slice(&pixel_bytes.to_le_bytes());

    let node = Node::start();
    let baseline = peak_rss_bytes(node.pid());
    let mut scu = Scu::connect(node.dicom_port, "TESTSCU", &[(MF_WORD_SC, EXPLICIT)]).unwrap();
    let pc = scu.context(MF_WORD_SC, EXPLICIT);
    let id = scu.next_id();
    scu.send_command(pc, &scu::store_rq(id, MF_WORD_SC, uid), usize::MAX);
    scu.send_data_start(pc, &head, usize::MAX);
    let chunk = vec![0x5Au8; scu.max_data_chunk()];
    let mut left = pixel_bytes as usize;
    while left > chunk.len() {
        scu.send_data_start(pc, &chunk, usize::MAX);
        left -= chunk.len();
    }
    scu.send_data(pc, &chunk[..left], usize::MAX, Duration::ZERO);
    let r = scu.receive_response();
    assert_eq!(r.status, 0, "{r:?}");
    scu.release();
    let peak = peak_rss_bytes(node.pid());
    let stored = node.stored_files();
    assert_eq!(stored.len(), 1);
    assert!(std::fs::metadata(&stored[0]).unwrap().len() > u64::from(pixel_bytes));
    assert!(
        peak < 150 * 1024 * 1024,
        "peak RSS {} MB (baseline {} MB) while receiving a {} MB instance",
        peak >> 20,
        baseline >> 20,
        pixel_bytes >> 20
    );
    eprintln!(
        "peak RSS {} MB for a {} MB instance",
        peak >> 20,
        pixel_bytes >> 20
    );
}
