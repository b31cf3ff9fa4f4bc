"""Self-supervised pre-training: where along the body is a slice? (body-part regression).

Labels are scarce and come from a few sources; the position of a slice in its own series is known
for every CT volume, labelled or not (its z in millimetres). Following Yan et al. 2018
("Unsupervised body part regression via spatially self-ordering convolutional neural networks"),
a network gives each axial slice one score, trained so that within a series
  * the order of scores follows the order along the body (head → feet: the score grows), and
  * score differences follow the distance in millimetres (`mm_per_unit` mm per unit),
for slices drawn from the same series and augmented independently. Nothing here reads a class
label: every image of the named splits of every dataset given counts, `ambiguous` ones, test
sources and a site's own unlabelled series included. The backbone (stem and residual stages)
then initialises the classifier (`train --init`), whose head is trained from scratch.

What the card found: see models/README.md, "Self-supervised pre-training".
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .augment import AugmentConfig, augment, preprocess
from .data import Dataset, load as load_dataset
from .model import build, count_parameters
from .train import _lr_at

PRETRAIN_FORMAT = "anatomy-pretrain-checkpoint/1"
# Pairs closer than this along z say nothing about order (same slice, or overlapping ones).
MIN_GAP_MM = 5.0


@dataclass
class PretrainConfig:
    data: tuple = ()  # datasets (folders or .npz); every image of `splits` of each is used
    splits: tuple = ("train", "val")
    val_split: str = "val"  # whose series the order accuracy is reported on (never trained on)
    out: str = "training/runs/pretrain"
    hu_window: tuple = (-100.0, 200.0)
    epochs: int = 20
    series_per_batch: int = 16
    slices_per_series: int = 4
    lr: float = 2e-3
    weight_decay: float = 5e-4
    mm_per_unit: float = 100.0  # one score unit = 10 cm along the body
    distance_weight: float = 1.0
    width: int = 32
    blocks: tuple = (1, 1, 1, 1)
    seed: int = 2015
    device: str = "cpu"
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(pair_p=0.0))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["data"], d["splits"] = list(self.data), list(self.splits)
        d["hu_window"], d["blocks"] = list(self.hu_window), list(self.blocks)
        return d


@dataclass
class Volumes:
    """Images of several series, each series' indices sorted head to foot."""
    hu: torch.Tensor  # int16 [n, S, S]
    z_mm: torch.Tensor  # float32 [n]
    series: list  # list of LongTensor index arrays, one per series with >= 2 distinct z

    @property
    def images(self) -> int:
        return sum(len(s) for s in self.series)


def series_groups(series_uid: np.ndarray, z_mm: np.ndarray) -> list[np.ndarray]:
    """Index arrays of the series that can teach order: two or more images whose z is known and
    differs by at least MIN_GAP_MM; each sorted by decreasing z (DICOM +z is the head)."""
    groups = []
    known = ~np.isnan(z_mm)
    for uid in np.unique(series_uid[known]):
        idx = np.flatnonzero((series_uid == uid) & known)
        if len(idx) >= 2 and np.ptp(z_mm[idx]) >= MIN_GAP_MM:
            groups.append(idx[np.argsort(-z_mm[idx], kind="stable")])
    return groups


def gather_volumes(datasets: list[Dataset], splits: tuple, device) -> Volumes:
    """Every image of `splits` of every dataset, grouped by series; series with one image or one
    z (single key-images) cannot teach order and are left out."""
    hu, z, series, offset = [], [], [], 0
    for ds in datasets:
        part = ds.subset(np.isin(ds.split, list(splits)))
        groups = series_groups(part.series_uid, part.z_mm)
        keep = np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64)
        remap = {int(old): new for new, old in enumerate(keep)}
        series += [torch.tensor([offset + remap[int(i)] for i in g], dtype=torch.long) for g in groups]
        values = np.clip(part.images[keep].astype(np.int32) - part.hu_offset, -32768, 32767)
        hu.append(torch.from_numpy(values.astype(np.int16)))
        z.append(torch.from_numpy(part.z_mm[keep].astype(np.float32)))
        offset += len(keep)
    if not series:
        raise ValueError(f"no series with two or more images at different z in splits {list(splits)}")
    return Volumes(torch.cat(hu).to(device), torch.cat(z).to(device), series)


