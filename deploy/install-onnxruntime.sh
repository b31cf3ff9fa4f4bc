#!/usr/bin/env bash
# Put ONNX Runtime's shared library where the node looks for it by default
# (<project>/.onnxruntime/libonnxruntime.so), taken from the `onnxruntime` wheel on PyPI.
# No Python is needed at run time; pip only downloads the wheel. Idempotent.
#   deploy/install-onnxruntime.sh [DEST_DIR]
set -euo pipefail
version="${ORT_VERSION:-1.31.1}" # ort 2.0.0-rc.15 (API 31) needs ONNX Runtime >= 1.31
here="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$here/.onnxruntime}"

if [[ -f "$dest/libonnxruntime.so" && "$(cat "$dest/VERSION" 2>/dev/null)" == "$version" ]]; then
    exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    "onnxruntime==$version" -d "$tmp"
mkdir -p "$dest"
python3 - "$tmp" "$dest" "$version" <<'PY'
import glob, sys, zipfile
tmp, dest, version = sys.argv[1:]
wheel = glob.glob(f"{tmp}/onnxruntime-{version}-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    for name, target in [
        (f"onnxruntime/capi/libonnxruntime.so.{version}", "libonnxruntime.so"),
        ("onnxruntime/capi/libonnxruntime_providers_shared.so", "libonnxruntime_providers_shared.so"),
    ]:
        with z.open(name) as src, open(f"{dest}/{target}", "wb") as out:
            out.write(src.read())
PY
echo "$version" > "$dest/VERSION"
echo "ONNX Runtime $version: $dest/libonnxruntime.so"
