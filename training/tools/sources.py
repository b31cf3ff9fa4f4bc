"""Helpers for leave-source-out runs over ../shared/data/sources.csv (both data folders).

    python training/tools/sources.py list ../shared/data/sources.csv
        one line per source: SLUG<TAB>NAME<TAB>cases<TAB>folders (in file order); the slug
        (lowercase, '-' for anything else) names the run folder
    python training/tools/sources.py combine-labels OUT.csv ../shared/data/ct ../shared/data/ct-extra
        one labels.csv for several data folders of one parent: each `file` prefixed by its
        folder's name, so that `anatomy-node dataset build --from <parent> --labels OUT.csv`
        builds one dataset of all of them (case ids are unique across the folders)
"""
from __future__ import annotations

import csv
import re
import sys
from pathlib import Path


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def list_sources(sources: Path) -> list[tuple[str, str, int, str]]:
    with sources.open(newline="") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, list] = {}
    for row in rows:
        entry = out.setdefault(row["source"], [0, []])
        entry[0] += 1
        if row["folder"] not in entry[1]:
            entry[1].append(row["folder"])
    return [(slug(name), name, n, ",".join(folders)) for name, (n, folders) in out.items()]


def combine_labels(out: Path, folders: list[Path]) -> int:
    parents = {f.resolve().parent for f in folders}
    if len(parents) != 1:
        raise SystemExit(f"the folders must share one parent (the --from of dataset build): {folders}")
    header, rows, cases = None, [], {}
    for folder in folders:
        with (folder / "labels.csv").open(newline="") as f:
            reader = csv.DictReader(f)
            if header is None:
                header = reader.fieldnames
            elif reader.fieldnames != header:
                raise SystemExit(f"{folder}/labels.csv: columns {reader.fieldnames} differ from {header}")
            for row in reader:
                owner = cases.setdefault(row["case_id"], folder.name)
                if owner != folder.name:
                    raise SystemExit(f"case {row['case_id']} is in both {owner} and {folder.name}")
                row["file"] = f"{folder.name}/{row['file']}"
                rows.append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "list":
        for row in list_sources(Path(argv[1])):
            print("\t".join(str(v) for v in row))
        return 0
    if len(argv) >= 3 and argv[0] == "combine-labels":
        n = combine_labels(Path(argv[1]), [Path(a) for a in argv[2:]])
        print(f"{n} rows of {len(argv) - 2} folders: {argv[1]}", file=sys.stderr)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
