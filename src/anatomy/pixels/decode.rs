//! Frame decoding: the raw stored samples of one frame, little endian, `BitsAllocated` wide.
//!
//! The codecs of dicom-transfer-syntax-registry are called directly rather than through
//! `dicom_pixeldata::PixelDecoder`, because the latter also parses the VOI attributes
//! (window, VOI LUT) and fails the whole decode when those are inconsistent, while HU need
//! only the stored samples. With the `gdcm` cargo feature, JPEG Extended (12-bit) goes
//! through dicom-pixeldata's GDCM decoder.

use std::panic::{catch_unwind, AssertUnwindSafe};

use dicom_core::value::{PixelFragmentSequence, PrimitiveValue, Value};
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::adapters::PixelDataReader;
use dicom_encoding::transfer_syntax::{Codec, TransferSyntaxIndex};
use dicom_object::DefaultDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::attributes::PixelFormat;
use super::{error_chain, PixelErrorKind};

/// JPEG Extended (Process 2 & 4): the syntax of 12-bit lossy JPEG.
const JPEG_EXTENDED: &str = "1.2.840.10008.1.2.4.51";
/// RLE Lossless: byte planes of the stored words, so the stored bit layout survives.
const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";
/// JPEG-LS lossless and near-lossless: CharLS (feature `charls`) or GDCM decodes them.
const JPEG_LS: [&str; 2] = ["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"];

/// How the frames of one object are decoded.
pub(crate) enum FrameDecoder<'r> {
    /// Native (uncompressed) pixel data: frames are slices of the Pixel Data value.
    Native,
    /// Encapsulated pixel data and the codec that decodes it.
    Encapsulated {
        reader: &'r (dyn PixelDataReader + Send + Sync),
        uid: String,
    },
    /// Encapsulated pixel data that GDCM decodes (12-bit JPEG, and JPEG-LS when the
    /// build has no CharLS).
    #[cfg(feature = "gdcm")]
    Gdcm,
}

impl FrameDecoder<'static> {
    pub(crate) fn for_object(obj: &DefaultDicomObject) -> Result<Self, PixelErrorKind> {
        let uid = obj
            .meta()
            .transfer_syntax()
            .trim_end_matches('\0')
            .to_string();
        let unsupported = |reason: &str| PixelErrorKind::UnsupportedTransferSyntax {
            uid: uid.clone(),
            name: transfer_syntax_name(&uid),
            reason: reason.to_string(),
        };
        let ts = TransferSyntaxRegistry
            .get(&uid)
            .ok_or_else(|| unsupported("unknown transfer syntax"))?;
        #[cfg(feature = "gdcm")]
        if uid == JPEG_EXTENDED
            || (JPEG_LS.contains(&uid.as_str())
                && matches!(ts.codec(), Codec::EncapsulatedPixelData(None, _)))
        {
            return Ok(FrameDecoder::Gdcm);
        }
        match ts.codec() {
            Codec::None | Codec::Dataset(Some(_)) => Ok(FrameDecoder::Native),
            Codec::Dataset(None) => Err(unsupported("no data set codec in this build")),
            Codec::EncapsulatedPixelData(Some(reader), _) => Ok(FrameDecoder::Encapsulated {
                reader: reader.as_ref(),
                uid,
            }),
            Codec::EncapsulatedPixelData(None, _) if JPEG_LS.contains(&uid.as_str()) => Err(
                unsupported("this build has no JPEG-LS decoder (features `charls` or `gdcm`)"),
            ),
            Codec::EncapsulatedPixelData(None, _) => {
                Err(unsupported("no pixel data decoder in this build"))
            }
        }
    }
}

