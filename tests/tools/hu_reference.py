#!/usr/bin/env python3
"""Independent HU reference for tests/pixels.rs: decodes DICOM files with pydicom.

Usage: hu_reference.py OUT_DIR FILE...

For the i-th FILE it writes OUT_DIR/<i>.f32 (every frame's HU, float32 little endian,
frame after frame, rows × columns each, as stored: no flip, no padding, no resize) and
prints one JSON line: {"index": i, "file": ..., "frames": n, "rows": r, "columns": c} or
{"index": i, "file": ..., "error": "..."}.

HU follow docs/contracts.md step 2: pydicom decodes the stored values (its own handling of
Pixel Representation, Bits Stored and JPEG 2000 sign mismatches) and applies the modality
LUT (Rescale Slope/Intercept, per-frame for Enhanced CT); this script then sets pixels
whose stored value equals the Pixel Padding Value (or lies within the Pixel Padding Range
Limit) to -1024 and inverts MONOCHROME1 before rescaling, as the contract says.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

AIR_HU = -1024.0


def stored_like_pixels(value, ds):
    """A padding value interpreted as a stored sample (bits stored, sign-extended)."""
    bits = int(ds.BitsStored)
    value = int(value) & ((1 << bits) - 1)
    if int(ds.PixelRepresentation) == 1 and value >> (bits - 1):
        value -= 1 << bits
    return value


def frame_hu(ds, stored, frame_index):
    padding = None
    if "PixelPaddingValue" in ds:
        low = stored_like_pixels(ds.PixelPaddingValue, ds)
        high = low
        if "PixelPaddingRangeLimit" in ds:
            high = stored_like_pixels(ds.PixelPaddingRangeLimit, ds)
        low, high = min(low, high), max(low, high)
        padding = (stored >= low) & (stored <= high)
    values = stored.astype(np.int64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        bits = int(ds.BitsStored)
        if int(ds.PixelRepresentation) == 1:
            values = -1 - values
        else:
            values = ((1 << bits) - 1) - values
    hu = rescale(ds, values, frame_index)
    if padding is not None:
        hu[padding] = AIR_HU
    return hu.astype(np.float32)


def rescale(ds, values, frame_index):
    """Rescale of one frame; Enhanced CT keeps it in the functional groups."""
    slope, intercept = 1.0, 0.0
    item = None
    for seq_name in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        groups = ds.get(seq_name)
        if not groups:
            continue
        index = frame_index if seq_name.startswith("PerFrame") else 0
        if index < len(groups) and "PixelValueTransformationSequence" in groups[index]:
            item = groups[index].PixelValueTransformationSequence[0]
            break
    if item is not None and "RescaleSlope" in item:
        slope, intercept = float(item.RescaleSlope), float(item.RescaleIntercept)
    elif "RescaleSlope" in ds or "RescaleIntercept" in ds:
        # pydicom's own modality LUT for the classic attributes
        return apply_modality_lut(values, ds).astype(np.float64)
    return values.astype(np.float64) * slope + intercept


def convert(index, path, out_dir):
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames == 1:
        pixels = pixels[np.newaxis, ...]
    hu = np.stack([frame_hu(ds, pixels[i], i) for i in range(frames)])
    hu.astype("<f4").tofile(out_dir / f"{index}.f32")
    return {"frames": frames, "rows": int(ds.Rows), "columns": int(ds.Columns)}


def main():
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(sys.argv[2:]):
        line = {"index": index, "file": path}
        try:
            line.update(convert(index, path, out_dir))
        except Exception as e:  # reported per file; the Rust test decides what it means
            line["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
