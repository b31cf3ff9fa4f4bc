//! Hostile input over the network (issue #18): lengths from a peer that announce more
//! than follows, and a network fuzzer. Every stream must be answered (a status, an abort,
//! a rejection) or closed within a timeout, the node's peak RSS stays bounded, and a clean
//! peer's C-ECHO succeeds after every batch.
//!
//! Short run in `cargo test`; the long run is the same test with more streams:
//!
//! ```text
//! ANATOMY_NETFUZZ_STREAMS=3000 cargo test --test hostile network_fuzzer -- --nocapture
//! ```

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use anatomy_node::fuzz::{self, Rng};
use common::node::{Node, NodeOptions};
use common::scu::{Scu, IMPLICIT};

/// (VmHWM, VmRSS) of a process, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// How the node answered one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Answer {
    /// It answered with DIMSE responses (P-DATA) or a release, then closed.
    Responses,
    /// A-ASSOCIATE-RJ.
    Rejected,
    /// A-ABORT.
    Aborted,
    /// It closed the connection without a word (what it does when the peer leaves).
    Closed,
    /// Nothing within the timeout: a hang.
    Timeout,
}

/// Send `stream` from a fresh connection; with `leave`, the peer closes its side after
/// sending (as a crashed SCU does), otherwise it stays connected and silent, and the node
/// must end the association on its own (an abort or its idle timeout).
fn exchange(port: u16, stream: &[u8], leave: bool, timeout: Duration) -> Answer {
    let Ok(mut socket) = TcpStream::connect(("127.0.0.1", port)) else {
        return Answer::Closed;
    };
    let _ = socket.set_nodelay(true);
    let _ = socket.set_write_timeout(Some(Duration::from_secs(5)));
    let _ = socket.write_all(stream);
    if leave {
        let _ = socket.shutdown(Shutdown::Write);
    }
    let deadline = Instant::now() + timeout;
    let mut received = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Answer::Timeout;
        }
        let _ = socket.set_read_timeout(Some(left));
        match socket.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Answer::Timeout
            }
            Err(_) => break, // reset: closed
        }
    }
    classify(&received)
}

/// The PDU types in what the node sent back.
fn classify(received: &[u8]) -> Answer {
    let mut at = 0;
    let mut answer = Answer::Closed;
    while at + 6 <= received.len() {
        let len = u32::from_be_bytes([
            received[at + 2],
            received[at + 3],
            received[at + 4],
            received[at + 5],
        ]) as usize;
        answer = match received[at] {
            0x03 => Answer::Rejected,
            0x07 => return Answer::Aborted,
            0x04 | 0x06 => Answer::Responses,
            _ => answer,
        };
        at += 6 + len;
    }
    answer
}

fn clean_echo(port: u16) -> u16 {
    let mut scu = Scu::connect(port, "TESTSCU", &[(fuzz::VERIFICATION, IMPLICIT)])
        .expect("a clean peer is still accepted");
    let status = scu.echo().status;
    scu.release();
    status
}

fn hostile_node() -> Node {
    Node::start_with(NodeOptions {
        artim_timeout_secs: 3,
        idle_timeout_secs: 3,
        max_associations: 32,
        ..NodeOptions::default()
    })
}

/// A small data set: a synthetic 8×8 CT slice.
fn small_dataset() -> Vec<u8> {
    fuzz::dataset_of(&fuzz::synthetic_file(8, 12))
        .expect("synthetic file")
        .0
}

/// Regression (issue #18): a C-STORE whose command set announces lengths far beyond its
/// few hundred bytes. dicom-object reserved and zeroed each announced length (800 MB for
/// one 608-byte stream); the command set is now checked first and the association aborted.
#[test]
fn a_command_set_with_corrupted_lengths_is_aborted_without_allocating() {
    let node = hostile_node();
    let (hwm_before, _) = memory(node.pid());
    let dataset = small_dataset();
    let rq = fuzz::associate_rq("TESTSCU", "ANATOMY");
    let mut command = fuzz::store_rq(1, "1.2.826.0.1.3680043.8.498.608");
    // Every element length of the command set, one stream each, 800 MB announced.
    let mut at = 0;
    let mut offsets = vec![];
    while at + 8 <= command.len() {
        offsets.push(at);
        at += 8 + u32::from_le_bytes(command[at + 4..at + 8].try_into().unwrap()) as usize;
    }
    let good = command.clone();
    let mut answers = vec![];
    for (i, offset) in offsets.iter().enumerate() {
        command.copy_from_slice(&good);
        command[offset + 4..offset + 8].copy_from_slice(&0x3000_0000u32.to_le_bytes());
        let mut stream = rq.clone();
        stream.extend(pdata(3, true, true, &command));
        stream.extend(pdata(3, false, true, &dataset[..dataset.len().min(200)]));
        stream.extend([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]);
        let answer = exchange(node.dicom_port, &stream, false, Duration::from_secs(10));
        answers.push((i, stream.len(), answer));
    }
    let (hwm_after, _) = memory(node.pid());
    println!(
        "{} streams of corrupted command sets ({:?}): peak RSS {:.1} MB → {:.1} MB",
        offsets.len(),
        answers.iter().map(|a| a.2).collect::<Vec<_>>(),
        mb(hwm_before),
        mb(hwm_after)
    );
    for (i, len, answer) in &answers {
        assert_eq!(*answer, Answer::Aborted, "element {i}: {len} bytes");
    }
    assert!(
        hwm_after < hwm_before + (64 << 20),
        "peak RSS grew by {:.0} MB",
        mb(hwm_after - hwm_before)
    );
    assert_eq!(clean_echo(node.dicom_port), 0);
}

