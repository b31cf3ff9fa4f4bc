//! `GET /` (and `/ui`): the recent series and what the node decided about each, for a
//! person at a browser. Plain HTML with inline CSS and SVG: no script, no external asset.
//! Thumbnails are the series' key-images through the rendered endpoint (WADO-RS).

use std::fmt::Write as _;

use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::error::WebError;
use super::WebState;

const DEFAULT_PER_PAGE: u64 = 20;
const MAX_PER_PAGE: u64 = 100;
/// Thumbnails per series: key-images spread head to foot.
const THUMBNAILS: usize = 4;
const THUMBNAIL_SIDE: u32 = 112;
const BAR_WIDTH: f64 = 360.0;

type Params = Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>;

/// A row of the page.
struct SeriesRow {
    series_uid: String,
    study_uid: String,
    patient_name: Option<String>,
    patient_id: Option<String>,
    study_date: Option<String>,
    study_description: Option<String>,
    series_description: Option<String>,
    modality: Option<String>,
    series_number: Option<i64>,
    received_body_part: Option<String>,
    predicted_body_part: Option<String>,
    predicted_class: Option<String>,
    label_status: Option<String>,
    state: String,
    last_received_at: i64,
    instances: i64,
    label_ref: Option<i64>,
    coverage: Option<String>,
    regions: Option<String>,
    model_version: Option<String>,
    reason: Option<String>,
    series_ref: i64,
}

impl SeriesRow {
    fn read(r: &AnyRow) -> Result<SeriesRow, sqlx::Error> {
        Ok(SeriesRow {
            series_ref: r.try_get(0)?,
            series_uid: r.try_get(1)?,
            study_uid: r.try_get(2)?,
            patient_name: r.try_get(3)?,
            patient_id: r.try_get(4)?,
            study_date: r.try_get(5)?,
            study_description: r.try_get(6)?,
            series_description: r.try_get(7)?,
            modality: r.try_get(8)?,
            series_number: r.try_get(9)?,
            received_body_part: r.try_get(10)?,
            predicted_body_part: r.try_get(11)?,
            predicted_class: r.try_get(12)?,
            label_status: r.try_get(13)?,
            state: r.try_get(14)?,
            last_received_at: r.try_get(15)?,
            instances: r.try_get(16)?,
            label_ref: r.try_get(17)?,
            coverage: r.try_get(18)?,
            regions: r.try_get(19)?,
            model_version: r.try_get(20)?,
            reason: r.try_get(21)?,
        })
    }
}

struct KeyImage {
    sop_instance_uid: String,
    frame: i64,
    z_mm: f64,
    label: String,
}

#[derive(Deserialize)]
struct Range {
    class: String,
    z_from_mm: f64,
    z_to_mm: f64,
    images: usize,
}

#[derive(Deserialize)]
struct Region {
    #[serde(default)]
    body_part: Option<String>,
    #[serde(default)]
    code_value: Option<String>,
    #[serde(default)]
    coding_scheme: Option<String>,
    #[serde(default)]
    code_meaning: Option<String>,
}

pub(super) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A UID as a URL path segment.
fn segment(uid: &str) -> String {
    let mut out = String::with_capacity(uid.len());
    for b in uid.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn or_dash(v: &Option<String>) -> String {
    match v.as_deref().map(str::trim) {
        Some(s) if !s.is_empty() => escape(s),
        _ => "–".into(),
    }
}

/// The colour of a class on the page (the five classes of Roth et al., then the rest).
fn colour(class: &str) -> &'static str {
    match class {
        "neck" => "#8e5ea2",
        "lungs" => "#3e95cd",
        "liver" => "#c45850",
        "pelvis" => "#e8a33d",
        "legs" => "#3cba9f",
        "other" => "#9e9e9e",
        _ => "#6d6d6d",
    }
}

