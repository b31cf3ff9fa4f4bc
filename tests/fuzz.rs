//! Fuzz targets on stable Rust (issue #18): every parser that reads peer input, fed
//! mutations of real and synthetic byte streams (`src/fuzz.rs`). A short run per target in
//! `cargo test`; the long run is the same test with a larger budget:
//!
//! ```text
//! ANATOMY_FUZZ_INPUTS=200000 ANATOMY_FUZZ_SECS=300 cargo test --release --test fuzz -- --nocapture
//! ```
//!
//! A target fails on any panic or any single allocation of 64 MiB or more; the inputs that
//! did it are written to `$ANATOMY_FUZZ_FINDINGS` (default: a temporary folder), named
//! after the target, for a regression test.

use std::path::Path;
use std::time::Duration;

use anatomy_node::fuzz::{self, Budget, CountingAlloc};

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn run(name: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let targets = fuzz::targets(root);
    let target = targets
        .iter()
        .find(|t| t.name == name)
        .expect("a fuzz target of that name");
    let budget = Budget {
        inputs: env_u64("ANATOMY_FUZZ_INPUTS", 2000),
        time: Duration::from_secs(env_u64("ANATOMY_FUZZ_SECS", 3)),
        seed: env_u64("ANATOMY_FUZZ_SEED", 18),
    };
    if fuzz::real_files(root, 1).is_empty() {
        eprintln!("../shared/data is absent: seeds are the synthetic series only");
    }
    let report = fuzz::run(target, budget);
    println!("{} (seeds {})", report.line(), target.seeds.len());
    if report.findings() > 0 {
        let dir = std::env::var("ANATOMY_FUZZ_FINDINGS")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| std::env::temp_dir().join("anatomy-fuzz-findings"));
        let _ = std::fs::create_dir_all(&dir);
        for (i, (input, why)) in report.panics.iter().enumerate() {
            let _ = std::fs::write(dir.join(format!("{name}-panic-{i}.bin")), input);
            eprintln!("{name}: panic {i}: {why}");
        }
        for (i, (input, size)) in report.allocations.iter().enumerate() {
            let _ = std::fs::write(dir.join(format!("{name}-alloc-{i}.bin")), input);
            eprintln!(
                "{name}: allocation of {size} bytes from a {}-byte input",
                input.len()
            );
        }
        panic!(
            "{name}: {} findings, inputs in {}",
            report.findings(),
            dir.display()
        );
    }
    assert!(report.inputs > 0);
}

#[test]
fn fuzz_pdu() {
    run("pdu");
}

#[test]
fn fuzz_association() {
    run("association");
}

#[test]
fn fuzz_command() {
    run("command");
}

#[test]
fn fuzz_inspect() {
    run("inspect");
}

#[test]
fn fuzz_identifier() {
    run("identifier");
}

#[test]
fn fuzz_stow() {
    run("stow");
}

#[test]
fn fuzz_qido() {
    run("qido");
}

#[test]
fn fuzz_pixels() {
    run("pixels");
}

#[test]
fn fuzz_manifest() {
    run("manifest");
}

/// The checks the fuzz targets drove (binary values of whole values, Implicit VR sequences
/// walked, unknown VRs as UN) must not refuse real data: every real CT file passes
/// `store::inspect` and a C-FIND-like structure check of its data set.
#[test]
fn every_real_file_passes_the_stricter_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![];
    for data in ["ct", "ct-extra"] {
        collect(&root.join("../shared/data").join(data), 4, &mut files);
    }
    if files.is_empty() {
        eprintln!("../shared/data is absent: only the synthetic series are checked");
    }
    files.truncate(5000);
    let mut inputs: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|p| (p.display().to_string(), std::fs::read(p).expect("read")))
        .collect();
    inputs.push(("synthetic".into(), fuzz::synthetic_file(64, 12)));
    let mut checked = 0;
    for (name, bytes) in &inputs {
        let (dataset, ts) = fuzz::dataset_of(bytes).unwrap_or_else(|| panic!("{name}: no meta"));
        anatomy_node::store::inspect::inspect_file(std::io::Cursor::new(&dataset), 0, &ts)
            .unwrap_or_else(|e| panic!("{name} ({ts}): {e}"));
        if ts == "1.2.840.10008.1.2" || ts == "1.2.840.10008.1.2.1" {
            anatomy_node::dimse::find::identifier::check_structure(
                &dataset,
                ts != "1.2.840.10008.1.2",
            )
            .unwrap_or_else(|e| panic!("{name} ({ts}): {e}"));
        }
        checked += 1;
    }
    println!("{checked} files pass store::inspect");
}

fn collect(dir: &Path, depth: usize, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() && depth > 0 {
            collect(&path, depth - 1, out);
        } else if path.extension().is_some_and(|e| e == "dcm") {
            out.push(path);
        }
    }
}

/// The harness itself: a panic and a 100 MiB allocation are both findings.
#[test]
fn the_harness_reports_panics_and_large_allocations() {
    fn flawed(input: &[u8]) {
        match input.first() {
            Some(1) => panic!("a finding"),
            Some(2) => {
                let v: Vec<u8> = Vec::with_capacity(100 << 20);
                std::hint::black_box(&v);
            }
            _ => {}
        }
    }
    let target = fuzz::Target {
        name: "selftest",
        seeds: vec![vec![0], vec![1], vec![2]],
        max_len: 4,
        run: flawed,
    };
    let budget = Budget {
        inputs: 3,
        time: Duration::from_secs(10),
        seed: 1,
    };
    let report = fuzz::run(&target, budget);
    assert_eq!(report.inputs, 3);
    assert_eq!(report.panics.len(), 1, "{report:?}");
    assert_eq!(report.panics[0].1, "a finding");
    assert_eq!(report.allocations.len(), 1);
    assert!(report.allocations[0].1 >= 100 << 20);
}
