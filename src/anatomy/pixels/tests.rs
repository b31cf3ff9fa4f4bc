//! Synthetic images, small enough to check every pixel by hand.

use dicom_core::value::{DataSetSequence, PixelFragmentSequence, Value};
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::{DefaultDicomObject, InMemDicomObject};

use super::*;

const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
const RLE: &str = "1.2.840.10008.1.2.5";
const JPEG_XL_LOSSLESS: &str = "1.2.840.10008.1.2.4.110";

/// A CT image under construction: 16-bit samples unless told otherwise.
struct Synth {
    rows: u16,
    columns: u16,
    bits_allocated: u16,
    bits_stored: u16,
    high_bit: u16,
    signed: bool,
    photometric: &'static str,
    samples: Vec<u16>,
    extra: Vec<DataElement<InMemDicomObject>>,
    transfer_syntax: &'static str,
}

impl Synth {
    fn new(rows: u16, columns: u16, samples: Vec<u16>) -> Self {
        Self {
            rows,
            columns,
            bits_allocated: 16,
            bits_stored: 16,
            high_bit: 15,
            signed: true,
            photometric: "MONOCHROME2",
            samples,
            extra: vec![],
            transfer_syntax: EXPLICIT_LE,
        }
    }

    fn signed_values(rows: u16, columns: u16, values: &[i16]) -> Self {
        Self::new(rows, columns, values.iter().map(|v| *v as u16).collect())
    }

    fn bits(mut self, stored: u16, high: u16, signed: bool) -> Self {
        self.bits_stored = stored;
        self.high_bit = high;
        self.signed = signed;
        self
    }

    fn with(mut self, element: DataElement<InMemDicomObject>) -> Self {
        self.extra.push(element);
        self
    }

    fn ds(self, tag: Tag, value: &str) -> Self {
        self.with(DataElement::new(tag, VR::DS, PrimitiveValue::from(value)))
    }

    fn rescale(self, slope: &str, intercept: &str) -> Self {
        self.ds(tags::RESCALE_SLOPE, slope)
            .ds(tags::RESCALE_INTERCEPT, intercept)
    }

    fn orientation(self, iop: &str) -> Self {
        self.ds(tags::IMAGE_ORIENTATION_PATIENT, iop)
    }

    fn pixel_bytes(&self) -> Vec<u8> {
        match self.bits_allocated {
            8 => self.samples.iter().map(|s| *s as u8).collect(),
            _ => self.samples.iter().flat_map(|s| s.to_le_bytes()).collect(),
        }
    }

    fn object(self) -> DefaultDicomObject {
        let pixels = self.pixel_bytes();
        let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
        let mut obj = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::SOP_CLASS_UID,
                VR::UI,
                PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.2"),
            ),
            DataElement::new(
                tags::SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2.3"),
            ),
            us(tags::SAMPLES_PER_PIXEL, 1),
            DataElement::new(
                tags::PHOTOMETRIC_INTERPRETATION,
                VR::CS,
                PrimitiveValue::from(self.photometric),
            ),
            us(tags::ROWS, self.rows),
            us(tags::COLUMNS, self.columns),
            us(tags::BITS_ALLOCATED, self.bits_allocated),
            us(tags::BITS_STORED, self.bits_stored),
            us(tags::HIGH_BIT, self.high_bit),
            us(tags::PIXEL_REPRESENTATION, u16::from(self.signed)),
            DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(pixels)),
        ]);
        for element in self.extra {
            obj.put(element);
        }
        let meta = FileMetaTableBuilder::new()
            .transfer_syntax(self.transfer_syntax)
            .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.2")
            .media_storage_sop_instance_uid("1.2.3");
        obj.with_meta(meta).expect("valid meta")
    }

    fn hu(self) -> Vec<f32> {
        let frames = hu_frames_of(self.object()).expect("decodes");
        assert_eq!(frames.len(), 1);
        frames.into_iter().next().map(|f| f.hu).unwrap_or_default()
    }
}

fn image(rows: usize, columns: usize, hu: Vec<f32>) -> HuImage {
    HuImage {
        rows,
        columns,
        hu,
        frame: 0,
        pixel_spacing: None,
        orientation: None,
    }
}

fn seq_item(elements: Vec<DataElement<InMemDicomObject>>) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(elements)
}

