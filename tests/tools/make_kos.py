"""Write a Key Object Selection document (PS3.3 A.35.4) that flags images of one study
(or, with --sr, a Comprehensive SR document of the same content).

Used by tests/mine.rs: a radiologist's key-image note as a PACS would hold it. The patient
and study attributes are copied from the first referenced image; the document's content is

  CONTAINER (113000, DCM, "Of Interest") or --title CODE
    TEXT  (113012, DCM, "Key Object Description") = --text        (when given)
    CODE  (121071, DCM, "Finding") = --code VALUE^SCHEME^MEANING   (when given)
    IMAGE ... one per referenced image (frame numbers with FILE:FRAME,FRAME)

usage: make_kos.py OUT.dcm [--text T] [--code V^S^M] [--manufacturer M] [--sr] FILE[:FRAMES]...
"""

import argparse
import sys

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

KOS = "1.2.840.10008.5.1.4.1.1.88.59"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def code(value, scheme, meaning):
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--text")
    parser.add_argument("--code")
    parser.add_argument("--manufacturer", default="Test PACS")
    parser.add_argument("--series-uid", default=None)
    parser.add_argument("--sr", action="store_true", help="a Comprehensive SR document")
    args = parser.parse_args()

    refs = []
    for spec in args.images:
        path, _, frames = spec.partition(":")
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        refs.append((ds, [int(f) for f in frames.split(",") if f]))
    first = refs[0][0]

    kos = Dataset()
    for keyword in [
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ]:
        if keyword in first:
            setattr(kos, keyword, first.data_element(keyword).value)
        elif keyword not in ("IssuerOfPatientID", "PatientBirthDate"):
            setattr(kos, keyword, "")
    sop_class = COMPREHENSIVE_SR if args.sr else KOS
    kos.SOPClassUID = sop_class
    kos.SOPInstanceUID = generate_uid()
    kos.Modality = "SR" if args.sr else "KO"
    if args.sr:
        kos.CompletionFlag = "COMPLETE"
        kos.VerificationFlag = "UNVERIFIED"
    kos.SeriesInstanceUID = args.series_uid or generate_uid()
    kos.SeriesNumber = 900
    kos.InstanceNumber = 1
    kos.Manufacturer = args.manufacturer
    kos.ContentDate = first.get("StudyDate", "")
    kos.ContentTime = "120000"
    kos.ReferencedPerformedProcedureStepSequence = Sequence([])
    kos.ValueType = "CONTAINER"
    kos.ContinuityOfContent = "SEPARATE"
    kos.ConceptNameCodeSequence = Sequence([code("113000", "DCM", "Of Interest")])
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "2010"
    kos.ContentTemplateSequence = Sequence([template])

    content = []
    if args.text:
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "TEXT"
        item.ConceptNameCodeSequence = Sequence(
            [code("113012", "DCM", "Key Object Description")]
        )
        item.TextValue = args.text
        content.append(item)
    if args.code:
        value, scheme, meaning = args.code.split("^")
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "CODE"
        item.ConceptNameCodeSequence = Sequence([code("121071", "DCM", "Finding")])
        item.ConceptCodeSequence = Sequence([code(value, scheme, meaning)])
        content.append(item)
    by_series = {}
    for ds, frames in refs:
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "IMAGE"
        sop = Dataset()
        sop.ReferencedSOPClassUID = ds.SOPClassUID
        sop.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        if frames:
            sop.ReferencedFrameNumber = frames
        item.ReferencedSOPSequence = Sequence([sop])
        content.append(item)
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ref)
    kos.ContentSequence = Sequence(content)
    series_items = []
    for series_uid, sops in by_series.items():
        s = Dataset()
        s.SeriesInstanceUID = series_uid
        s.ReferencedSOPSequence = Sequence(sops)
        series_items.append(s)
    study = Dataset()
    study.StudyInstanceUID = first.StudyInstanceUID
    study.ReferencedSeriesSequence = Sequence(series_items)
    kos.CurrentRequestedProcedureEvidenceSequence = Sequence([study])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = kos.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    kos.file_meta = meta
    kos.save_as(args.out, enforce_file_format=True)
    print(kos.SOPInstanceUID)


if __name__ == "__main__":
    sys.exit(main())
