//! Synthetic CT series for tests and benchmarks that must run anywhere (no real data):
//! real CT Image Storage files with a simple body phantom (soft-tissue ellipse, lungs in the
//! upper half of the series, a spine), Explicit VR Little Endian, 16-bit signed HU.

use std::path::{Path, PathBuf};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::InMemDicomObject;

/// Root of the UIDs this module makes (a UUID-derived 2.25 root).
const UID_ROOT: &str = "2.25.310349876213496125711987061942376412519";

#[derive(Debug, Clone)]
pub struct SeriesSpec {
    /// Distinguishes series (and their UIDs) made by one caller.
    pub number: u32,
    pub slices: u32,
    pub rows: u16,
    pub columns: u16,
    pub patient_id: String,
    /// Slice spacing along z (mm).
    pub spacing_mm: f64,
    /// 16 (signed, HU as stored), 12 (unsigned, intercept −1024) or 8 (unsigned, one byte
    /// per pixel, slope 8, intercept −1024): the encodings JPEG variants need.
    pub bits_stored: u16,
}

impl SeriesSpec {
    pub fn new(number: u32, slices: u32, size: u16) -> Self {
        Self {
            number,
            slices,
            rows: size,
            columns: size,
            patient_id: format!("SYNTH{number:04}"),
            spacing_mm: 2.5,
            bits_stored: 16,
        }
    }

    pub fn study_uid(&self) -> String {
        format!("{UID_ROOT}.1.{}", self.number)
    }

    pub fn series_uid(&self) -> String {
        format!("{UID_ROOT}.2.{}", self.number)
    }

    pub fn sop_uid(&self, slice: u32) -> String {
        format!("{UID_ROOT}.3.{}.{}", self.number, slice + 1)
    }
}

/// Write the series as `dir/slice0001.dcm ...`; returns the paths in slice order.
pub fn write_series(
    dir: &Path,
    spec: &SeriesSpec,
) -> Result<Vec<PathBuf>, Box<dicom_object::WriteError>> {
    let mut paths = Vec::with_capacity(spec.slices as usize);
    for slice in 0..spec.slices {
        let path = dir.join(format!("slice{:04}.dcm", slice + 1));
        ct_slice(spec, slice).write_to_file(&path)?;
        paths.push(path);
    }
    Ok(paths)
}

/// One CT slice as a Part-10 object.
pub fn ct_slice(spec: &SeriesSpec, slice: u32) -> dicom_object::DefaultDicomObject {
    let z = -(f64::from(slice) * spec.spacing_mm);
    let enc = Encoding::of(spec.bits_stored);
    let sop_uid = spec.sop_uid(slice);
    let text = |tag, vr, value: String| DataElement::new(tag, vr, PrimitiveValue::from(value));
    let us = |tag, value: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(value));
    let obj = InMemDicomObject::from_element_iter([
        text(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100".into()),
        text(tags::IMAGE_TYPE, VR::CS, "ORIGINAL\\PRIMARY\\AXIAL".into()),
        text(tags::SOP_CLASS_UID, VR::UI, uids::CT_IMAGE_STORAGE.into()),
        text(tags::SOP_INSTANCE_UID, VR::UI, sop_uid.clone()),
        text(tags::STUDY_DATE, VR::DA, "20260101".into()),
        text(tags::STUDY_TIME, VR::TM, "120000".into()),
        text(
            tags::ACCESSION_NUMBER,
            VR::SH,
            format!("ACC{}", spec.number),
        ),
        text(tags::MODALITY, VR::CS, "CT".into()),
        text(tags::STUDY_DESCRIPTION, VR::LO, "Synthetic phantom".into()),
        text(
            tags::SERIES_DESCRIPTION,
            VR::LO,
            format!("Synthetic series {}", spec.number),
        ),
        text(
            tags::PATIENT_NAME,
            VR::PN,
            format!("Phantom^{}", spec.number),
        ),
        text(tags::PATIENT_ID, VR::LO, spec.patient_id.clone()),
        text(tags::PATIENT_BIRTH_DATE, VR::DA, "19700101".into()),
        text(tags::PATIENT_SEX, VR::CS, "O".into()),
        text(
            tags::SLICE_THICKNESS,
            VR::DS,
            format!("{}", spec.spacing_mm),
        ),
        text(tags::STUDY_INSTANCE_UID, VR::UI, spec.study_uid()),
        text(tags::SERIES_INSTANCE_UID, VR::UI, spec.series_uid()),
        text(tags::SERIES_NUMBER, VR::IS, spec.number.to_string()),
        text(tags::INSTANCE_NUMBER, VR::IS, (slice + 1).to_string()),
        text(
            tags::IMAGE_POSITION_PATIENT,
            VR::DS,
            format!("-250\\-250\\{z}"),
        ),
        text(
            tags::IMAGE_ORIENTATION_PATIENT,
            VR::DS,
            "1\\0\\0\\0\\1\\0".into(),
        ),
        text(tags::SLICE_LOCATION, VR::DS, format!("{z}")),
        us(tags::SAMPLES_PER_PIXEL, 1),
        text(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            "MONOCHROME2".into(),
        ),
        us(tags::ROWS, spec.rows),
        us(tags::COLUMNS, spec.columns),
        text(
            tags::PIXEL_SPACING,
            VR::DS,
            format!("{0}\\{0}", 500.0 / f64::from(spec.columns)),
        ),
        us(tags::BITS_ALLOCATED, enc.bits_allocated),
        us(tags::BITS_STORED, spec.bits_stored),
        us(tags::HIGH_BIT, spec.bits_stored - 1),
        us(tags::PIXEL_REPRESENTATION, enc.pixel_representation),
        text(tags::RESCALE_INTERCEPT, VR::DS, enc.intercept.to_string()),
        text(tags::RESCALE_SLOPE, VR::DS, enc.slope.to_string()),
        DataElement::new(
            tags::PIXEL_DATA,
            enc.vr,
            PrimitiveValue::from(encode(&enc, &phantom(spec, slice))),
        ),
    ]);
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(uids::CT_IMAGE_STORAGE)
        .media_storage_sop_instance_uid(sop_uid)
        .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
        .build();
    // The builder only fails without a transfer syntax, which is always given here.
    match meta {
        Ok(meta) => obj.with_exact_meta(meta),
        Err(_) => unreachable!("transfer syntax is set"),
    }
}

