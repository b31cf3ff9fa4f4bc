//! The attributes the HU pipeline reads, read leniently where real files are sloppy and
//! strictly where a wrong guess would give wrong HU.
//!
//! Values stored with VR UN (e.g. an Explicit VR file written by a tool that did not know
//! the tags) are decoded by the VR the standard gives the attribute, as PS3.5 6.2.2 asks.

use dicom_core::value::{PrimitiveValue, Value};
use dicom_core::{DataDictionary, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemElement;
use dicom_object::InMemDicomObject;

use super::PixelErrorKind;

/// Image Pixel module attributes, as the pipeline needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PixelFormat {
    pub rows: usize,
    pub columns: usize,
    pub bits_allocated: u16,
    pub bits_stored: u16,
    pub high_bit: u16,
    pub signed: bool,
    pub monochrome1: bool,
}

/// How stored values of one frame become HU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Modality {
    pub slope: f64,
    pub intercept: f64,
}

/// Stored values that mean "no data" (Pixel Padding Value, and the Pixel Padding Range
/// Limit when present), already interpreted like the stored samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Padding {
    pub low: i64,
    pub high: i64,
}

/// The Image Pixel module attributes, checked for what a CT image can be.
pub(crate) fn pixel_format<D: DataDictionary + Clone>(
    obj: &InMemDicomObject<D>,
) -> Result<PixelFormat, PixelErrorKind> {
    let rows = required_u16(obj, tags::ROWS, "Rows")?;
    let columns = required_u16(obj, tags::COLUMNS, "Columns")?;
    let samples = u16_value(obj, tags::SAMPLES_PER_PIXEL, "SamplesPerPixel")?.unwrap_or(1);
    let bits_allocated = required_u16(obj, tags::BITS_ALLOCATED, "BitsAllocated")?;
    let bits_stored = u16_value(obj, tags::BITS_STORED, "BitsStored")?.unwrap_or(bits_allocated);
    let high_bit =
        u16_value(obj, tags::HIGH_BIT, "HighBit")?.unwrap_or(bits_stored.saturating_sub(1));
    let representation =
        u16_value(obj, tags::PIXEL_REPRESENTATION, "PixelRepresentation")?.unwrap_or(0);
    let photometric = text_values(obj, tags::PHOTOMETRIC_INTERPRETATION)
        .and_then(|v| v.into_iter().next())
        .ok_or(PixelErrorKind::MissingAttribute(
            "PhotometricInterpretation",
        ))?;

    if rows == 0 || columns == 0 {
        return Err(invalid("Rows/Columns", format!("{rows}×{columns} image")));
    }
    if samples != 1 {
        return Err(PixelErrorKind::UnsupportedImage(format!(
            "SamplesPerPixel is {samples}; a CT image has one sample per pixel"
        )));
    }
    let monochrome1 = match photometric.as_str() {
        "MONOCHROME1" => true,
        "MONOCHROME2" => false,
        other => {
            return Err(PixelErrorKind::UnsupportedImage(format!(
                "PhotometricInterpretation {other}; CT images are MONOCHROME1 or MONOCHROME2"
            )))
        }
    };
    if !matches!(bits_allocated, 8 | 16 | 32) {
        return Err(invalid("BitsAllocated", format!("{bits_allocated}")));
    }
    if bits_stored == 0 || bits_stored > bits_allocated {
        return Err(invalid(
            "BitsStored",
            format!("{bits_stored} with BitsAllocated {bits_allocated}"),
        ));
    }
    if high_bit >= bits_allocated || high_bit + 1 < bits_stored {
        return Err(invalid(
            "HighBit",
            format!("{high_bit} with BitsStored {bits_stored}, BitsAllocated {bits_allocated}"),
        ));
    }
    if representation > 1 {
        return Err(invalid("PixelRepresentation", format!("{representation}")));
    }
    Ok(PixelFormat {
        rows: usize::from(rows),
        columns: usize::from(columns),
        bits_allocated,
        bits_stored,
        high_bit,
        signed: representation == 1,
        monochrome1,
    })
}

/// Number of Frames, 1 when absent (single-frame IODs do not carry it).
pub(crate) fn number_of_frames<D: DataDictionary + Clone>(
    obj: &InMemDicomObject<D>,
) -> Result<u32, PixelErrorKind> {
    match f64_values(obj, tags::NUMBER_OF_FRAMES, "NumberOfFrames")?.as_deref() {
        None | Some([]) => Ok(1),
        Some([n, ..]) if *n >= 1.0 && n.fract() == 0.0 && *n <= f64::from(u32::MAX) => {
            Ok(*n as u32)
        }
        Some([n, ..]) => Err(invalid("NumberOfFrames", format!("{n}"))),
    }
}

