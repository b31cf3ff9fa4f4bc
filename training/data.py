"""Reading the dataset contract (docs/contracts.md, "Dataset folder") and packing it.

A dataset is either
  * the folder written by `anatomy-node dataset build`: dataset.json, manifest.csv and one
    16-bit PNG per row holding HU + hu_offset, or
  * one compressed .npz written by `pack` from such a folder, which needs only numpy to read
    (the GPU machine may lack Pillow and has no network).

Both load into the same `Dataset`: uint16 images plus per-image string arrays. Windowing and
normalisation are done later, in torch (`to_unit`), so that one dataset serves any window.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The five classes of Roth et al. 2015 in the contract's order, plus `other` as the shipped
# model's sixth class. `ambiguous` is a dataset label, never a class: kept, never trained on
# nor scored.
CLASSES = ("neck", "lungs", "liver", "pelvis", "legs", "other")
AMBIGUOUS = "ambiguous"
DATASET_FORMAT = "anatomy-node-dataset/1"
# Contract step 4 (docs/contracts.md): how an image becomes the square the model sees.
FRAMINGS = ("whole", "body")
MANIFEST_COLUMNS = (
    "image", "patient_key", "study_uid", "series_uid", "sop_instance_uid",
    "z_mm", "label", "label_source", "split",
)
# Per-image string columns carried into the .npz (image paths are kept for traceability).
_STR_COLUMNS = ("image", "patient_key", "series_uid", "label", "label_source", "split")


@dataclass
class Dataset:
    images: np.ndarray  # uint16 [n, S, S], value = HU + hu_offset
    image: np.ndarray  # str [n], path relative to the dataset folder
    patient_key: np.ndarray  # str [n]
    series_uid: np.ndarray  # str [n]
    label: np.ndarray  # str [n]
    label_source: np.ndarray  # str [n]
    split: np.ndarray  # str [n]
    z_mm: np.ndarray  # float64 [n] (NaN where empty)
    info: dict  # dataset.json
    hu_offset: int
    source: str  # where it was read from

    def __len__(self) -> int:
        return len(self.label)

    @property
    def input_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def field_of_view_mm(self) -> float | None:
        """Millimetres every image spans (`dataset build --field-of-view`); None: fitted whole."""
        mm = self.info.get("field_of_view_mm")
        return None if mm is None else float(mm)

    @property
    def framing(self) -> str:
        """How every image was framed (`dataset build --framing`): "whole" (the image fitted
        whole, or a fixed field of view) or "body" (the square around the body, resized)."""
        framing = self.info.get("framing") or "whole"
        if framing not in FRAMINGS:
            raise ValueError(f"{self.source}: dataset.json framing {framing!r} is not one of {list(FRAMINGS)}")
        return framing

    def targets(self, classes=CLASSES) -> np.ndarray:
        """Class index per image; -1 for `ambiguous` (never trained on nor scored)."""
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(self.label) - set(index) - {AMBIGUOUS})
        if unknown:
            raise ValueError(f"{self.source}: labels {unknown} are neither classes {list(classes)} nor '{AMBIGUOUS}'")
        return np.array([index.get(lbl, -1) for lbl in self.label], dtype=np.int64)

    def subset(self, mask: np.ndarray) -> "Dataset":
        mask = np.asarray(mask)
        pick = lambda a: a[mask]
        return Dataset(
            images=pick(self.images), image=pick(self.image), patient_key=pick(self.patient_key),
            series_uid=pick(self.series_uid), label=pick(self.label),
            label_source=pick(self.label_source), split=pick(self.split), z_mm=pick(self.z_mm),
            info=self.info, hu_offset=self.hu_offset, source=self.source,
        )

    def summary(self, classes=CLASSES) -> str:
        """One line for the model's `trained_on` metadata and logs."""
        name = self.info.get("name") or Path(self.source).name
        build = self.info.get("format", DATASET_FORMAT)
        if self.info.get("labels_file") and not self.info.get("name"):
            # written by `anatomy-node dataset build`: name what it was built from, and how
            name = self.info["labels_file"]
            ratios = "/".join(f"{float(v):g}" for v in self.info.get("split_ratios", []))
            fov = f", field of view {self.field_of_view_mm:g} mm" if self.field_of_view_mm else ""
            fov += ", framed to the body" if self.framing == "body" else ""
            build = (f"anatomy-node dataset build, {build}, size {self.input_size}{fov}, "
                     f"seed {self.info.get('seed')}, split {ratios}")
        parts = [f"{name} ({build})",
                 f"{len(self)} images", f"{len(set(self.patient_key))} patients"]
        for s in ("train", "val", "test"):
            m = self.split == s
            if m.any():
                parts.append(f"{s} {int(m.sum())} img/{len(set(self.patient_key[m]))} pat")
        return ", ".join(parts)


