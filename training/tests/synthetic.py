"""A tiny synthetic dataset in the contract's format (dataset.json, manifest.csv, 16-bit PNGs
of HU + 32768), with one crude "anatomy" per class, so tests run anywhere without real CT."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np

from training.data import CLASSES, MANIFEST_COLUMNS, write_png16

HU_OFFSET = 32768


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def phantom(label: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One axial slice in HU: air, a body outline and a class-specific pattern."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # [0, 1)
    cy, cx = 0.5 + rng.uniform(-0.04, 0.04, 2)
    s = rng.uniform(0.9, 1.1)
    img = np.full((size, size), -1000.0, np.float32)
    if label == "legs":  # two separate thighs with a bright femur each
        for side in (-1, 1):
            img[_ellipse(yy, xx, cy, cx + side * 0.2 * s, 0.17 * s, 0.15 * s)] = 30
            img[_ellipse(yy, xx, cy, cx + side * 0.2 * s, 0.04 * s, 0.04 * s)] = 900
        return img + rng.normal(0, 10, img.shape)
    body_r = {"neck": (0.22, 0.24)}.get(label, (0.32, 0.42))
    img[_ellipse(yy, xx, cy, cx, body_r[0] * s, body_r[1] * s)] = 30  # soft tissue
    if label == "neck":  # small body, vertebra, airway
        img[_ellipse(yy, xx, cy + 0.08, cx, 0.05, 0.05)] = 800
        img[_ellipse(yy, xx, cy - 0.08, cx, 0.03, 0.03)] = -950
    elif label == "lungs":  # two large air-filled lungs
        for side in (-1, 1):
            img[_ellipse(yy, xx, cy, cx + side * 0.18 * s, 0.22 * s, 0.13 * s)] = -850
    elif label == "liver":  # large homogeneous organ on the patient's right (image left)
        img[_ellipse(yy, xx, cy, cx - 0.14 * s, 0.22 * s, 0.2 * s)] = 110
    elif label == "pelvis":  # bony ring
        ring = _ellipse(yy, xx, cy, cx, 0.25 * s, 0.33 * s) & ~_ellipse(yy, xx, cy, cx, 0.2 * s, 0.27 * s)
        img[ring] = 700
    elif label == "other":  # bowel gas bubbles
        for _ in range(6):
            by, bx = cy + rng.uniform(-0.2, 0.2), cx + rng.uniform(-0.3, 0.3)
            img[_ellipse(yy, xx, by, bx, 0.03, 0.03)] = -900
    elif label == "ambiguous":  # lungs over liver
        img[_ellipse(yy, xx, cy, cx - 0.14 * s, 0.22 * s, 0.2 * s)] = 110
        img[_ellipse(yy, xx, cy, cx + 0.18 * s, 0.22 * s, 0.13 * s)] = -850
    return img + rng.normal(0, 10, img.shape)


def write_dataset(out: Path, size: int = 32, patients: int = 12, per_class: int = 3,
                  seed: int = 0) -> Path:
    """Patients 0..n-5 train, the next two val, the last two test; each has every class."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, counts, splits = [], {}, {}
    for p in range(patients):
        split = "train" if p < patients - 4 else ("val" if p < patients - 2 else "test")
        key = hashlib.sha256(f"synthetic-{p}".encode()).hexdigest()[:16]
        labels = [c for c in CLASSES for _ in range(per_class)] + ["ambiguous"]
        for i, label in enumerate(labels):
            hu = phantom(label, size, rng)
            name = f"images/{key}_{i:03d}.png"
            write_png16(out / name, np.clip(np.round(hu) + HU_OFFSET, 0, 65535).astype(np.uint16))
            rows.append({"image": name, "patient_key": key, "study_uid": f"2.25.{p}",
                         "series_uid": f"2.25.{p}.1", "sop_instance_uid": f"2.25.{p}.1.{i}",
                         "z_mm": f"{-10.0 * i:.1f}", "label": label, "label_source": "synthetic",
                         "split": split})
            counts[label] = counts.get(label, 0) + 1
            splits.setdefault(split, {})[label] = splits.setdefault(split, {}).get(label, 0) + 1
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    (out / "dataset.json").write_text(json.dumps({
        "format": "anatomy-node-dataset/1", "input_size": size, "hu_offset": HU_OFFSET,
        "images": len(rows), "patients": patients, "counts": counts, "splits": splits,
        "name": "synthetic",
    }, indent=2))
    return out
