"""GPU check: the CUDA run's answers against the CPU's (tests/gpu/check.sh)."""
import json
import sys
from pathlib import Path

TOLERANCE = 1e-4


def images(path):
    out = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        if "probabilities" in row and "sop_instance_uid" in row:
            out[(row["sop_instance_uid"], row.get("frame"))] = row
    return out


def main(check, results):
    cpu = images(Path(check) / "classify-cpu.jsonl")
    cuda = images(Path(results) / "classify-cuda.jsonl")
    assert cpu, "no CPU image rows"
    assert cpu.keys() == cuda.keys(), f"images differ: {len(cpu)} on CPU, {len(cuda)} on CUDA"
    worst = 0.0
    for key, row in cpu.items():
        other = cuda[key]
        assert row["label"] == other["label"], f"{key}: {row['label']} on CPU, {other['label']} on CUDA"
        for name, p in row["probabilities"].items():
            worst = max(worst, abs(p - other["probabilities"][name]))
    assert worst < TOLERANCE, f"probabilities differ by {worst}"
    print(f"classify: {len(cpu)} images, same labels, largest probability difference {worst:.2e}")

    a = json.loads((Path(check) / "eval-cpu" / "metrics.json").read_text())
    b = json.loads((Path(results) / "eval-cuda" / "metrics.json").read_text())
    for key in ("images", "errors"):
        assert a["slice"][key] == b["slice"][key], f"eval slice.{key}: {a['slice'][key]} on CPU, {b['slice'][key]} on CUDA"
    for name, auc in a["slice"]["auc"].items():
        other = b["slice"]["auc"][name]
        assert (auc is None) == (other is None) and (auc is None or abs(auc - other) < 1e-3), (
            f"eval AUC {name}: {auc} on CPU, {other} on CUDA"
        )
    print(f"eval: {a['slice']['images']} images, {a['slice']['errors']} errors on both, AUCs equal")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
