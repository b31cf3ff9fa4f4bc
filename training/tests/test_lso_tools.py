"""Leave-source-out over both data folders: hold_out.py --source-name and tools/sources.py."""
import csv

import numpy as np
import pytest

from training import data
from training.tools import hold_out, sources

SOURCES = ('case_id,folder,source,manufacturer,model\n'
           'synthetic-0,ct,"Alpha (TCIA, x)",GE,A\n'
           'synthetic-9,ct-extra,"Alpha (TCIA, x)",GE,A\n'
           'synthetic-10,ct,Beta,SIEMENS,B\n'
           'synthetic-1,ct,Beta,SIEMENS,B\n')


def test_hold_out_a_named_source_of_sources_csv(synthetic_dataset, tmp_path):
    src = data.pack(synthetic_dataset, tmp_path / "a.npz")
    table = tmp_path / "sources.csv"
    table.write_text(SOURCES)
    hold_out.main([str(src), str(tmp_path / "b.npz"), "--source-name", "Alpha (TCIA, x)",
                   "--sources", str(table), "--to", "test", "--rest-to", "train"])
    a, b = data.load(src), data.load(tmp_path / "b.npz")
    key = {p: hold_out.patient_key(f"synthetic-{p}") for p in (0, 9, 10, 11)}
    # synthetic-0 was train, -9 val: both now test, alone; the old test patients (10, 11) train
    assert set(b.patient_key[b.split == "test"]) == {key[0], key[9]}
    assert (b.split[b.patient_key == key[10]] == "train").all()
    assert (b.split[b.patient_key == key[11]] == "train").all()
    assert len(b.split) == len(a.split)
    with pytest.raises(SystemExit, match="no case has source 'Gamma'"):
        hold_out.main([str(src), str(tmp_path / "c.npz"), "--source-name", "Gamma", "--sources", str(table)])
    with pytest.raises(SystemExit, match="no column 'site'"):
        hold_out.main([str(src), str(tmp_path / "c.npz"), "--source-name", "Beta", "--sources", str(table),
                       "--source-column", "site"])
    with pytest.raises(SystemExit, match="needs --sources"):
        hold_out.main([str(src), str(tmp_path / "c.npz"), "--source-name", "Beta"])


def test_splits_from_keeps_a_reference_split_and_adds_new_subjects(synthetic_dataset, tmp_path):
    full = data.pack(synthetic_dataset, tmp_path / "full.npz")
    arrays, info = data.read_npz_arrays(full)
    key = {p: hold_out.patient_key(f"synthetic-{p}") for p in range(12)}
    # the reference knows patients 0..9 only (the shipped dataset), with 0 moved to test there
    known = np.isin(arrays["patient_key"], [key[p] for p in range(10)])
    ref = {k: v[known] if getattr(v, "shape", ()) and len(v) == len(known) else v for k, v in arrays.items()}
    ref["split"] = np.where(ref["patient_key"] == key[0], "test", ref["split"])
    data.write_npz_arrays(tmp_path / "ref.npz", ref, info)
    hold_out.main([str(full), str(tmp_path / "out.npz"), "--splits-from", str(tmp_path / "ref.npz")])
    out = data.load(tmp_path / "out.npz")
    split_of = lambda p: set(out.split[out.patient_key == key[p]])
    assert split_of(0) == {"test"} and split_of(9) == {"val"} and split_of(1) == {"train"}
    assert split_of(10) == {"train"} and split_of(11) == {"train"}  # not in the reference: --new-to
    # and a source can still be moved in the same call
    hold_out.main([str(full), str(tmp_path / "out2.npz"), "--splits-from", str(tmp_path / "ref.npz"),
                   "--subjects", "synthetic-11", "--to", "test", "--rest-to", "train"])
    out2 = data.load(tmp_path / "out2.npz")
    assert set(out2.patient_key[out2.split == "test"]) == {key[11]}


def test_sources_list_and_combined_labels(tmp_path):
    table = tmp_path / "sources.csv"
    table.write_text(SOURCES)
    assert sources.list_sources(table) == [("alpha-tcia-x", "Alpha (TCIA, x)", 2, "ct,ct-extra"),
                                           ("beta", "Beta", 2, "ct")]
    header = "case_id,file,label\n"
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "labels.csv").write_text(header + "a,a/1.dcm,neck\na,a/2.dcm,lungs\n")
    (tmp_path / "ct-extra").mkdir()
    (tmp_path / "ct-extra" / "labels.csv").write_text(header + "b,b/CT/1.dcm,legs\n")
    out = tmp_path / "run" / "labels.csv"
    assert sources.combine_labels(out, [tmp_path / "ct", tmp_path / "ct-extra"]) == 3
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == ["ct/a/1.dcm", "ct/a/2.dcm", "ct-extra/b/CT/1.dcm"]
    assert [r["case_id"] for r in rows] == ["a", "a", "b"]
    # a case in both folders is refused (a person would be split across sources)
    (tmp_path / "ct-extra" / "labels.csv").write_text(header + "a,a/9.dcm,legs\n")
    with pytest.raises(SystemExit, match="case a is in both ct and ct-extra"):
        sources.combine_labels(out, [tmp_path / "ct", tmp_path / "ct-extra"])
