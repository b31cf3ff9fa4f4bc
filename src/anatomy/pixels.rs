//! From a stored CT image to Hounsfield units and to the model input, exactly as
//! docs/contracts.md "Preprocessing" says. The node and `anatomy-node dataset build` both
//! call this module, so training images and live images can never be prepared differently.
//!
//! 1. [`hu_frames`]: decode every frame (any transfer syntax the store accepts) and map
//!    stored values to HU (Pixel Representation, Bits Stored, MONOCHROME1, Rescale, Pixel
//!    Padding → −1024 HU). Images keep the orientation they were stored in.
//! 2. [`to_model_input`] / [`preprocess`]: canonical axial orientation, pad to a square with
//!    air (or cut the model's fixed field of view, or frame the body: [`Framing`]), resize
//!    to `S×S`. [`window_unit`] then maps HU to the model's `[0, 1]` input.
//!
//! Two real files of the development set test the lenient corners, and both decode:
//! * `pydicom-j2k-head/CT/J2K_pixelrep_mismatch.dcm`: Pixel Representation 1 (signed,
//!   13 bits stored) but an unsigned JPEG 2000 codestream. The DICOM attributes win: the
//!   decoded samples are cut to Bits Stored and sign-extended (see [`stored_value`]), which
//!   is what the writer meant and what pydicom does too.
//! * `pydicom-data-abdomen/CT/explicit_VR-UN.dcm`: Explicit VR with most attributes
//!   (Rescale, Image Orientation, ...) written as UN; their bytes are decoded with the VR the
//!   dictionary gives them (see `attributes`).

mod attributes;
mod body;
mod decode;
mod geometry;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use dicom_object::{DefaultDicomObject, OpenFileOptions};
use serde::{Deserialize, Serialize};

use crate::error_text::error_chain;

pub use body::{body_box, body_framing, BodyBox};
pub use geometry::{
    canonical_orientation, cut_window, fixed_field, pad_to_square, resize, AxialFlips,
};

/// HU written where there is no patient: padding pixels, and the border added to make
/// the image square.
pub const AIR_HU: f32 = -1024.0;

/// Largest angle between the image normal and the patient's z axis for which an image is
/// treated as axial (and flipped into the canonical orientation). Gantry tilts reach ±30°;
/// 35° keeps them axial while oblique reformats (45°) and other planes stay as stored.
pub const DEFAULT_AXIAL_TOLERANCE_DEG: f64 = 35.0;

/// One frame in Hounsfield units, in the orientation it was stored in.
#[derive(Debug, Clone, PartialEq)]
pub struct HuImage {
    pub rows: usize,
    pub columns: usize,
    /// `rows × columns` values, row by row.
    pub hu: Vec<f32>,
    /// 0-based frame number in the file.
    pub frame: u32,
    /// Pixel Spacing (mm): distance between rows, then between columns.
    pub pixel_spacing: Option<[f64; 2]>,
    /// Image Orientation (Patient): row direction cosines, then column direction cosines.
    pub orientation: Option<[f64; 6]>,
}

impl HuImage {
    /// HU at (row, column); panics outside the image, like slice indexing.
    pub fn at(&self, row: usize, column: usize) -> f32 {
        self.hu[row * self.columns + column]
    }
}

/// How a [`HuImage`] becomes the model input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preprocessing {
    /// Side `S` of the square model input.
    pub size: usize,
    /// See [`DEFAULT_AXIAL_TOLERANCE_DEG`].
    pub axial_tolerance_deg: f64,
    /// When set (the model's `field_of_view_mm`), every image shows this many millimetres
    /// around its centre, whatever its own field of view, so that a neck is neck-sized in a
    /// 128-pixel RT-planning CT and in a 512-pixel diagnostic one. Unset: the whole image
    /// is fitted to `S×S` (the original contract), or framed by [`Self::framing`].
    pub field_of_view_mm: Option<f64>,
    /// Without a field of view: the whole image, or the square around the body (the model's
    /// `framing`). Exclusive with `field_of_view_mm`: the model metadata, `dataset build`
    /// and the mine settings refuse both, so they never meet here; if they did, the body
    /// framing would be used.
    pub framing: Framing,
}

impl Preprocessing {
    pub fn new(size: usize) -> Self {
        Self {
            size,
            axial_tolerance_deg: DEFAULT_AXIAL_TOLERANCE_DEG,
            field_of_view_mm: None,
            framing: Framing::Whole,
        }
    }

