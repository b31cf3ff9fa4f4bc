//! The three PNG plots of `anatomy-node eval`: confusion matrix (counts as text), ROC
//! curves per class, reliability diagram.
//!
//! Drawn with `plotters` into an RGB buffer (bitmap backend) and written with the `png`
//! crate. Text is rasterised by `ab_glyph` with DejaVu Sans, embedded in the binary from
//! the `dejavu` crate: no system font or font library is needed at run time.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};

use super::report::Report;

/// A plot: draws `report` into a PNG file at `path`.
pub type Plot = fn(&Report, &Path) -> Result<(), String>;

/// The family name the plots use; [`fonts`] registers DejaVu Sans under it.
const FONT: &str = "sans-serif";

/// Line colours of the classes (colour-blind friendly: Okabe–Ito, then a few more).
const COLORS: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
    RGBColor(240, 228, 66),
];

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Registers the embedded fonts once per process.
fn fonts() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            for (style, bytes) in [
                (FontStyle::Normal, dejavu::sans::regular()),
                (FontStyle::Bold, dejavu::sans::bold()),
            ] {
                register_font(FONT, style, bytes)
                    .map_err(|_| "the embedded DejaVu Sans font does not load".to_string())?;
            }
            Ok(())
        })
        .clone()
}

fn text_error(e: impl std::fmt::Display) -> String {
    format!("drawing failed: {e}")
}

/// Draws with `draw` on a white `width × height` canvas and writes it as an 8-bit RGB PNG.
fn render(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(&Area) -> Result<(), String>,
) -> Result<(), String> {
    fonts()?;
    let mut buffer = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(text_error)?;
        draw(&root)?;
        root.present().map_err(text_error)?;
    }
    write_png(path, width, height, &buffer)
}

fn write_png(path: &Path, width: u32, height: u32, rgb: &[u8]) -> Result<(), String> {
    let file = File::create(path).map_err(|e| e.to_string())?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(rgb).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())
}

