import torch

from training.augment import AugmentConfig, augment, preprocess, sampling_grid

OFF = AugmentConfig(rotate_deg=0, scale_min=1, scale_max=1, translate=0, elastic_sigma=0, hflip=0,
                    hu_scale=0, hu_offset=0, noise_hu=0, lowres_p=0)


def _batch(n=6, size=40):
    g = torch.Generator().manual_seed(3)
    hu = torch.full((n, 1, size, size), -1024.0)
    hu[:, :, 8:32, 10:30] = torch.rand(n, 1, 24, 20, generator=g) * 1200 - 300
    return hu


def test_shape_range_and_dtype():
    hu = _batch()
    x = augment(hu, -100, 200, AugmentConfig(lowres_p=1.0, hflip=0.5), torch.Generator().manual_seed(0))
    assert x.shape == hu.shape and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    assert not torch.allclose(x, preprocess(hu, -100, 200))


def test_same_seed_same_batch():
    hu = _batch()
    a = augment(hu, -100, 200, AugmentConfig(), torch.Generator().manual_seed(7))
    b = augment(hu, -100, 200, AugmentConfig(), torch.Generator().manual_seed(7))
    c = augment(hu, -100, 200, AugmentConfig(), torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_all_off_is_the_contract_preprocessing():
    hu = _batch()
    x = augment(hu, -100, 200, OFF, torch.Generator().manual_seed(0))
    assert torch.allclose(x, preprocess(hu, -100, 200), atol=1e-5)


def test_border_is_air_for_any_window():
    # a window below air: air is not 0 after normalisation, and must still fill the border
    hu = torch.full((2, 1, 32, 32), -1024.0)
    cfg = AugmentConfig(rotate_deg=0, scale_min=0.5, scale_max=0.5, translate=0, elastic_sigma=0,
                        hu_scale=0, hu_offset=0, noise_hu=0, lowres_p=0)
    x = augment(hu, -2000, 0, cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(x, torch.full_like(x, (-1024 + 2000) / 2000), atol=1e-5)


def test_grid_is_smooth_and_bounded():
    g = sampling_grid(4, 64, AugmentConfig(), torch.Generator().manual_seed(0))
    assert g.shape == (4, 64, 64, 2)
    step = (g[:, 1:] - g[:, :-1]).abs().max()
    assert step < 0.2  # neighbouring pixels stay neighbours: no tearing


def test_strip_background_keeps_the_body_and_what_it_encloses():
    from training.augment import strip_background

    hu = torch.full((1, 1, 64, 64), -1000.0)
    hu[0, 0, 10:40, 8:56] = 40.0  # the body
    hu[0, 0, 15:35, 14:30] = -850.0  # a lung inside it...
    hu[0, 0, 25, 20] = 60.0  # ...with a vessel
    hu[0, 0, 44, 2:62] = 300.0  # a couch top, one pixel thin, below the body
    hu[0, 0, 50:52, 60:62] = 500.0  # a marker in the corner, 2 x 2
    out = strip_background(hu)
    assert torch.equal(out[0, 0, 10:40, 8:56], hu[0, 0, 10:40, 8:56])  # body, lung, vessel kept
    assert (out[0, 0, 44] == -1024.0).all() and (out[0, 0, 50:52, 60:62] == -1024.0).all()
    assert (out[0, 0, :10] == -1024.0).all()  # air stays air


def test_strip_p_strips_some_images():
    hu = torch.full((8, 1, 40, 40), -1000.0)
    hu[:, :, 5:30, 5:35] = 40.0
    hu[:, :, 35, :] = 300.0  # the couch
    on = augment(hu, -100, 200, OFF.__class__(**(OFF.to_dict() | {"strip_p": 0.5})), torch.Generator().manual_seed(1))
    couch_seen = on[:, 0, 35].amax(dim=1) > 0.5
    assert 0 < int(couch_seen.sum()) < 8


def test_crops_are_not_shown_smaller_than_crop_scale_min():
    cfg = AugmentConfig(rotate_deg=0, scale_min=0.25, scale_max=1.0, translate=0, elastic_sigma=0,
                        crop_scale_min=0.8)
    n = 400
    crop = torch.arange(n) % 2 == 0

    def sizes(c):
        g = sampling_grid(n, 16, cfg, torch.Generator().manual_seed(3), crop=c)
        return (15 / 8) / (g[:, 0, -1, 0] - g[:, 0, 0, 0])  # x spans 2 * 15/16 at size 1

    size = sizes(crop)
    assert size[crop].min() >= 0.8 - 1e-4 and size[crop].max() <= 1.0 + 1e-4
    assert size[~crop].min() < 0.3  # the rest still zooms out to scale_min
    plain = sizes(None)  # the same draws: the non-crops are untouched
    assert torch.allclose(size[~crop], plain[~crop]) and not torch.allclose(size[crop], plain[crop])


def test_augment_finds_the_crops_by_body_fill():
    # crops (body everywhere) and small bodies: with zoom-out only for the small ones, the crops
    # keep body to their border, the small bodies shrink
    hu = torch.full((8, 1, 32, 32), -1000.0)
    hu[0::2] = 40.0
    hu[1::2, 0, 8:24, 8:24] = 40.0  # a quarter of the image
    cfg = AugmentConfig(rotate_deg=0, scale_min=0.25, scale_max=1.0, translate=0, elastic_sigma=0,
                        hu_scale=0, hu_offset=0, noise_hu=0, lowres_p=0, crop_scale_min=1.0)
    x = augment(hu, -100, 200, cfg, torch.Generator().manual_seed(0))
    fill = (x > 0.2).float().mean(dim=(1, 2, 3))
    assert (fill[0::2] > 0.99).all()  # the crops: size 1 exactly
    assert fill[1::2].mean() < 0.2  # the small bodies: ~0.25 * size^2 on average
