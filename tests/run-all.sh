#!/usr/bin/env bash
# Install what the tests need (Debian packages) and run the whole test suite: style checks,
# unit tests, and every integration test on SQLite and again on PostgreSQL.
# This is the README's second set-up command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/install-deps.sh --test

bash deploy/pg-test.sh start
trap 'bash deploy/pg-test.sh stop' EXIT
pg_url="postgres://postgres@127.0.0.1:${PGPORT:-55432}/postgres"

# As root (CI), tests that mount a small filesystem must run, never skip.
if [[ "$(id -u)" == 0 ]]; then
    export ANATOMY_REQUIRE_ROOT_TESTS=1
fi
# Chromium is installed above: the browser check of the web page (tests/web.rs) must run.
export ANATOMY_REQUIRE_BROWSER_TESTS=1

# Python of the test tools (tests/tools/requirements.txt: pydicom for tests/pixels.rs, onnx for
# the models of tests/model.rs), rebuilt when the requirements file changes; and the ONNX Runtime
# library that tests/model.rs loads.
venv=.venv-tests
req_hash="$(sha256sum tests/tools/requirements.txt | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" || "$(cat "$venv/requirements.sha256" 2>/dev/null)" != "$req_hash" ]]; then
    echo "== test Python: $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet -r tests/tools/requirements.txt
    echo "$req_hash" >"$venv/requirements.sha256"
fi
export ANATOMY_TEST_PYTHON="$PWD/$venv/bin/python"
bash deploy/install-onnxruntime.sh
# The training package (PyTorch, CPU): its own tests, and tests/training.rs.
bash training/install.sh

echo "== style: cargo fmt --check, cargo clippy -D warnings"
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings

echo "== unit and integration tests on SQLite"
cargo test --locked

echo "== integration tests that use the index, again on PostgreSQL"
db_tests=()
for file in $(grep -l -E "Node::start|TestDb" tests/*.rs); do
    db_tests+=(--test "$(basename "$file" .rs)")
done
ANATOMY_TEST_DATABASE_URL="$pg_url" cargo test --locked "${db_tests[@]}"

echo "== training package tests (PyTorch, CPU)"
training/.venv/bin/python -m pytest training/tests -q

echo "== all tests passed"