/// Rescale Slope/Intercept for one frame: the Pixel Value Transformation macro of an
/// Enhanced CT image (per-frame before shared), else the top-level attributes, else 1/0.
pub(crate) fn modality<D: DataDictionary + Clone>(
    obj: &InMemDicomObject<D>,
    frame: u32,
) -> Result<Modality, PixelErrorKind> {
    let source = functional_group(obj, frame, tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE)
        .filter(|item| item.get(tags::RESCALE_SLOPE).is_some())
        .unwrap_or(obj);
    let slope = first_f64(source, tags::RESCALE_SLOPE, "RescaleSlope")?.unwrap_or(1.0);
    let intercept = first_f64(source, tags::RESCALE_INTERCEPT, "RescaleIntercept")?.unwrap_or(0.0);
    if !slope.is_finite() || slope == 0.0 {
        return Err(invalid("RescaleSlope", format!("{slope}")));
    }
    if !intercept.is_finite() {
        return Err(invalid("RescaleIntercept", format!("{intercept}")));
    }
    if source.get(tags::RESCALE_SLOPE).is_none() && obj.get(tags::MODALITY_LUT_SEQUENCE).is_some() {
        // A lookup table instead of a linear rescale: not something CT scanners write, and
        // guessing 1/0 would give wrong HU.
        return Err(PixelErrorKind::UnsupportedImage(
            "Modality LUT Sequence without Rescale Slope/Intercept".into(),
        ));
    }
    Ok(Modality { slope, intercept })
}

/// Image Orientation (Patient) of one frame (Plane Orientation macro first), if present
/// and usable: six finite values with non-zero direction vectors.
pub(crate) fn orientation<D: DataDictionary + Clone>(
    obj: &InMemDicomObject<D>,
    frame: u32,
) -> Option<[f64; 6]> {
    let source = functional_group(obj, frame, tags::PLANE_ORIENTATION_SEQUENCE).unwrap_or(obj);
    let values = f64_values(source, tags::IMAGE_ORIENTATION_PATIENT, "")
        .ok()
        .flatten()?;
    let iop: [f64; 6] = values.get(..6)?.try_into().ok()?;
    let usable = iop.iter().all(|v| v.is_finite())
        && iop[..3].iter().any(|v| *v != 0.0)
        && iop[3..].iter().any(|v| *v != 0.0);
    usable.then_some(iop)
}

/// Pixel Spacing of one frame (Pixel Measures macro first): (between rows, between
/// columns) in mm, if present and positive.
pub(crate) fn pixel_spacing<D: DataDictionary + Clone>(
    obj: &InMemDicomObject<D>,
    frame: u32,
) -> Option<[f64; 2]> {
    let source = functional_group(obj, frame, tags::PIXEL_MEASURES_SEQUENCE).unwrap_or(obj);
    let values = f64_values(source, tags::PIXEL_SPACING, "").ok().flatten()?;
    let spacing: [f64; 2] = values.get(..2)?.try_into().ok()?;
    spacing
        .iter()
        .all(|v| v.is_finite() && *v > 0.0)
        .then_some(spacing)
}

/// Pixel Padding Value (and Range Limit), interpreted like a stored sample of `format`.
pub(crate) fn padding<D: DataDictionary + Clone>(
    obj: &InMemDicomObject<D>,
    format: &PixelFormat,
) -> Result<Option<Padding>, PixelErrorKind> {
    let Some(value) = raw_bits(obj, tags::PIXEL_PADDING_VALUE, "PixelPaddingValue")? else {
        return Ok(None);
    };
    let value = interpret_padding(value, format);
    let limit = raw_bits(
        obj,
        tags::PIXEL_PADDING_RANGE_LIMIT,
        "PixelPaddingRangeLimit",
    )?
    .map(|l| interpret_padding(l, format))
    .unwrap_or(value);
    Ok(Some(Padding {
        low: value.min(limit),
        high: value.max(limit),
    }))
}

/// Padding values are US or SS like the pixels, and some writers store the bit pattern
/// with the other signedness (e.g. SS −2000 written as US 63536); keeping only the stored
/// bits and sign-extending like a sample compares them the way the scanner meant.
fn interpret_padding(bits: u32, format: &PixelFormat) -> i64 {
    super::stored_value(u64::from(bits), format.bits_stored, format.signed)
}

