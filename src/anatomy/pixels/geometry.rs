//! Contract steps 3–5: canonical orientation, pad to a square of air (or cut a fixed field
//! of view), resize. Body framing, the third way of step 4, is in `body.rs`.

use super::{HuImage, AIR_HU};

/// Pixel spacings closer than this (relative) count as square pixels.
const SQUARE_PIXEL_TOLERANCE: f64 = 0.01;
/// Pixel aspect ratios beyond this are taken for a broken Pixel Spacing, not for real
/// rectangular pixels (honouring them could pad an image to an absurd size).
const MAX_PIXEL_ASPECT: f64 = 4.0;

/// What turns a stored axial image into the canonical one: rows towards patient left
/// (+x, LPS) and columns towards posterior (+y). `transpose` is applied first, for the
/// rare image stored with its rows along y; the flips then act on the transposed image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AxialFlips {
    pub transpose: bool,
    pub flip_columns: bool,
    pub flip_rows: bool,
}

impl AxialFlips {
    /// The flips for an image with this Image Orientation (Patient), or `None` when the
    /// image plane is more than `tolerance_deg` away from axial.
    pub fn for_orientation(orientation: &[f64; 6], tolerance_deg: f64) -> Option<Self> {
        let row = unit(&orientation[..3])?;
        let column = unit(&orientation[3..])?;
        let normal = unit(&cross(&row, &column))?;
        if normal[2].abs() < tolerance_deg.to_radians().cos() {
            return None;
        }
        let transpose = row[0].abs() < row[1].abs();
        let (row, column) = if transpose {
            (column, row)
        } else {
            (row, column)
        };
        Some(Self {
            transpose,
            flip_columns: row[0] < 0.0,
            flip_rows: column[1] < 0.0,
        })
    }
}

/// The image in canonical axial orientation (see [`AxialFlips`]); images that are not
/// axial within `tolerance_deg`, or carry no orientation, are returned as stored.
pub fn canonical_orientation(image: &HuImage, tolerance_deg: f64) -> HuImage {
    let flips = image
        .orientation
        .and_then(|o| AxialFlips::for_orientation(&o, tolerance_deg))
        .unwrap_or_default();
    let mut out = image.clone();
    if flips.transpose {
        out = transpose(&out);
    }
    if flips.flip_columns {
        out = flip_columns(&out);
    }
    if flips.flip_rows {
        out = flip_rows(&out);
    }
    out
}

fn transpose(image: &HuImage) -> HuImage {
    let (rows, columns) = (image.columns, image.rows);
    let hu = (0..rows)
        .flat_map(|r| (0..columns).map(move |c| image.at(c, r)))
        .collect();
    HuImage {
        rows,
        columns,
        hu,
        frame: image.frame,
        pixel_spacing: image.pixel_spacing.map(|[r, c]| [c, r]),
        orientation: image
            .orientation
            .map(|o| [o[3], o[4], o[5], o[0], o[1], o[2]]),
    }
}

fn flip_columns(image: &HuImage) -> HuImage {
    let hu = image
        .hu
        .chunks_exact(image.columns)
        .flat_map(|row| row.iter().rev().copied())
        .collect();
    HuImage {
        hu,
        orientation: image
            .orientation
            .map(|o| [-o[0], -o[1], -o[2], o[3], o[4], o[5]]),
        ..image.clone()
    }
}

fn flip_rows(image: &HuImage) -> HuImage {
    let hu = image
        .hu
        .chunks_exact(image.columns)
        .rev()
        .flatten()
        .copied()
        .collect();
    HuImage {
        hu,
        orientation: image
            .orientation
            .map(|o| [o[0], o[1], o[2], -o[3], -o[4], -o[5]]),
        ..image.clone()
    }
}

/// The image centred on a background of air ([`AIR_HU`]) that is square in millimetres:
/// square in pixels when the pixels are square, else wider along the finer axis, so the
/// square resize of step 5 keeps the aspect ratio of the anatomy.
pub fn pad_to_square(image: &HuImage) -> HuImage {
    let (rows, columns) = padded_shape(image.rows, image.columns, image.pixel_spacing);
    let top = (rows - image.rows) / 2;
    let left = (columns - image.columns) / 2;
    let mut hu = vec![AIR_HU; rows * columns];
    for (r, source) in image.hu.chunks_exact(image.columns.max(1)).enumerate() {
        let start = (top + r) * columns + left;
        hu[start..start + image.columns].copy_from_slice(source);
    }
    HuImage {
        rows,
        columns,
        hu,
        frame: image.frame,
        pixel_spacing: image.pixel_spacing,
        orientation: image.orientation,
    }
}

/// The square of `field_of_view_mm` around the image centre, cut out of the image or padded
/// with air where the image is smaller, at the image's own pixel spacing (the resize of
/// step 5 brings it to `S×S`). `None` when the image has no usable Pixel Spacing: then the
/// physical size is unknown and the caller fits the whole image instead.
pub fn fixed_field(image: &HuImage, field_of_view_mm: f64) -> Option<HuImage> {
    let [row_mm, column_mm] = image.pixel_spacing?;
    let usable = |mm: f64| mm.is_finite() && mm > 0.0;
    if !usable(row_mm) || !usable(column_mm) || !usable(field_of_view_mm) {
        return None;
    }
    let aspect = row_mm / column_mm;
    if !(1.0 / MAX_PIXEL_ASPECT..=MAX_PIXEL_ASPECT).contains(&aspect) {
        return None;
    }
    let rows = ((field_of_view_mm / row_mm).round() as usize).max(1);
    let columns = ((field_of_view_mm / column_mm).round() as usize).max(1);
    // Offsets of the window in the image (negative: air before the image starts), chosen so
    // that the window and the image share their centre.
    let top = (image.rows as i64 - rows as i64).div_euclid(2);
    let left = (image.columns as i64 - columns as i64).div_euclid(2);
    Some(cut_window(image, top, left, rows, columns))
}

