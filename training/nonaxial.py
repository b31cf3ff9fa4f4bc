"""Synthetic `other` images: non-axial reformats and scout-like projections.

The development data has no non-axial images and no localizers (scouts), yet the node must
answer `other` for them rather than force one of the five regions. The node's key-image
selection already skips localizers and non-axial images (anatomy::select), so this is a second
line of defence, for mislabelled headers and for callers that send single images.

They are built from the dataset's own axial stacks, i.e. from images the Rust side already
converted, so there is still one preprocessing implementation: the images of one series,
sorted by z (superior at the top), form a volume [z, y, x]; from it come
  * coronal and sagittal planes (a row or column of every slice, through the body), and
  * AP and lateral projections (the mean attenuation along y or x, scaled to a random
    "HU" range), which is roughly what a CT localizer looks like,
stretched in z by a random factor (the z spacing of the sources varies and is not the pixel
spacing) and placed on air. Sparse stacks (every 3rd slice, or neck + a few head and chest
slices) give blocky planes; they are still clearly not axial slices.

Only series of the requested split are used, so training gets training patients only and the
held-out check (`evaluate --nonaxial`) uses held-out patients only.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data import Dataset

AIR_HU = -1024.0
KINDS = ("coronal", "sagittal", "scout-ap", "scout-lateral")


def _stacks(ds: Dataset, mask: np.ndarray, min_slices: int):
    """(series_uid, HU volume [z, S, S] float32, superior first) of every series in `mask`
    with at least `min_slices` images at distinct z."""
    idx = np.flatnonzero(mask & np.isfinite(ds.z_mm))
    for uid in sorted(set(ds.series_uid[idx])):
        rows = idx[ds.series_uid[idx] == uid]
        _, first = np.unique(ds.z_mm[rows], return_index=True)
        rows = rows[first]
        if len(rows) < min_slices:
            continue
        rows = rows[np.argsort(-ds.z_mm[rows], kind="stable")]  # LPS z grows superiorly
        vol = ds.images[rows].astype(np.float32) - ds.hu_offset
        yield uid, vol


def _place(plane: np.ndarray, S: int, rng: np.random.Generator) -> np.ndarray:
    """A [z, w] plane → S×S on air: width scaled to a random share of S, height (z) stretched
    by an independent random factor, both at most S."""
    width = int(S * rng.uniform(0.6, 1.0))
    height = int(min(S, max(S * 0.3, width * rng.uniform(0.4, 1.6))))
    t = torch.from_numpy(np.ascontiguousarray(plane))[None, None]
    img = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()
    out = np.full((S, S), AIR_HU, np.float32)
    y0 = int(rng.integers(0, S - height + 1))
    x0 = (S - width) // 2
    out[y0:y0 + height, x0:x0 + width] = img
    return out


def _through_body(fill: np.ndarray, rng: np.random.Generator) -> int:
    """An index along one axis where the body is, weighted towards its middle."""
    inside = np.flatnonzero(fill > 0.25 * fill.max())
    lo, hi = inside.min(), inside.max()
    return int(np.clip(round(rng.normal((lo + hi) / 2, (hi - lo) / 6 + 1e-6)), lo, hi))


def make(ds: Dataset, split: str, seed: int, kinds=KINDS, min_slices: int = 8):
    """Synthetic non-axial images of the series of `split`: (uint16 images [n, S, S] as in the
    dataset, i.e. HU + hu_offset; kind names [n]). One image per kind per series; seeded."""
    rng = np.random.default_rng(seed)
    S = ds.input_size
    images, names = [], []
    for _, vol in _stacks(ds, ds.split == split, min_slices):
        body = vol > -500
        for kind in kinds:
            if kind == "coronal":
                plane = vol[:, _through_body(body.mean(axis=(0, 2)), rng), :]
            elif kind == "sagittal":
                plane = vol[:, :, _through_body(body.mean(axis=(0, 1)), rng)]
            else:
                # Mean attenuation along the beam, 0 for air, scaled so that the densest ray
                # gets a random value between soft tissue and bone.
                mu = np.clip(vol - AIR_HU, 0, None).mean(axis=1 if kind == "scout-ap" else 2)
                plane = AIR_HU + mu / max(float(mu.max()), 1e-6) * rng.uniform(900, 3000)
            images.append(_place(plane, S, rng))
            names.append(kind)
    if not images:
        return np.zeros((0, S, S), np.uint16), np.array([], dtype=str)
    hu = np.stack(images)
    return (np.clip(np.round(hu) + ds.hu_offset, 0, 65535).astype(np.uint16),
            np.array(names, dtype=str))
