"""Training loop: patient-level splits, class-balanced sampling, batched tensor augmentation,
early stopping on the validation patients, temperature scaling, checkpoints and metrics.

Everything after loading runs on tensors on one device: the whole dataset (int16 HU, ~260 MB
for 2000 images at 256×256) sits on the GPU and a batch is gathered by index, so there is no
DataLoader and no worker process to make runs irreproducible or slow.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import calibrate, metrics, nonaxial
from .data import CLASSES, Dataset, load as load_dataset
from .augment import AugmentConfig, augment, body_fill, preprocess
from .model import build, count_parameters

CHECKPOINT_FORMAT = "anatomy-training-checkpoint/1"


@dataclass
class TrainConfig:
    data: str = ""
    out: str = "training/runs/latest"
    classes: tuple = CLASSES
    hu_window: tuple = (-100.0, 200.0)
    epochs: int = 80
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 5e-4
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.05
    balance: str = "sampler"  # sampler | loss | none
    balance_power: float = 1.0  # class weight = count^-power (1: fully balanced, 0.5: softer)
    # Pseudo-labelled training images (label_source `pseudo:<model>`, the node's own confident,
    # order-consistent predictions mined by `anatomy-node mine`) are drawn this many times as
    # often as a human-labelled image of the same class; 0: never trained on.
    pseudo_weight: float = 1.0
    width: int = 32
    blocks: tuple = (2, 2, 2, 2)
    dropout: float = 0.2
    patience: int = 25
    # Exponential moving average of the weights (0: off): validation, selection, calibration and
    # the export use the average, which moves less from one step to the next than the weights
    # themselves (steadier validation on few patients; flatter minima generalise further).
    ema: float = 0.0
    # Which epoch's weights are kept: "best" (lowest validation NLL; early stopping) or "last"
    # (the final epoch, no early stopping): for validation patients that lack a class, e.g. a
    # leave-source-out run whose left-out source holds nearly all of one class, where the
    # validation NLL cannot see that class and the kept epoch would swing with the run.
    keep: str = "best"
    seed: int = 2015
    device: str = "cpu"
    amp: bool = False  # bf16 autocast (CUDA)
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = True
    limit: int = 0  # use only this many images (evenly spaced), for quick runs
    steps_per_epoch: int = 0  # 0: one pass over the number of training images
    eval_batch_size: int = 256
    model_version: str = "anatomy-convnet-dev"
    # classes whose crops augment.pair_composite may turn into a left-right pair
    pair_classes: tuple = ("legs", "pelvis")
    # add synthetic non-axial/scout images of the training series as `other` (nonaxial.py);
    # needs an `other` class; series with fewer images are skipped
    nonaxial: bool = True
    nonaxial_min_slices: int = 8
    # a backbone from `pretrain` (self-supervised body-part regression) to start from; "": none
    init: str = ""
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["classes"], d["hu_window"], d["blocks"] = list(self.classes), list(self.hu_window), list(self.blocks)
        d["pair_classes"] = list(self.pair_classes)
        return d


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        # cuBLAS needs this before its first use to be deterministic
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def check_patient_splits(ds: Dataset) -> None:
    """Splits are by patient (contract): a patient in two splits would leak, so refuse."""
    seen: dict[str, str] = {}
    for p, s in zip(ds.patient_key, ds.split):
        if seen.setdefault(p, s) != s:
            raise ValueError(f"patient {p} is in splits {seen[p]!r} and {s!r}; splits must be by patient")


def hu_tensor(ds: Dataset, device) -> torch.Tensor:
    """uint16 HU+offset → int16 HU on the device (exact for the contract's offset 32768)."""
    hu = np.clip(ds.images.astype(np.int32) - ds.hu_offset, -32768, 32767).astype(np.int16)
    return torch.from_numpy(hu).to(device)


def nonaxial_report(model, ds: Dataset, split: str, cfg: "TrainConfig", temperature: float) -> dict:
    """How the model answers synthetic non-axial/scout images of one split's patients."""
    if "other" not in cfg.classes:
        return {"images": 0}
    images, kinds = nonaxial.make(ds, split, cfg.seed + 1, min_slices=cfg.nonaxial_min_slices)
    if not len(images):
        return {"images": 0}
    hu = torch.from_numpy(images.astype(np.int32) - ds.hu_offset).to(torch.int16)
    low, high = map(float, cfg.hu_window)
    logits = predict_logits(model, hu.to(next(model.parameters()).device), low, high, cfg.eval_batch_size)
    return metrics.other_report(torch.softmax(logits / temperature, 1).numpy(), kinds, cfg.classes)


def sample_weights(targets: np.ndarray, num_classes: int, power: float = 1.0) -> np.ndarray:
    """Per-image weights ∝ count(class)^-power: with power 1 every class gets the same expected
    share of each batch; a smaller power repeats the few images of rare classes less often."""
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    return counts[targets] ** -power


PSEUDO_PREFIX = "pseudo:"


def is_pseudo(label_source: np.ndarray) -> np.ndarray:
    """Rows whose label is a pseudo label (`pseudo:<model version>`), not a human one."""
    return np.char.startswith(np.asarray(label_source).astype(str), PSEUDO_PREFIX)


def pseudo_sampling_weights(weights: np.ndarray, pseudo: np.ndarray, pseudo_weight: float) -> np.ndarray:
    """The sampling weights with pseudo-labelled images' scaled by `pseudo_weight` (0 drops them)."""
    if pseudo_weight < 0:
        raise ValueError(f"pseudo_weight {pseudo_weight}: must be >= 0")
    out = np.asarray(weights, dtype=np.float64).copy()
    out[np.asarray(pseudo, dtype=bool)] *= pseudo_weight
    if not (out > 0).any():
        raise ValueError("no training image left to draw (every one is pseudo-labelled and pseudo_weight is 0)")
    return out


@torch.no_grad()
def predict_logits(model, hu: torch.Tensor, low: float, high: float, batch_size: int,
                   amp: bool = False, channels_last: bool = False) -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(hu), batch_size):
        x = preprocess(hu[i:i + batch_size].float().unsqueeze(1), low, high)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            out.append(model(x).float())
    return torch.cat(out).cpu() if out else torch.zeros(0, _plain(model).fc.out_features)


