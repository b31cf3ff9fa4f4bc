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
    translate: float = 0.08  # fraction of the image width, uniform ±, per axis
    elastic_sigma: float = 0.015  # std of control-point displacement (fraction of width)
    elastic_grid: int = 5  # control points per axis of the smooth deformation
    hflip: float = 0.0  # probability of a left-right flip (0: keep laterality, see README)
    hu_scale: float = 0.05  # HU multiplied by uniform [1-s, 1+s]
    hu_offset: float = 20.0  # plus uniform ± this many HU
    noise_hu: float = 15.0  # plus Gaussian noise with std uniform in [0, this] HU
    lowres_p: float = 0.25  # probability of a down-and-up-sampling...
    lowres_min: float = 0.4  # ...to a fraction of the size uniform in [this, 0.9]

    def to_dict(self) -> dict:
        return asdict(self)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def sampling_grid(n: int, size: int, cfg: AugmentConfig, gen: torch.Generator,
                  device=None) -> torch.Tensor:
    """[n, size, size, 2] grid for grid_sample (normalised coordinates, align_corners=False).

    The random parameters are drawn on the CPU; the full-size grid is built on `device`."""
    angle = _uniform(n, -cfg.rotate_deg, cfg.rotate_deg, gen) * (math.pi / 180.0)
    # grid coordinates map output → input, so showing anatomy s times larger scales them by 1/s
    scale = torch.exp(-_uniform(n, math.log(cfg.scale_min), math.log(cfg.scale_max), gen))
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


def augment(hu: torch.Tensor, low: float, high: float, cfg: AugmentConfig,
            gen: torch.Generator) -> torch.Tensor:
    """HU batch [n,1,S,S] (float, any device) → augmented unit-normalised batch in [0, 1]."""
    n, _, size, _ = hu.shape
    dev = hu.device
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

    grid = sampling_grid(n, size, cfg, gen, dev).to(x.dtype)
    # grid_sample pads with zeros; shift so that the padding is air, whatever the window
    air = float(to_unit(torch.tensor(AIR_HU), low, high))
    x = F.grid_sample(x - air, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + air
    return x.clamp(0.0, 1.0)


def preprocess(hu: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Evaluation path: the contract's window + normalisation, nothing random."""
    return to_unit(hu, low, high)