fn sequence(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

// --- step 2: stored values to HU ---

#[test]
fn rescale_slope_and_intercept_give_hu() {
    let hu = Synth::new(1, 3, vec![0, 1024, 2000])
        .bits(12, 11, false)
        .rescale("1", "-1024")
        .hu();
    assert_eq!(hu, [-1024.0, 0.0, 976.0]);
    let hu = Synth::new(1, 2, vec![10, 20]).rescale("2.5", "-3").hu();
    assert_eq!(hu, [22.0, 47.0]);
}

#[test]
fn orientation_and_spacing_are_read() {
    let obj = Synth::signed_values(1, 1, &[0])
        .orientation("1\\0\\0\\0\\-1\\0")
        .ds(tags::PIXEL_SPACING, "0.5\\0.75")
        .object();
    let frames = hu_frames_of(obj).expect("decodes");
    assert_eq!(frames[0].orientation, Some([1.0, 0.0, 0.0, 0.0, -1.0, 0.0]));
    assert_eq!(frames[0].pixel_spacing, Some([0.5, 0.75]));
}

#[test]
fn missing_rescale_means_identity() {
    assert_eq!(Synth::signed_values(1, 2, &[-5, 7]).hu(), [-5.0, 7.0]);
}

#[test]
fn pixel_representation_decides_the_sign() {
    let signed = Synth::new(1, 2, vec![0xFFFF, 0x8000])
        .bits(16, 15, true)
        .hu();
    assert_eq!(signed, [-1.0, -32768.0]);
    let unsigned = Synth::new(1, 2, vec![0xFFFF, 0x8000])
        .bits(16, 15, false)
        .hu();
    assert_eq!(unsigned, [65535.0, 32768.0]);
}

#[test]
fn bits_above_bits_stored_are_ignored_and_the_sign_extended() {
    // 12 bits stored, garbage (e.g. an overlay) in the top four bits.
    let unsigned = Synth::new(1, 2, vec![0xF123, 0x0FFF])
        .bits(12, 11, false)
        .hu();
    assert_eq!(unsigned, [291.0, 4095.0]);
    let signed = Synth::new(1, 3, vec![0xF7FF, 0x0800, 0x0FFF])
        .bits(12, 11, true)
        .hu();
    assert_eq!(signed, [2047.0, -2048.0, -1.0]);
}

#[test]
fn high_bit_above_bits_stored_shifts_native_samples() {
    // 12 bits stored in bits 4..=15.
    let hu = Synth::new(1, 2, vec![0x1230, 0xFFF0])
        .bits(12, 15, false)
        .hu();
    assert_eq!(hu, [291.0, 4095.0]);
}

#[test]
fn eight_bit_samples_decode() {
    let mut synth = Synth::new(1, 3, vec![0, 128, 255]).bits(8, 7, false);
    synth.bits_allocated = 8;
    assert_eq!(synth.rescale("4", "-1024").hu(), [-1024.0, -512.0, -4.0]);
}

#[test]
fn pixel_padding_value_becomes_air() {
    let padding = DataElement::new(
        tags::PIXEL_PADDING_VALUE,
        VR::SS,
        PrimitiveValue::from(-2000i16),
    );
    let hu = Synth::signed_values(1, 3, &[-2000, -1999, 40])
        .rescale("1", "-24")
        .with(padding)
        .hu();
    assert_eq!(hu, [AIR_HU, -2023.0, 16.0]);
}

#[test]
fn padding_written_with_the_other_signedness_still_matches() {
    // Real TCGA files: signed pixels, Pixel Padding Value US 63536 (= −2000 as SS).
    let padding = DataElement::new(
        tags::PIXEL_PADDING_VALUE,
        VR::US,
        PrimitiveValue::from(63536u16),
    );
    let hu = Synth::signed_values(1, 2, &[-2000, 0])
        .rescale("1", "-1024")
        .with(padding)
        .hu();
    assert_eq!(hu, [AIR_HU, -1024.0]);
}

#[test]
fn pixel_padding_range_limit_covers_a_range() {
    let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
    let hu = Synth::new(1, 4, vec![0, 5, 10, 11])
        .bits(16, 15, false)
        .with(us(tags::PIXEL_PADDING_VALUE, 10))
        .with(us(tags::PIXEL_PADDING_RANGE_LIMIT, 5))
        .hu();
    assert_eq!(hu, [0.0, AIR_HU, AIR_HU, 11.0]);
}

#[test]
fn monochrome1_is_inverted_before_rescaling() {
    let mut synth = Synth::new(1, 3, vec![0, 1000, 4095]).bits(12, 11, false);
    synth.photometric = "MONOCHROME1";
    assert_eq!(synth.rescale("1", "-1024").hu(), [3071.0, 2071.0, -1024.0]);
    let mut signed = Synth::signed_values(1, 2, &[-1, 100]);
    signed.photometric = "MONOCHROME1";
    assert_eq!(signed.hu(), [0.0, -101.0]);
}

#[test]
fn rescale_written_as_un_is_read() {
    let un = |tag, text: &str| {
        DataElement::new(tag, VR::UN, PrimitiveValue::from(text.as_bytes().to_vec()))
    };
    let hu = Synth::signed_values(1, 2, &[0, 10])
        .with(un(tags::RESCALE_SLOPE, "2 "))
        .with(un(tags::RESCALE_INTERCEPT, "-1024 "))
        .with(un(tags::IMAGE_ORIENTATION_PATIENT, "1\\0\\0\\0\\-1\\0 "))
        .object();
    let frames = hu_frames_of(hu).expect("decodes");
    assert_eq!(frames[0].hu, [-1024.0, -1004.0]);
    assert_eq!(frames[0].orientation, Some([1.0, 0.0, 0.0, 0.0, -1.0, 0.0]));
}

#[test]
fn image_pixel_attributes_written_as_un_are_read() {
    let mut obj = Synth::signed_values(1, 2, &[3, 4]).object();
    let un = |tag, bytes: Vec<u8>| DataElement::new(tag, VR::UN, PrimitiveValue::from(bytes));
    obj.put(un(tags::ROWS, 1u16.to_le_bytes().to_vec()));
    obj.put(un(
        tags::PHOTOMETRIC_INTERPRETATION,
        b"MONOCHROME2 ".to_vec(),
    ));
    let frames = hu_frames_of(obj).expect("decodes");
    assert_eq!(frames[0].hu, [3.0, 4.0]);
}

#[test]
fn enhanced_ct_rescale_comes_from_the_functional_groups() {
    let pvt = |slope: &str, intercept: &str| {
        sequence(
            tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE,
            vec![seq_item(vec![
                DataElement::new(tags::RESCALE_SLOPE, VR::DS, PrimitiveValue::from(slope)),
                DataElement::new(
                    tags::RESCALE_INTERCEPT,
                    VR::DS,
                    PrimitiveValue::from(intercept),
                ),
            ])],
        )
    };
    let per_frame = sequence(
        tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE,
        vec![
            seq_item(vec![pvt("1", "-1024")]),
            // frame 2 has no transformation of its own: the shared one applies
            seq_item(vec![]),
            seq_item(vec![pvt("2", "0")]),
        ],
    );
    let shared = sequence(
        tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE,
        vec![seq_item(vec![
            pvt("1", "-1000"),
            sequence(
                tags::PLANE_ORIENTATION_SEQUENCE,
                vec![seq_item(vec![DataElement::new(
                    tags::IMAGE_ORIENTATION_PATIENT,
                    VR::DS,
                    PrimitiveValue::from("-1\\0\\0\\0\\1\\0"),
                )])],
            ),
        ])],
    );
    let obj = Synth::signed_values(1, 6, &[0, 10, 0, 10, 0, 10])
        .with(DataElement::new(
            tags::NUMBER_OF_FRAMES,
            VR::IS,
            PrimitiveValue::from("3"),
        ))
        .with(per_frame)
        .with(shared)
        .object();
    // three 1×2 frames in a 1×6 buffer: fix the geometry to match
    let mut obj = obj;
    obj.put(DataElement::new(
        tags::COLUMNS,
        VR::US,
        PrimitiveValue::from(2u16),
    ));
    let frames = hu_frames_of(obj).expect("decodes");
    let hu: Vec<Vec<f32>> = frames.iter().map(|f| f.hu.clone()).collect();
    assert_eq!(
        hu,
        [
            vec![-1024.0, -1014.0],
            vec![-1000.0, -990.0],
            vec![0.0, 20.0]
        ]
    );
    assert_eq!(frames[2].frame, 2);
    assert_eq!(frames[1].orientation, Some([-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]));
}

#[test]
fn deflated_file_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("deflated.dcm");
    let mut synth = Synth::signed_values(2, 2, &[-1000, 0, 50, 3000]).rescale("1", "0");
    synth.transfer_syntax = DEFLATED;
    synth.object().write_to_file(&path).expect("write");
    let frames = hu_frames(&path).expect("decodes");
    assert_eq!(frames[0].hu, [-1000.0, 0.0, 50.0, 3000.0]);
}

