//! The files of a dataset folder (docs/contracts.md "Dataset folder"): 16-bit PNG images
//! holding HU + 32768, `manifest.csv` and `dataset.json`.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::path::Path;

use serde::Serialize;

/// Added to HU so that every CT value fits an unsigned 16-bit sample.
pub const HU_OFFSET: i32 = 32768;

/// One row of `manifest.csv`, in the contract's column order. Written by `dataset build`
/// (and `mine`), read back by `eval` (by header name; extra columns are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ManifestRow {
    /// Path relative to the dataset folder.
    pub image: String,
    pub patient_key: String,
    pub study_uid: String,
    pub series_uid: String,
    pub sop_instance_uid: String,
    pub z_mm: String,
    pub label: String,
    pub label_source: String,
    pub split: String,
}

/// The PNG sample for a HU value: rounded, offset, clamped to 16 bits.
pub fn png_sample(hu: f32) -> u16 {
    (hu.round() as i64 + i64::from(HU_OFFSET)).clamp(0, i64::from(u16::MAX)) as u16
}

/// Write `size × size` HU values as a 16-bit grayscale PNG.
pub fn write_png(path: &Path, size: usize, hu: &[f32]) -> io::Result<()> {
    let side = u32::try_from(size).map_err(|_| io::Error::other("image too large"))?;
    let file = BufWriter::new(File::create(path)?);
    let mut encoder = png::Encoder::new(file, side, side);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Sixteen);
    encoder.set_compression(png::Compression::Balanced);
    let mut writer = encoder.write_header().map_err(io::Error::other)?;
    // PNG stores 16-bit samples big endian.
    let bytes: Vec<u8> = hu
        .iter()
        .flat_map(|v| png_sample(*v).to_be_bytes())
        .collect();
    writer.write_image_data(&bytes).map_err(io::Error::other)?;
    writer.finish().map_err(io::Error::other)
}

/// A dataset image back in HU: (rows, columns, row-major HU). For tests and checks.
pub fn read_png_hu(path: &Path) -> io::Result<(usize, usize, Vec<i32>)> {
    let decoder = png::Decoder::new(BufReader::new(File::open(path)?));
    let mut reader = decoder.read_info().map_err(io::Error::other)?;
    let info = reader.info();
    if info.color_type != png::ColorType::Grayscale || info.bit_depth != png::BitDepth::Sixteen {
        return Err(io::Error::other(format!(
            "{}: expected 16-bit grayscale, found {:?} {:?}",
            path.display(),
            info.color_type,
            info.bit_depth
        )));
    }
    let (columns, rows) = (info.width as usize, info.height as usize);
    let mut buffer = vec![0u8; rows * columns * 2];
    reader.next_frame(&mut buffer).map_err(io::Error::other)?;
    let hu = buffer
        .chunks_exact(2)
        .map(|b| i32::from(u16::from_be_bytes([b[0], b[1]])) - HU_OFFSET)
        .collect();
    Ok((rows, columns, hu))
}

/// Write `manifest.csv`.
pub fn write_manifest(path: &Path, rows: &[ManifestRow]) -> io::Result<()> {
    let mut writer = csv::Writer::from_writer(BufWriter::new(File::create(path)?));
    for row in rows {
        writer.serialize(row).map_err(io::Error::other)?;
    }
    writer.flush()
}

/// Write a JSON value, pretty-printed, ending with a newline.
pub fn write_json(path: &Path, value: &serde_json::Value) -> io::Result<()> {
    let mut file = BufWriter::new(File::create(path)?);
    serde_json::to_writer_pretty(&mut file, value).map_err(io::Error::other)?;
    file.write_all(b"\n")?;
    file.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_samples_round_offset_and_clamp() {
        assert_eq!(png_sample(-1024.0), 31744);
        assert_eq!(png_sample(0.4), 32768);
        assert_eq!(png_sample(-0.6), 32767);
        assert_eq!(png_sample(-40000.0), 0);
        assert_eq!(png_sample(40000.0), 65535);
    }

    #[test]
    fn png_round_trips_hu() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.png");
        let hu = [-1024.0, -1.0, 0.0, 3071.0];
        write_png(&path, 2, &hu).expect("write");
        let (rows, columns, back) = read_png_hu(&path).expect("read");
        assert_eq!((rows, columns), (2, 2));
        assert_eq!(back, [-1024, -1, 0, 3071]);
    }
}