/// The coverage along z as one horizontal bar, head (left) to foot (right): each range of
/// one class from halfway to its neighbours, so the bar has no gaps.
fn coverage_svg(ranges: &[Range]) -> String {
    if ranges.is_empty() {
        return String::new();
    }
    let n = ranges.len();
    let mut edges = Vec::with_capacity(n + 1);
    edges.push(ranges[0].z_from_mm);
    for w in ranges.windows(2) {
        edges.push((w[0].z_to_mm + w[1].z_from_mm) / 2.0);
    }
    edges.push(ranges[n - 1].z_to_mm);
    let extent = (edges[0] - edges[n]).abs();
    let total_images: usize = ranges.iter().map(|r| r.images).sum::<usize>().max(1);
    let mut svg = format!(
        "<svg class=\"bar\" width=\"{w}\" height=\"34\" viewBox=\"0 0 {w} 34\" role=\"img\" \
         aria-label=\"coverage along z\">",
        w = BAR_WIDTH
    );
    let mut x = 0.0;
    for (i, r) in ranges.iter().enumerate() {
        // By z where the series has extent, by key-images otherwise.
        let share = if extent > 0.0 {
            (edges[i] - edges[i + 1]).abs() / extent
        } else {
            r.images as f64 / total_images as f64
        };
        let width = (share * BAR_WIDTH).max(2.0).min(BAR_WIDTH - x);
        let _ = write!(
            svg,
            "<rect x=\"{x:.1}\" y=\"0\" width=\"{width:.1}\" height=\"20\" fill=\"{}\">\
             <title>{}: z {:.1} to {:.1} mm, {} key-image(s)</title></rect>",
            colour(&r.class),
            escape(&r.class),
            r.z_from_mm,
            r.z_to_mm,
            r.images
        );
        if width > 7.0 * r.class.len() as f64 {
            let _ = write!(
                svg,
                "<text x=\"{:.1}\" y=\"14\" text-anchor=\"middle\" class=\"in\">{}</text>",
                x + width / 2.0,
                escape(&r.class)
            );
        }
        x += width;
    }
    let _ = write!(
        svg,
        "<text x=\"0\" y=\"32\" class=\"z\">head z {:.0} mm</text>\
         <text x=\"{BAR_WIDTH}\" y=\"32\" text-anchor=\"end\" class=\"z\">foot z {:.0} mm</text></svg>",
        // + 0.0: no "-0 mm"
        edges[0] + 0.0,
        edges[n] + 0.0
    );
    svg
}

/// Up to `k` key-images spread evenly over the list (head to foot).
fn spread<T>(items: &[T], k: usize) -> Vec<&T> {
    let n = items.len();
    if n <= k {
        return items.iter().collect();
    }
    (0..k)
        .map(|i| &items[(i * (n - 1) + (k - 1) / 2) / (k - 1)])
        .collect()
}

fn date(millis: i64) -> String {
    crate::dimse::find::matching::format_datetime(millis)
        .get(..14)
        .map(|d| {
            format!(
                "{}-{}-{} {}:{}:{} UTC",
                &d[..4],
                &d[4..6],
                &d[6..8],
                &d[8..10],
                &d[10..12],
                &d[12..14]
            )
        })
        .unwrap_or_default()
}

fn thumbnail(row: &SeriesRow, sop: &str, frame: i64, caption: &str) -> String {
    format!(
        "<figure><img src=\"/dicom-web/studies/{}/series/{}/instances/{}/frames/{}/rendered?viewport={s},{s}\" \
         width=\"{s}\" height=\"{s}\" alt=\"{cap}\" loading=\"lazy\"><figcaption>{cap}</figcaption></figure>",
        segment(&row.study_uid),
        segment(&row.series_uid),
        segment(sop),
        frame + 1,
        s = THUMBNAIL_SIDE,
        cap = escape(caption),
    )
}

