//! Contract step 4, body framing: the square around the patient's body, plus a margin, cut
//! out of the image and resized to `S×S`, so that every body fills the model input whatever
//! the scanner's field of view (a 500 mm diagnostic field, a 250 mm neck field, a crop of one
//! thigh).
//!
//! The box is found on the whole image already resized to `S×S` (cheap: a 192×192 mask, never
//! the 512×512 image), then mapped back onto the image padded to a square and cut out there,
//! so the model input is resampled once, from the stored pixels.

use super::geometry::{cut_window, pad_to_square, resize};
use super::HuImage;

/// A pixel above this is body: soft tissue (about +40 HU) and fat (about −100 HU) are; air
/// (−1000 HU) and the foam of pads and cushions (below −700 HU) are not. The lungs (about
/// −850 HU) are not either, but the chest wall around them is, and only the box's edges
/// count.
pub(super) const BODY_HU: f32 = -300.0;
/// Side of the square that opens the body mask, as a share of `S` (made odd, at least
/// [`MIN_OPENING`]): a couch top, an RT board or a thermoplastic mask is a few millimetres
/// thin and disappears; a body, even a child's neck, does not.
const OPENING_SHARE: f64 = 0.03;
const MIN_OPENING: usize = 3;
/// A row (column) is a body row when at least this share of `S` of its pixels are body (and
/// at least [`MIN_LINE_PIXELS`]): a stray pixel that survived the opening (a cable, a
/// marker) does not stretch the box.
const LINE_SHARE: f64 = 0.01;
const MIN_LINE_PIXELS: usize = 2;
/// Added on each side of the box, as a share of its longer side: the skin and what lies
/// at the body's edge stay in view, away from the border of the input.
const MARGIN: f64 = 0.05;

/// The `size × size` HU image of `oriented` (canonically oriented, contract step 3) framed
/// around the body (steps 4 and 5). Without a body (an all-air image) it is the whole image
/// padded to a square and resized, exactly the whole-image framing.
pub fn body_framing(oriented: &HuImage, size: usize) -> Vec<f32> {
    let padded = pad_to_square(oriented);
    let whole = resize(&padded, size, size);
    let Some(body) = body_box(&whole, size) else {
        return whole;
    };
    let window = body.window_in(&padded, size);
    let framed = cut_window(
        &padded,
        window.top,
        window.left,
        window.rows,
        window.columns,
    );
    resize(&framed, size, size)
}

/// Where the body is in an `S×S` image: rows `top..bottom`, columns `left..right`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyBox {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

/// Steps 2–4 of body framing on the `side × side` HU image `hu`: the box of the rows and
/// columns that hold enough body once thin things are opened away; `None` without a body.
pub fn body_box(hu: &[f32], side: usize) -> Option<BodyBox> {
    if side == 0 || hu.len() != side * side {
        return None;
    }
    let mask = open(&body_mask(hu), side, opening_side(side));
    let need = min_line_pixels(side);
    let mut row_counts = vec![0; side];
    let mut column_counts = vec![0; side];
    for (i, _) in mask.iter().enumerate().filter(|(_, body)| **body) {
        row_counts[i / side] += 1;
        column_counts[i % side] += 1;
    }
    let (top, bottom) = extent(&row_counts, need)?;
    let (left, right) = extent(&column_counts, need)?;
    Some(BodyBox {
        top,
        bottom,
        left,
        right,
    })
}

/// `k` of the `k×k` opening for an input of side `size`: `max(3, floor(0.03·S) | 1)`.
pub(super) fn opening_side(size: usize) -> usize {
    (((OPENING_SHARE * size as f64).floor() as usize) | 1).max(MIN_OPENING)
}

/// Body pixels a row or column needs to count: `max(2, floor(0.01·S))`.
fn min_line_pixels(size: usize) -> usize {
    ((LINE_SHARE * size as f64).floor() as usize).max(MIN_LINE_PIXELS)
}

fn body_mask(hu: &[f32]) -> Vec<bool> {
    hu.iter().map(|&v| v > BODY_HU).collect()
}