fn style(size: f64, hpos: HPos, vpos: VPos, color: &'static RGBColor) -> TextStyle<'static> {
    TextStyle::from((FONT, size).into_font())
        .pos(Pos::new(hpos, vpos))
        .color(color)
}

fn subtitle(report: &Report) -> String {
    format!(
        "{} on {} ({} scored images)",
        report.model.version,
        report.splits.join(","),
        report.slice.images
    )
}

// ---------------------------------------------------------------------------------------
// Confusion matrix

const CELL: i32 = 84;
const LEFT: i32 = 150;
const TOP: i32 = 120;

/// Cells shaded by the share of their row (recall on the diagonal), count and row share as
/// text.
pub fn confusion(report: &Report, path: &Path) -> Result<(), String> {
    let c = &report.slice.confusion;
    let n = c.classes.len() as i32;
    let width = (LEFT + n * CELL + 40).max(560);
    let height = TOP + n * CELL + 40;
    render(path, (width as u32, height as u32), |root| {
        draw_confusion_labels(root, report, width)?;
        for (i, row) in c.matrix.iter().enumerate() {
            let total: usize = row.iter().sum();
            for (j, &count) in row.iter().enumerate() {
                let share = if total > 0 {
                    count as f64 / total as f64
                } else {
                    0.0
                };
                draw_cell(root, (i as i32, j as i32), count, share, total > 0)?;
            }
        }
        Ok(())
    })
}

fn draw_confusion_labels(root: &Area, report: &Report, width: i32) -> Result<(), String> {
    let c = &report.slice.confusion;
    let title = format!(
        "Confusion matrix: slice error {:.2} %",
        100.0 * report.slice.error
    );
    let texts = [
        (
            title,
            (width / 2, 22),
            style(22.0, HPos::Center, VPos::Center, &BLACK),
        ),
        (
            subtitle(report),
            (width / 2, 50),
            style(15.0, HPos::Center, VPos::Center, &BLACK),
        ),
        (
            "predicted →".to_string(),
            (LEFT + c.classes.len() as i32 * CELL / 2, 82),
            style(16.0, HPos::Center, VPos::Center, &BLACK),
        ),
        (
            "true ↓".to_string(),
            (LEFT - 12, 82),
            style(16.0, HPos::Right, VPos::Center, &BLACK),
        ),
    ];
    for (text, at, st) in texts {
        root.draw_text(&text, &st, at).map_err(text_error)?;
    }
    for (k, class) in c.classes.iter().enumerate() {
        let middle = k as i32 * CELL + CELL / 2;
        let column = style(15.0, HPos::Center, VPos::Center, &BLACK);
        root.draw_text(class, &column, (LEFT + middle, TOP - 14))
            .map_err(text_error)?;
        let row = style(15.0, HPos::Right, VPos::Center, &BLACK);
        root.draw_text(class, &row, (LEFT - 12, TOP + middle))
            .map_err(text_error)?;
    }
    Ok(())
}

fn draw_cell(
    root: &Area,
    (row, column): (i32, i32),
    count: usize,
    share: f64,
    row_has_images: bool,
) -> Result<(), String> {
    let (x, y) = (LEFT + column * CELL, TOP + row * CELL);
    let shade = |white: u8, full: u8| {
        (f64::from(white) + (f64::from(full) - f64::from(white)) * share) as u8
    };
    let fill = RGBColor(shade(247, 8), shade(251, 69), shade(255, 148));
    root.draw(&Rectangle::new(
        [(x, y), (x + CELL, y + CELL)],
        fill.filled(),
    ))
    .map_err(text_error)?;
    root.draw(&Rectangle::new(
        [(x, y), (x + CELL, y + CELL)],
        RGBColor(200, 200, 200),
    ))
    .map_err(text_error)?;
    let ink: &'static RGBColor = if share > 0.5 { &WHITE } else { &BLACK };
    let middle = (x + CELL / 2, y + CELL / 2 - 8);
    root.draw_text(
        &count.to_string(),
        &style(22.0, HPos::Center, VPos::Center, ink),
        middle,
    )
    .map_err(text_error)?;
    if row_has_images {
        let share_text = format!("{:.0} %", 100.0 * share);
        let below = (x + CELL / 2, y + CELL / 2 + 18);
        root.draw_text(
            &share_text,
            &style(13.0, HPos::Center, VPos::Center, ink),
            below,
        )
        .map_err(text_error)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// ROC curves

/// One-vs-rest ROC curve per class with its AUC in the legend; classes without a curve
/// (no positives or no negatives) are named in the legend.
pub fn roc(report: &Report, path: &Path) -> Result<(), String> {
    render(path, (760, 680), |root| {
        let mean = report
            .slice
            .mean_auc
            .map_or_else(|| "n/a".to_string(), |m| format!("{m:.4}"));
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!("ROC curves, one-vs-rest: mean AUC {mean}"),
                (FONT, 22),
            )
            .margin(18)
            .x_label_area_size(50)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..1f64, 0f64..1.0001f64)
            .map_err(text_error)?;
        chart
            .configure_mesh()
            .x_desc(format!("false positive rate ({})", subtitle(report)))
            .y_desc("true positive rate")
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 15))
            .light_line_style(TRANSPARENT)
            .draw()
            .map_err(text_error)?;
        chart
            .draw_series(LineSeries::new(
                [(0.0, 0.0), (1.0, 1.0)],
                RGBColor(170, 170, 170),
            ))
            .map_err(text_error)?;
        for (k, (class, auc)) in report.slice.auc.0.iter().enumerate() {
            let color = COLORS[k % COLORS.len()];
            let series = match report.roc.get(k).and_then(Option::as_ref) {
                Some(points) => chart
                    .draw_series(LineSeries::new(
                        points.iter().copied(),
                        color.stroke_width(2),
                    ))
                    .map_err(text_error)?,
                None => chart
                    .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
                    .map_err(text_error)?,
            };
            match auc {
                Some(a) => {
                    series
                        .label(format!("{class}: AUC {a:.4}"))
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(3))
                        });
                }
                None => {
                    let why = report
                        .slice
                        .auc_undefined
                        .get(class)
                        .cloned()
                        .unwrap_or_default();
                    series.label(format!("{class}: no curve ({why})"));
                }
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(150, 150, 150))
            .label_font((FONT, 15))
            .draw()
            .map_err(text_error)
    })
}