    pub fn with_field_of_view(self, field_of_view_mm: Option<f64>) -> Self {
        Self {
            field_of_view_mm,
            ..self
        }
    }

    pub fn with_framing(self, framing: Framing) -> Self {
        Self { framing, ..self }
    }
}

/// How contract step 4 frames an image when there is no fixed field of view: the value of
/// the model's metadata key `framing`, of `dataset build --framing`, of `mine.framing` and
/// of the `framing` of dataset.json (each absent: [`Framing::Whole`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Framing {
    /// `"whole"`: the whole image, padded to a square of air (the original contract).
    #[default]
    Whole,
    /// `"body"`: the square around the patient's body plus a margin, so that every body
    /// fills the input whatever the scanner's field of view ([`body_framing`]).
    Body,
}

impl Framing {
    pub const fn as_str(self) -> &'static str {
        match self {
            Framing::Whole => "whole",
            Framing::Body => "body",
        }
    }
}

impl fmt::Display for Framing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `framing` that is neither `whole` nor `body`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a framing: \"whole\" or \"body\"")]
pub struct UnknownFraming(pub String);

impl FromStr for Framing {
    type Err = UnknownFraming;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "whole" => Ok(Framing::Whole),
            "body" => Ok(Framing::Body),
            _ => Err(UnknownFraming(text.to_string())),
        }
    }
}