/// How HU become stored values for a given Bits Stored.
struct Encoding {
    bits_allocated: u16,
    pixel_representation: u16,
    slope: i32,
    intercept: i32,
    vr: VR,
}

impl Encoding {
    fn of(bits_stored: u16) -> Encoding {
        match bits_stored {
            8 => Encoding {
                bits_allocated: 8,
                pixel_representation: 0,
                slope: 8,
                intercept: -1024,
                vr: VR::OB,
            },
            12 => Encoding {
                bits_allocated: 16,
                pixel_representation: 0,
                slope: 1,
                intercept: -1024,
                vr: VR::OW,
            },
            _ => Encoding {
                bits_allocated: 16,
                pixel_representation: 1,
                slope: 1,
                intercept: 0,
                vr: VR::OW,
            },
        }
    }
}

fn encode(enc: &Encoding, hu: &[i16]) -> Vec<u8> {
    let stored = hu
        .iter()
        .map(|&h| (i32::from(h) - enc.intercept) / enc.slope);
    if enc.bits_allocated == 8 {
        stored.map(|v| v.clamp(0, 255) as u8).collect()
    } else {
        stored.flat_map(|v| (v as i16).to_le_bytes()).collect()
    }
}

/// HU of one slice: air, a body ellipse, lungs in the upper half of the
/// series, a vertebra; slightly different per slice so no two slices are identical.
fn phantom(spec: &SeriesSpec, slice: u32) -> Vec<i16> {
    let (rows, cols) = (usize::from(spec.rows), usize::from(spec.columns));
    let upper = slice < spec.slices / 2;
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let y = (r as f64 / rows as f64) * 2.0 - 1.0;
            let x = (c as f64 / cols as f64) * 2.0 - 1.0;
            let body = (x / 0.8).powi(2) + (y / 0.6).powi(2) <= 1.0;
            let lung = upper && (((x.abs() - 0.35) / 0.25).powi(2) + (y / 0.4).powi(2) <= 1.0);
            let spine = (x / 0.1).powi(2) + ((y - 0.4) / 0.1).powi(2) <= 1.0;
            let hu: i16 = if !body {
                -1000
            } else if spine {
                700
            } else if lung {
                -850
            } else {
                40 + ((r + c + slice as usize) % 7) as i16
            };
            out.push(hu);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_readable_series() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SeriesSpec::new(1, 3, 32);
        let paths = write_series(dir.path(), &spec).unwrap();
        assert_eq!(paths.len(), 3);
        let obj = dicom_object::open_file(&paths[2]).unwrap();
        assert_eq!(
            obj.element(tags::SOP_INSTANCE_UID)
                .unwrap()
                .to_str()
                .unwrap(),
            spec.sop_uid(2)
        );
        let pixels = obj.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
        assert_eq!(pixels.len(), 32 * 32 * 2);
    }
}
