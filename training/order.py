"""The node's head-to-foot decoding (src/anatomy/order.rs), for the training side.

Self-training keeps a pseudo label only where the model's own label agrees with its series'
decoded labelling (`mine.pseudo_label_require_order`); tools that imitate that offline must decode
exactly as the node does, or their figures describe another rule. This is a line-by-line port:
the same eight states with the same minimal region lengths, the same switch and mm-scaled skip
penalties, the same probability floor, ordering and ties. tests/fixtures/order/cases.json holds
cases decoded by this port; a Rust test (src/anatomy/order.rs) decodes them again and must agree,
so the two cannot drift apart silently.
"""
from __future__ import annotations

import math

import numpy as np

PROBABILITY_FLOOR = np.float32(1e-4)
# (class, minimal region length in mm), head to foot, as order.rs STATES
STATES = (("other", 0.0), ("neck", 40.0), ("lungs", 100.0), ("liver", 60.0), ("other", 20.0),
          ("pelvis", 80.0), ("legs", 150.0), ("other", 0.0))
REGIONS = ("neck", "lungs", "liver", "pelvis", "legs")
SWITCH_PENALTY = 1.0
SKIP_PENALTY = 4.0


def states(classes) -> list[tuple[int, float]]:
    """(class index, minimal length) of each state this model's classes feed."""
    classes = list(classes)
    known = set(REGIONS) | {"other"}
    if (any(c not in known for c in classes) or any(r not in classes for r in REGIONS)
            or len(set(classes)) != len(classes)):
        raise ValueError(f"the model's classes {classes} are not neck, lungs, liver, pelvis, legs "
                         "(and optionally other), each once")
    return [(classes.index(name), length) for name, length in STATES if name in classes]


def _transition(st, frm: int, to: int, gap_mm: float, switch: float, skip: float) -> float:
    if frm == to:
        return 0.0
    skipped = sum(skip * max(0.0, 1.0 - gap_mm / max(length, 1.0)) for _, length in st[frm + 1:to])
    return switch + skipped


def head_to_foot(probabilities: np.ndarray, z_mm: np.ndarray) -> list[int]:
    """Indices sorted z descending; equal z by their probabilities (lexicographic, ascending),
    stable, as order.rs head_to_foot."""
    import functools

    def cmp(a: int, b: int) -> int:
        za, zb = z_mm[a], z_mm[b]
        if za != zb:
            return -1 if za > zb else 1
        for x, y in zip(probabilities[a], probabilities[b]):
            if x != y:
                return -1 if x < y else 1
        return 0

    return sorted(range(len(z_mm)), key=functools.cmp_to_key(cmp))


def decode(probabilities, z_mm, classes, switch_penalty: float = SWITCH_PENALTY,
           skip_penalty: float = SKIP_PENALTY) -> np.ndarray:
    """Class index per image (in the order given) on the most probable head-to-foot path."""
    st = states(classes)
    p = np.asarray(probabilities, dtype=np.float32)
    z = np.asarray(z_mm, dtype=np.float64)
    if len(p) == 0:
        return np.zeros(0, dtype=np.int64)
    order = head_to_foot(p, z)

    def emission(i: int, s: int) -> float:
        v = p[i, st[s][0]]
        return math.log(float(PROBABILITY_FLOOR if not v >= PROBABILITY_FLOOR else v))

    n = len(st)
    score = [emission(order[0], s) for s in range(n)]
    back = [list(range(n))]
    for step in range(1, len(order)):
        i = order[step]
        gap = abs(z[order[step - 1]] - z[i])
        gap = gap if math.isfinite(gap) else 0.0
        nxt, frm = [-math.inf] * n, [0] * n
        for to in range(n):
            for prev in range(to + 1):
                candidate = score[prev] - _transition(st, prev, to, gap, switch_penalty, skip_penalty)
                if candidate > nxt[to]:
                    nxt[to], frm[to] = candidate, prev
            nxt[to] += emission(i, to)
        score = nxt
        back.append(frm)
    state = 0
    for s in range(n):
        if score[s] > score[state]:
            state = s
    labels = np.zeros(len(p), dtype=np.int64)
    for step in range(len(order) - 1, -1, -1):
        labels[order[step]] = st[state][0]
        state = back[step][state]
    return labels