/// The item of a functional group macro (e.g. Pixel Value Transformation) that applies
/// to `frame`: from the Per-frame Functional Groups, else from the Shared ones.
fn functional_group<D: DataDictionary + Clone>(
    obj: &InMemDicomObject<D>,
    frame: u32,
    macro_sequence: Tag,
) -> Option<&InMemDicomObject<D>> {
    let first_item = |group| first_item_of(group, macro_sequence);
    let per_frame = obj
        .get(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .and_then(|e| e.items())
        .and_then(|items| items.get(frame as usize))
        .and_then(first_item);
    per_frame.or_else(|| {
        first_item_of(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE).and_then(first_item)
    })
}

fn first_item_of<D: DataDictionary + Clone>(
    obj: &InMemDicomObject<D>,
    sequence: Tag,
) -> Option<&InMemDicomObject<D>> {
    obj.get(sequence)
        .and_then(|e| e.items())
        .and_then(|items| items.first())
}

fn invalid(name: &'static str, reason: String) -> PixelErrorKind {
    PixelErrorKind::InvalidAttribute { name, reason }
}

fn required_u16<D: DataDictionary + Clone>(
    obj: &InMemDicomObject<D>,
    tag: Tag,
    name: &'static str,
) -> Result<u16, PixelErrorKind> {
    u16_value(obj, tag, name)?.ok_or(PixelErrorKind::MissingAttribute(name))
}

/// A US attribute (also accepted: UN bytes, or a number written as text).
fn u16_value<D: DataDictionary + Clone>(
    obj: &InMemDicomObject<D>,
    tag: Tag,
    name: &'static str,
) -> Result<Option<u16>, PixelErrorKind> {
    let Some(bits) = raw_bits(obj, tag, name)? else {
        return Ok(None);
    };
    u16::try_from(bits)
        .map(Some)
        .map_err(|_| invalid(name, format!("{bits} does not fit 16 bits")))
}

/// The first value of a 16-bit integer attribute as its bit pattern (US or SS), from
/// whatever VR the file used.
fn raw_bits<D: DataDictionary + Clone>(
    obj: &InMemDicomObject<D>,
    tag: Tag,
    name: &'static str,
) -> Result<Option<u32>, PixelErrorKind> {
    let Some(element) = obj.get(tag) else {
        return Ok(None);
    };
    let Value::Primitive(value) = element.value() else {
        return Err(invalid(name, "is a sequence".into()));
    };
    let bits = match value {
        PrimitiveValue::Empty => return Ok(None),
        PrimitiveValue::U16(v) => v.first().map(|x| u32::from(*x)),
        PrimitiveValue::I16(v) => v.first().map(|x| u32::from(*x as u16)),
        PrimitiveValue::U32(v) => v.first().copied(),
        PrimitiveValue::I32(v) => v.first().map(|x| *x as u32),
        // UN/OB bytes: little-endian, as every transfer syntax this node stores.
        PrimitiveValue::U8(b) => match b.as_slice() {
            [] => None,
            [lo, hi, ..] => Some(u32::from(u16::from_le_bytes([*lo, *hi]))),
            [_] => return Err(invalid(name, "one byte long".into())),
        },
        other => {
            let text = other.to_str();
            let trimmed = text.trim_matches(|c: char| c == ' ' || c == '\0');
            let n: i64 = trimmed
                .parse()
                .map_err(|_| invalid(name, format!("{trimmed:?} is not an integer")))?;
            Some(n as u32)
        }
    };
    Ok(bits)
}

fn first_f64<D: DataDictionary + Clone>(
    obj: &InMemDicomObject<D>,
    tag: Tag,
    name: &'static str,
) -> Result<Option<f64>, PixelErrorKind> {
    Ok(f64_values(obj, tag, name)?.and_then(|v| v.first().copied()))
}

/// A numeric attribute (DS, IS, FD, ...) as floats; `None` when absent or empty.
fn f64_values<D: DataDictionary + Clone>(
    obj: &InMemDicomObject<D>,
    tag: Tag,
    name: &'static str,
) -> Result<Option<Vec<f64>>, PixelErrorKind> {
    let Some(element) = obj.get(tag) else {
        return Ok(None);
    };
    let texts = match element.value() {
        Value::Primitive(PrimitiveValue::Empty) => return Ok(None),
        Value::Primitive(PrimitiveValue::Str(_) | PrimitiveValue::Strs(_)) => text_values(obj, tag),
        _ if element.vr() == VR::UN => un_text(element),
        _ => {
            return element
                .to_multi_float64()
                .map(Some)
                .map_err(|e| invalid(name, e.to_string()))
        }
    };
    let Some(texts) = texts else {
        return Ok(None);
    };
    texts
        .iter()
        .map(|t| {
            t.parse::<f64>()
                .map_err(|_| invalid(name, format!("{t:?} is not a number")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Text values (CS, DS, ...), trimmed, from a string or UN element.
fn text_values<D: DataDictionary + Clone>(
    obj: &InMemDicomObject<D>,
    tag: Tag,
) -> Option<Vec<String>> {
    let element = obj.get(tag)?;
    if element.vr() == VR::UN {
        return un_text(element);
    }
    let text = element.to_str().ok()?;
    let values: Vec<String> = split_text(&text);
    (!values.is_empty()).then_some(values)
}

/// The values of a text attribute that arrived as UN bytes (the VR the dictionary gives
/// the tag is text for every attribute read this way).
fn un_text<D: DataDictionary + Clone>(element: &InMemElement<D>) -> Option<Vec<String>> {
    let Value::Primitive(value) = element.value() else {
        return None;
    };
    let bytes = value.to_bytes();
    let values = split_text(&String::from_utf8_lossy(&bytes));
    (!values.is_empty()).then_some(values)
}

fn split_text(text: &str) -> Vec<String> {
    text.split('\\')
        .map(|v| v.trim_matches(|c: char| c == ' ' || c == '\0').to_string())
        .filter(|v| !v.is_empty())
        .collect()
}
