#!/usr/bin/env bash
# The long runs of issue #18's hostile-input checks (the short ones run in `cargo test`):
#   every fuzz target of src/fuzz.rs for up to FUZZ_SECS seconds or FUZZ_INPUTS inputs,
#   then the network fuzzer with NETFUZZ_STREAMS mutated association streams.
# Findings (inputs that panicked or allocated >= 64 MiB) land in $ANATOMY_FUZZ_FINDINGS.
# Usage: tests/tools/hostile-long.sh [seed]     (run from the project root)
set -euo pipefail
seed="${1:-18}"
export ANATOMY_FUZZ_SEED="$seed" ANATOMY_NETFUZZ_SEED="$seed"
export ANATOMY_FUZZ_INPUTS="${FUZZ_INPUTS:-1000000}" ANATOMY_FUZZ_SECS="${FUZZ_SECS:-75}"
export ANATOMY_NETFUZZ_STREAMS="${NETFUZZ_STREAMS:-3000}"
export ANATOMY_FUZZ_FINDINGS="${ANATOMY_FUZZ_FINDINGS:-$PWD/target/fuzz-findings}"
date -u +"run of %Y-%m-%d %H:%M UTC, seed $seed"
cargo test --test fuzz -- --nocapture --test-threads 1
cargo test --test hostile network_fuzzer -- --nocapture