def calibrate_and_score(scored: dict, classes, log=print) -> tuple[float, dict]:
    """Temperature scaling on the validation patients, then the calibrated report of each split.
    `scored`: split → (logits, targets) of scored images; a split without images is left out,
    and without validation images T stays 1."""
    temperature = 1.0
    if "val" in scored and len(scored["val"][0]):
        val_logits, val_targets = scored["val"]
        temperature = calibrate.fit_temperature(val_logits, val_targets)
        log(f"temperature {temperature:.4f}: val NLL {calibrate.nll(val_logits, val_targets):.4f} → "
            f"{calibrate.nll(val_logits, val_targets, temperature):.4f}")
    reports = {}
    for split, (logits, targets) in scored.items():
        if len(logits):
            r = metrics.classification_report(torch.softmax(logits / temperature, 1).numpy(), targets.numpy(), classes)
            reports[split] = r
            log(f"{split} (calibrated): {metrics.format_report(r, classes)}")
            log(metrics.format_confusion(r, classes))
    return temperature, reports


def save_checkpoint(path: Path, model, cfg: TrainConfig, ds_summary: str, input_size: int,
                    temperature: float, epoch: int, scores: dict,
                    field_of_view_mm: float | None = None, framing: str = "whole") -> None:
    state = {k: v.detach().cpu() for k, v in _plain(model).state_dict().items()}
    torch.save({
        "format": CHECKPOINT_FORMAT,
        "state_dict": state,
        "model_config": _plain(model).config,
        "classes": list(cfg.classes),
        "input_size": int(input_size),
        "field_of_view_mm": field_of_view_mm,
        "framing": framing,
        "hu_window": [float(v) for v in cfg.hu_window],
        "temperature": float(temperature),
        "model_version": cfg.model_version,
        "trained_on": ds_summary,
        "train_config": cfg.to_dict(),
        "epoch": int(epoch),
        "metrics": scores,
    }, path)