/// First index with at least `need`, and one past the last; `None` when there is none.
fn extent(counts: &[usize], need: usize) -> Option<(usize, usize)> {
    let first = counts.iter().position(|&n| n >= need)?;
    let last = counts.iter().rposition(|&n| n >= need)?;
    Some((first, last + 1))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Morph {
    /// Body only where the whole window is body (min).
    Erode,
    /// Body where any of the window is body (max).
    Dilate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Axis {
    Rows,
    Columns,
}

/// Morphological opening of the `side × side` mask with a `k×k` square: erosion, then
/// dilation, each separable.
fn open(mask: &[bool], side: usize, k: usize) -> Vec<bool> {
    let eroded = morph(mask, side, k, Morph::Erode);
    morph(&eroded, side, k, Morph::Dilate)
}

/// `op` over a `k×k` square: along the rows, then along the columns.
fn morph(mask: &[bool], side: usize, k: usize, op: Morph) -> Vec<bool> {
    let along_rows = pass(mask, side, k, op, Axis::Rows);
    pass(&along_rows, side, k, op, Axis::Columns)
}

/// `op` over a window of `k` pixels centred on each pixel, along every row or every column.
/// The window is clipped at the border: pixels outside the image count neither as body nor
/// as air.
fn pass(mask: &[bool], side: usize, k: usize, op: Morph, axis: Axis) -> Vec<bool> {
    let radius = k / 2;
    let mut out = vec![false; mask.len()];
    // prefix[i]: body pixels among the first i of the line
    let mut prefix = vec![0usize; side + 1];
    for line in 0..side {
        let at = |i: usize| match axis {
            Axis::Rows => line * side + i,
            Axis::Columns => i * side + line,
        };
        for i in 0..side {
            prefix[i + 1] = prefix[i] + usize::from(mask[at(i)]);
        }
        for i in 0..side {
            let (low, high) = (i.saturating_sub(radius), (i + radius + 1).min(side));
            let body = prefix[high] - prefix[low];
            out[at(i)] = match op {
                Morph::Erode => body == high - low,
                Morph::Dilate => body > 0,
            };
        }
    }
    out
}

/// A window in the padded image: `rows × columns` pixels from (`top`, `left`), which may
/// lie outside the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    top: i64,
    left: i64,
    rows: usize,
    columns: usize,
}

impl BodyBox {
    /// Steps 5–6: the square around the box, with [`MARGIN`] on each side, in the pixels of
    /// `padded`, the image padded to a square in millimetres of which the box's `size × size`
    /// image is the resize (so the window is square in millimetres too, whatever the pixels).
    fn window_in(&self, padded: &HuImage, size: usize) -> Window {
        let cy = (self.top + self.bottom) as f64 / 2.0;
        let cx = (self.left + self.right) as f64 / 2.0;
        let longer = (self.bottom - self.top).max(self.right - self.left);
        let side = longer as f64 * (1.0 + 2.0 * MARGIN);
        let fy = padded.rows as f64 / size as f64;
        let fx = padded.columns as f64 / size as f64;
        let rows = ((side * fy).round() as usize).max(1);
        let columns = ((side * fx).round() as usize).max(1);
        Window {
            top: (cy * fy - rows as f64 / 2.0).round() as i64,
            left: (cx * fx - columns as f64 / 2.0).round() as i64,
            rows,
            columns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_and_line_sizes_follow_the_input_size() {
        assert_eq!(opening_side(192), 5);
        assert_eq!(opening_side(256), 7);
        assert_eq!(opening_side(64), 3);
        assert_eq!(opening_side(8), 3);
        assert_eq!(min_line_pixels(192), 2);
        assert_eq!(min_line_pixels(256), 2);
        assert_eq!(min_line_pixels(512), 5);
    }

    #[test]
    fn the_opening_removes_lines_thinner_than_its_square_and_keeps_blocks() {
        let side = 12;
        let mut mask = vec![false; side * side];
        // a 2-pixel line across the image (rows 1-2), a 4×4 block at rows 6..10, columns 3..7
        for c in 0..side {
            mask[side + c] = true;
            mask[2 * side + c] = true;
        }
        for r in 6..10 {
            for c in 3..7 {
                mask[r * side + c] = true;
            }
        }
        let opened = open(&mask, side, 3);
        let expected: Vec<bool> = (0..side * side)
            .map(|i| (6..10).contains(&(i / side)) && (3..7).contains(&(i % side)))
            .collect();
        assert_eq!(opened, expected);
    }

    #[test]
    fn the_window_is_clipped_at_the_border() {
        // a body touching the border survives the opening: outside is not air
        let side = 6;
        let mask: Vec<bool> = (0..side * side).map(|i| i % side < 3).collect();
        assert_eq!(open(&mask, side, 3), mask);
        // and a full image stays full
        assert_eq!(open(&[true; 36], side, 5), [true; 36]);
    }

    #[test]
    fn the_box_and_its_window() {
        let side = 20;
        let hu: Vec<f32> = (0..side * side)
            .map(|i| {
                let (r, c) = (i / side, i % side);
                if (2..8).contains(&r) && (4..14).contains(&c) {
                    40.0
                } else {
                    -1000.0
                }
            })
            .collect();
        let body = body_box(&hu, side).expect("a body");
        assert_eq!(
            body,
            BodyBox {
                top: 2,
                bottom: 8,
                left: 4,
                right: 14
            }
        );
        // side 10 · 1.1 = 11 pixels of S; the padded image has twice as many rows as S,
        // as many columns: 22 × 11, centred on (5, 9) → (10, 9)
        let padded = HuImage {
            rows: 40,
            columns: 20,
            hu: vec![0.0; 800],
            frame: 0,
            pixel_spacing: Some([0.5, 1.0]),
            orientation: None,
        };
        assert_eq!(
            body.window_in(&padded, side),
            Window {
                top: -1,
                left: 4,
                rows: 22,
                columns: 11
            }
        );
        assert_eq!(body_box(&[-1000.0; 400], side), None);
    }
}