// --- errors ---

#[test]
fn missing_rows_is_named() {
    let mut obj = Synth::signed_values(1, 1, &[0]).object();
    obj.remove_element(tags::ROWS);
    assert_eq!(
        hu_frames_of(obj).err(),
        Some(PixelErrorKind::MissingAttribute("Rows"))
    );
}

#[test]
fn colour_images_are_refused() {
    let mut obj = Synth::signed_values(1, 3, &[0, 0, 0]).object();
    obj.put(DataElement::new(
        tags::SAMPLES_PER_PIXEL,
        VR::US,
        PrimitiveValue::from(3u16),
    ));
    let err = hu_frames_of(obj).err();
    assert!(
        matches!(err, Some(PixelErrorKind::UnsupportedImage(ref why)) if why.contains("SamplesPerPixel")),
        "{err:?}"
    );
}

#[test]
fn short_native_pixel_data_is_corrupt() {
    let obj = Synth::signed_values(2, 2, &[0, 0, 0]).object();
    let err = hu_frames_of(obj).err();
    assert!(
        matches!(err, Some(PixelErrorKind::CorruptPixelData { frame: 0, ref reason }) if reason.contains("6 bytes")),
        "{err:?}"
    );
}

fn encapsulated(transfer_syntax: &'static str, fragments: Vec<Vec<u8>>) -> DefaultDicomObject {
    let mut synth = Synth::signed_values(2, 2, &[]);
    synth.transfer_syntax = transfer_syntax;
    let mut obj = synth.object();
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        Value::PixelSequence(PixelFragmentSequence::new(Vec::<u32>::new(), fragments)),
    ));
    obj
}