impl FrameDecoder<'_> {
    /// The format of the samples this decoder hands out. Native and RLE data keep the
    /// stored bit layout (High Bit may sit above Bits Stored − 1); the JPEG family hands out
    /// the codestream's values, already in the low bits, whatever High Bit says.
    pub(crate) fn sample_format(&self, format: &PixelFormat) -> PixelFormat {
        match self {
            FrameDecoder::Native => *format,
            FrameDecoder::Encapsulated { uid, .. } if uid == RLE_LOSSLESS => *format,
            _ => PixelFormat {
                high_bit: format.bits_stored - 1,
                ..*format
            },
        }
    }

    /// The stored samples of `frame`, exactly `rows × columns` of them.
    pub(crate) fn frame_bytes(
        &self,
        obj: &DefaultDicomObject,
        frame: u32,
        format: &PixelFormat,
    ) -> Result<Vec<u8>, PixelErrorKind> {
        let expected = format.rows * format.columns * usize::from(format.bits_allocated / 8);
        let corrupt = |reason: String| PixelErrorKind::CorruptPixelData { frame, reason };
        if obj.get(tags::PIXEL_DATA).is_none() {
            return Err(PixelErrorKind::NoPixelData);
        }
        let bytes = match self {
            FrameDecoder::Native => native_frame(obj, frame, expected)?,
            FrameDecoder::Encapsulated { reader, uid } => {
                encapsulated_frame(*reader, uid, obj, frame, format)?
            }
            #[cfg(feature = "gdcm")]
            FrameDecoder::Gdcm => gdcm_frame(obj, frame)?,
        };
        if bytes.len() < expected {
            return Err(corrupt(format!(
                "decoded {} bytes, the image needs {expected}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }
}

fn native_frame(
    obj: &DefaultDicomObject,
    frame: u32,
    frame_len: usize,
) -> Result<Vec<u8>, PixelErrorKind> {
    let element = obj
        .get(tags::PIXEL_DATA)
        .ok_or(PixelErrorKind::NoPixelData)?;
    let Value::Primitive(value) = element.value() else {
        return Err(PixelErrorKind::CorruptPixelData {
            frame,
            reason: "encapsulated pixel data in a native transfer syntax".into(),
        });
    };
    let data = value.to_bytes();
    let start = frame as usize * frame_len;
    data.get(start..start + frame_len)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| PixelErrorKind::CorruptPixelData {
            frame,
            reason: format!(
                "Pixel Data holds {} bytes, frame {frame} needs bytes {start}..{}",
                data.len(),
                start + frame_len
            ),
        })
}

fn encapsulated_frame(
    reader: &(dyn PixelDataReader + Send + Sync),
    uid: &str,
    obj: &DefaultDicomObject,
    frame: u32,
    format: &PixelFormat,
) -> Result<Vec<u8>, PixelErrorKind> {
    let mut out = Vec::new();
    // The codecs index buffers with sizes taken from the codestream; a corrupt or hostile
    // file can make them panic. One bad file must not take the node down.
    let result = catch_unwind(AssertUnwindSafe(|| {
        reader.decode_frame(obj, frame, &mut out)
    }));
    match result {
        Ok(Ok(())) => Ok(out),
        Ok(Err(e)) if uid == JPEG_EXTENDED && format.bits_stored > 8 => {
            Err(PixelErrorKind::UnsupportedTransferSyntax {
                uid: uid.to_string(),
                name: transfer_syntax_name(uid),
                reason: format!(
                    "{}-bit JPEG needs a build with GDCM (`--no-default-features --features gdcm`): {}",
                    format.bits_stored,
                    error_chain(&e)
                ),
            })
        }
        Ok(Err(e)) => Err(PixelErrorKind::CorruptPixelData {
            frame,
            reason: error_chain(&e),
        }),
        Err(_) => Err(PixelErrorKind::CorruptPixelData {
            frame,
            reason: "the decoder gave up on the codestream (it panicked)".into(),
        }),
    }
}

#[cfg(feature = "gdcm")]
fn gdcm_frame(obj: &DefaultDicomObject, frame: u32) -> Result<Vec<u8>, PixelErrorKind> {
    use dicom_pixeldata::PixelDecoder;
    let result = catch_unwind(AssertUnwindSafe(|| {
        obj.decode_pixel_data_frame(frame)
            .map(|decoded| decoded.data().to_vec())
    }));
    match result {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err(PixelErrorKind::CorruptPixelData {
            frame,
            reason: error_chain(&e),
        }),
        Err(_) => Err(PixelErrorKind::CorruptPixelData {
            frame,
            reason: "GDCM gave up on the codestream (it panicked)".into(),
        }),
    }
}

/// A readable name for error messages (the registry knows every syntax the store takes).
fn transfer_syntax_name(uid: &str) -> String {
    TransferSyntaxRegistry
        .get(uid)
        .map(|ts| ts.name().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

/// Image Pixel attributes written as UN (see `attributes`) get their standard VR, so that
/// the codecs, which read them as US/CS/IS, see them too.
pub(crate) fn retype_un_pixel_attributes(mut obj: DefaultDicomObject) -> DefaultDicomObject {
    let us_tags = [
        tags::ROWS,
        tags::COLUMNS,
        tags::SAMPLES_PER_PIXEL,
        tags::BITS_ALLOCATED,
        tags::BITS_STORED,
        tags::HIGH_BIT,
        tags::PIXEL_REPRESENTATION,
        tags::PLANAR_CONFIGURATION,
    ];
    for tag in us_tags {
        let Some(bytes) = un_bytes(&obj, tag) else {
            continue;
        };
        if let [lo, hi] = bytes[..] {
            let value = PrimitiveValue::from(u16::from_le_bytes([lo, hi]));
            obj.put(DataElement::new(tag, VR::US, value));
        }
    }
    for (tag, vr) in [
        (tags::PHOTOMETRIC_INTERPRETATION, VR::CS),
        (tags::NUMBER_OF_FRAMES, VR::IS),
    ] {
        let Some(bytes) = un_bytes(&obj, tag) else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes)
            .trim_matches(|c: char| c == ' ' || c == '\0')
            .to_string();
        obj.put(DataElement::new(tag, vr, PrimitiveValue::from(text)));
    }
    obj
}

fn un_bytes(obj: &DefaultDicomObject, tag: dicom_core::Tag) -> Option<Vec<u8>> {
    let element = obj.get(tag)?;
    if element.vr() != VR::UN {
        return None;
    }
    match element.value() {
        Value::Primitive(p) => Some(p.to_bytes().to_vec()),
        _ => None,
    }
}

/// Encapsulated pixel data regrouped to one fragment per frame, the layout the RLE codec
/// assumes (it panics on a frame split over several fragments, as in the real
/// D_CLUNIE_CT1_RLE_FRAGS.dcm). A single frame takes every fragment; several frames are
/// grouped by the Basic Offset Table. Without a usable table the object is left as it is
/// and the codec reports what it finds.
pub(crate) fn one_fragment_per_frame(
    mut obj: DefaultDicomObject,
    frames: u32,
) -> DefaultDicomObject {
    let grouped = match obj.get(tags::PIXEL_DATA).map(|e| e.value()) {
        Some(Value::PixelSequence(seq)) if seq.fragments().len() != frames as usize => {
            group_fragments(seq.offset_table(), seq.fragments(), frames)
        }
        _ => None,
    };
    if let Some(fragments) = grouped {
        let seq = PixelFragmentSequence::new(Vec::<u32>::new(), fragments);
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            Value::PixelSequence(seq),
        ));
    }
    obj
}

fn group_fragments(offsets: &[u32], fragments: &[Vec<u8>], frames: u32) -> Option<Vec<Vec<u8>>> {
    if frames == 1 {
        return Some(vec![fragments.concat()]);
    }
    if offsets.len() != frames as usize || offsets.first() != Some(&0) {
        return None;
    }
    let mut groups = vec![Vec::new(); frames as usize];
    // Offsets count bytes from the first fragment's item tag: 8 header bytes per fragment.
    let mut position = 0u64;
    for fragment in fragments {
        let frame = offsets
            .partition_point(|&o| u64::from(o) <= position)
            .checked_sub(1)?;
        groups[frame].extend_from_slice(fragment);
        position += 8 + fragment.len() as u64;
    }
    Some(groups)
}
