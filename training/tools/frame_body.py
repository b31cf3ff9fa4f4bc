"""Copy a packed dataset (.npz) with every image re-framed to the body: a diagnostic.

    python training/tools/frame_body.py IN.npz OUT.npz [--margin 0.05]

The shipped preprocessing fits the whole image to the model's input, so the apparent size of
the body is the scanner's field of view: 0.44 of the side for the OpenKBP necks, ~1 for the
sarcoma thigh crops. The model card's leave-source-out check shows the model reading the source
(and so the class) off that size. This tool tests the opposite of a fixed field of view: every
image is cropped to the square around the body's bounding box (HU > -300, opened so that thin
things such as the couch or a mask do not count),
plus a margin, and resized back to the input size, so that every body fills the image whatever
the scanner. It works on the packed images (already fitted to the input size), so it loses some
resolution on small bodies; it is an experiment on the training side, not a preprocessing of the
node (which has no such framing).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the training package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from training.data import read_npz_arrays, write_npz_arrays  # noqa: E402

BODY_HU = -300.0
AIR_HU = -1024.0
# Thin structures outside the body (the couch, an RT board, a thermoplastic mask, foam) must not
# widen the box: the body mask is opened with a square of this share of the image side first.
OPEN_SHARE = 0.03
# A row or column belongs to the body when at least this share of its pixels does: stray
# pixels (noise, burnt-in text, a ring artefact) must not widen the box.
MIN_SHARE = 0.01


def body_box(hu: np.ndarray) -> tuple[float, float, float] | None:
    """(centre row, centre column, side) of the square around the body, or None (no body)."""
    body = _opened(hu > BODY_HU, max(3, int(OPEN_SHARE * hu.shape[0]) | 1))
    need = max(2, int(MIN_SHARE * hu.shape[0]))
    rows = np.flatnonzero(body.sum(1) >= need)
    cols = np.flatnonzero(body.sum(0) >= need)
    if len(rows) == 0 or len(cols) == 0:
        return None
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return (r0 + r1) / 2, (c0 + c1) / 2, float(max(r1 - r0, c1 - c0))


def _opened(mask: np.ndarray, k: int) -> np.ndarray:
    """Morphological opening (erosion then dilation) with a k×k square, k odd."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    eroded = -F.max_pool2d(-t, k, stride=1, padding=k // 2)
    return (F.max_pool2d(eroded, k, stride=1, padding=k // 2)[0, 0] > 0.5).numpy()


def frame(hu: np.ndarray, margin: float) -> np.ndarray:
    """One HU image [S, S] → the square around its body (plus margin) resized to S×S, air outside."""
    S = hu.shape[0]
    box = body_box(hu)
    if box is None:
        return hu
    cy, cx, side = box
    side = min(side * (1 + 2 * margin), 4.0 * S)
    # affine_grid maps output to input in normalised coordinates ([-1, 1] spans S pixels)
    scale = side / S
    ty, tx = (2 * cy / S) - 1, (2 * cx / S) - 1
    theta = torch.tensor([[[scale, 0.0, tx], [0.0, scale, ty]]], dtype=torch.float32)
    grid = F.affine_grid(theta, [1, 1, S, S], align_corners=False)
    src = torch.from_numpy(hu.astype(np.float32) - AIR_HU)[None, None]  # air → 0, the padding
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0, 0].numpy() + AIR_HU


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="packed dataset (.npz from `python -m training pack`)")
    p.add_argument("dst", help="output .npz")
    p.add_argument("--margin", type=float, default=0.05, help="air around the body, share of its size per side")
    a = p.parse_args(argv)
    arrays, info = read_npz_arrays(a.src)
    if info.get("field_of_view_mm") is not None:
        raise SystemExit(f"{a.src}: built with a fixed field of view; body framing needs whole images")
    offset = int(info.get("hu_offset", 32768))
    images = arrays["images"]
    framed = np.empty_like(images)
    for i, img in enumerate(images):
        hu = img.astype(np.float32) - offset
        framed[i] = np.clip(np.rint(frame(hu, a.margin) + offset), 0, 65535).astype(images.dtype)
    arrays["images"] = framed
    info["name"] = f"{info.get('name', 'dataset')} (framed to the body, margin {a.margin})"
    info["framing"] = "body"
    info["framing_tool"] = {"margin": a.margin, "body_hu": BODY_HU, "open_share": OPEN_SHARE}
    write_npz_arrays(a.dst, arrays, info)
    print(f"framed {len(images)} images to the body: {a.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