#[test]
fn transfer_syntax_without_a_decoder_is_unsupported() {
    // JPEG XL needs dicom-rs features this build leaves out.
    let err = hu_frames_of(encapsulated(JPEG_XL_LOSSLESS, vec![vec![0; 16]])).err();
    assert!(
        matches!(err, Some(PixelErrorKind::UnsupportedTransferSyntax { ref uid, ref name, .. })
            if uid == JPEG_XL_LOSSLESS && name.contains("JPEG XL")),
        "{err:?}"
    );
    let text = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(text.contains("cannot be decoded"), "{text}");
}

#[test]
fn corrupt_rle_is_reported_not_panicked() {
    // RLE header claiming two segments at offsets beyond the fragment.
    let mut fragment = vec![0u8; 64];
    fragment[..4].copy_from_slice(&2u32.to_le_bytes());
    fragment[4..8].copy_from_slice(&64u32.to_le_bytes());
    fragment[8..12].copy_from_slice(&9999u32.to_le_bytes());
    let err = hu_frames_of(encapsulated(RLE, vec![fragment])).err();
    assert!(
        matches!(err, Some(PixelErrorKind::CorruptPixelData { frame: 0, .. })),
        "{err:?}"
    );
    let tiny = hu_frames_of(encapsulated(RLE, vec![vec![1, 2]])).err();
    assert!(
        matches!(tiny, Some(PixelErrorKind::CorruptPixelData { .. })),
        "{tiny:?}"
    );
}

/// Regression (issue #18): Rows × Columns announcing 65535 × 65535 (8 GiB per frame) over a
/// few bytes of RLE is refused before a decoder sizes its output buffer from them.
#[test]
fn frames_larger_than_any_ct_are_refused_before_decoding() {
    let mut obj = encapsulated(RLE, vec![vec![1, 0, 0, 0, 64, 0, 0, 0]]);
    obj.put(DataElement::new(
        tags::ROWS,
        VR::US,
        PrimitiveValue::from(65535u16),
    ));
    obj.put(DataElement::new(
        tags::COLUMNS,
        VR::US,
        PrimitiveValue::from(65535u16),
    ));
    let err = hu_frames_of(obj).err();
    assert!(
        matches!(err, Some(PixelErrorKind::UnsupportedImage(ref why)) if why.contains("65535 × 65535")),
        "{err:?}"
    );
}

