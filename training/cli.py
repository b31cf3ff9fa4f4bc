"""Command line: python -m training pack|train|export|evaluate ... (each has --help)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import data


def _floats(text: str) -> tuple:
    return tuple(float(v) for v in text.replace("[", "").replace("]", "").split(","))


def _ints(text: str) -> tuple:
    return tuple(int(v) for v in text.split(","))


def _names(text: str) -> tuple:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def cmd_pack(a) -> int:
    t0 = time.perf_counter()
    out = data.pack(a.dataset, a.out)
    ds = data.load_npz(out)
    print(f"packed {len(ds)} images ({ds.summary()}) into {out} "
          f"({out.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")
    return 0


def augment_config(a):
    """The AugmentConfig of `train`'s options."""
    from .augment import SCANNER_PRESET, AugmentConfig

    if getattr(a, "scanner", False):
        for part, p in SCANNER_PRESET.items():
            if not getattr(a, part):
                setattr(a, part, p)
    return AugmentConfig(
        rotate_deg=a.rotate, scale_min=a.scale[0], scale_max=a.scale[1], crop_scale_min=a.crop_scale_min,
        crop_fill=a.crop_fill, translate=a.translate, elastic_sigma=a.elastic,
        elastic_grid=a.elastic_grid, hflip=a.hflip, hu_scale=a.hu_scale, hu_offset=a.hu_offset,
        noise_hu=a.noise_hu, lowres_p=a.lowres_p, lowres_min=a.lowres_min, strip_p=a.strip_p,
        pair_p=a.pair_p, pair_scale_min=a.pair_scale[0], pair_scale_max=a.pair_scale[1],
        pair_min_fill=a.pair_min_fill, pair_true_size=a.pair_true_size,
        blur_p=a.blur_p, blur_sigma_max=a.blur_sigma_max, sharpen_p=a.sharpen_p, sharpen_max=a.sharpen_max,
        dose_p=a.dose_p, dose_noise_hu=a.dose_noise_hu, contrast_p=a.contrast_p,
        contrast_scale=a.contrast_scale, fov_p=a.fov_p, fov_min=a.fov_min, couch_p=a.couch_p,
    )


def cmd_train(a) -> int:
    from .augment import AugmentConfig
    from .train import TrainConfig, run

    aug = augment_config(a)
    if a.no_augment:
        aug = AugmentConfig(rotate_deg=0, scale_min=1, scale_max=1, translate=0, elastic_sigma=0, hflip=0, hu_scale=0,
                            hu_offset=0, noise_hu=0, lowres_p=0, pair_p=0)
    cfg = TrainConfig(
        data=a.data, out=a.out, classes=a.classes, hu_window=a.hu_window, epochs=a.epochs,
        batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay, warmup_epochs=a.warmup_epochs,
        label_smoothing=a.label_smoothing, balance=a.balance, balance_power=a.balance_power,
        pseudo_weight=a.pseudo_weight, width=a.width, blocks=a.blocks,
        dropout=a.dropout, patience=a.patience, ema=a.ema, keep=a.keep, seed=a.seed, device=a.device, amp=a.amp,
        channels_last=a.channels_last, compile=a.compile, deterministic=not a.nondeterministic,
        limit=a.limit, steps_per_epoch=a.steps_per_epoch, eval_batch_size=a.eval_batch_size,
        model_version=a.model_version, augment=aug, pair_classes=a.pair_classes,
        nonaxial=not a.no_nonaxial, nonaxial_min_slices=a.nonaxial_min_slices, init=a.init,
    )
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    run(cfg)
    return 0


def cmd_pretrain(a) -> int:
    from .pretrain import PretrainConfig, run

    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    cfg = PretrainConfig(
        data=tuple(a.data), splits=a.splits, val_split=a.val_split, out=a.out, hu_window=a.hu_window,
        epochs=a.epochs, series_per_batch=a.series_per_batch, slices_per_series=a.slices_per_series,
        lr=a.lr, mm_per_unit=a.mm_per_unit, distance_weight=a.distance_weight, width=a.width,
        blocks=a.blocks, seed=a.seed, device=a.device,
    )
    try:
        run(cfg)
    except ValueError as e:
        raise SystemExit(f"pretrain: {e}") from e
    return 0


