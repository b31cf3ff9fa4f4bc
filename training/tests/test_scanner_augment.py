"""Scanner and protocol variation (augment.scanner_variation): off by default without touching
the shipped recipe's random stream, seeded, and each part changing the image as intended."""
import pytest
import torch

from training import cli
from training.augment import (SCANNER_PARTS, SCANNER_PRESET, AugmentConfig, augment, contrast_phase,
                              fov_circle, gaussian_blur, insert_couch, scanner_variation)


def _batch(n=6, size=40):
    g = torch.Generator().manual_seed(3)
    hu = torch.full((n, 1, size, size), -1024.0)
    hu[:, :, 8:32, 10:30] = torch.rand(n, 1, 24, 20, generator=g) * 1200 - 300
    return hu


def _phantom(n=4, size=48):
    """A body of soft tissue (40 HU) with an enhancing organ (200 HU) and a bone (1000 HU)."""
    hu = torch.full((n, 1, size, size), -1024.0)
    hu[:, :, 10:34, 8:40] = 40.0
    hu[:, :, 14:24, 12:22] = 200.0
    hu[:, :, 26:31, 28:33] = 1000.0
    return hu


def _only(part, **extra):
    return AugmentConfig(**{part: 1.0}, **extra)


def _tv(x):
    """Total variation: the high-frequency content."""
    return float((x[..., 1:, :] - x[..., :-1, :]).abs().sum() + (x[..., :, 1:] - x[..., :, :-1]).abs().sum())


# Figures of the default augmentation before the scanner parts existed (same batch, pairs and
# seed): a changed random stream would move them by far more than the tolerance.
BEFORE = [((), 890.6914084808413, 691.7407410470668),
          ((("lowres_p", 1.0), ("strip_p", 0.5), ("crop_scale_min", 0.8)), 1105.2581796155669, 698.9946369278391)]


@pytest.mark.parametrize("options,total,squares", BEFORE)
def test_default_path_is_unchanged(options, total, squares):
    pair = torch.tensor([True, False, True, False, True, True])
    x = augment(_batch(), -100, 200, AugmentConfig(**dict(options)), torch.Generator().manual_seed(7), pair)
    assert x.double().sum().item() == pytest.approx(total, rel=1e-6)
    assert (x.double() ** 2).sum().item() == pytest.approx(squares, rel=1e-6)