async fn key_images(state: &WebState, label_ref: i64) -> Result<Vec<KeyImage>, WebError> {
    let rows = sqlx::query(
        "SELECT sop_instance_uid, frame, z_mm, label FROM key_images \
         WHERE series_label_ref = $1 ORDER BY z_mm DESC, frame",
    )
    .bind(label_ref)
    .fetch_all(state.index.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(KeyImage {
                sop_instance_uid: r.try_get(0)?,
                frame: r.try_get(1)?,
                z_mm: r.try_get(2)?,
                label: r.try_get(3)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(WebError::from)
}

/// An image of a series without key-images (not labelled yet): the middle one.
async fn middle_image(state: &WebState, row: &SeriesRow) -> Result<Option<String>, WebError> {
    let found = sqlx::query(
        "SELECT sop_instance_uid FROM instances WHERE series_ref = $1 AND image_rows IS NOT NULL \
         ORDER BY instance_number, id LIMIT 1 OFFSET $2",
    )
    .bind(row.series_ref)
    .bind(row.instances / 2)
    .fetch_optional(state.index.pool())
    .await?;
    Ok(found.map(|r| r.try_get(0)).transpose()?)
}

async fn series_html(state: &WebState, row: &SeriesRow) -> Result<String, WebError> {
    let mut html = String::new();
    let status = row
        .label_status
        .as_deref()
        .unwrap_or(match row.state.as_str() {
            "complete" => "waiting",
            _ => "receiving",
        });
    let _ = write!(
        html,
        "<article class=\"series {status_class}\" data-series-uid=\"{uid}\">\
         <header><h2>{desc}</h2><span class=\"status\">{status}</span></header>\
         <p class=\"who\">{name} · ID {pid} · study {sdate} {sdesc} · {modality} series {number} · {n} instance(s) · last received {received}</p>\
         <p class=\"uid\">{uid}</p>",
        status_class = escape(status),
        uid = escape(&row.series_uid),
        desc = or_dash(&row.series_description),
        status = escape(status),
        name = or_dash(&row.patient_name),
        pid = or_dash(&row.patient_id),
        sdate = or_dash(&row.study_date),
        sdesc = or_dash(&row.study_description),
        modality = or_dash(&row.modality),
        number = row
            .series_number
            .map(|n| n.to_string())
            .unwrap_or_else(|| "–".into()),
        n = row.instances,
        received = date(row.last_received_at),
    );
    let regions: Vec<Region> = row
        .regions
        .as_deref()
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default();
    let region_text: Vec<String> = regions
        .iter()
        .map(|r| {
            format!(
                "{} ({}, {} “{}”)",
                escape(r.body_part.as_deref().unwrap_or("?")),
                escape(r.code_value.as_deref().unwrap_or("?")),
                escape(r.coding_scheme.as_deref().unwrap_or("?")),
                escape(r.code_meaning.as_deref().unwrap_or(""))
            )
        })
        .collect();
    let _ = write!(
        html,
        "<dl><dt>Body Part Examined, predicted</dt><dd class=\"predicted\">{}</dd>\
         <dt>Body Part Examined, as received</dt><dd class=\"received\">{}</dd>\
         <dt>dominant class</dt><dd>{}</dd>\
         <dt>anatomic regions</dt><dd>{}</dd>\
         <dt>model</dt><dd>{}</dd></dl>",
        or_dash(&row.predicted_body_part),
        or_dash(&row.received_body_part),
        or_dash(&row.predicted_class),
        if region_text.is_empty() {
            "–".to_string()
        } else {
            region_text.join(", ")
        },
        or_dash(&row.model_version),
    );
    if let Some(reason) = row.reason.as_deref().filter(|r| !r.is_empty()) {
        let _ = write!(html, "<p class=\"reason\">{}</p>", escape(reason));
    }
    let ranges: Vec<Range> = row
        .coverage
        .as_deref()
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default();
    if !ranges.is_empty() {
        let mut legend = String::new();
        let mut seen = Vec::new();
        for r in &ranges {
            if !seen.contains(&r.class.as_str()) {
                seen.push(r.class.as_str());
                let _ = write!(
                    legend,
                    "<span><i style=\"background:{}\"></i>{}</span>",
                    colour(&r.class),
                    escape(&r.class)
                );
            }
        }
        let _ = write!(
            html,
            "<div class=\"coverage\">{}<div class=\"legend\">{legend}</div></div>",
            coverage_svg(&ranges)
        );
    }
    let mut thumbs = String::new();
    match row.label_ref {
        Some(label) => {
            let images = key_images(state, label).await?;
            for k in spread(&images, THUMBNAILS) {
                let caption = format!("{} · z {:.0} mm", k.label, k.z_mm);
                thumbs.push_str(&thumbnail(row, &k.sop_instance_uid, k.frame, &caption));
            }
        }
        None => {
            if let Some(sop) = middle_image(state, row).await? {
                thumbs.push_str(&thumbnail(row, &sop, 0, "not labelled yet"));
            }
        }
    }
    if !thumbs.is_empty() {
        let _ = write!(html, "<div class=\"thumbs\">{thumbs}</div>");
    }
    html.push_str("</article>");
    Ok(html)
}

pub(super) const STYLE: &str = "\
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f4f5f7;color:#222}\
main{max-width:1200px;margin:0 auto;padding:16px 24px}\
h1{font-size:22px;margin:8px 0}form.signout{display:inline;margin-left:6px}h2{font-size:17px;margin:0}\
.meta{color:#555;font-size:13px}\
.series{background:#fff;border:1px solid #d9dce1;border-left:6px solid #9e9e9e;border-radius:6px;padding:12px 16px;margin:12px 0}\
.series.labelled{border-left-color:#2e7d32}.series.failed{border-left-color:#c62828}.series.skipped{border-left-color:#f9a825}\
.series header{display:flex;justify-content:space-between;align-items:baseline}\
.status{font-size:12px;text-transform:uppercase;letter-spacing:.05em;padding:2px 8px;border-radius:10px;background:#eceff1}\
.labelled .status{background:#c8e6c9}.failed .status{background:#ffcdd2}.skipped .status{background:#fff3c4}\
.who{margin:4px 0;font-size:13px;color:#444}.uid{margin:0;font:11px monospace;color:#888}\
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;font-size:14px;margin:10px 0}\
dt{color:#666}dd{margin:0;font-weight:600}\
.reason{font-size:13px;color:#8d6e00}\
.coverage{margin:8px 0}.bar text.in{font-size:11px;fill:#fff}.bar text.z{font-size:10px;fill:#666}\
.legend span{font-size:12px;margin-right:12px}.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}\
.thumbs{display:flex;gap:10px;flex-wrap:wrap}\
figure{margin:0;text-align:center}figure img{background:#000;border-radius:3px;display:block;object-fit:contain}\
figcaption{font-size:11px;color:#555}\
nav a{margin-right:16px}";

async fn page(state: WebState, params: Params, who: &str) -> Result<Response, WebError> {
    let Query(params) =
        params.map_err(|e| WebError::BadRequest(format!("cannot read the query string: {e}")))?;
    let number = |name: &str, default: u64| -> Result<u64, WebError> {
        match params.iter().find(|(n, _)| n == name) {
            None => Ok(default),
            Some((_, v)) => v
                .trim()
                .parse::<u64>()
                .map_err(|_| WebError::BadRequest(format!("{name}={v}: not a positive integer"))),
        }
    };
    let page = number("page", 1)?.max(1);
    let per_page = number("per_page", DEFAULT_PER_PAGE)?.clamp(1, MAX_PER_PAGE);
    let total: i64 = sqlx::query("SELECT COUNT(*) FROM series")
        .fetch_one(state.index.pool())
        .await?
        .try_get(0)?;
    let offset = (page - 1).saturating_mul(per_page);
    let rows = sqlx::query(
        "SELECT s.id, s.series_uid, st.study_uid, p.patient_name, p.patient_id, st.study_date, \
         st.study_description, s.series_description, s.modality, s.series_number, \
         s.body_part_examined, s.predicted_body_part, s.predicted_class, s.label_status, \
         s.state, s.last_received_at, \
         (SELECT COUNT(*) FROM instances x WHERE x.series_ref = s.id), \
         sl.id, sl.coverage, sl.anatomic_regions, sl.model_version, sl.reason \
         FROM series s JOIN studies st ON st.id = s.study_ref \
         JOIN patients p ON p.id = st.patient_ref \
         LEFT JOIN series_labels sl ON sl.series_ref = s.id AND sl.generation = s.label_generation \
         ORDER BY s.last_received_at DESC, s.id DESC LIMIT $1 OFFSET $2",
    )
    .bind(i64::try_from(per_page).unwrap_or(i64::MAX))
    .bind(i64::try_from(offset).unwrap_or(i64::MAX))
    .fetch_all(state.index.pool())
    .await?;
    let mut body = String::new();
    for r in &rows {
        let row = SeriesRow::read(r)?;
        body.push_str(&series_html(&state, &row).await?);
    }
    if rows.is_empty() {
        body.push_str("<p>No series on this page.</p>");
    }
    let total_u = u64::try_from(total).unwrap_or(0);
    let pages = total_u.div_ceil(per_page).max(1);
    let mut nav = String::from("<nav>");
    if page > 1 {
        let _ = write!(
            nav,
            "<a href=\"/?page={}&amp;per_page={per_page}\">← newer</a>",
            page - 1
        );
    }
    if page < pages {
        let _ = write!(
            nav,
            "<a href=\"/?page={}&amp;per_page={per_page}\">older →</a>",
            page + 1
        );
    }
    nav.push_str("</nav>");
    let html = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>anatomy-node · recent series</title><style>{STYLE}</style></head>\
         <body><main><h1>anatomy-node · {ae}</h1>\
         <p class=\"meta\">{total} series, newest first · page {page} of {pages} · classifier: {classifier}{signed_in}</p>\
         {nav}{body}{nav}</main></body></html>",
        ae = escape(&state.config.dicom.ae_title),
        classifier = escape(&state.classifier),
        signed_in = if who.is_empty() || who == "anonymous" {
            String::new()
        } else {
            format!(
                " · signed in: {} <form class=\"signout\" method=\"post\" action=\"/logout\">\
                 <button type=\"submit\">Sign out</button></form>",
                escape(who)
            )
        },
    );
    Ok((
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        html,
    )
        .into_response())
}

pub async fn index(
    State(state): State<WebState>,
    principal: Option<axum::Extension<super::auth::Principal>>,
    params: Params,
) -> Response {
    let who = principal.map(|p| p.0.name).unwrap_or_default();
    page(state, params, &who).await.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(class: &str, from: f64, to: f64, images: usize) -> Range {
        Range {
            class: class.into(),
            z_from_mm: from,
            z_to_mm: to,
            images,
        }
    }

    #[test]
    fn the_bar_spans_head_to_foot_without_gaps() {
        let svg = coverage_svg(&[
            range("lungs", 100.0, 20.0, 5),
            range("liver", 10.0, -90.0, 6),
            range("pelvis", -100.0, -200.0, 5),
        ]);
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("fill=\"#3e95cd\""));
        assert!(svg.contains("head z 100 mm") && svg.contains("foot z -200 mm"));
        // 85 + 110 + 105 mm of 300 (ranges meet halfway): 102 + 132 + 126 px.
        assert!(svg.contains("width=\"102.0\""), "{svg}");
        assert!(svg.contains("x=\"102.0\" y=\"0\" width=\"132.0\""), "{svg}");
        assert!(coverage_svg(&[]).is_empty());
        // One slice: no extent, still a full bar.
        assert!(coverage_svg(&[range("neck", 5.0, 5.0, 1)]).contains("width=\"360.0\""));
    }

    #[test]
    fn text_and_uids_are_escaped() {
        assert_eq!(escape("<b>&\"'"), "&lt;b&gt;&amp;&quot;&#39;");
        assert_eq!(segment("1.2.3"), "1.2.3");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn thumbnails_spread_over_the_series() {
        let items: Vec<u32> = (0..10).collect();
        assert_eq!(
            spread(&items, 4).into_iter().copied().collect::<Vec<_>>(),
            [0, 3, 6, 9]
        );
        assert_eq!(spread(&items[..2], 4).len(), 2);
    }
}