#[test]
fn rle_split_over_fragments_is_regrouped() {
    // 2×2 signed 16-bit image, two segments (high bytes, low bytes), literal runs.
    let values: [i16; 4] = [-1000, 0, 40, 1200];
    let high: Vec<u8> = values.iter().map(|v| (*v as u16 >> 8) as u8).collect();
    let low: Vec<u8> = values.iter().map(|v| *v as u8).collect();
    let mut rle = vec![0u8; 64];
    rle[..4].copy_from_slice(&2u32.to_le_bytes());
    rle[4..8].copy_from_slice(&64u32.to_le_bytes());
    rle[8..12].copy_from_slice(&69u32.to_le_bytes());
    rle.push(3);
    rle.extend_from_slice(&high);
    rle.push(3);
    rle.extend_from_slice(&low);
    let (a, b) = rle.split_at(40);
    let frames = hu_frames_of(encapsulated(RLE, vec![a.to_vec(), b.to_vec()])).expect("decodes");
    assert_eq!(frames[0].hu, [-1000.0, 0.0, 40.0, 1200.0]);
}

#[test]
fn errors_name_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("not-dicom.dcm");
    std::fs::write(&path, b"hello").expect("write");
    let err = hu_frames(&path)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("not-dicom.dcm") && err.contains("not a readable DICOM file"),
        "{err}"
    );
}

// --- step 3: canonical orientation ---

/// 2×3 image with distinct values: row r, column c holds 10·r + c.
fn numbered(orientation: [f64; 6]) -> HuImage {
    HuImage {
        orientation: Some(orientation),
        pixel_spacing: Some([0.5, 0.7]),
        ..image(2, 3, vec![0.0, 1.0, 2.0, 10.0, 11.0, 12.0])
    }
}

