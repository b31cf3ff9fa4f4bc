"""Batched data augmentation on tensors (CPU or CUDA), after Roth et al. 2015.

The paper enlarged its training set with random translations, rotations and non-rigid
deformations, and trained on random 224×224 crops of 256×256 images. Here all geometric parts
are folded into ONE sampling grid per image (affine: rotation about z, zoom, translation,
optional flip; plus a smooth random displacement field), applied with a single grid_sample, so
a whole batch is augmented on the GPU in a few kernels. Random zoom + translation at the full
input size S plays the role of the random crop without a train/test resolution mismatch (the
exported model sees S×S images, as the node sends them).

Intensity parts work in HU, before windowing: a small scale/offset (scanner calibration,
contrast phase) and Gaussian noise. A random down-and-up-sampling imitates low-resolution
sources (the neck RT-planning CTs are mostly 128×128, upsampled to 256): without it a network
can learn "blurry = neck" instead of anatomy.

Scanner and protocol variation (`scanner_variation`, every part off by default): a soft or a
sharp reconstruction kernel (Gaussian blur, unsharp mask), low-dose noise (correlated, tens of
HU), another contrast phase (the enhancing band of 100-300 HU scaled), a reconstruction circle
smaller than the image, and a couch top inserted under the body. A part that is off draws no
random number, so the shipped recipe's stream, and its weights, stay the same bit for bit.

Random parameters come from a CPU torch.Generator (small tensors), so a seed gives the same
geometry on CPU and CUDA; only the pixel noise is drawn on the batch's device.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .data import to_unit

AIR_HU = -1024.0  # the contract pads with air; what comes into view when the image moves


@dataclass
class AugmentConfig:
    rotate_deg: float = 15.0  # uniform ±, about the z axis (in-plane)
    # Apparent size of the anatomy, log-uniform in [scale_min, scale_max]: > 1 zooms in (a
    # random crop), < 1 zooms out (more air around: a larger field of view). Sources differ a
    # lot here (cropped sarcoma thighs fill the image, RT neck scans sit small in a wide field),
    # so a wide range keeps the net from reading the class off the field of view.
    scale_min: float = 0.6
    scale_max: float = 1.2
    # A crop (the body fills more than crop_fill of the image: cut off at the edges) is never
    # seen small in a wider field of view, since no scanner shows a cut-off body with air
    # around it; so a crop's smallest apparent size may stay larger (0: scale_min for all).
    crop_scale_min: float = 0.0
    crop_fill: float = 0.3
    translate: float = 0.08  # fraction of the image width, uniform ±, per axis
    elastic_sigma: float = 0.015  # std of control-point displacement (fraction of width)
    elastic_grid: int = 5  # control points per axis of the smooth deformation
    hflip: float = 0.0  # probability of a left-right flip (0: keep laterality, see README)
    hu_scale: float = 0.05  # HU multiplied by uniform [1-s, 1+s]
    hu_offset: float = 20.0  # plus uniform ± this many HU
    noise_hu: float = 15.0  # plus Gaussian noise with std uniform in [0, this] HU
    lowres_p: float = 0.25  # probability of a down-and-up-sampling...
    lowres_min: float = 0.4  # ...to a fraction of the size uniform in [this, 0.9]
    # Pairing of crops (see pair_composite): an image of a `pair_classes` class whose body fills
    # more than pair_min_fill of the image (a one-thigh sarcoma crop) becomes, with probability
    # pair_p, two shrunken copies side by side, one mirrored: a full-field pair of legs/hips.
    pair_p: float = 0.5
    pair_scale_min: float = 0.22  # size of each copy, fraction of the image side, uniform
    pair_scale_max: float = 0.45
    pair_min_fill: float = 0.3  # fraction of the image inside the body (HU > -500)
    # With a fixed field of view (dataset build --field-of-view) a crop already shows one thigh
    # at its true size: the pair is then made of two unscaled copies of the body's bounding box,
    # for crops that are not already wide (bounding box at most pair_max_aspect as wide as high).
    pair_true_size: bool = False
    pair_max_aspect: float = 1.3
    # Probability of stripping the background (strip_background): the couch, a board, a mask,
    # cables, whatever lies outside the body, set to air. Sources differ here too (the OpenKBP
    # planning CTs are masked to the body, diagnostic CTs show the couch, and pairs of crops are
    # drawn on clean air), so a clean background must not tell the class.
    strip_p: float = 0.0
    # Scanner and protocol variation (scanner_variation; each off at probability 0). In HU,
    # after pairing and stripping, before the intensity jitter and the geometry.
    blur_p: float = 0.0  # a soft reconstruction kernel: Gaussian blur...
    blur_sigma_max: float = 1.5  # ...of std uniform in [0.3, this] pixels, per image
    sharpen_p: float = 0.0  # a sharp (bone, lung) kernel: unsharp mask x + a (x - blur_1px(x))...
    sharpen_max: float = 1.5  # ...of strength a uniform in [0.2, this]
    dose_p: float = 0.0  # low dose: spatially correlated Gaussian noise (blurred at 0.7 px)...
    dose_noise_hu: float = 60.0  # ...of std uniform in [10, this] HU
    contrast_p: float = 0.0  # another contrast phase: HU of the enhancing band (100-300, tapered
    contrast_scale: float = 0.4  # to 0 at 40 and 450) scaled about 40 HU by uniform [1-c, 1+c]
    fov_p: float = 0.0  # a reconstruction circle: what lies outside a centred circle is air...
    fov_min: float = 0.75  # ...of radius uniform in [this, 1] x half the image side
    couch_p: float = 0.0  # a couch top (two thin curved shells, 0-400 HU) just below the body

    def to_dict(self) -> dict:
        return asdict(self)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def sampling_grid(n: int, size: int, cfg: AugmentConfig, gen: torch.Generator,
                  device=None, crop: torch.Tensor | None = None) -> torch.Tensor:
    """[n, size, size, 2] grid for grid_sample (normalised coordinates, align_corners=False).

    `crop`: optional bool [n] (CPU), the images whose smallest size is cfg.crop_scale_min.
    The random parameters are drawn on the CPU; the full-size grid is built on `device`."""
    angle = _uniform(n, -cfg.rotate_deg, cfg.rotate_deg, gen) * (math.pi / 180.0)
    # grid coordinates map output → input, so showing anatomy s times larger scales them by 1/s
    lo, hi = math.log(cfg.scale_min), math.log(cfg.scale_max)
    log_size = _uniform(n, lo, hi, gen)
    if crop is not None and cfg.crop_scale_min > 0:
        # the same draw mapped onto the crops' range (one draw either way: the stream of
        # random numbers, and so every other parameter, stays that of a run without it)
        r = (log_size - lo) / (hi - lo) if hi > lo else torch.zeros(n)
        crop_lo = math.log(cfg.crop_scale_min)
        log_size = torch.where(crop, crop_lo + (hi - crop_lo) * r, log_size)
    scale = torch.exp(-log_size)
    shift = _uniform(2 * n, -2 * cfg.translate, 2 * cfg.translate, gen).view(n, 2)  # [-1,1] spans 2
    flip = torch.where(torch.rand(n, generator=gen) < cfg.hflip, -1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([
        torch.stack([cos * flip, -sin, shift[:, 0]], 1),
        torch.stack([sin * flip, cos, shift[:, 1]], 1),
    ], 1).to(device)  # [n, 2, 3]
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    if cfg.elastic_sigma > 0:
        # Random displacements at a few control points, interpolated bicubically: a smooth
        # (B-spline-like) non-rigid deformation, as in the paper.
        k = cfg.elastic_grid
        ctrl = (torch.randn(n, 2, k, k, generator=gen) * (2 * cfg.elastic_sigma)).to(device)
        disp = F.interpolate(ctrl, size=(size, size), mode="bicubic", align_corners=True)
        grid = grid + disp.permute(0, 2, 3, 1)
    return grid


def body_fill(hu: torch.Tensor) -> torch.Tensor:
    """Fraction of each image [n,1,S,S] inside the body (HU > -500): ~1 for a crop that one
    thigh fills, a few percent for a full-body field of view."""
    return (hu > -500).float().mean(dim=(1, 2, 3))


def pair_composite(hu: torch.Tensor, eligible: torch.Tensor, cfg: AugmentConfig,
                   gen: torch.Generator) -> torch.Tensor:
    """Two shrunken copies of a cropped image side by side, the second mirrored, on air.

    Every leg and most pelvis images of the development data are sarcoma crops in which one
    thigh (or hip) fills the image; the only full-field legs are one cadaver's, small in a wide
    field of view, and a net trained on the crops calls those "neck". This turns a crop into
    the picture a full field of view gives: a left and a right limb, small, with air around.
    One size per batch (one area down-sampling); positions per image. Label-safe for legs and
    pelvis (left and right are anatomically alike). `eligible`: bool [n] (CPU)."""
    n, _, S, _ = hu.shape
    pick = (torch.rand(n, generator=gen) < cfg.pair_p) & eligible.cpu()
    f = float(_uniform(1, cfg.pair_scale_min, cfg.pair_scale_max, gen))
    rand = torch.rand(n, 4, generator=gen)  # gap, x jitter, y jitter, which copy is mirrored
    if not pick.any():
        return hu
    if cfg.pair_true_size:
        return _true_size_pairs(hu, pick, rand, cfg)
    s = max(4, round(S * f))
    idx = pick.nonzero().squeeze(1)
    small = F.interpolate(hu[idx.to(hu.device)], size=(s, s), mode="area")
    out = hu.clone()
    for j, i in enumerate(idx.tolist()):
        gap = int((rand[i, 0] * 0.12 - 0.04) * S)  # slight overlap .. a hand's width apart
        gap = min(gap, S - 2 * s)
        span = 2 * s + gap
        x0 = (S - span) // 2 + int((rand[i, 1] - 0.5) * (S - span))
        y0 = (S - s) // 2 + int((rand[i, 2] - 0.5) * 0.3 * (S - s))
        a, b = small[j], small[j].flip(-1)
        if rand[i, 3] < 0.5:
            a, b = b, a
        canvas = torch.full_like(hu[i], AIR_HU)
        canvas[:, y0:y0 + s, x0:x0 + s] = a
        xb = x0 + s + gap
        canvas[:, y0:y0 + s, xb:xb + s] = torch.maximum(canvas[:, y0:y0 + s, xb:xb + s], b)
        out[i] = canvas
    return out


def _true_size_pairs(hu: torch.Tensor, pick: torch.Tensor, rand: torch.Tensor,
                     cfg: AugmentConfig) -> torch.Tensor:
    """pair_composite for a fixed field of view: the body's bounding box twice, unscaled."""
    S = hu.shape[-1]
    out = hu.clone()
    for i in pick.nonzero().squeeze(1).tolist():
        body = hu[i, 0] > -500
        rows, cols = body.any(1).nonzero().squeeze(1), body.any(0).nonzero().squeeze(1)
        if not len(rows):
            continue
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        h, w = r1 - r0, c1 - c0
        gap = int((rand[i, 0] * 0.08 - 0.02) * S)  # slight overlap .. a few centimetres apart
        span = 2 * w + gap
        if w > cfg.pair_max_aspect * h or span > S:
            continue
        x0 = (S - span) // 2 + int((rand[i, 1] - 0.5) * (S - span))
        patch = hu[i, :, r0:r1, c0:c1]
        a, b = (patch, patch.flip(-1)) if rand[i, 3] < 0.5 else (patch.flip(-1), patch)
        canvas = torch.full_like(hu[i], AIR_HU)
        canvas[:, r0:r1, x0:x0 + w] = a
        xb = x0 + w + gap
        canvas[:, r0:r1, xb:xb + w] = torch.maximum(canvas[:, r0:r1, xb:xb + w], b)
        out[i] = canvas
    return out