def cmd_export(a) -> int:
    from .export import export

    meta = export(a.checkpoint, a.out, model_version=a.model_version, verify=not a.no_verify,
                  trained_on=a.trained_on)
    size = Path(a.out).stat().st_size
    print(f"wrote {a.out} ({size / 2**20:.2f} MiB)")
    for k, v in meta.items():
        print(f"  {k} = {v}")
    return 0


def cmd_ensemble(a) -> int:
    from .ensemble import EnsembleError, combine

    try:
        combine(a.checkpoints, a.data, a.out, model_version=a.model_version)
    except EnsembleError as e:
        raise SystemExit(f"ensemble: {e}") from e
    return 0


def cmd_evaluate(a) -> int:
    import torch

    from . import metrics

    path = Path(a.model)
    if path.suffix == ".onnx":
        import onnxruntime as ort

        from .export import INPUT_NAME, OUTPUT_NAME, read_metadata
        meta = read_metadata(path)
        classes = json.loads(meta["classes"])
        low, high = json.loads(meta["hu_window"])
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        predict = lambda x: sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        size = int(meta["input_size"])
    else:
        from .export import ExportWrapper
        from .train import load_checkpoint
        model, ckpt = load_checkpoint(path, "cpu")
        classes, (low, high), size = ckpt["classes"], ckpt["hu_window"], ckpt["input_size"]
        wrapper = ExportWrapper(model, ckpt["temperature"]).eval()
        predict = lambda x: wrapper(x).numpy()

    ds = data.load(a.data, a.limit or None)
    if ds.input_size != size:
        raise SystemExit(f"dataset input_size {ds.input_size} != model input_size {size}")
    targets = ds.targets(classes)

    def probabilities(uint16_images):
        hu = torch.from_numpy(uint16_images.astype(np.float32) - ds.hu_offset)
        out = []
        with torch.no_grad():
            for i in range(0, len(hu), a.batch_size):
                out.append(predict(data.to_unit(hu[i:i + a.batch_size].unsqueeze(1), low, high)))
        return np.concatenate(out) if out else np.zeros((0, len(classes)), np.float32)

    report = {}
    for split in a.splits:
        m = ds.split == split
        if not m.any():
            continue
        probs = probabilities(ds.images[m])
        r = metrics.classification_report(probs, targets[m], classes)
        r["patients"] = metrics.patient_report(probs, targets[m], ds.patient_key[m])
        report[split] = r
        print(f"{split}: {metrics.format_report(r, classes)}")
        if r.get("images"):
            print(metrics.format_confusion(r, classes))
            p = r["patients"]
            print(f"{split} patients: {p['patients']}, wrong by majority vote: {p['errors']} (patient_error "
                  f"{100 * p['patient_error']:.1f}%), with a wrong slice: {p['with_error']} "
                  f"({100 * p['any_slice_error']:.1f}%), mean per-patient slice error "
                  f"{100 * p['mean_patient_slice_error']:.2f}%")
        if a.nonaxial and "other" in classes:
            from .nonaxial import make
            images, kinds = make(ds, split, a.seed)
            if len(images):
                r["nonaxial"] = metrics.other_report(probabilities(images), kinds, classes)
                print(f"{split} synthetic non-axial/scout: {metrics.format_other(r['nonaxial'])}")
        if a.pairs:
            r["pairs"] = pairs_report(ds, m, targets, classes, probabilities, a.seed)
            if r["pairs"]["images"]:
                print(f"{split} synthetic full-field pairs of cropped legs/pelvis: n={r['pairs']['images']} "
                      f"error={100 * r['pairs']['error']:.1f}% predicted {r['pairs']['predicted']}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2, default=float))
    if a.headline:
        if a.headline_split not in report:
            raise SystemExit(f"--headline: split {a.headline_split!r} was not scored (see --splits)")
        head = metrics.headline(report[a.headline_split], classes, ds.info, a.headline_split)
        head["model"] = {"file": path.name, "model_version": meta.get("model_version") if path.suffix == ".onnx"
                         else ckpt.get("model_version"), "scored_by": "python -m training evaluate"}
        Path(a.headline).write_text(json.dumps(head, indent=2, default=float) + "\n")
        print(f"wrote {a.headline}")
    return 0


def pairs_report(ds, mask, targets, classes, probabilities, seed: int) -> dict:
    """Every cropped legs/pelvis image of the split turned into a full-field left-right pair
    (augment.pair_composite, p = 1): does the model still see legs/pelvis in a wide field?"""
    import torch

    from .augment import AugmentConfig, body_fill, pair_composite
    framed = bool(ds.field_of_view_mm)  # a fixed field of view: pairs at true size
    cfg = AugmentConfig(pair_p=1.0, pair_true_size=framed, pair_min_fill=0.0 if framed else 0.3)
    want = [classes.index(c) for c in ("legs", "pelvis") if c in classes]
    hu = torch.from_numpy(ds.images[mask].astype(np.float32) - ds.hu_offset).unsqueeze(1)
    t = targets[mask]
    pick = torch.from_numpy(np.isin(t, want)) & (body_fill(hu) > cfg.pair_min_fill)
    if not pick.any():
        return {"images": 0}
    gen = torch.Generator().manual_seed(seed)
    paired = torch.cat([pair_composite(hu[i:i + 32], pick[i:i + 32], cfg, gen) for i in range(0, len(hu), 32)])
    # only the images that did become a pair (a true-size pair needs room for two copies)
    sel = (pick & (paired != hu).flatten(1).any(1)).numpy()
    if not sel.any():
        return {"images": 0}
    images = (paired[sel, 0].numpy() + ds.hu_offset).clip(0, 65535).astype(np.uint16)
    pred = probabilities(images).argmax(1)
    return {"images": int(sel.sum()), "error": float((pred != t[sel]).mean()),
            "predicted": {c: int((pred == i).sum()) for i, c in enumerate(classes) if (pred == i).any()}}


def parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="python -m training", description=(
        "Train the anatomy-node axial CT body-region classifier (neck, lungs, liver, pelvis, legs, "
        "other) from a dataset folder of docs/contracts.md and export it as the contract's ONNX model."),
        formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("pack", formatter_class=fmt, help="dataset folder → one compressed .npz",
                       description="Read a dataset folder (dataset.json, manifest.csv, 16-bit PNGs) and "
                       "write one compressed .npz that `train`/`evaluate` read with numpy only.")
    s.add_argument("dataset", help="dataset folder written by `anatomy-node dataset build`")
    s.add_argument("out", help="output .npz path")
    s.set_defaults(func=cmd_pack)

    from .augment import AugmentConfig
    from .train import TrainConfig
    d, da = TrainConfig(), AugmentConfig()
    s = sub.add_parser("train", formatter_class=fmt, help="train a model, write checkpoint + metrics",
                       description="Train on split=train, select and calibrate on split=val (patients "
                       "never mixed), report split=test once at the end. Writes OUT/model.pt "
                       "(state_dict + config), OUT/config.json, OUT/metrics.json, OUT/history.jsonl.")
    g = s.add_argument_group("data and output")
    g.add_argument("--data", required=True, help="dataset folder or .npz from `pack`")
    g.add_argument("--out", default=d.out, help="run folder for checkpoint and metrics")
    g.add_argument("--classes", type=_names, default=d.classes,
                   help="comma-separated class list, in output order (dataset label 'ambiguous' is always excluded)")
    g.add_argument("--hu-window", type=_floats, default=d.hu_window,
                   help="LOW,HIGH in HU, written with = because LOW is negative (--hu-window=-100,200): "
                   "x = (clamp(hu, LOW, HIGH) - LOW) / (HIGH - LOW); recorded in the model")
    g.add_argument("--limit", type=int, default=0, help="use only N evenly spaced images (0: all); for quick runs")
    g.add_argument("--model-version", default=d.model_version, help="model_version recorded in checkpoint and ONNX")
    g = s.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs, help="maximum number of epochs")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    g.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate (linear warm-up, cosine decay)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay on conv/linear weights")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="epochs of linear learning-rate warm-up")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="cross-entropy label smoothing")
    g.add_argument("--balance", choices=("sampler", "loss", "none"), default=d.balance,
                   help="class balancing: weighted sampling (equal classes per batch), class-weighted loss, or none")
    g.add_argument("--balance-power", type=float, default=d.balance_power,
                   help="class weight = count^-POWER: 1 equalises classes, 0.5 is softer, 0 is no balancing")
    g.add_argument("--pseudo-weight", type=float, default=d.pseudo_weight,
                   help="sampling weight of pseudo-labelled training images (label_source pseudo:..., the node's "
                        "own predictions mined by `anatomy-node mine`) against a human-labelled one; 0: not trained on")
    g.add_argument("--patience", type=int, default=d.patience, help="early stop after N epochs without val NLL improvement (0: never)")
    g.add_argument("--ema", type=float, default=d.ema,
                   help="decay per step of an exponential moving average of the weights, which is then validated, "
                        "kept and exported (e.g. 0.99; 0: off, the weights themselves)")
    g.add_argument("--keep", choices=("best", "last"), default=d.keep,
                   help="weights kept and exported: the epoch with the lowest validation NLL (with early stopping), "
                        "or the last epoch (for validation patients that lack a class)")
    g.add_argument("--steps-per-epoch", type=int, default=0, help="batches per epoch (0: training images / batch size)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed for weights, sampling and augmentation")
    g.add_argument("--nondeterministic", action="store_true", help="allow non-deterministic (faster) cuDNN kernels")
    g = s.add_argument_group("model")
    g.add_argument("--width", type=int, default=d.width, help="channels of the first stage (doubled per stage)")
    g.add_argument("--blocks", type=_ints, default=d.blocks, help="residual blocks per stage, comma-separated")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout before the classifier")
    g.add_argument("--init", default=d.init,
                   help="start from the backbone of a `pretrain` checkpoint (same --width and --blocks)")
    g = s.add_argument_group("device")
    g.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format (faster convs on GPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (needs triton on CUDA)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="batch size for validation/test")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    g = s.add_argument_group("augmentation (see augment.py)")
    g.add_argument("--rotate", type=float, default=da.rotate_deg, help="max in-plane rotation, degrees")
    g.add_argument("--scale", type=_floats, default=(da.scale_min, da.scale_max),
                   help="MIN,MAX apparent size, log-uniform: >1 zooms in (random crop), <1 zooms out (wider field of view)")
    g.add_argument("--crop-scale-min", type=float, default=da.crop_scale_min,
                   help="smallest apparent size of a crop (body fills more than --crop-fill of the image), which a "
                        "wider field of view cannot show small (0: --scale's MIN)")
    g.add_argument("--crop-fill", type=float, default=da.crop_fill,
                   help="share of the image inside the body (HU > -500) above which an image is a crop")
    g.add_argument("--translate", type=float, default=da.translate, help="max translation, fraction of the width")
    g.add_argument("--elastic", type=float, default=da.elastic_sigma, help="std of the smooth non-rigid displacement, fraction of the width (0: off)")
    g.add_argument("--elastic-grid", type=int, default=da.elastic_grid, help="control points per axis of the deformation")
    g.add_argument("--hflip", type=float, default=da.hflip, help="probability of a left-right flip")
    g.add_argument("--hu-scale", type=float, default=da.hu_scale, help="HU scaled by uniform [1-S, 1+S]")
    g.add_argument("--hu-offset", type=float, default=da.hu_offset, help="HU offset uniform in [-O, O]")
    g.add_argument("--noise-hu", type=float, default=da.noise_hu, help="Gaussian noise std up to this many HU")
    g.add_argument("--lowres-p", type=float, default=da.lowres_p, help="probability of a down-and-up-sampling (resolution jitter)")
    g.add_argument("--lowres-min", type=float, default=da.lowres_min, help="smallest down-sampling factor")
    g.add_argument("--strip-p", type=float, default=da.strip_p,
                   help="probability of setting everything outside the body (couch, board, mask) to air")
    g = s.add_argument_group("scanner and protocol variation (augment.scanner_variation; all off by default)")
    g.add_argument("--blur-p", type=float, default=da.blur_p,
                   help="probability of a Gaussian blur (a soft reconstruction kernel)")
    g.add_argument("--blur-sigma-max", type=float, default=da.blur_sigma_max,
                   help="blur std uniform in [0.3, this] pixels")
    g.add_argument("--sharpen-p", type=float, default=da.sharpen_p,
                   help="probability of an unsharp mask (a sharp bone/lung reconstruction kernel)")
    g.add_argument("--sharpen-max", type=float, default=da.sharpen_max,
                   help="unsharp-mask strength uniform in [0.2, this]")
    g.add_argument("--dose-p", type=float, default=da.dose_p,
                   help="probability of low-dose noise (Gaussian, correlated over ~1 pixel)")
    g.add_argument("--dose-noise-hu", type=float, default=da.dose_noise_hu,
                   help="low-dose noise std uniform in [10, this] HU")
    g.add_argument("--contrast-p", type=float, default=da.contrast_p,
                   help="probability of another contrast phase (HU of 100-300, tapered, scaled about 40 HU)")
    g.add_argument("--contrast-scale", type=float, default=da.contrast_scale,
                   help="contrast-phase factor uniform in [1-C, 1+C]")
    g.add_argument("--fov-p", type=float, default=da.fov_p,
                   help="probability of a reconstruction circle (air outside a centred circle)")
    g.add_argument("--fov-min", type=float, default=da.fov_min,
                   help="circle radius uniform in [this, 1] x half the image side")
    g.add_argument("--couch-p", type=float, default=da.couch_p,
                   help="probability of inserting a couch top (two thin curved shells) below the body")
    g.add_argument("--scanner", action="store_true",
                   help="the preset augment.SCANNER_PRESET: --blur-p 0.2 --sharpen-p 0.2 --dose-p 0.3 --contrast-p 0.3 "
                        "--fov-p 0.1 --couch-p 0.2, for each of them not given a non-zero value")
    g = s.add_argument_group("pairs of crops")
    g.add_argument("--pair-p", type=float, default=da.pair_p,
                   help="probability that a crop of a --pair-classes class becomes two shrunken copies side by side (one mirrored)")
    g.add_argument("--pair-scale", type=_floats, default=(da.pair_scale_min, da.pair_scale_max),
                   help="MIN,MAX size of each copy of a pair, fraction of the image side")
    g.add_argument("--pair-min-fill", type=float, default=da.pair_min_fill,
                   help="only images whose body (HU > -500) fills more than this share are paired (crops)")
    g.add_argument("--pair-true-size", action="store_true",
                   help="pair the body's bounding box at its true size, unscaled (for a dataset with a fixed field of view; use with --pair-min-fill 0)")
    g.add_argument("--pair-classes", type=_names, default=d.pair_classes, help="classes whose crops may be paired")
    g.add_argument("--no-nonaxial", action="store_true",
                   help="do not add synthetic non-axial/scout images of the training series as `other`")
    g.add_argument("--nonaxial-min-slices", type=int, default=d.nonaxial_min_slices,
                   help="series with fewer images give no synthetic non-axial images")
    g.add_argument("--no-augment", action="store_true", help="turn every augmentation off")
    s.set_defaults(func=cmd_train)

    from .pretrain import PretrainConfig
    dp = PretrainConfig()
    s = sub.add_parser("pretrain", formatter_class=fmt, help="self-supervised pre-training (body-part regression)",
                       description="Teach a backbone where along the body each slice lies, from the z of the "
                       "slices of each series, without class labels (Yan et al. 2018); `train --init` "
                       "starts from it. Every image of --splits of every --data counts, ambiguous ones too.")
    s.add_argument("--data", action="append", required=True,
                   help="dataset folder or .npz (repeat for several: a site's unlabelled archive too)")
    s.add_argument("--splits", type=_names, default=dp.splits, help="splits whose images are used")
    s.add_argument("--val-split", default=dp.val_split,
                   help="split whose series report order accuracy (not trained on unless in --splits)")
    s.add_argument("--out", default=dp.out, help="run folder for pretrain.pt and metrics.json")
    s.add_argument("--hu-window", type=_floats, default=dp.hu_window, help="HU window low,high (as train)")
    s.add_argument("--epochs", type=int, default=dp.epochs, help="passes over the images")
    s.add_argument("--series-per-batch", type=int, default=dp.series_per_batch, help="series per batch")
    s.add_argument("--slices-per-series", type=int, default=dp.slices_per_series, help="images drawn per series")
    s.add_argument("--lr", type=float, default=dp.lr, help="peak AdamW learning rate")
    s.add_argument("--mm-per-unit", type=float, default=dp.mm_per_unit, help="millimetres per unit of score")
    s.add_argument("--distance-weight", type=float, default=dp.distance_weight,
                   help="weight of the distance term beside the order term")
    s.add_argument("--width", type=int, default=dp.width, help="as train --width")
    s.add_argument("--blocks", type=_ints, default=dp.blocks, help="as train --blocks")
    s.add_argument("--seed", type=int, default=dp.seed, help="seed for weights, sampling and augmentation")
    s.add_argument("--device", default=dp.device, help="cpu, cuda or cuda:N")
    s.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("export", formatter_class=fmt, help="checkpoint → ONNX model (CPU only)",
                       description="Write the contract's ONNX model: input 'image' [N,1,S,S], output "
                       "'probabilities' [N,C] = softmax(logits / T), opset 17, metadata_props classes, "
                       "input_size, hu_window, normalization, model_version, trained_on, temperature.")
    s.add_argument("checkpoint", help="model.pt written by `train`")
    s.add_argument("out", help="output .onnx path")
    s.add_argument("--model-version", default=None, help="override the checkpoint's model_version")
    s.add_argument("--trained-on", default=None, help="override the checkpoint's trained_on (dataset summary)")
    s.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs torch parity check")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("ensemble", formatter_class=fmt, help="several checkpoints → one ensemble checkpoint",
                       description="Combine checkpoints trained on the same dataset (other seeds or "
                       "recipes) into one that averages their logits; fit one temperature on the "
                       "validation patients of --data; `export` and `evaluate` take the result.")
    s.add_argument("checkpoints", nargs="+", help="model.pt files written by `train` (at least two)")
    s.add_argument("--data", required=True, help="the dataset folder or .npz the members were trained on")
    s.add_argument("--out", required=True, help="output checkpoint (.pt)")
    s.add_argument("--model-version", default=None, help="model_version of the ensemble (default: the first member's)")
    s.set_defaults(func=cmd_ensemble)

    s = sub.add_parser("evaluate", formatter_class=fmt, help="score a checkpoint or ONNX model on a dataset",
                       description="Slice error, NLL, ECE, per-class one-vs-rest AUC and confusion matrix "
                       "per split ('ambiguous' excluded). Uses the preprocessing recorded in the model.")
    s.add_argument("model", help="model.pt or model.onnx")
    s.add_argument("--data", required=True, help="dataset folder or .npz")
    s.add_argument("--splits", type=_names, default=("test",), help="comma-separated splits to score")
    s.add_argument("--batch-size", type=int, default=64, help="inference batch size")
    s.add_argument("--limit", type=int, default=0, help="use only N evenly spaced images (0: all)")
    s.add_argument("--json", default=None, help="also write the report to this JSON file")
    s.add_argument("--headline", default=None, help="write the model card's metrics JSON (dataset section, "
                   "slice_error, mean_auc, per_class_auc, patient_error, ece, confusion) for --headline-split")
    s.add_argument("--headline-split", default="test", help="split whose scores --headline writes")
    s.add_argument("--nonaxial", action="store_true", help="also score synthetic non-axial/scout images of "
                   "each split's series (right answer: other; see nonaxial.py)")
    s.add_argument("--pairs", action="store_true", help="also score full-field left-right pairs made of each "
                   "split's cropped legs/pelvis images (see augment.pair_composite)")
    s.add_argument("--seed", type=int, default=2016, help="seed of the synthetic images (--nonaxial, --pairs)")
    s.set_defaults(func=cmd_evaluate)
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