/// A file whose pixels cannot be turned into HU, and why.
#[derive(Debug, thiserror::Error)]
#[error("{}: {kind}", file.display())]
pub struct PixelError {
    pub file: PathBuf,
    pub kind: PixelErrorKind,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PixelErrorKind {
    #[error("not a readable DICOM file: {0}")]
    Open(String),
    #[error("transfer syntax {uid} ({name}) cannot be decoded: {reason}")]
    UnsupportedTransferSyntax {
        uid: String,
        name: String,
        reason: String,
    },
    #[error("missing attribute {0}")]
    MissingAttribute(&'static str),
    #[error("invalid {name}: {reason}")]
    InvalidAttribute { name: &'static str, reason: String },
    #[error("unsupported image: {0}")]
    UnsupportedImage(String),
    #[error("no Pixel Data")]
    NoPixelData,
    #[error("corrupt pixel data in frame {frame}: {reason}")]
    CorruptPixelData { frame: u32, reason: String },
}

/// Largest frame decoded, in stored bytes: 8192 × 8192 pixels of 16 bits.
pub const MAX_FRAME_BYTES: usize = 128 << 20;

/// Every frame of the DICOM file at `path`, in HU.
pub fn hu_frames(path: &Path) -> Result<Vec<HuImage>, PixelError> {
    let at = |kind| PixelError {
        file: path.to_path_buf(),
        kind,
    };
    let obj = OpenFileOptions::new()
        .open_file(path)
        .map_err(|e| at(PixelErrorKind::Open(error_chain(&e))))?;
    hu_frames_of(obj).map_err(at)
}

/// Every frame of an already opened DICOM object, in HU.
pub fn hu_frames_of(obj: DefaultDicomObject) -> Result<Vec<HuImage>, PixelErrorKind> {
    decode_frames(obj, None)
}

/// One frame (0-based) of the DICOM file at `path`, in HU; only that frame is decoded (the
/// web page renders key-images of multi-frame files this way).
pub fn hu_frame(path: &Path, frame: u32) -> Result<HuImage, PixelError> {
    let at = |kind| PixelError {
        file: path.to_path_buf(),
        kind,
    };
    let obj = OpenFileOptions::new()
        .open_file(path)
        .map_err(|e| at(PixelErrorKind::Open(error_chain(&e))))?;
    let mut frames = decode_frames(obj, Some(frame)).map_err(at)?;
    frames.pop().ok_or_else(|| at(PixelErrorKind::NoPixelData))
}

/// The frames of `obj` (all, or only the one given) in HU.
fn decode_frames(
    obj: DefaultDicomObject,
    only: Option<u32>,
) -> Result<Vec<HuImage>, PixelErrorKind> {
    let obj = decode::retype_un_pixel_attributes(obj);
    let format = attributes::pixel_format(&obj)?;
    // The decoders size their output buffers from Rows × Columns, whatever the codestream
    // holds: a header announcing 65535 × 65535 would cost gigabytes before the data is
    // found short (issue #18). CT frames are at most a few MiB.
    let frame_bytes = format.rows * format.columns * usize::from(format.bits_allocated / 8);
    if frame_bytes > MAX_FRAME_BYTES {
        return Err(PixelErrorKind::UnsupportedImage(format!(
            "{} × {} pixels of {} bits is {} MiB per frame; at most {} MiB are decoded",
            format.rows,
            format.columns,
            format.bits_allocated,
            frame_bytes >> 20,
            MAX_FRAME_BYTES >> 20
        )));
    }
    let frames = attributes::number_of_frames(&obj)?;
    let wanted = match only {
        None => 0..frames,
        Some(f) if f < frames => f..f + 1,
        Some(f) => {
            return Err(PixelErrorKind::InvalidAttribute {
                name: "frame number",
                reason: format!("frame {} asked for, the image has {frames}", f + 1),
            })
        }
    };
    let obj = decode::one_fragment_per_frame(obj, frames);
    let padding = attributes::padding(&obj, &format)?;
    let codec = decode::FrameDecoder::for_object(&obj)?;
    let samples = codec.sample_format(&format);
    wanted
        .map(|frame| {
            let bytes = codec.frame_bytes(&obj, frame, &format)?;
            let modality = attributes::modality(&obj, frame)?;
            Ok(HuImage {
                rows: format.rows,
                columns: format.columns,
                hu: modality_values(&bytes, &samples, padding, modality),
                frame,
                pixel_spacing: attributes::pixel_spacing(&obj, frame),
                orientation: attributes::orientation(&obj, frame),
            })
        })
        .collect()
}

/// The `size × size` HU array the model sees (before windowing), with the default axial
/// tolerance.
pub fn to_model_input(image: &HuImage, size: usize) -> Vec<f32> {
    preprocess(image, &Preprocessing::new(size))
}

/// Contract steps 3–5: canonical orientation, then either the square around the body (body
/// framing), the fixed field of view around the centre (when the model has one and the
/// image says its Pixel Spacing) or the whole image padded to a square with air; resized to
/// `S×S`.
pub fn preprocess(image: &HuImage, options: &Preprocessing) -> Vec<f32> {
    let oriented = canonical_orientation(image, options.axial_tolerance_deg);
    if options.framing == Framing::Body {
        return body_framing(&oriented, options.size);
    }
    let framed = options
        .field_of_view_mm
        .and_then(|mm| fixed_field(&oriented, mm))
        .unwrap_or_else(|| pad_to_square(&oriented));
    resize(&framed, options.size, options.size)
}

/// The model's normalisation (`"unit"`): HU clamped to `[low, high]`, mapped to `[0, 1]`.
pub fn window_unit(hu: f32, low: f32, high: f32) -> f32 {
    (hu.clamp(low, high) - low) / (high - low)
}

/// Contract step 2 for one decoded frame: stored samples (little endian, `BitsAllocated`
/// wide) to HU.
fn modality_values(
    bytes: &[u8],
    format: &attributes::PixelFormat,
    padding: Option<attributes::Padding>,
    modality: attributes::Modality,
) -> Vec<f32> {
    let width = usize::from(format.bits_allocated / 8);
    let shift = format.high_bit + 1 - format.bits_stored;
    let max_unsigned = (1i64 << format.bits_stored) - 1;
    bytes
        .chunks_exact(width)
        .map(|sample| {
            let raw = sample
                .iter()
                .rev()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            let stored = stored_value(raw >> shift, format.bits_stored, format.signed);
            if padding.is_some_and(|p| (p.low..=p.high).contains(&stored)) {
                return AIR_HU;
            }
            // MONOCHROME1 is inverted within the stored range before rescaling.
            let value = match (format.monochrome1, format.signed) {
                (false, _) => stored,
                (true, true) => -1 - stored,
                (true, false) => max_unsigned - stored,
            };
            (value as f64 * modality.slope + modality.intercept) as f32
        })
        .collect()
}

/// A stored sample from its raw bits: only the low `bits_stored` bits count, sign-extended
/// when Pixel Representation is signed. Decoders that disagree with the attributes (a
/// JPEG 2000 codestream marked unsigned in a signed image, say) are corrected here.
fn stored_value(raw: u64, bits_stored: u16, signed: bool) -> i64 {
    let bits = u32::from(bits_stored.clamp(1, 63));
    let value = (raw & ((1u64 << bits) - 1)) as i64;
    if signed && value >> (bits - 1) == 1 {
        value - (1i64 << bits)
    } else {
        value
    }
}

#[cfg(test)]
mod tests;