def opening_side(size: int) -> int:
    """The node's body-framing opening (src/anatomy/pixels/body.rs): max(3, floor(0.03 S) | 1)."""
    return max(3, int(0.03 * size) | 1)


def strip_background(hu: torch.Tensor, body_hu: float = -300.0) -> torch.Tensor:
    """HU batch [n,1,S,S] with everything outside the body set to air.

    The body is what is above `body_hu` once thin things (a couch top, a mask's mesh, a cable)
    are opened away, as in the node's body framing, plus everything it encloses: a pixel with
    body to its left, right, above and below (the lungs and their vessels, the bowel gas)."""
    k = opening_side(hu.shape[-1])
    air_mask = (hu <= body_hu).float()
    eroded = 1.0 - F.max_pool2d(air_mask, k, stride=1, padding=k // 2)
    body = F.max_pool2d(eroded, k, stride=1, padding=k // 2)
    ahead = lambda t, dim: t.cummax(dim).values
    behind = lambda t, dim: t.flip(dim).cummax(dim).values.flip(dim)
    inside = ahead(body, -1) * behind(body, -1) * ahead(body, -2) * behind(body, -2)
    return torch.where(inside > 0, hu, torch.full_like(hu, AIR_HU))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image of x [m,1,H,W] blurred by its own Gaussian of std sigma [m] pixels
    (separable, borders replicated so that air stays air)."""
    m, _, h, w = x.shape
    r = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma.to(x.device, x.dtype).view(m, 1)) ** 2)
    k = k / k.sum(1, keepdim=True)
    y = F.pad(x.reshape(1, m, h, w), (r, r, r, r), mode="replicate")
    y = F.conv2d(y, k.view(m, 1, 1, 2 * r + 1), groups=m)
    y = F.conv2d(y, k.view(m, 1, 2 * r + 1, 1), groups=m)
    return y.view(m, 1, h, w)


def sharpen(x: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """Unsharp mask x + a (x - blur_1px(x)), a [m] per image: a sharp reconstruction kernel's
    edge overshoot and amplified fine detail."""
    a = amount.to(x.device, x.dtype).view(-1, 1, 1, 1)
    return x + a * (x - gaussian_blur(x, torch.ones(x.shape[0])))


def dose_noise(shape, std: torch.Tensor, gen: torch.Generator, device, dtype) -> torch.Tensor:
    """Low-dose CT noise: white noise blurred at 0.7 px (CT noise is correlated over a few
    pixels), rescaled to std [m] HU per image."""
    dev_gen = torch.Generator(device=device)
    dev_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    white = torch.randn(shape, generator=dev_gen, device=device, dtype=dtype)
    corr = gaussian_blur(white, torch.full((shape[0],), 0.7))
    corr = corr / corr.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return corr * std.to(device, dtype).view(-1, 1, 1, 1)


CONTRAST_PIVOT_HU = 40.0  # unenhanced soft tissue: left where it is


def contrast_phase(hu: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Another contrast phase: HU in the enhancing band scaled about 40 HU by factor [m].
    Weight 1 on [100, 300] HU (enhancing parenchyma and vessels), tapering linearly to 0 at
    40 HU (water, unenhanced tissue) and at 450 HU (so bone and air are left alone)."""
    w = ((hu - CONTRAST_PIVOT_HU) / 60.0).clamp(0, 1) * ((450.0 - hu) / 150.0).clamp(0, 1)
    f = factor.to(hu.device, hu.dtype).view(-1, 1, 1, 1)
    return hu + w * (f - 1) * (hu - CONTRAST_PIVOT_HU)


def fov_circle(hu: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """A reconstruction circle: outside a centred circle of radius [m] (fraction of half the
    side) the image is air, as a scanner shows a display field smaller than the body."""
    m, _, h, w = hu.shape
    ys = (torch.arange(h, device=hu.device, dtype=hu.dtype) + 0.5 - h / 2) / (h / 2)
    xs = (torch.arange(w, device=hu.device, dtype=hu.dtype) + 0.5 - w / 2) / (w / 2)
    r2 = ys.view(1, 1, h, 1) ** 2 + xs.view(1, 1, 1, w) ** 2
    inside = r2 <= radius.to(hu.device, hu.dtype).view(-1, 1, 1, 1) ** 2
    return torch.where(inside, hu, torch.full_like(hu, AIR_HU))


def insert_couch(hu: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """A couch top below the body (posterior is +y in the contract's orientation): two thin
    shells curving up to the sides, params [m, 6] uniform in [0, 1] (gap, half width, centre,
    curvature, shell HU, shell distance). An image whose body reaches the bottom is unchanged."""
    m, _, S, _ = hu.shape
    out = hu.clone()
    cols = torch.arange(S, device=hu.device, dtype=hu.dtype)
    for i in range(m):
        body_rows = (hu[i, 0] > -500).any(1).nonzero()
        bottom = int(body_rows[-1]) + 1 if len(body_rows) else S // 2
        g, hw, c, cv, v, d = params[i].tolist()
        y0 = bottom + 1 + int(g * 0.04 * S)
        half = (0.3 + 0.18 * hw) * S
        xc = S / 2 + (c - 0.5) * 0.1 * S
        u = ((cols - xc) / half)
        rise = (cv * 0.06 * S * u ** 2).round().long()
        value = float(v) * 400.0
        gap2 = max(2, int((0.02 + 0.03 * d) * S))
        for y_top in (y0, y0 + gap2):
            ys = y_top - rise
            ok = (u.abs() <= 1) & (ys >= 0) & (ys < S)
            if y_top >= S or not ok.any():
                continue
            xs = cols.long()[ok]
            out[i, 0, ys[ok], xs] = torch.maximum(out[i, 0, ys[ok], xs], torch.tensor(value, dtype=hu.dtype))
    return out


def scanner_variation(hu: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """The scanner and protocol parts of the augmentation on an HU batch [n,1,S,S]: couch,
    contrast phase, reconstruction circle, soft or sharp kernel, low-dose noise, each with its
    own probability. A part at probability 0 draws nothing from `gen`."""
    n = hu.shape[0]

    def apply(p, params, fn):
        nonlocal hu
        pick = torch.rand(n, generator=gen) < p
        if pick.any():
            idx = pick.nonzero().squeeze(1)
            dev_idx = idx.to(hu.device)
            hu = hu.index_copy(0, dev_idx, fn(hu[dev_idx], params[idx]))

    if cfg.couch_p > 0:
        apply(cfg.couch_p, torch.rand(n, 6, generator=gen), insert_couch)
    if cfg.contrast_p > 0:
        c = cfg.contrast_scale
        apply(cfg.contrast_p, _uniform(n, 1 - c, 1 + c, gen), contrast_phase)
    if cfg.fov_p > 0:
        apply(cfg.fov_p, _uniform(n, cfg.fov_min, 1.0, gen), fov_circle)
    if cfg.blur_p > 0:
        apply(cfg.blur_p, _uniform(n, 0.3, max(0.3, cfg.blur_sigma_max), gen), gaussian_blur)
    if cfg.sharpen_p > 0:
        apply(cfg.sharpen_p, _uniform(n, 0.2, max(0.2, cfg.sharpen_max), gen), sharpen)
    if cfg.dose_p > 0:
        std = _uniform(n, 10.0, max(10.0, cfg.dose_noise_hu), gen)
        apply(cfg.dose_p, std,
              lambda x, s: x + dose_noise(x.shape, s, gen, x.device, x.dtype))
    return hu


SCANNER_PARTS = ("couch_p", "contrast_p", "fov_p", "blur_p", "sharpen_p", "dose_p")
# `train --scanner`: the probabilities of the experiment in models/README.md ("Scanner and
# protocol augmentation"); magnitudes at the AugmentConfig defaults.
SCANNER_PRESET = {"blur_p": 0.2, "sharpen_p": 0.2, "dose_p": 0.3, "contrast_p": 0.3, "fov_p": 0.1,
                  "couch_p": 0.2}


def augment(hu: torch.Tensor, low: float, high: float, cfg: AugmentConfig,
            gen: torch.Generator, pair: torch.Tensor | None = None) -> torch.Tensor:
    """HU batch [n,1,S,S] (float, any device) → augmented unit-normalised batch in [0, 1].

    `pair`: optional bool [n], the images that pair_composite may turn into a pair (by class
    and body fill; the caller knows the classes)."""
    n, _, size, _ = hu.shape
    dev = hu.device
    crop = (body_fill(hu) > cfg.crop_fill).cpu() if cfg.crop_scale_min > 0 else None
    if pair is not None and cfg.pair_p > 0:
        hu = pair_composite(hu, pair, cfg, gen)
    if cfg.strip_p > 0:
        strip = torch.rand(n, generator=gen) < cfg.strip_p
        if strip.any():  # only the drawn images pay for the mask
            idx = strip.nonzero().squeeze(1).to(dev)
            hu = hu.index_copy(0, idx, strip_background(hu[idx]))
    if any(getattr(cfg, part) > 0 for part in SCANNER_PARTS):
        hu = scanner_variation(hu, cfg, gen)
    per = lambda t: t.to(dev).view(n, 1, 1, 1)
    scale = per(_uniform(n, 1 - cfg.hu_scale, 1 + cfg.hu_scale, gen))
    offset = per(_uniform(n, -cfg.hu_offset, cfg.hu_offset, gen))
    noise_std = per(_uniform(n, 0.0, cfg.noise_hu, gen))
    # The pixel noise is the one big random tensor: draw it on the batch's device, from a
    # generator seeded by the CPU one (still reproducible per device).
    dev_gen = torch.Generator(device=dev)
    dev_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    noise = torch.randn(hu.shape, generator=dev_gen, device=dev, dtype=hu.dtype)
    x = to_unit(hu * scale + offset + noise * noise_std, low, high)

    if cfg.lowres_p > 0:
        pick = torch.rand(n, generator=gen) < cfg.lowres_p
        if pick.any():
            # one factor per batch keeps it to two interpolate calls
            f = float(_uniform(1, cfg.lowres_min, 0.9, gen))
            small = max(8, round(size * f))
            idx = pick.nonzero().squeeze(1).to(dev)
            sub = F.interpolate(x[idx], size=(small, small), mode="area")
            x = x.index_copy(0, idx, F.interpolate(sub, size=(size, size), mode="bilinear",
                                                   align_corners=False))

    grid = sampling_grid(n, size, cfg, gen, dev, crop).to(x.dtype)
    # grid_sample pads with zeros; shift so that the padding is air, whatever the window
    air = float(to_unit(torch.tensor(AIR_HU), low, high))
    x = F.grid_sample(x - air, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + air
    return x.clamp(0.0, 1.0)


def preprocess(hu: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Evaluation path: the contract's window + normalisation, nothing random."""
    return to_unit(hu, low, high)