def load_checkpoint(path, device="cpu"):
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a checkpoint of this package (format {ckpt.get('format')!r})")
    model = build(ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def _plain(model):
    return getattr(model, "_orig_mod", model)  # unwrap torch.compile


class WeightAverage:
    """An exponential moving average of a model's parameters and float buffers (BatchNorm
    statistics); integer buffers are copied. The decay ramps up as (1 + n) / (10 + n) so that
    the average does not keep the random initial weights for the first hundreds of steps."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema {decay}: expected 0 < decay < 1 (0 turns it off)")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        live = model.state_dict()
        for name, avg in self.model.state_dict().items():
            value = live[name].detach()
            if avg.dtype.is_floating_point:
                avg.mul_(d).add_(value.to(avg.dtype), alpha=1 - d)
            else:
                avg.copy_(value)


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def run(cfg: TrainConfig, log=print) -> dict:
    seed_everything(cfg.seed, cfg.deterministic)
    device = torch.device(cfg.device)
    low, high = map(float, cfg.hu_window)
    if not low < high:
        raise ValueError(f"hu_window {cfg.hu_window}: low must be < high")
    if cfg.keep not in ("best", "last"):
        raise ValueError(f"keep {cfg.keep!r}: expected best or last")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    ds = load_dataset(cfg.data, cfg.limit or None)
    check_patient_splits(ds)
    targets = ds.targets(cfg.classes)
    summary = ds.summary(cfg.classes)
    log(f"dataset: {summary}")
    split = {s: (ds.split == s) & (targets >= 0) for s in ("train", "val", "test")}
    # Validation (early stopping, calibration) and the test figures read human labels only,
    # as `anatomy-node eval --labels human` and deploy/mine-retrain.sh do; pseudo labels train.
    human = ~is_pseudo(ds.label_source)
    for s in ("val", "test"):
        left_out = int((split[s] & ~human).sum())
        if left_out and (split[s] & human).any():
            split[s] &= human
            log(f"{s}: {left_out} pseudo-labelled images not scored (human labels only)")
    ambiguous = int((targets < 0).sum())
    log("scored images per split: " + ", ".join(f"{s}={int(m.sum())}" for s, m in split.items())
        + f" (ambiguous, not used: {ambiguous})")
    if not split["train"].any():
        raise ValueError("no training images (split == 'train' with a class label)")
    C = len(cfg.classes)
    hu = {s: hu_tensor(ds.subset(m), device) for s, m in split.items()}
    tgt = {s: torch.from_numpy(targets[m]) for s, m in split.items()}
    S = ds.input_size
    train_t = targets[split["train"]]
    synthetic = 0
    if cfg.nonaxial and "other" in cfg.classes:
        extra, kinds = nonaxial.make(ds, "train", cfg.seed, min_slices=cfg.nonaxial_min_slices)
        synthetic = len(extra)
        if synthetic:
            extra_hu = torch.from_numpy(extra.astype(np.int32) - ds.hu_offset).to(torch.int16)
            hu["train"] = torch.cat([hu["train"], extra_hu.to(device)])
            extra_t = np.full(synthetic, cfg.classes.index("other"), dtype=np.int64)
            tgt["train"] = torch.cat([tgt["train"], torch.from_numpy(extra_t)])
            train_t = np.concatenate([train_t, extra_t])
        log(f"synthetic non-axial/scout images of training series, as other: {synthetic} "
            f"({', '.join(f'{k}={int((kinds == k).sum())}' for k in nonaxial.KINDS)})")
    counts = np.bincount(train_t, minlength=C)
    log("train images per class: " + ", ".join(f"{c}={n}" for c, n in zip(cfg.classes, counts)))
    for c, n in zip(cfg.classes, counts):
        if n == 0:
            log(f"warning: class {c!r} has no training images; the model cannot learn it")

    model = build({"num_classes": C, "width": cfg.width, "blocks": list(cfg.blocks), "dropout": cfg.dropout})
    log(f"model: {count_parameters(model):,} parameters, input [N,1,{S},{S}], classes {list(cfg.classes)}")
    if cfg.init:
        from .pretrain import load_backbone  # pretrain imports train's schedule

        copied = load_backbone(cfg.init, model)
        log(f"backbone from {cfg.init}: {copied} tensors (self-supervised pre-training); head from scratch")
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if cfg.compile else model
    average = WeightAverage(model, cfg.ema) if cfg.ema else None
    scored = average.model if average else net  # what validation sees and what is kept

    # No weight decay on BatchNorm parameters and biases (decaying them only fights BN).
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)

    present = counts > 0
    loss_weight = None
    if cfg.balance == "loss":
        w = np.where(present, np.maximum(counts, 1) ** -cfg.balance_power, 0.0)
        w = w * counts.sum() / (w * counts).sum()  # mean weight per image 1
        loss_weight = torch.tensor(w, dtype=torch.float32, device=device)
    if cfg.balance == "sampler":
        weights = torch.from_numpy(sample_weights(train_t, C, cfg.balance_power))
    elif cfg.balance in ("loss", "none"):
        weights = torch.ones(len(train_t), dtype=torch.float64)
    else:
        raise ValueError(f"balance {cfg.balance!r}: expected sampler, loss or none")
    pseudo_train = np.concatenate([is_pseudo(ds.label_source[split["train"]]), np.zeros(synthetic, dtype=bool)])
    if pseudo_train.any() or cfg.pseudo_weight != 1.0:
        weights = torch.from_numpy(pseudo_sampling_weights(weights.numpy(), pseudo_train, cfg.pseudo_weight))
        log(f"pseudo-labelled training images: {int(pseudo_train.sum())} of {len(pseudo_train)}, "
            f"drawn with weight {cfg.pseudo_weight:g} against a human-labelled image")

    n_train = len(train_t)
    steps = cfg.steps_per_epoch or max(1, math.ceil(n_train / cfg.batch_size))
    total_steps = steps * cfg.epochs
    warmup = max(1, min(total_steps // 5, round(cfg.warmup_epochs * steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    train_hu, train_tgt = hu["train"], tgt["train"].to(device)
    pair_idx = [cfg.classes.index(c) for c in cfg.pair_classes if c in cfg.classes]
    pairable = torch.from_numpy(np.isin(train_t, pair_idx)) & (
        body_fill(train_hu.cpu().unsqueeze(1)) > cfg.augment.pair_min_fill)
    if cfg.augment.pair_p > 0 and pair_idx:
        log(f"crops that may become left-right pairs ({', '.join(cfg.pair_classes)}, body fill > "
            f"{cfg.augment.pair_min_fill}): {int(pairable.sum())} of {int(np.isin(train_t, pair_idx).sum())}")

    history, best, best_state, bad_epochs, step = [], None, None, 0, 0
    hist_file = open(out / "history.jsonl", "w")
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        t0 = time.perf_counter()
        # summed on the device: a .item() per step would stall the GPU queue
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        for _ in range(steps):
            lr = _lr_at(step, total_steps, warmup, cfg.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=gen)
            dev_idx = idx.to(device)
            x = augment(train_hu[dev_idx].float().unsqueeze(1), low, high, cfg.augment, gen, pairable[idx])
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = train_tgt[dev_idx]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y, weight=loss_weight, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if average:
                average.update(model)
            step += 1
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_time = time.perf_counter() - t0

        val_logits = predict_logits(scored, hu["val"], low, high, cfg.eval_batch_size, cfg.amp, cfg.channels_last)
        val = metrics.classification_report(torch.softmax(val_logits, 1).numpy(), tgt["val"].numpy(), cfg.classes)
        epoch_time = time.perf_counter() - t0
        rec = {"epoch": epoch, "lr": lr, "train_loss": float(loss_sum) / seen,
               "train_error": 1 - int(correct) / seen,
               "images_per_s": seen / train_time, "epoch_s": epoch_time, "val": val}
        history.append(rec)
        hist_file.write(json.dumps(rec) + "\n")
        hist_file.flush()
        log(f"epoch {epoch:3d}/{cfg.epochs} lr={lr:.2e} loss={rec['train_loss']:.4f} "
            f"train_err={100 * rec['train_error']:.1f}% | val {metrics.format_report(val, cfg.classes)} | "
            f"{rec['images_per_s']:.1f} img/s, {epoch_time:.1f} s")

        # Early stopping on validation NLL (smoother than the error on a few hundred slices);
        # without validation images, the last epoch is kept.
        key = (val["nll"], val["error"]) if val.get("images") and cfg.keep == "best" else (-epoch, 0)
        if best is None or key < best[0]:
            best = (key, epoch, val)
            best_state = {k: v.detach().clone() for k, v in _plain(scored).state_dict().items()}
            bad_epochs = 0
        else:
            bad_epochs += 1
            if cfg.patience and bad_epochs >= cfg.patience:
                log(f"early stop: no val improvement for {cfg.patience} epochs")
                break
    hist_file.close()

    _plain(net).load_state_dict(best_state)  # the kept weights (averaged, with ema) into the model
    best_epoch = best[1]
    log(f"best epoch {best_epoch}")

    # From here on fp32 (no autocast): calibration and the reported scores must be those of
    # the exported fp32 model, not of the bf16 training-time evaluation.
    scored = {s: (predict_logits(model, hu[s], low, high, cfg.eval_batch_size, False, cfg.channels_last), tgt[s])
              for s in ("val", "test")}
    temperature, calibrated = calibrate_and_score(scored, cfg.classes, log)
    scores = {"best_epoch": best_epoch, "temperature": temperature,
              "parameters": count_parameters(model), "input_size": S,
              "synthetic_other_train_images": synthetic} | calibrated
    for s in ("val", "test"):
        r = nonaxial_report(model, ds, s, cfg, temperature)
        if r["images"]:
            scores[f"{s}_nonaxial"] = r
            log(f"{s} synthetic non-axial/scout (held-out patients): {metrics.format_other(r)}")
    scores["history"] = [{k: v for k, v in h.items() if k != "val"} | {"val_error": h["val"].get("error"),
                          "val_nll": h["val"].get("nll"), "val_mean_auc": h["val"].get("mean_auc")}
                         for h in history]

    ckpt_path = out / "model.pt"
    save_checkpoint(ckpt_path, model, cfg, summary, S, temperature, best_epoch,
                    {k: v for k, v in scores.items() if k != "history"}, ds.field_of_view_mm, ds.framing)
    (out / "config.json").write_text(json.dumps(cfg.to_dict() | {"input_size": S, "trained_on": summary}, indent=2))
    (out / "metrics.json").write_text(json.dumps(scores, indent=2, default=float))
    log(f"checkpoint: {ckpt_path}")
    return scores