/// A P-DATA-TF PDU in a stream, raw: one PDV.
fn pdata(pc: u8, command: bool, last: bool, data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x04, 0];
    out.extend_from_slice(&((data.len() + 6) as u32).to_be_bytes());
    out.extend_from_slice(&((data.len() + 2) as u32).to_be_bytes());
    out.push(pc);
    out.push(u8::from(command) | (u8::from(last) << 1));
    out.extend_from_slice(data);
    out
}

/// Regression (issue #18): dicom-ul, not strict, buffered a PDU until its announced length
/// (up to 4 GiB) had arrived. A PDU longer than dicom.max_pdu_length is now refused from
/// its header with an A-ABORT, before its body is read.
#[test]
fn a_pdu_longer_than_max_pdu_length_is_aborted_from_its_header() {
    let node = hostile_node();
    let (hwm_before, _) = memory(node.pid());
    let mut outcomes = vec![];
    for (what, first) in [
        // after the association is accepted: a P-DATA-TF of 4 GiB - 16
        ("P-DATA-TF", true),
        // instead of an A-ASSOCIATE-RQ: one of 4 GiB - 16
        ("A-ASSOCIATE-RQ", false),
    ] {
        let mut socket = TcpStream::connect(("127.0.0.1", node.dicom_port)).unwrap();
        socket
            .set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let header = if first {
            socket
                .write_all(&fuzz::associate_rq("TESTSCU", "ANATOMY"))
                .unwrap();
            let mut ac = [0u8; 6];
            socket.read_exact(&mut ac).unwrap();
            assert_eq!(ac[0], 0x02, "A-ASSOCIATE-AC");
            let len = u32::from_be_bytes([ac[2], ac[3], ac[4], ac[5]]) as usize;
            let mut rest = vec![0u8; len];
            socket.read_exact(&mut rest).unwrap();
            vec![0x04, 0, 0xFF, 0xFF, 0xFF, 0xF0]
        } else {
            vec![0x01, 0, 0xFF, 0xFF, 0xFF, 0xF0]
        };
        socket.write_all(&header).unwrap();
        // Up to 64 MB of body: the node must stop reading long before.
        let chunk = vec![0x5Au8; 1 << 20];
        let mut sent = 0usize;
        while sent < 64 << 20 {
            match socket.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut back = Vec::new();
        let _ = socket.read_to_end(&mut back);
        let answer = classify(&back);
        println!(
            "{what} announcing 4 GiB: the node took at most {:.1} MB before it ended the association ({answer:?})",
            mb(sent as u64)
        );
        outcomes.push((what, answer, sent));
    }
    let (hwm_after, _) = memory(node.pid());
    println!(
        "peak RSS {:.1} MB → {:.1} MB",
        mb(hwm_before),
        mb(hwm_after)
    );
    for (what, answer, sent) in outcomes {
        assert_eq!(answer, Answer::Aborted, "{what}");
        assert!(
            sent < 64 << 20,
            "{what}: the node read the whole 64 MB body"
        );
    }
    assert!(
        hwm_after < hwm_before + (32 << 20),
        "peak RSS grew by {:.0} MB",
        mb(hwm_after - hwm_before)
    );
    assert!(
        node.log().contains("dicom.max_pdu_length"),
        "the abort says why"
    );
    assert_eq!(clean_echo(node.dicom_port), 0);
}

/// The network fuzzer: association streams as DCMTK's echoscu, storescu and findscu send
/// them, mutated (bit flips, truncations, corrupted lengths, splices), sent to a running
/// node, 8 at a time.
#[test]
fn network_fuzzer() {
    let streams: usize = std::env::var("ANATOMY_NETFUZZ_STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    let seed: u64 = std::env::var("ANATOMY_NETFUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(18);
    let mut node = hostile_node();
    let (hwm_start, rss_start) = memory(node.pid());
    let seeds = fuzz::association_streams("TESTSCU", "ANATOMY", &small_dataset());
    // The clean streams are answered.
    for stream in &seeds {
        assert_eq!(
            exchange(node.dicom_port, stream, true, Duration::from_secs(10)),
            Answer::Responses
        );
    }
    let mut rng = Rng::new(seed);
    let mut tally = std::collections::BTreeMap::<Answer, usize>::new();
    let started = Instant::now();
    let batch = 8;
    let mut sent = 0;
    let mut batches = 0;
    let mut hung: Vec<Vec<u8>> = vec![];
    while sent < streams {
        let n = batch.min(streams - sent);
        let inputs: Vec<(Vec<u8>, bool)> = (0..n)
            .map(|_| {
                let mut s = seeds[rng.below(seeds.len())].clone();
                fuzz::mutate(&mut s, &mut rng, &seeds, 64 * 1024);
                (s, rng.chance(2))
            })
            .collect();
        let port = node.dicom_port;
        let answers: Vec<(Answer, Vec<u8>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = inputs
                .iter()
                .map(|(s, leave)| {
                    // The node's idle timeout is 3 s: everything ends well within 15 s.
                    scope.spawn(move || {
                        (
                            exchange(port, s, *leave, Duration::from_secs(15)),
                            s.clone(),
                        )
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("exchange thread"))
                .collect()
        });
        for (answer, stream) in answers {
            if answer == Answer::Timeout && hung.len() < 4 {
                hung.push(stream);
            }
            *tally.entry(answer).or_default() += 1;
        }
        sent += n;
        batches += 1;
        assert!(
            node.exited().is_none(),
            "the node died after {sent} streams"
        );
        assert_eq!(
            clean_echo(node.dicom_port),
            0,
            "C-ECHO after batch {batches}"
        );
    }
    let (hwm_end, rss_end) = memory(node.pid());
    println!(
        "network fuzzer: {sent} mutated streams in {batches} batches, {:.0} s, seed {seed}: {tally:?}",
        started.elapsed().as_secs_f64()
    );
    println!(
        "node RSS {:.1} MB → {:.1} MB, peak {:.1} MB → {:.1} MB",
        mb(rss_start),
        mb(rss_end),
        mb(hwm_start),
        mb(hwm_end)
    );
    for stream in &hung {
        eprintln!(
            "a stream of {} bytes was neither answered nor closed within 15 s: {:02X?}",
            stream.len(),
            &stream[..stream.len().min(512)]
        );
    }
    let timeouts = tally.get(&Answer::Timeout).copied().unwrap_or(0);
    assert_eq!(timeouts, 0, "streams neither answered nor closed");
    assert!(
        hwm_end < hwm_start + (100 << 20),
        "peak RSS grew by {:.0} MB",
        mb(hwm_end - hwm_start)
    );
}

/// Regression (issue #18): multer held a STOW-RS part's headers in memory until their blank
/// line, up to `http.stow_max_mb` (1 GB by default). Headers past 16 KiB now end the
/// request with a 400, and the node's memory does not follow the body.
#[test]
fn a_stow_part_whose_headers_never_end_is_refused() {
    let node = hostile_node();
    let (hwm_before, _) = memory(node.pid());
    let body_len = 64usize << 20;
    let mut socket = TcpStream::connect(("127.0.0.1", node.http_port)).unwrap();
    socket
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let head = format!(
        "POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Content-Type: multipart/related; type=\"application/dicom\"; boundary=XyZ\r\n\
         Accept: application/dicom+json\r\nContent-Length: {body_len}\r\n\r\n\
         --XyZ\r\nContent-Type: application/dicom\r\nX-Junk: "
    );
    socket.write_all(head.as_bytes()).unwrap();
    let chunk = vec![b'h'; 1 << 20];
    let mut sent = 0usize;
    while sent < body_len - head.len() {
        match socket.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    let (hwm_after, _) = memory(node.pid());
    println!(
        "STOW-RS part headers of {:.1} MB sent: {:?}; peak RSS {:.1} MB → {:.1} MB",
        mb(sent as u64),
        answer.lines().next().unwrap_or(""),
        mb(hwm_before),
        mb(hwm_after)
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("16 KiB"), "{answer}");
    assert!(
        hwm_after < hwm_before + (32 << 20),
        "peak RSS grew by {:.0} MB",
        mb(hwm_after - hwm_before)
    );
}