// ---------------------------------------------------------------------------------------
// Reliability diagram

/// Accuracy per confidence bin (bars), the gap to the bin's mean confidence (red), the
/// diagonal of perfect calibration, and the number of images above each bar.
pub fn reliability(report: &Report, path: &Path) -> Result<(), String> {
    let cal = &report.calibration;
    render(path, (760, 680), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!(
                    "Reliability: ECE {:.4} ({} equal-width bins)",
                    cal.ece, cal.bins
                ),
                (FONT, 22),
            )
            .margin(18)
            .x_label_area_size(50)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..1f64, 0f64..1.08f64)
            .map_err(text_error)?;
        chart
            .configure_mesh()
            .x_desc(format!(
                "confidence, largest probability ({})",
                subtitle(report)
            ))
            .y_desc("accuracy")
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 15))
            .light_line_style(TRANSPARENT)
            .draw()
            .map_err(text_error)?;
        let blue = COLORS[0];
        let red = RGBColor(213, 60, 40);
        let bins: Vec<_> = cal.reliability.iter().filter(|b| b.images > 0).collect();
        chart
            .draw_series(bins.iter().map(|b| {
                let acc = b.accuracy.unwrap_or(0.0);
                Rectangle::new([(b.lower, 0.0), (b.upper, acc)], blue.mix(0.8).filled())
            }))
            .map_err(text_error)?
            .label("accuracy")
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 6), (x + 18, y + 6)], blue.mix(0.8).filled())
            });
        chart
            .draw_series(bins.iter().map(|b| {
                let (acc, conf) = (b.accuracy.unwrap_or(0.0), b.confidence.unwrap_or(0.0));
                Rectangle::new([(b.lower, acc), (b.upper, conf)], red.mix(0.25).filled())
            }))
            .map_err(text_error)?
            .label("gap to mean confidence")
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 6), (x + 18, y + 6)], red.mix(0.25).filled())
            });
        chart
            .draw_series(bins.iter().map(|b| {
                let (acc, conf) = (b.accuracy.unwrap_or(0.0), b.confidence.unwrap_or(0.0));
                Rectangle::new([(b.lower, acc), (b.upper, conf)], red.stroke_width(2))
            }))
            .map_err(text_error)?;
        chart
            .draw_series(bins.iter().map(|b| {
                let conf = b.confidence.unwrap_or(0.0);
                Circle::new(((b.lower + b.upper) / 2.0, conf), 4, BLACK.filled())
            }))
            .map_err(text_error)?
            .label("mean confidence")
            .legend(|(x, y)| Circle::new((x + 9, y), 4, BLACK.filled()));
        chart
            .draw_series(LineSeries::new(
                [(0.0, 0.0), (1.0, 1.0)],
                RGBColor(120, 120, 120),
            ))
            .map_err(text_error)?
            .label("perfect calibration")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RGBColor(120, 120, 120)));
        chart
            .draw_series(bins.iter().map(|b| {
                let top = b.accuracy.unwrap_or(0.0).max(b.confidence.unwrap_or(0.0));
                Text::new(
                    b.images.to_string(),
                    ((b.lower + b.upper) / 2.0, top + 0.035),
                    style(12.0, HPos::Center, VPos::Center, &BLACK),
                )
            }))
            .map_err(text_error)?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(150, 150, 150))
            .label_font((FONT, 15))
            .draw()
            .map_err(text_error)
    })
}
