"""Self-supervised pre-training (body-part regression): the loss, the series it learns from, a run
on the synthetic dataset whose slices lie head to foot, and `train --init` from its backbone."""
import numpy as np
import pytest
import torch

from training import cli
from training.model import build
from training.pretrain import (InitError, PretrainConfig, load_backbone, order_and_distance_loss,
                               order_report, gather_volumes, run, series_groups)
from training.data import load as load_dataset
from training.train import TrainConfig, run as train_run


def test_series_groups_keep_series_that_can_teach_order_sorted_head_first():
    uid = np.array(["a", "a", "a", "single", "flat", "flat", "b", "b"])
    z = np.array([-50.0, 10.0, -20.0, 0.0, 5.0, 6.0, np.nan, 3.0])
    groups = series_groups(uid, z)
    # "single": one image; "flat": 1 mm apart; "b": one known z
    assert [g.tolist() for g in groups] == [[1, 2, 0]]


def test_loss_prefers_scores_that_grow_towards_the_feet_by_the_distance():
    z = torch.tensor([[100.0, 0.0, -100.0]])  # head first
    right = torch.tensor([[0.0, 1.0, 2.0]])  # 100 mm per unit, feet score higher
    reversed_ = torch.tensor([[2.0, 1.0, 0.0]])
    squashed = torch.tensor([[0.0, 0.1, 0.2]])  # right order, wrong distances
    loss = lambda s: float(order_and_distance_loss(s, z, 100.0, 1.0)[0])
    assert loss(right) < loss(squashed) < loss(reversed_)
    _, parts = order_and_distance_loss(right, z, 100.0, 1.0)
    assert parts["distance"] == pytest.approx(0.0) and parts["pairs"] == 6


def test_pairs_closer_than_the_gap_teach_nothing():
    z = torch.tensor([[0.0, 1.0]])
    loss, parts = order_and_distance_loss(torch.tensor([[5.0, -5.0]], requires_grad=True), z, 100.0, 1.0)
    assert parts["pairs"] == 0 and float(loss) == 0.0
    loss.backward()  # still differentiable: a batch of such pairs does not break the step


@pytest.fixture(scope="module")
def pretrained(synthetic_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    torch.set_num_threads(2)
    cfg = PretrainConfig(data=(str(synthetic_dataset),), splits=("train",), val_split="val", out=str(out),
                         epochs=6, width=8, series_per_batch=4, mm_per_unit=30.0, seed=3)
    final = run(cfg, log=lambda *_: None)
    return out, cfg, final


def test_pretraining_learns_the_order_of_held_out_series(pretrained, synthetic_dataset):
    out, cfg, final = pretrained
    assert (out / "pretrain.pt").exists() and (out / "metrics.json").exists()
    # the synthetic patients' slices lie head to foot in class order (neck ... other), 10 mm apart
    untrained = build({"num_classes": 1, "width": 8, "blocks": [1, 1, 1, 1], "dropout": 0.0})
    torch.manual_seed(0)
    val = gather_volumes([load_dataset(synthetic_dataset)], ("val",), "cpu")
    before = order_report(untrained, val, -100.0, 200.0, 30.0)["order_accuracy"]
    assert final["series"] == 2 and final["pairs"] > 100
    assert final["order_accuracy"] >= 0.7 and final["order_accuracy"] > before + 0.1


def test_training_starts_from_the_pretrained_backbone(pretrained, synthetic_dataset, tmp_path):
    out, _, _ = pretrained
    logs = []
    train_run(TrainConfig(data=str(synthetic_dataset), out=str(tmp_path / "run"), epochs=1, batch_size=16,
                          width=8, blocks=(1, 1, 1, 1), patience=0, seed=1, init=str(out / "pretrain.pt")),
              log=logs.append)
    assert any("backbone from" in line and "tensors" in line for line in logs)
    model = build({"num_classes": 6, "width": 8, "blocks": [1, 1, 1, 1]})
    copied = load_backbone(out / "pretrain.pt", model)
    saved = torch.load(out / "pretrain.pt", weights_only=True)["state_dict"]
    assert copied == len(saved) and torch.equal(model.stem[0].weight, saved["stem.0.weight"])


def test_init_refuses_another_shape_or_file(pretrained, tmp_path):
    out, _, _ = pretrained
    with pytest.raises(InitError, match="model_config"):
        load_backbone(out / "pretrain.pt", build({"num_classes": 6, "width": 16, "blocks": [1, 1, 1, 1]}))
    other = tmp_path / "classifier.pt"
    torch.save({"format": "anatomy-training-checkpoint/1"}, other)
    with pytest.raises(InitError, match="classifier.pt.*expected"):
        load_backbone(other, build({"num_classes": 6, "width": 8, "blocks": [1, 1, 1, 1]}))


def test_cli_names_what_is_missing(tmp_path, synthetic_dataset):
    with pytest.raises(SystemExit, match="no series"):
        cli.main(["pretrain", "--data", str(synthetic_dataset), "--splits", "nosuchsplit",
                  "--out", str(tmp_path / "p"), "--epochs", "1", "--width", "8"])