def draw_batch(vol: Volumes, series_per_batch: int, per_series: int, gen: torch.Generator) -> torch.Tensor:
    """[B, k] image indices: B series drawn uniformly, k images of each (with replacement when the
    series is shorter; pairs of equal z are masked out by the loss)."""
    picks = torch.randint(len(vol.series), (series_per_batch,), generator=gen)
    rows = []
    for p in picks.tolist():
        members = vol.series[p]
        rows.append(members[torch.randint(len(members), (per_series,), generator=gen)])
    return torch.stack(rows)


def order_and_distance_loss(scores: torch.Tensor, z_mm: torch.Tensor, mm_per_unit: float,
                            distance_weight: float) -> tuple[torch.Tensor, dict]:
    """scores, z_mm: [B, k]. For every pair of one series more than MIN_GAP_MM apart: the slice
    nearer the feet must score higher (logistic order loss) and the score difference must equal
    the distance in units of mm_per_unit (smooth L1)."""
    ds = scores[:, :, None] - scores[:, None, :]  # s_i - s_j
    dz = z_mm[:, :, None] - z_mm[:, None, :]  # z_i - z_j; > 0: i nearer the head
    pairs = dz.abs() >= MIN_GAP_MM
    if not pairs.any():
        zero = scores.sum() * 0.0
        return zero, {"order": 0.0, "distance": 0.0, "pairs": 0}
    # i nearer the head (dz > 0) must have s_i < s_j: softplus(ds) for those, softplus(-ds) else
    order = F.softplus(ds * torch.sign(dz))[pairs].mean()
    distance = F.smooth_l1_loss(ds[pairs], (-dz / mm_per_unit)[pairs])
    loss = order + distance_weight * distance
    return loss, {"order": float(order.detach()), "distance": float(distance.detach()), "pairs": int(pairs.sum())}


@torch.no_grad()
def score_slices(model, hu: torch.Tensor, low: float, high: float, batch: int = 256) -> torch.Tensor:
    model.eval()
    out = [model(preprocess(hu[i:i + batch].float().unsqueeze(1), low, high)).squeeze(1)
           for i in range(0, len(hu), batch)]
    return torch.cat(out) if out else torch.zeros(0)


def order_report(model, vol: Volumes, low: float, high: float, mm_per_unit: float) -> dict:
    """Over every pair of every series: how often the scores order the slices as z does, and the
    median error of the distance they imply (mm)."""
    scores = score_slices(model, vol.hu, low, high).cpu()
    z = vol.z_mm.cpu()
    right = total = 0
    errors = []
    for members in vol.series:
        s, zz = scores[members], z[members]
        ds = s[:, None] - s[None, :]
        dz = zz[:, None] - zz[None, :]
        upper = torch.triu(torch.ones_like(dz, dtype=torch.bool), 1) & (dz.abs() >= MIN_GAP_MM)
        right += int(((ds * dz) < 0)[upper].sum())
        total += int(upper.sum())
        errors.append((ds * mm_per_unit + dz)[upper].abs())
    err = torch.cat(errors) if errors else torch.zeros(0)
    return {"series": len(vol.series), "pairs": total,
            "order_accuracy": right / total if total else float("nan"),
            "median_distance_error_mm": float(err.median()) if len(err) else float("nan")}


