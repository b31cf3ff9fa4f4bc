"""Several checkpoints → one ensemble checkpoint (model.Ensemble: the mean of the members' logits).

The members must be trained on the same dataset (same patients in validation) with the same
contract (classes, input size, HU window, field of view, framing); they differ by seed or
recipe. One temperature is fitted on the validation patients for the mean logits, as `train`
does for one net, so `export` writes the same contract graph (softmax(logits / T)) and
`evaluate` scores it like any checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .data import load as load_dataset
from .model import Ensemble, count_parameters
from .train import CHECKPOINT_FORMAT, calibrate_and_score, hu_tensor, load_checkpoint, predict_logits

# Keys that must agree between members: the model contract and the data they were trained on.
SHARED_KEYS = ("classes", "input_size", "hu_window", "field_of_view_mm", "framing", "trained_on")


class EnsembleError(ValueError):
    """Members that cannot be combined, or data that does not fit them."""


def _check_members(paths: list[Path], ckpts: list[dict]) -> None:
    if len(ckpts) < 2:
        raise EnsembleError("an ensemble needs at least two checkpoints")
    first = ckpts[0]
    for path, ckpt in zip(paths[1:], ckpts[1:]):
        for key in SHARED_KEYS:
            if ckpt.get(key) != first.get(key):
                raise EnsembleError(f"{path}: {key} {ckpt.get(key)!r} differs from {paths[0]}'s "
                                    f"{first.get(key)!r}; members must share the contract and the dataset")


def combine(checkpoints: list[str | Path], data: str | Path, out: str | Path,
            model_version: str | None = None, batch_size: int = 128, log=print) -> dict:
    """Write the ensemble checkpoint `out` and return its scores on the validation and test
    patients of `data` (the dataset the members were trained on)."""
    paths = [Path(p) for p in checkpoints]
    loaded = [load_checkpoint(p, "cpu") for p in paths]
    ckpts = [c for _, c in loaded]
    _check_members(paths, ckpts)
    first = ckpts[0]
    ensemble = Ensemble([net for net, _ in loaded]).eval()

    ds = load_dataset(data)
    if ds.input_size != first["input_size"]:
        raise EnsembleError(f"{data}: input_size {ds.input_size} != the members' {first['input_size']}")
    classes = list(first["classes"])
    targets = torch.from_numpy(ds.targets(classes))
    low, high = map(float, first["hu_window"])
    scored = {}
    for split in ("val", "test"):
        keep = torch.from_numpy(ds.split == split) & (targets >= 0)
        if keep.any():
            hu = hu_tensor(ds.subset(keep.numpy()), "cpu")
            scored[split] = (predict_logits(ensemble, hu, low, high, batch_size), targets[keep])
    if "val" not in scored:
        raise EnsembleError(f"{data}: no scored validation images to fit the temperature on")

    log(f"ensemble of {len(paths)}:")
    temperature, reports = calibrate_and_score(scored, classes, log)
    scores = {"temperature": temperature, "parameters": count_parameters(ensemble),
              "members": [{"checkpoint": str(p), "model_version": c["model_version"], "epoch": c["epoch"],
                           "seed": c.get("train_config", {}).get("seed"), "temperature": c["temperature"]}
                          for p, c in zip(paths, ckpts)]} | reports

    torch.save({
        "format": CHECKPOINT_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in ensemble.state_dict().items()},
        "model_config": ensemble.config,
        **{k: first.get(k) for k in SHARED_KEYS},
        "temperature": float(temperature),
        "model_version": model_version or first["model_version"],
        "train_config": {"ensemble_of": [c.get("train_config", {}) for c in ckpts]},
        "epoch": -1,  # members keep their own epochs (metrics.members)
        "metrics": scores,
    }, out)
    log(f"checkpoint: {out}")
    return scores
