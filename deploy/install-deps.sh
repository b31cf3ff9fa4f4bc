#!/usr/bin/env bash
# Install what anatomy-node needs on a fresh Debian 12 machine.
#   deploy/install-deps.sh          run the node: build tools (cmake, g++ for CharLS), DCMTK
#   deploy/install-deps.sh --test   also what the tests use: Orthanc, PostgreSQL, Chromium, openssl, curl
# Only Debian packages; idempotent; uses sudo when not root.
set -euo pipefail

packages=(ca-certificates cmake g++ pkg-config dcmtk python3 python3-venv python3-pip unzip)
if [[ "${1:-}" == "--test" ]]; then
    # chromium: tests/web.rs takes a screenshot of the web page with headless Chromium;
    # openssl and curl: tests/web.rs makes a test CA, keys and JWTs, and talks HTTPS
    packages+=(orthanc orthanc-dicomweb postgresql procps chromium openssl curl)
fi

sudo=""
if [[ "$(id -u)" != 0 ]]; then
    sudo="sudo"
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    $sudo apt-get update -qq
    # Debian's packages start their services on install; we start our own instances.
    echo exit 101 | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
    $sudo rm -f /usr/sbin/policy-rc.d
fi
if ! command -v cargo >/dev/null; then
    echo "cargo (Rust toolchain) is required: https://rustup.rs" >&2
    exit 1
fi

# ONNX Runtime's library, from the onnxruntime wheel on PyPI.
bash "$(dirname "$0")/install-onnxruntime.sh"