def read_png16(path: Path) -> np.ndarray:
    from PIL import Image  # only the folder path needs Pillow

    with Image.open(path) as im:
        if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
            raise ValueError(f"{path}: expected a 16-bit grayscale PNG, got mode {im.mode}")
        return np.asarray(im).astype(np.uint16)


def write_png16(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint16)).save(path)


def load_folder(folder: str | Path, limit: int | None = None) -> Dataset:
    folder = Path(folder)
    info = json.loads((folder / "dataset.json").read_text())
    if info.get("format", DATASET_FORMAT) != DATASET_FORMAT:
        raise ValueError(f"{folder}/dataset.json: format {info.get('format')!r}, expected {DATASET_FORMAT!r}")
    with open(folder / "manifest.csv", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{folder}/manifest.csv: missing columns {missing}")
        rows = list(reader)
    if limit:
        rows = _limit_rows(rows, limit)
    size = int(info["input_size"])
    images = np.empty((len(rows), size, size), dtype=np.uint16)
    for i, row in enumerate(rows):
        img = read_png16(folder / row["image"])
        if img.shape != (size, size):
            raise ValueError(f"{row['image']}: shape {img.shape}, dataset.json says input_size {size}")
        images[i] = img
    col = lambda name: np.array([r[name] for r in rows], dtype=str)
    return Dataset(
        images=images, image=col("image"), patient_key=col("patient_key"),
        series_uid=col("series_uid"), label=col("label"), label_source=col("label_source"),
        split=col("split"), z_mm=np.array([float(r["z_mm"]) if r["z_mm"] else np.nan for r in rows]),
        info=info, hu_offset=int(info.get("hu_offset", 32768)), source=str(folder),
    )


def _limit_rows(rows: list[dict], limit: int) -> list[dict]:
    """An evenly spaced subset that keeps every split and label represented (for quick runs)."""
    if limit >= len(rows):
        return rows
    idx = np.linspace(0, len(rows) - 1, limit).round().astype(int)
    return [rows[i] for i in sorted(set(idx.tolist()))]


def pack(folder: str | Path, out: str | Path) -> Path:
    """Folder → one compressed .npz (uint16 images + string arrays + dataset.json text)."""
    ds = load_folder(folder)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out, images=ds.images, z_mm=ds.z_mm,
        dataset_json=np.array(json.dumps(ds.info)),
        **{c: getattr(ds, c) for c in _STR_COLUMNS},
    )
    return out


def read_npz_arrays(path: str | Path) -> tuple[dict, dict]:
    """A packed dataset as its raw arrays plus its dataset.json, for tools that rewrite it."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads(str(arrays["dataset_json"]))


def write_npz_arrays(path: str | Path, arrays: dict, info: dict) -> None:
    """The inverse of read_npz_arrays: `info` becomes the stored dataset.json."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **(arrays | {"dataset_json": np.array(json.dumps(info))}))


def load_npz(path: str | Path, limit: int | None = None) -> Dataset:
    # allow_pickle=False: string arrays are stored as fixed-width unicode, not objects.
    with np.load(path, allow_pickle=False) as z:
        info = json.loads(str(z["dataset_json"]))
        n = len(z["label"])
        idx = np.arange(n)
        if limit and limit < n:
            idx = np.unique(np.linspace(0, n - 1, limit).round().astype(int))
        cols = {c: z[c][idx] for c in _STR_COLUMNS}
        return Dataset(images=z["images"][idx], z_mm=z["z_mm"][idx], info=info,
                       hu_offset=int(info.get("hu_offset", 32768)), source=str(path), **cols)


def load(path: str | Path, limit: int | None = None) -> Dataset:
    """A dataset folder or a packed .npz."""
    path = Path(path)
    if path.is_dir():
        return load_folder(path, limit)
    if path.suffix == ".npz":
        return load_npz(path, limit)
    raise ValueError(f"{path}: neither a dataset folder nor a .npz from `pack`")


def to_unit(hu, low: float, high: float):
    """The contract's normalisation: (clamp(hu, low, high) - low) / (high - low), in [0, 1].

    Works on torch tensors and numpy arrays alike.
    """
    if hasattr(hu, "clamp"):
        return (hu.clamp(low, high) - low) / (high - low)
    return (np.clip(hu, low, high) - low) / (high - low)
