#!/usr/bin/env python3
"""Re-encode a DICOM file as JPEG 2000 Lossless (1.2.840.10008.1.2.4.90) with pydicom and
OpenJPEG (pylibjpeg-openjpeg), for tests/pixels.rs: DCMTK has no JPEG 2000 encoder.

Usage: to_jpeg2000.py IN OUT
"""
import sys

import pydicom
from pydicom.uid import JPEG2000Lossless


def main():
    ds = pydicom.dcmread(sys.argv[1])
    ds.compress(JPEG2000Lossless)
    ds.save_as(sys.argv[2], enforce_file_format=True)


if __name__ == "__main__":
    main()
