"""The classifier: a ResNet-18-shaped CNN at half width (about 2.8 M parameters).

Roth et al. 2015 used an AlexNet-style net (~57 M parameters, mostly in its fully connected
layers). A residual CNN with BatchNorm and global average pooling reaches far lower error on
ImageNet-like tasks with a fraction of the weights, trains well from scratch on ~2000 images
with strong augmentation, and exports to ONNX as plain Conv/BatchNorm(folded)/Relu/Add/
GlobalAveragePool/Gemm: operators every ONNX Runtime build runs on CPU and CUDA. Global average
pooling also makes the net independent of the input size, so one architecture serves any S.

The network returns logits; softmax (after temperature scaling) is added at export
(export.ExportWrapper), so training uses the numerically stable cross-entropy on logits.
"""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class AnatomyNet(nn.Module):
    """Input [N, 1, S, S] in [0, 1] (the contract's unit normalisation) → logits [N, C]."""

    def __init__(self, num_classes: int, width: int = 32, blocks=(2, 2, 2, 2), dropout: float = 0.2):
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "blocks": list(blocks), "dropout": dropout}
        # Stem: stride 4 before the first stage, as in ResNet, keeps CPU cost low at 256×256.
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        layers, cin = [], width
        for stage, n in enumerate(blocks):
            cout = width * 2**stage
            for i in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (i == 0 and stage > 0) else 1))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each residual branch: every block starts as identity, which
        # makes training from scratch on a small dataset more stable.
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))


class Ensemble(nn.Module):
    """Several trained nets that answer together: the mean of their logits. Nets trained the
    same way but from other seeds disagree most where the data is thin (the model card's seeds
    move the test error by 2 points and a left-out source by tens), and their mean is steadier
    than any one of them. The mean of logits, not of probabilities, so that one temperature
    calibrates the whole (ensemble.py fits it) and the graph stays softmax(logits / T)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.config = {"ensemble": [m.config for m in self.members]}

    @property
    def fc(self) -> nn.Linear:
        """The first member's classifier: its width is the ensemble's, for code that asks."""
        return self.members[0].fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.members[0](x)
        for m in self.members[1:]:
            total = total + m(x)
        return total / len(self.members)


def build(config: dict) -> nn.Module:
    if "ensemble" in config:
        return Ensemble([build(c) for c in config["ensemble"]])
    return AnatomyNet(config["num_classes"], config.get("width", 32),
                      tuple(config.get("blocks", (2, 2, 2, 2))), config.get("dropout", 0.2))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