def backbone_state(model) -> dict:
    """The weights `train --init` takes: everything but the head (fc)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("fc.")}


def run(cfg: PretrainConfig, log=print) -> dict:
    if not cfg.data:
        raise ValueError("no dataset given")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = torch.device(cfg.device)
    low, high = map(float, cfg.hu_window)
    datasets = [load_dataset(d) for d in cfg.data]
    sizes = {ds.input_size for ds in datasets}
    if len(sizes) != 1:
        raise ValueError(f"datasets of different input sizes {sorted(sizes)}: build them with one --size")
    train = gather_volumes(datasets, tuple(cfg.splits), device)
    val_splits = () if cfg.val_split in cfg.splits else (cfg.val_split,)
    val = None
    if val_splits:
        try:
            val = gather_volumes(datasets, val_splits, device)
        except ValueError:
            log(f"no {cfg.val_split} series with two or more z: order accuracy reported on training series")
    log(f"pre-training on {train.images} images of {len(train.series)} series "
        f"(splits {', '.join(cfg.splits)} of {len(datasets)} dataset(s)); no class label is read")
    model = build({"num_classes": 1, "width": cfg.width, "blocks": list(cfg.blocks), "dropout": 0.0}).to(device)
    log(f"model: {count_parameters(model):,} parameters, one score per slice")
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    per_batch = cfg.series_per_batch * cfg.slices_per_series
    steps = max(1, math.ceil(train.images / per_batch))
    total = steps * cfg.epochs
    warmup = max(1, total // 20)  # train's schedule: linear warm-up, then cosine decay
    gen = torch.Generator().manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    history, step = [], 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0, sums = time.perf_counter(), {"loss": 0.0, "order": 0.0, "distance": 0.0}
        for _ in range(steps):
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, warmup, cfg.lr)
            idx = draw_batch(train, cfg.series_per_batch, cfg.slices_per_series, gen).to(device)
            x = augment(train.hu[idx.flatten()].float().unsqueeze(1), low, high, cfg.augment, gen)
            scores = model(x).view(idx.shape)
            loss, parts = order_and_distance_loss(scores, train.z_mm[idx], cfg.mm_per_unit, cfg.distance_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sums["loss"] += float(loss.detach())
            sums["order"] += parts["order"]
            sums["distance"] += parts["distance"]
        rec = {"epoch": epoch} | {k: v / steps for k, v in sums.items()} | {"epoch_s": time.perf_counter() - t0}
        rec["val"] = order_report(model, val or train, low, high, cfg.mm_per_unit)
        history.append(rec)
        log(f"epoch {epoch:3d}/{cfg.epochs} loss={rec['loss']:.4f} (order {rec['order']:.4f}, distance "
            f"{rec['distance']:.4f}) | {'val' if val else 'train'} order accuracy "
            f"{100 * rec['val']['order_accuracy']:.1f}% over {rec['val']['pairs']} pairs, median distance error "
            f"{rec['val']['median_distance_error_mm']:.0f} mm | {rec['epoch_s']:.1f} s")
    final = history[-1]["val"]
    path = out / "pretrain.pt"
    torch.save({"format": PRETRAIN_FORMAT, "state_dict": backbone_state(model),
                "model_config": {"width": cfg.width, "blocks": list(cfg.blocks)},
                "input_size": next(iter(sizes)), "pretrain_config": cfg.to_dict(), "metrics": final}, path)
    (out / "metrics.json").write_text(json.dumps({"final": final, "history": history}, indent=2, default=float))
    log(f"checkpoint: {path}")
    return final


class InitError(ValueError):
    pass


def load_backbone(path: str | Path, model) -> int:
    """Copy a pre-trained backbone into `model` (built with the same width and blocks); the head
    stays as built. Returns the number of tensors copied."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise InitError(f"{path}: cannot read ({e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != PRETRAIN_FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise InitError(f"{path}: format {got!r}, expected {PRETRAIN_FORMAT!r} (written by `pretrain`)")
    want = {"width": model.config["width"], "blocks": list(model.config["blocks"])}
    have = {k: ckpt["model_config"].get(k) for k in want}
    if have != want:
        raise InitError(f"{path}: model_config {have} differs from the classifier's {want}")
    own = model.state_dict()
    for name, value in ckpt["state_dict"].items():
        if name not in own or own[name].shape != value.shape:
            raise InitError(f"{path}: tensor {name} does not fit the classifier")
    model.load_state_dict(ckpt["state_dict"], strict=False)
    return len(ckpt["state_dict"])
