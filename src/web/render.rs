//! Rendered images (PS3.18 8.3.5.1 / 9.5): one frame through `anatomy::pixels` (any stored
//! transfer syntax → HU), a window, resized to fit a viewport, as an 8-bit grey PNG.

use std::path::Path;

use crate::anatomy::pixels::{self, HuImage, PixelErrorKind};

/// What a person expects of a CT thumbnail: the soft-tissue window (W 400, L 40).
pub const SOFT_TISSUE: Window = Window {
    center: 40.0,
    width: 400.0,
};
/// The largest side of a rendered image when the request gives no viewport.
pub const DEFAULT_MAX_SIDE: usize = 512;
/// The largest viewport side accepted.
const MAX_VIEWPORT: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub center: f32,
    pub width: f32,
}

/// `window=center,width[,function]` (PS3.18 8.3.5.1.3); only the linear functions.
pub fn parse_window(text: &str) -> Result<Window, String> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let bad = || format!("window={text}: give center,width (e.g. 40,400) in HU");
    let (center, width) = match parts.as_slice() {
        [c, w] | [c, w, "linear" | "linear-exact" | "LINEAR" | "LINEAR_EXACT"] => (c, w),
        [_, _, f] => {
            return Err(format!(
                "window function {f:?} is not supported (linear only)"
            ))
        }
        _ => return Err(bad()),
    };
    let center: f32 = center.parse().map_err(|_| bad())?;
    let width: f32 = width.parse().map_err(|_| bad())?;
    if !center.is_finite() || !width.is_finite() || width < 1.0 {
        return Err(bad());
    }
    Ok(Window { center, width })
}

/// `viewport=vw,vh` (PS3.18 8.3.5.1.3): the image is scaled to fit, never enlarged.
pub fn parse_viewport(text: &str) -> Result<(usize, usize), String> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let bad = || format!("viewport={text}: give width,height in pixels (1 to {MAX_VIEWPORT})");
    let [w, h, ..] = parts.as_slice() else {
        return Err(bad());
    };
    let w: usize = w.parse().map_err(|_| bad())?;
    let h: usize = h.parse().map_err(|_| bad())?;
    if !(1..=MAX_VIEWPORT).contains(&w) || !(1..=MAX_VIEWPORT).contains(&h) {
        return Err(bad());
    }
    Ok((w, h))
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The instance holds nothing this renderer can show (no pixels, colour, a syntax
    /// that cannot be decoded, a frame it does not have).
    #[error("{0}")]
    Unrenderable(String),
    /// The stored file cannot be read or its pixels are corrupt.
    #[error("{0}")]
    Broken(String),
}

/// The output size: the image's physical aspect (pixel spacing), scaled down to fit
/// `viewport`.
fn output_size(image: &HuImage, viewport: (usize, usize)) -> (usize, usize) {
    let aspect = image
        .pixel_spacing
        .filter(|[r, c]| {
            *r > 0.0 && *c > 0.0 && (r / c - 1.0).abs() > 0.01 && r / c < 4.0 && c / r < 4.0
        })
        .map_or(1.0, |[r, c]| r / c);
    let width = image.columns as f64;
    let height = image.rows as f64 * aspect;
    let scale = (viewport.0 as f64 / width)
        .min(viewport.1 as f64 / height)
        .min(1.0);
    let w = ((width * scale).round() as usize).clamp(1, viewport.0.max(1));
    let h = ((height * scale).round() as usize).clamp(1, viewport.1.max(1));
    (w, h)
}

/// 8-bit grey levels of `hu` through `window` (linear, PS3.3 C.11.2.1.2.1).
fn grey(hu: &[f32], window: Window) -> Vec<u8> {
    let low = window.center - window.width / 2.0;
    hu.iter()
        .map(|&v| {
            let t = ((v - low) / window.width).clamp(0.0, 1.0);
            (t * 255.0).round() as u8
        })
        .collect()
}

/// A window over the image's own range, for images that are not in HU (not CT).
fn full_range(hu: &[f32]) -> Window {
    let (lo, hi) = hu
        .iter()
        .filter(|v| v.is_finite())
        .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return SOFT_TISSUE;
    }
    Window {
        center: (lo + hi) / 2.0,
        width: (hi - lo).max(1.0),
    }
}