def test_parts_are_off_by_default_and_their_magnitudes_alone_change_nothing():
    d = AugmentConfig()
    assert all(getattr(d, part) == 0 for part in SCANNER_PARTS)
    loud = AugmentConfig(blur_sigma_max=3, sharpen_max=3, dose_noise_hu=200, contrast_scale=0.9, fov_min=0.2)
    a = augment(_batch(), -100, 200, d, torch.Generator().manual_seed(5))
    b = augment(_batch(), -100, 200, loud, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("part", SCANNER_PARTS)
def test_each_part_is_seeded_and_changes_the_batch(part):
    hu = _phantom()
    a = scanner_variation(hu, _only(part), torch.Generator().manual_seed(1))
    b = scanner_variation(hu, _only(part), torch.Generator().manual_seed(1))
    c = scanner_variation(hu, _only(part), torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, hu)
    assert not torch.equal(a, c)
    x = augment(hu, -100, 200, _only(part), torch.Generator().manual_seed(1))
    assert x.shape == hu.shape and 0 <= float(x.min()) and float(x.max()) <= 1


def test_a_part_at_probability_half_touches_some_images_only():
    hu = _phantom(n=32)
    out = scanner_variation(hu, AugmentConfig(contrast_p=0.5), torch.Generator().manual_seed(0))
    changed = (out != hu).flatten(1).any(1)
    assert 4 < int(changed.sum()) < 28


def test_blur_smooths_and_keeps_the_mean():
    hu = _phantom()
    out = gaussian_blur(hu, torch.tensor([0.5, 1.0, 1.5, 3.0]))
    tv = [_tv(out[i]) for i in range(4)]
    assert tv[0] > tv[1] > tv[2] > tv[3] and tv[0] < _tv(hu[0])
    assert torch.allclose(out.mean(dim=(1, 2, 3)), hu.mean(dim=(1, 2, 3)), rtol=1e-4)
    assert float(out[:, :, 0, 0].max()) == pytest.approx(-1024.0)  # air stays air at the border


def test_sharpen_overshoots_at_edges_and_leaves_flat_regions():
    hu = _phantom()
    out = scanner_variation(hu, _only("sharpen_p"), torch.Generator().manual_seed(0))
    assert _tv(out) > _tv(hu)
    assert float(out.max()) > 1000.0 + 1  # overshoot beside the bone's edge
    assert torch.allclose(out[:, :, 0:4, 0:4], hu[:, :, 0:4, 0:4])  # flat air untouched
    assert torch.allclose(out[:, :, 17:21, 15:19], hu[:, :, 17:21, 15:19], atol=1e-3)  # organ centre


def test_dose_noise_has_the_drawn_std_and_no_bias():
    hu = torch.full((4, 1, 96, 96), 40.0)
    cfg = AugmentConfig(dose_p=1.0, dose_noise_hu=60.0)
    out = scanner_variation(hu, cfg, torch.Generator().manual_seed(0))
    std = (out - hu).std(dim=(1, 2, 3))
    assert ((std > 9.0) & (std < 61.0)).all() and float(std.max() - std.min()) > 1.0
    assert float((out - hu).mean().abs()) < 2.0
    # correlated: neighbours agree more than white noise does (correlation ~0)
    d = (out - hu)[:, 0]
    corr = float((d[:, :, 1:] * d[:, :, :-1]).mean() / (d * d).mean())
    assert corr > 0.3


def test_contrast_phase_scales_the_enhancing_band_only():
    hu = torch.tensor([-1000.0, 0.0, 40.0, 100.0, 200.0, 300.0, 450.0, 1000.0]).view(1, 1, 1, 8)
    out = contrast_phase(hu, torch.tensor([1.5]))[0, 0, 0]
    assert out[[0, 1, 2, 6, 7]].tolist() == [-1000.0, 0.0, 40.0, 450.0, 1000.0]
    assert out[3] == pytest.approx(40 + 60 * 1.5) and out[4] == pytest.approx(40 + 160 * 1.5)
    assert out[5] == pytest.approx(40 + 260 * 1.5)
    lower = contrast_phase(hu, torch.tensor([0.6]))[0, 0, 0]
    assert lower[4] == pytest.approx(40 + 160 * 0.6)


def test_fov_circle_makes_the_corners_air_and_keeps_the_centre():
    hu = torch.full((2, 1, 40, 40), 40.0)
    out = fov_circle(hu, torch.tensor([0.8, 1.0]))
    assert (out[:, :, 0, 0] == -1024).all() and (out[:, :, 20, 20] == 40).all()
    assert int((out[0] == -1024).sum()) > int((out[1] == -1024).sum()) > 0
    assert out[0, 0, 20, 1] == -1024 and out[1, 0, 20, 1] == 40  # radius 0.8 cuts the sides too


def test_couch_goes_below_the_body_only():
    hu = _phantom(n=3)
    params = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.6, 0.5]] * 2 + [[0.0, 1.0, 0.5, 0.0, 1.0, 0.0]])
    out = insert_couch(hu, params)
    changed = (out != hu)[:, 0]
    assert changed.any(dim=(1, 2)).all()
    rows = changed.any(2).nonzero()[:, 1]
    assert int(rows.min()) >= 34  # the body ends at row 33
    assert float(out[2].max()) == 1000.0 and float(out[2][changed[2].unsqueeze(0)].min()) == pytest.approx(400.0)
    body_to_bottom = hu.clone()
    body_to_bottom[:, :, 10:, 8:40] = 40.0
    assert torch.equal(insert_couch(body_to_bottom, params), body_to_bottom)


def test_cli_options_and_the_preset_reach_the_config():
    base = ["train", "--data", "d.npz", "--out", "o"]
    a = cli.parser().parse_args(base)
    cfg = cli.augment_config(a)
    assert cfg == AugmentConfig()
    a = cli.parser().parse_args(base + ["--blur-p", "0.3", "--blur-sigma-max", "2", "--contrast-scale", "0.2",
                                        "--couch-p", "0.1", "--fov-min", "0.6"])
    cfg = cli.augment_config(a)
    assert (cfg.blur_p, cfg.blur_sigma_max, cfg.contrast_scale, cfg.couch_p, cfg.fov_min) == (0.3, 2.0, 0.2, 0.1, 0.6)
    assert cfg.sharpen_p == 0
    a = cli.parser().parse_args(base + ["--scanner", "--dose-p", "0.9"])
    cfg = cli.augment_config(a)
    assert cfg.dose_p == 0.9
    assert all(getattr(cfg, k) == v for k, v in SCANNER_PRESET.items() if k != "dose_p")
