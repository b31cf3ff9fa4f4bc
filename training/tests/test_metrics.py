import numpy as np
import torch

from training.calibrate import fit_temperature, nll
from training.metrics import auc_one_vs_rest, classification_report


def test_auc_known_values():
    y = np.array([0, 0, 1, 1], bool)
    assert auc_one_vs_rest(np.array([0.1, 0.2, 0.8, 0.9]), y) == 1.0
    assert auc_one_vs_rest(np.array([0.9, 0.8, 0.2, 0.1]), y) == 0.0
    assert auc_one_vs_rest(np.array([0.5, 0.5, 0.5, 0.5]), y) == 0.5
    assert auc_one_vs_rest(np.array([0.1, 0.6, 0.4, 0.9]), y) == 0.75
    assert np.isnan(auc_one_vs_rest(np.array([0.1, 0.2]), np.array([True, True])))


def test_report_excludes_ambiguous():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    r = classification_report(probs, np.array([0, 1, -1]), ["a", "b"])
    assert r["images"] == 2 and r["error"] == 0.0 and r["mean_auc"] == 1.0
    assert r["confusion"] == [[1, 0], [0, 1]]


def test_temperature_scaling_fixes_overconfidence():
    g = torch.Generator().manual_seed(0)
    n, C = 4000, 6
    # well-calibrated logits by construction: labels are sampled from softmax(true_logits)
    true_logits = torch.randn(n, C, generator=g) * 2
    targets = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=g).squeeze(1)
    over = true_logits * 3  # an overconfident model: same ranking, logits 3x too large
    t = fit_temperature(over, targets)
    assert 2.5 < t < 3.5
    assert nll(over, targets, t) < nll(over, targets) - 0.1
    # ambiguous targets (-1) are ignored
    t2 = fit_temperature(torch.cat([over, over[:5]]), torch.cat([targets, torch.full((5,), -1)]))
    assert abs(t2 - t) < 1e-6