/// Frame `frame` (0-based) of the file at `path` as a PNG. `window` None: soft tissue
/// for CT, the image's range otherwise.
pub fn render_png(
    path: &Path,
    frame: u32,
    window: Option<Window>,
    is_ct: bool,
    viewport: (usize, usize),
) -> Result<Vec<u8>, RenderError> {
    let image = pixels::hu_frame(path, frame).map_err(|e| match e.kind {
        PixelErrorKind::Open(why) => {
            RenderError::Broken(format!("the stored file cannot be read: {why}"))
        }
        PixelErrorKind::CorruptPixelData { .. } => RenderError::Broken(e.kind.to_string()),
        other => RenderError::Unrenderable(format!("cannot render this instance: {other}")),
    })?;
    let (w, h) = output_size(&image, viewport);
    let resized = pixels::resize(&image, h, w);
    let window = window.unwrap_or_else(|| {
        if is_ct {
            SOFT_TISSUE
        } else {
            full_range(&resized)
        }
    });
    encode_png(&grey(&resized, window), w, h)
}

pub fn encode_png(grey: &[u8], width: usize, height: usize) -> Result<Vec<u8>, RenderError> {
    let mut out = Vec::new();
    let broken = |e: png::EncodingError| RenderError::Broken(format!("PNG encoding failed: {e}"));
    let (w, h) = (
        u32::try_from(width).map_err(|_| RenderError::Broken("image too wide".into()))?,
        u32::try_from(height).map_err(|_| RenderError::Broken("image too high".into()))?,
    );
    let mut encoder = png::Encoder::new(&mut out, w, h);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(broken)?;
    writer.write_image_data(grey).map_err(broken)?;
    writer.finish().map_err(broken)?;
    Ok(out)
}

/// CT Image, Enhanced CT, Legacy Converted Enhanced CT and the CT "for processing" classes:
/// their pixels are HU.
pub fn is_ct(sop_class_uid: &str) -> bool {
    sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
        || sop_class_uid.starts_with("1.2.840.10008.5.1.4.1.1.2.")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(rows: usize, columns: usize, spacing: Option<[f64; 2]>) -> HuImage {
        HuImage {
            rows,
            columns,
            hu: vec![0.0; rows * columns],
            frame: 0,
            pixel_spacing: spacing,
            orientation: None,
        }
    }

    #[test]
    fn windows_and_viewports() {
        assert_eq!(
            parse_window("40,400").unwrap(),
            Window {
                center: 40.0,
                width: 400.0
            }
        );
        assert!(parse_window("-600,1500,linear").is_ok());
        assert!(parse_window("40,400,sigmoid")
            .unwrap_err()
            .contains("sigmoid"));
        assert!(parse_window("40").is_err());
        assert!(parse_window("40,0").is_err());
        assert_eq!(parse_viewport("128,96").unwrap(), (128, 96));
        assert!(parse_viewport("0,10").is_err());
        assert!(parse_viewport("99999,10").is_err());
    }

    #[test]
    fn grey_levels_of_the_soft_tissue_window() {
        assert_eq!(
            grey(&[-1000.0, -160.0, 40.0, 240.0, 3000.0], SOFT_TISSUE),
            [0, 0, 128, 255, 255]
        );
    }

    #[test]
    fn sizes_fit_the_viewport_and_keep_the_aspect() {
        assert_eq!(output_size(&image(512, 512, None), (512, 512)), (512, 512));
        assert_eq!(output_size(&image(512, 512, None), (128, 128)), (128, 128));
        assert_eq!(output_size(&image(64, 64, None), (512, 512)), (64, 64));
        assert_eq!(output_size(&image(256, 512, None), (128, 128)), (128, 64));
        // 2 mm between rows, 1 mm between columns: twice as high as the matrix says.
        assert_eq!(
            output_size(&image(100, 200, Some([2.0, 1.0])), (512, 512)),
            (200, 200)
        );
    }

    #[test]
    fn png_round_trip() {
        let bytes = encode_png(&[0, 64, 128, 255, 10, 20], 3, 2).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (3, 2));
        assert_eq!(&buf[..6], &[0, 64, 128, 255, 10, 20]);
    }

    #[test]
    fn ct_classes() {
        assert!(is_ct("1.2.840.10008.5.1.4.1.1.2"));
        assert!(is_ct("1.2.840.10008.5.1.4.1.1.2.1"));
        assert!(!is_ct("1.2.840.10008.5.1.4.1.1.20"));
    }
}