#[test]
fn canonical_axial_image_is_unchanged() {
    let img = numbered([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
    assert_eq!(canonical_orientation(&img, 35.0), img);
}

#[test]
fn row_direction_to_the_right_flips_columns() {
    let out = canonical_orientation(&numbered([-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]), 35.0);
    assert_eq!(out.hu, [2.0, 1.0, 0.0, 12.0, 11.0, 10.0]);
    assert_eq!(out.orientation, Some([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]));
}

#[test]
fn upside_down_image_flips_rows() {
    // pydicom-data-abdomen and vtk-prostate: IOP 1\0\0\0\-1\0
    let out = canonical_orientation(&numbered([1.0, 0.0, 0.0, 0.0, -1.0, 0.0]), 35.0);
    assert_eq!(out.hu, [10.0, 11.0, 12.0, 0.0, 1.0, 2.0]);
}

#[test]
fn prone_patient_flips_both() {
    let out = canonical_orientation(&numbered([-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]), 35.0);
    assert_eq!(out.hu, [12.0, 11.0, 10.0, 2.0, 1.0, 0.0]);
}

#[test]
fn decubitus_image_is_transposed() {
    // A real TCGA slice: rows run to patient anterior (−y), columns to patient left (+x).
    let out = canonical_orientation(&numbered([0.0, -1.0, 0.0, 1.0, 0.0, 0.0]), 35.0);
    assert_eq!((out.rows, out.columns), (3, 2));
    // canonical pixel (r, c) is stored pixel (row c, column 2 − r)
    assert_eq!(out.hu, [2.0, 12.0, 1.0, 11.0, 0.0, 10.0]);
    assert_eq!(out.orientation, Some([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]));
    assert_eq!(out.pixel_spacing, Some([0.7, 0.5]));
}

#[test]
fn gantry_tilt_within_tolerance_is_still_axial() {
    // 22° tilt, stored upside down
    let tilted = [1.0, 0.0, 0.0, 0.0, -0.9272, 0.3746];
    let out = canonical_orientation(&numbered(tilted), 35.0);
    assert_eq!(out.hu, [10.0, 11.0, 12.0, 0.0, 1.0, 2.0]);
    // ... but not with a tighter tolerance
    assert_eq!(
        canonical_orientation(&numbered(tilted), 15.0).hu,
        numbered(tilted).hu
    );
}

#[test]
fn non_axial_and_unknown_orientations_stay_as_stored() {
    let coronal = numbered([-1.0, 0.0, 0.0, 0.0, 0.0, -1.0]);
    assert_eq!(canonical_orientation(&coronal, 35.0), coronal);
    let unknown = HuImage {
        orientation: None,
        ..numbered([1.0; 6])
    };
    assert_eq!(canonical_orientation(&unknown, 35.0), unknown);
}

// --- step 4: pad to square ---

#[test]
fn wide_image_is_padded_top_and_bottom_with_air() {
    let out = pad_to_square(&image(2, 4, vec![1.0; 8]));
    assert_eq!((out.rows, out.columns), (4, 4));
    let a = AIR_HU;
    #[rustfmt::skip]
    let expected = [
        a, a, a, a,
        1.0, 1.0, 1.0, 1.0,
        1.0, 1.0, 1.0, 1.0,
        a, a, a, a,
    ];
    assert_eq!(out.hu, expected);
}

#[test]
fn tall_image_is_padded_left_and_right_centred() {
    let out = pad_to_square(&image(3, 1, vec![5.0, 6.0, 7.0]));
    let a = AIR_HU;
    assert_eq!(out.hu, [a, 5.0, a, a, 6.0, a, a, 7.0, a]);
}

#[test]
fn rectangular_pixels_pad_to_a_square_in_millimetres() {
    // 4 rows × 2 columns, rows 1 mm apart, columns 2 mm apart: already 4 mm × 4 mm.
    let img = HuImage {
        pixel_spacing: Some([1.0, 2.0]),
        ..image(4, 2, vec![0.0; 8])
    };
    let out = pad_to_square(&img);
    assert_eq!((out.rows, out.columns), (4, 2));
    // and a resize to S×S then gives square pixels of 4/S mm
    assert_eq!(resize(&out, 2, 2), [0.0; 4]);
}

// --- step 4, with the model's field of view ---

fn spaced(rows: usize, columns: usize, mm: [f64; 2], hu: Vec<f32>) -> HuImage {
    HuImage {
        pixel_spacing: Some(mm),
        ..image(rows, columns, hu)
    }
}

#[test]
fn a_small_field_of_view_is_padded_with_air_to_the_model_field() {
    // 2×2 pixels of 1 mm in a 4 mm field: centred, one pixel of air around
    let out = fixed_field(&spaced(2, 2, [1.0, 1.0], vec![1.0, 2.0, 3.0, 4.0]), 4.0).unwrap();
    let a = AIR_HU;
    #[rustfmt::skip]
    let expected = [
        a, a, a, a,
        a, 1.0, 2.0, a,
        a, 3.0, 4.0, a,
        a, a, a, a,
    ];
    assert_eq!((out.rows, out.columns), (4, 4));
    assert_eq!(out.hu, expected);
}

#[test]
fn a_wide_field_of_view_is_cut_to_its_centre() {
    let hu: Vec<f32> = (0..16).map(|v| v as f32).collect();
    let out = fixed_field(&spaced(4, 4, [2.0, 2.0], hu), 4.0).unwrap();
    assert_eq!((out.rows, out.columns), (2, 2));
    assert_eq!(out.hu, [5.0, 6.0, 9.0, 10.0]);
}

#[test]
fn the_same_body_gets_the_same_size_whatever_the_scanner_field() {
    // a 40 mm "neck" of 200 HU, once in 128 pixels of 4 mm, once in 512 of 1 mm
    let disc = |n: usize, mm: f64| {
        let c = n as f64 / 2.0;
        let hu = (0..n * n)
            .map(|i| {
                let (r, col) = ((i / n) as f64 + 0.5 - c, (i % n) as f64 + 0.5 - c);
                if (r * r + col * col).sqrt() * mm <= 20.0 {
                    200.0
                } else {
                    AIR_HU
                }
            })
            .collect();
        spaced(n, n, [mm, mm], hu)
    };
    let options = Preprocessing::new(32).with_field_of_view(Some(160.0));
    let body = |img: &HuImage| {
        preprocess(img, &options)
            .iter()
            .filter(|v| **v > 0.0)
            .count()
    };
    let (coarse, fine) = (body(&disc(128, 4.0)), body(&disc(512, 1.0)));
    // 40 mm of 160 mm in 32 pixels: a disc 8 pixels across, about 50 pixels
    assert!(
        (40..=60).contains(&coarse) && (40..=60).contains(&fine),
        "{coarse} {fine}"
    );
    // fitted to the image instead, the coarse one would be four times smaller in area
    assert!(
        to_model_input(&disc(512, 1.0), 32)
            .iter()
            .filter(|v| **v > 0.0)
            .count()
            < 10
    );
}

#[test]
fn without_pixel_spacing_the_whole_image_is_fitted() {
    let img = image(2, 2, vec![1.0; 4]);
    assert!(fixed_field(&img, 100.0).is_none());
    let options = Preprocessing::new(4).with_field_of_view(Some(100.0));
    assert_eq!(preprocess(&img, &options), to_model_input(&img, 4));
    let broken = spaced(2, 2, [0.0, 1.0], vec![1.0; 4]);
    assert!(fixed_field(&broken, 100.0).is_none());
}

// --- step 4, body framing ---

/// `rows × columns` of air with `value` in rows `r` and columns `c`.
fn block(
    rows: usize,
    columns: usize,
    r: std::ops::Range<usize>,
    c: std::ops::Range<usize>,
) -> Vec<f32> {
    (0..rows * columns)
        .map(|i| {
            if r.contains(&(i / columns)) && c.contains(&(i % columns)) {
                200.0
            } else {
                AIR_HU
            }
        })
        .collect()
}

/// Rows and columns (first, one past the last) of an `S×S` output that hold body.
fn body_extent(out: &[f32], size: usize) -> ((usize, usize), (usize, usize)) {
    let body = |i: usize| out[i] > -300.0;
    let rows: Vec<usize> = (0..size)
        .filter(|r| (0..size).any(|c| body(r * size + c)))
        .collect();
    let columns: Vec<usize> = (0..size)
        .filter(|c| (0..size).any(|r| body(r * size + c)))
        .collect();
    let span = |v: &[usize]| (v[0], v[v.len() - 1] + 1);
    (span(&rows), span(&columns))
}

fn body_framed(img: &HuImage, size: usize) -> Vec<f32> {
    preprocess(img, &Preprocessing::new(size).with_framing(Framing::Body))
}

#[test]
fn body_framing_fills_the_input_with_an_off_centre_body() {
    // a 60 × 120 pixel body in the top left corner of a 256 × 256 image
    let img = image(256, 256, block(256, 256, 10..70, 20..140));
    let size = 64;
    let ((r0, r1), (c0, c1)) = body_extent(&body_framed(&img, size), size);
    // the longer side fills S / 1.1 (5 % margin each side), about 58 pixels...
    assert!((56..=60).contains(&(c1 - c0)), "columns {c0}..{c1}");
    assert!((27..=31).contains(&(r1 - r0)), "rows {r0}..{r1}");
    // ...centred
    let centre = |a: usize, b: usize| (a + b) as f64 / 2.0;
    assert!((centre(r0, r1) - 32.0).abs() <= 1.5, "rows {r0}..{r1}");
    assert!((centre(c0, c1) - 32.0).abs() <= 1.5, "columns {c0}..{c1}");
    // fitted whole it is a quarter of that, in the corner
    let ((_, _), (w0, w1)) = body_extent(&to_model_input(&img, size), size);
    assert!(w1 - w0 <= 31 && w0 <= 6, "whole: columns {w0}..{w1}");
}

#[test]
fn a_thin_couch_far_from_the_body_does_not_widen_the_box() {
    let size = 64;
    let body = block(size, size, 4..20, 8..40);
    let mut with_couch = body.clone();
    // a 1-pixel couch top of 100 HU across the whole image, far below the body, and a
    // 1-pixel board edge down the right-hand side
    for c in 0..size {
        with_couch[58 * size + c] = 100.0;
    }
    for r in 0..size {
        with_couch[r * size + 62] = 100.0;
    }
    let alone = body_framed(&image(size, size, body), size);
    assert_eq!(body_framed(&image(size, size, with_couch), size), alone);
    let ((r0, r1), (c0, c1)) = body_extent(&alone, size);
    assert!(c1 - c0 >= 56 && r1 - r0 <= 31, "{r0}..{r1} × {c0}..{c1}");
}

#[test]
fn without_a_body_body_framing_fits_the_whole_image() {
    let air = image(40, 30, vec![AIR_HU; 1200]);
    assert_eq!(body_framed(&air, 16), to_model_input(&air, 16));
    // a stray bright pixel is not a body either
    let mut speck = vec![AIR_HU; 1200];
    speck[20 * 30 + 15] = 1000.0;
    let speck = image(40, 30, speck);
    assert_eq!(body_framed(&speck, 16), to_model_input(&speck, 16));
}

#[test]
fn body_framing_keeps_the_aspect_of_rectangular_pixels() {
    // 128 rows of 0.5 mm × 64 columns of 1 mm; the body is 20 mm × 20 mm: 40 rows × 20 columns
    let img = spaced(128, 64, [0.5, 1.0], block(128, 64, 10..50, 30..50));
    let size = 32;
    let ((r0, r1), (c0, c1)) = body_extent(&body_framed(&img, size), size);
    let (height, width) = (r1 - r0, c1 - c0);
    assert!(height.abs_diff(width) <= 1, "{height} × {width}");
    assert!((27..=31).contains(&height), "{height} × {width}");
}

#[test]
fn body_framing_is_exactly_the_crop_of_the_padded_image() {
    // the contract's steps on a small image, by hand: body rows 2..6, columns 2..10 of a
    // 12 × 12 image at S = 12; side 8 · 1.1 = 8.8 → 9 pixels from (round(4 − 4.5), round(6 − 4.5))
    let img = image(12, 12, block(12, 12, 2..6, 2..10));
    let window = cut_window(&pad_to_square(&img), -1, 2, 9, 9);
    assert_eq!(body_framed(&img, 12), resize(&window, 12, 12));
}

// --- step 5: resize ---

#[test]
fn shrinking_averages_areas() {
    #[rustfmt::skip]
    let img = image(4, 4, vec![
        0.0, 2.0, 10.0, 10.0,
        4.0, 6.0, 10.0, 10.0,
        1.0, 1.0, -8.0, 0.0,
        1.0, 1.0, 0.0, 0.0,
    ]);
    assert_eq!(resize(&img, 2, 2), [3.0, 10.0, 1.0, -2.0]);
}

#[test]
fn shrinking_by_a_non_integer_factor_weights_partial_pixels() {
    // 3 → 2: output 0 covers input [0, 1.5), output 1 covers [1.5, 3).
    let img = image(1, 3, vec![0.0, 3.0, 6.0]);
    let out = resize(&img, 1, 2);
    assert!((out[0] - 1.0).abs() < 1e-5, "{out:?}");
    assert!((out[1] - 5.0).abs() < 1e-5, "{out:?}");
}

#[test]
fn enlarging_interpolates_bilinearly() {
    let img = image(1, 2, vec![0.0, 100.0]);
    // centres of 4 outputs fall at input positions −0.25, 0.25, 0.75, 1.25 (edges clamp)
    assert_eq!(resize(&img, 1, 4), [0.0, 25.0, 75.0, 100.0]);
}

#[test]
fn same_size_is_identity_and_constants_stay_constant() {
    let img = image(2, 2, vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(resize(&img, 2, 2), img.hu);
    let flat = image(7, 5, vec![-1024.0; 35]);
    assert!(resize(&flat, 3, 3)
        .iter()
        .all(|v| (*v + 1024.0).abs() < 1e-3));
    assert!(resize(&flat, 11, 13)
        .iter()
        .all(|v| (*v + 1024.0).abs() < 1e-3));
}

#[test]
fn model_input_is_square_hu_in_canonical_orientation() {
    // 2×4 prone image: flipped, padded to 4×4 with air, enlarged to 8×8.
    let img = HuImage {
        orientation: Some([-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]),
        ..image(2, 4, vec![0.0, 0.0, 0.0, 0.0, 100.0, 100.0, 100.0, 100.0])
    };
    let out = to_model_input(&img, 8);
    assert_eq!(out.len(), 64);
    // padded rows: air, 100 (flipped up), 0, air; output rows 3 and 4 sample input rows
    // 1.25 and 1.75, between the 100 HU and the 0 HU row
    assert_eq!(out[0], AIR_HU);
    assert_eq!(out[3 * 8], 75.0);
    assert_eq!(out[4 * 8], 25.0);
    assert_eq!(out[7 * 8], AIR_HU);
}

#[test]
fn window_unit_clamps_and_scales() {
    assert_eq!(window_unit(-1024.0, -100.0, 200.0), 0.0);
    assert_eq!(window_unit(50.0, -100.0, 200.0), 0.5);
    assert_eq!(window_unit(3000.0, -100.0, 200.0), 1.0);
}
