"""Write tests/fixtures/order/cases.json: series decoded by training/order.py (the port of the
node's decoder), which the Rust test `order::tests::python_port_agrees` decodes again.

    training/.venv/bin/python training/tools/order_fixture.py tests/fixtures/order/cases.json

Cases: clean and noisy head-to-foot series, isolated wrong images, reversed and shuffled input,
gaps of 5-400 mm, equal z, one image, flat probabilities, a model without `other`, and other
penalties; probabilities are float32 values so that both sides read the same numbers.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from training import order  # noqa: E402

SIX = ["neck", "lungs", "liver", "pelvis", "legs", "other"]
FIVE = ["neck", "lungs", "liver", "pelvis", "legs"]


def f32(values) -> list:
    return [float(np.float32(v)) for v in values]


def noisy_series(rng, classes, regions, step_mm, sharpness, wrong=0):
    """Images head to foot through `regions` (class, count), Dirichlet noise, `wrong` images
    given a random confident class."""
    rows, z = [], []
    for name, count in regions:
        for _ in range(count):
            alpha = np.full(len(classes), 1.0)
            alpha[classes.index(name)] += sharpness
            rows.append(rng.dirichlet(alpha))
            z.append(-len(z) * step_mm)
    rows = np.array(rows)
    for i in rng.choice(len(rows), size=min(wrong, len(rows)), replace=False):
        k = rng.integers(len(classes))
        rows[i] = rng.dirichlet(np.full(len(classes), 0.5))
        rows[i, k] += 2.0
        rows[i] /= rows[i].sum()
    return rows, np.array(z, dtype=np.float64)


def cases(seed: int = 16) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    trunk = [("lungs", 6), ("liver", 4), ("other", 2), ("pelvis", 5), ("legs", 4)]
    head_neck = [("other", 3), ("neck", 5), ("lungs", 4)]
    for n in range(24):
        classes = SIX if n % 6 else FIVE
        regions = trunk if n % 2 else head_neck
        if classes is FIVE:
            regions = [(c, k) for c, k in regions if c != "other"]
        step = [5.0, 20.0, 50.0, 150.0, 400.0][n % 5]
        p, z = noisy_series(rng, classes, regions, step, sharpness=[0.5, 2.0, 6.0][n % 3], wrong=n % 4)
        perm = rng.permutation(len(z)) if n % 3 == 0 else (np.arange(len(z))[::-1] if n % 3 == 1 else np.arange(len(z)))
        p, z = p[perm], z[perm]
        if n % 7 == 0:
            z[: len(z) // 3] = z[0]  # images at one z
        switch, skip = [(1.0, 4.0), (0.5, 2.0), (3.0, 8.0)][n % 3]
        out.append({"classes": classes, "z_mm": [float(v) for v in z], "probabilities": [f32(r) for r in p],
                    "switch_penalty": switch, "skip_penalty": skip})
    out.append({"classes": SIX, "z_mm": [12.5], "probabilities": [f32([0.1, 0.2, 0.3, 0.15, 0.15, 0.1])],
                "switch_penalty": 1.0, "skip_penalty": 4.0})
    out.append({"classes": SIX, "z_mm": [0.0, -10.0, -20.0], "probabilities": [f32([1 / 6] * 6)] * 3,
                "switch_penalty": 1.0, "skip_penalty": 4.0})
    for case in out:
        case["decoded"] = order.decode(case["probabilities"], case["z_mm"], case["classes"],
                                       case["switch_penalty"], case["skip_penalty"]).tolist()
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: order_fixture.py OUT.json")
    data = cases()
    Path(argv[0]).write_text(json.dumps({"generator": "training/tools/order_fixture.py", "cases": data}) + "\n")
    print(f"{len(data)} cases: {argv[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