/// The `rows × columns` window of `image` whose first pixel is at (`top`, `left`); the
/// offsets may be negative and the window may run past the image: air ([`AIR_HU`]) there.
pub fn cut_window(image: &HuImage, top: i64, left: i64, rows: usize, columns: usize) -> HuImage {
    let mut hu = vec![AIR_HU; rows * columns];
    let first = left.max(0);
    let last = (left + columns as i64).min(image.columns as i64);
    for r in 0..rows {
        let source_row = top + r as i64;
        if source_row < 0 || source_row >= image.rows as i64 || first >= last {
            continue;
        }
        let source = source_row as usize * image.columns;
        let target = r * columns + (first - left) as usize;
        let n = (last - first) as usize;
        hu[target..target + n]
            .copy_from_slice(&image.hu[source + first as usize..source + last as usize]);
    }
    HuImage {
        rows,
        columns,
        hu,
        frame: image.frame,
        pixel_spacing: image.pixel_spacing,
        orientation: image.orientation,
    }
}

fn padded_shape(rows: usize, columns: usize, spacing: Option<[f64; 2]>) -> (usize, usize) {
    let side = rows.max(columns);
    let Some([row_mm, column_mm]) = spacing else {
        return (side, side);
    };
    let aspect = row_mm / column_mm;
    if (aspect - 1.0).abs() <= SQUARE_PIXEL_TOLERANCE
        || !(1.0 / MAX_PIXEL_ASPECT..=MAX_PIXEL_ASPECT).contains(&aspect)
    {
        return (side, side);
    }
    let side_mm = (rows as f64 * row_mm).max(columns as f64 * column_mm);
    let padded_rows = ((side_mm / row_mm).round() as usize).max(rows);
    let padded_columns = ((side_mm / column_mm).round() as usize).max(columns);
    (padded_rows, padded_columns)
}

/// Resample to `rows × columns`, each axis on its own: area averaging where it shrinks,
/// bilinear interpolation (pixel centres aligned) where it grows.
pub fn resize(image: &HuImage, rows: usize, columns: usize) -> Vec<f32> {
    if image.rows == 0 || image.columns == 0 {
        return vec![AIR_HU; rows * columns];
    }
    let column_weights = axis_weights(image.columns, columns);
    let row_weights = axis_weights(image.rows, rows);
    // Along each row first (image.rows × columns), then along each column.
    let narrowed: Vec<f32> = image
        .hu
        .chunks_exact(image.columns)
        .flat_map(|row| column_weights.iter().map(move |w| weighted(row, w, 1, 0)))
        .collect();
    (0..rows)
        .flat_map(|r| {
            let narrowed = &narrowed;
            let w = &row_weights[r];
            (0..columns).map(move |c| weighted(narrowed, w, columns, c))
        })
        .collect()
}

/// Source samples and weights that make one output sample.
type Taps = Vec<(usize, f64)>;

fn weighted(data: &[f32], taps: &Taps, stride: usize, offset: usize) -> f32 {
    taps.iter()
        .map(|&(i, w)| f64::from(data[i * stride + offset]) * w)
        .sum::<f64>() as f32
}

/// For each output position along one axis, the input positions it is made of.
fn axis_weights(input: usize, output: usize) -> Vec<Taps> {
    match output.cmp(&input) {
        std::cmp::Ordering::Equal => (0..output).map(|i| vec![(i, 1.0)]).collect(),
        std::cmp::Ordering::Less => (0..output).map(|i| area_taps(input, output, i)).collect(),
        std::cmp::Ordering::Greater => (0..output)
            .map(|i| bilinear_taps(input, output, i))
            .collect(),
    }
}

/// Output sample `i` averages the input interval it covers, partial pixels by their share.
fn area_taps(input: usize, output: usize, i: usize) -> Taps {
    let scale = input as f64 / output as f64;
    let (start, end) = (i as f64 * scale, (i + 1) as f64 * scale);
    let first = start.floor() as usize;
    let last = (end.ceil() as usize).min(input);
    (first..last)
        .map(|j| {
            let overlap = end.min(j as f64 + 1.0) - start.max(j as f64);
            (j, overlap / scale)
        })
        .filter(|&(_, w)| w > 0.0)
        .collect()
}

/// Output sample `i` interpolates between the two nearest input centres (edges clamp).
fn bilinear_taps(input: usize, output: usize, i: usize) -> Taps {
    let x = ((i as f64 + 0.5) * input as f64 / output as f64 - 0.5).clamp(0.0, (input - 1) as f64);
    let j0 = x.floor() as usize;
    let j1 = (j0 + 1).min(input - 1);
    let f = x - j0 as f64;
    if j1 == j0 || f == 0.0 {
        vec![(j0, 1.0)]
    } else {
        vec![(j0, 1.0 - f), (j1, f)]
    }
}

fn unit(v: &[f64]) -> Option<[f64; 3]> {
    let [x, y, z]: [f64; 3] = v.try_into().ok()?;
    let norm = (x * x + y * y + z * z).sqrt();
    (norm > 1e-6 && norm.is_finite()).then(|| [x / norm, y / norm, z / norm])
}

fn cross(a: &[f64; 3], b: &[f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}
