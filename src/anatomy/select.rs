//! Key-image selection: from the instances of a completed series, the axial, original CT
//! images (frame by frame for multi-frame Enhanced CT), without localizers, one per
//! position, sorted along the patient's long axis; then K of them spread evenly over the
//! z extent.

use std::path::{Path, PathBuf};

use dicom_dictionary_std::{tags, uids};
use dicom_object::{InMemDicomObject, OpenFileOptions};

/// An instance of the series, as the index knows it.
#[derive(Debug, Clone, Default)]
pub struct Instance {
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub path: PathBuf,
    pub image_type: Option<String>,
    pub image_position: Option<String>,
    pub image_orientation: Option<String>,
    pub number_of_frames: Option<i64>,
    pub instance_number: Option<i64>,
}

/// A chosen image: one frame of one instance, and where it lies.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyImage {
    pub sop_instance_uid: String,
    pub path: PathBuf,
    /// 0-based frame number within the instance.
    pub frame: u32,
    /// Image Position (Patient) z, mm (LPS: larger is towards the head).
    pub z_mm: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyImageCount {
    Count(usize),
    All,
}

#[derive(Debug, Clone, Copy)]
pub struct SelectionRules {
    pub key_images: KeyImageCount,
    /// Largest angle (degrees) between the image normal and the patient's z axis.
    pub axial_tolerance_deg: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    Selected {
        /// Sorted head to foot.
        key_images: Vec<KeyImage>,
        /// Usable axial images the key-images were chosen from.
        candidates: usize,
        /// True when the series had no ORIGINAL axial image and DERIVED ones were used.
        derived_only: bool,
    },
    Skipped {
        reason: String,
    },
}

/// Why images were left out, for the skip reason.
#[derive(Debug, Default)]
struct Tally {
    not_ct: usize,
    localizers: usize,
    not_axial: usize,
    no_geometry: usize,
    unreadable: usize,
    duplicates: usize,
}

struct Frame {
    image: KeyImage,
    original: bool,
    instance_number: i64,
}

pub fn is_ct_image_class(sop_class_uid: &str) -> bool {
    matches!(
        sop_class_uid,
        uids::CT_IMAGE_STORAGE
            | uids::ENHANCED_CT_IMAGE_STORAGE
            | uids::LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE
    )
}

pub fn select(instances: &[Instance], rules: &SelectionRules) -> Selection {
    let mut tally = Tally::default();
    let mut frames = Vec::new();
    for instance in instances {
        collect_frames(instance, rules, &mut frames, &mut tally);
    }
    let any_original = frames.iter().any(|f| f.original);
    if any_original {
        frames.retain(|f| f.original);
    }
    frames.sort_by(|a, b| {
        b.image
            .z_mm
            .total_cmp(&a.image.z_mm)
            .then(a.instance_number.cmp(&b.instance_number))
            .then(a.image.frame.cmp(&b.image.frame))
    });
    let before = frames.len();
    frames.dedup_by(|later, kept| (later.image.z_mm - kept.image.z_mm).abs() < 0.01);
    tally.duplicates = before - frames.len();
    if frames.is_empty() {
        return Selection::Skipped {
            reason: skip_reason(instances.len(), &tally),
        };
    }
    let candidates = frames.len();
    let all: Vec<KeyImage> = frames.into_iter().map(|f| f.image).collect();
    let key_images = match rules.key_images {
        KeyImageCount::All => all,
        KeyImageCount::Count(k) => spread_over_z(all, k),
    };
    Selection::Selected {
        key_images,
        candidates,
        derived_only: !any_original,
    }
}

fn skip_reason(instances: usize, t: &Tally) -> String {
    if instances == 0 {
        return "the series has no instances".into();
    }
    let mut parts = Vec::new();
    for (n, what) in [
        (t.not_ct, "not CT images"),
        (t.localizers, "localizers"),
        (t.not_axial, "not axial"),
        (t.no_geometry, "without position/orientation"),
        (t.unreadable, "unreadable"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    format!("no axial CT image to classify ({})", parts.join(", "))
}

fn collect_frames(
    instance: &Instance,
    rules: &SelectionRules,
    out: &mut Vec<Frame>,
    tally: &mut Tally,
) {
    if !is_ct_image_class(&instance.sop_class_uid) {
        tally.not_ct += 1;
        return;
    }
    let multi_frame = instance.number_of_frames.unwrap_or(1) > 1
        || instance.sop_class_uid != uids::CT_IMAGE_STORAGE;
    let geometries = if multi_frame {
        match frame_geometries(&instance.path) {
            Ok(g) => g,
            Err(_) => {
                tally.unreadable += 1;
                return;
            }
        }
    } else {
        vec![Geometry {
            position: instance
                .image_position
                .as_deref()
                .and_then(parse_numbers::<3>),
            orientation: instance
                .image_orientation
                .as_deref()
                .and_then(parse_numbers::<6>),
            image_type: instance.image_type.clone(),
        }]
    };
    for (frame, g) in geometries.into_iter().enumerate() {
        if is_localizer(g.image_type.as_deref()) {
            tally.localizers += 1;
            continue;
        }
        let (Some(position), Some(orientation)) = (g.position, g.orientation) else {
            tally.no_geometry += 1;
            continue;
        };
        if !is_axial(&orientation, rules.axial_tolerance_deg) {
            tally.not_axial += 1;
            continue;
        }
        out.push(Frame {
            image: KeyImage {
                sop_instance_uid: instance.sop_instance_uid.clone(),
                path: instance.path.clone(),
                frame: frame as u32,
                z_mm: position[2],
            },
            original: is_original(g.image_type.as_deref()),
            instance_number: instance.instance_number.unwrap_or(i64::MAX),
        });
    }
}

/// Pick `k` images whose z positions are closest to `k` evenly spaced targets between the
/// first and the last image; `images` are sorted along z.
pub fn spread_over_z(images: Vec<KeyImage>, k: usize) -> Vec<KeyImage> {
    if k == 0 {
        return Vec::new();
    }
    if images.len() <= k {
        return images;
    }
    let (first, last) = (images[0].z_mm, images[images.len() - 1].z_mm);
    let mut taken = vec![false; images.len()];
    let mut start = 0;
    for i in 0..k {
        let target = if k == 1 {
            first + (last - first) / 2.0
        } else {
            first + (last - first) * (i as f64) / ((k - 1) as f64)
        };
        // Images are sorted, so the best unused match is at or after the previous pick.
        let best = (start..images.len())
            .filter(|&j| !taken[j])
            .min_by(|&a, &b| {
                (images[a].z_mm - target)
                    .abs()
                    .total_cmp(&(images[b].z_mm - target).abs())
            });
        if let Some(j) = best {
            taken[j] = true;
            start = j + 1;
        }
    }
    images
        .into_iter()
        .zip(taken)
        .filter_map(|(img, t)| t.then_some(img))
        .collect()
}

fn is_localizer(image_type: Option<&str>) -> bool {
    image_type.is_some_and(|t| {
        t.split('\\')
            .any(|v| v.trim().eq_ignore_ascii_case("LOCALIZER"))
    })
}

fn is_original(image_type: Option<&str>) -> bool {
    image_type
        .and_then(|t| t.split('\\').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("ORIGINAL"))
}

/// The image normal (row × column) is within `tolerance_deg` of the patient's z axis.
pub fn is_axial(o: &[f64; 6], tolerance_deg: f64) -> bool {
    let n = [
        o[1] * o[5] - o[2] * o[4],
        o[2] * o[3] - o[0] * o[5],
        o[0] * o[4] - o[1] * o[3],
    ];
    let norm = (n[0] * n[0] + n[1] * n[1] + n[2] * n[2]).sqrt();
    norm > 1e-6 && (n[2].abs() / norm) >= tolerance_deg.to_radians().cos()
}

fn parse_numbers<const N: usize>(text: &str) -> Option<[f64; N]> {
    let values: Vec<f64> = text
        .split('\\')
        .map(|v| v.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .ok()?;
    let array: [f64; N] = values.try_into().ok()?;
    array.iter().all(|v| v.is_finite()).then_some(array)
}

struct Geometry {
    position: Option<[f64; 3]>,
    orientation: Option<[f64; 6]>,
    image_type: Option<String>,
}

/// Per-frame position, orientation and frame type of a multi-frame (Enhanced) CT, from
/// its functional groups (per-frame first, then shared), without reading pixel data.
fn frame_geometries(path: &Path) -> Result<Vec<Geometry>, dicom_object::ReadError> {
    let obj = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)?;
    let frames = text_of(&obj, tags::NUMBER_OF_FRAMES)
        .and_then(|t| t.trim().parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let shared = first_item(&obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE);
    let per_frame: Vec<&InMemDicomObject> = obj
        .element(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .ok()
        .and_then(|e| e.items())
        .map(|items| items.iter().collect())
        .unwrap_or_default();
    let top_type = text_of(&obj, tags::IMAGE_TYPE);
    Ok((0..frames)
        .map(|i| {
            let groups = [per_frame.get(i).copied(), shared];
            let from_groups = |seq, tag| {
                groups
                    .iter()
                    .flatten()
                    .find_map(|g| first_item(g, seq).and_then(|s| text_of(s, tag)))
            };
            Geometry {
                position: from_groups(tags::PLANE_POSITION_SEQUENCE, tags::IMAGE_POSITION_PATIENT)
                    .or_else(|| text_of(&obj, tags::IMAGE_POSITION_PATIENT))
                    .as_deref()
                    .and_then(parse_numbers::<3>),
                orientation: from_groups(
                    tags::PLANE_ORIENTATION_SEQUENCE,
                    tags::IMAGE_ORIENTATION_PATIENT,
                )
                .or_else(|| text_of(&obj, tags::IMAGE_ORIENTATION_PATIENT))
                .as_deref()
                .and_then(parse_numbers::<6>),
                image_type: from_groups(tags::CT_IMAGE_FRAME_TYPE_SEQUENCE, tags::FRAME_TYPE)
                    .or_else(|| top_type.clone()),
            }
        })
        .collect())
}

fn first_item(obj: &InMemDicomObject, seq: dicom_core::Tag) -> Option<&InMemDicomObject> {
    obj.element(seq).ok()?.items()?.first()
}

fn text_of(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<String> {
    obj.element(tag)
        .ok()?
        .to_str()
        .ok()
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const AXIAL: &str = "1\\0\\0\\0\\1\\0";

    fn inst(n: i64, z: f64, image_type: &str, orientation: &str) -> Instance {
        Instance {
            sop_instance_uid: format!("1.2.{n}"),
            sop_class_uid: uids::CT_IMAGE_STORAGE.into(),
            path: PathBuf::from(format!("/x/{n}.dcm")),
            image_type: Some(image_type.into()),
            image_position: Some(format!("0\\0\\{z}")),
            image_orientation: Some(orientation.into()),
            number_of_frames: None,
            instance_number: Some(n),
        }
    }

    fn rules(k: usize) -> SelectionRules {
        SelectionRules {
            key_images: KeyImageCount::Count(k),
            axial_tolerance_deg: 35.0,
        }
    }

    fn zs(s: &Selection) -> Vec<f64> {
        match s {
            Selection::Selected { key_images, .. } => key_images.iter().map(|k| k.z_mm).collect(),
            Selection::Skipped { reason } => panic!("skipped: {reason}"),
        }
    }

    #[test]
    fn localizers_and_other_planes_are_left_out_and_z_is_sorted_head_first() {
        let mut series: Vec<Instance> = (0..10)
            .rev()
            .map(|i| inst(i, -(i as f64) * 5.0, "ORIGINAL\\PRIMARY\\AXIAL", AXIAL))
            .collect();
        series.push(inst(
            100,
            0.0,
            "ORIGINAL\\PRIMARY\\LOCALIZER",
            "0\\1\\0\\0\\0\\-1",
        ));
        series.push(inst(
            101,
            3.0,
            "DERIVED\\SECONDARY\\REFORMATTED",
            "1\\0\\0\\0\\0\\-1",
        )); // coronal
        let s = select(&series, &rules(100));
        assert_eq!(
            zs(&s),
            (0..10).map(|i| -(i as f64) * 5.0).collect::<Vec<_>>()
        );
    }

    #[test]
    fn gantry_tilt_is_axial_oblique_reformats_are_not() {
        let tilt = 20f64.to_radians();
        let tilted = [1.0, 0.0, 0.0, 0.0, tilt.cos(), tilt.sin()];
        assert!(is_axial(&tilted, 35.0));
        let oblique = 50f64.to_radians();
        assert!(!is_axial(
            &[1.0, 0.0, 0.0, 0.0, oblique.cos(), oblique.sin()],
            35.0
        ));
        assert!(!is_axial(&[1.0, 0.0, 0.0, 0.0, 0.0, -1.0], 35.0), "coronal");
        assert!(
            is_axial(&[-1.0, 0.0, 0.0, 0.0, -1.0, 0.0], 35.0),
            "prone / flipped rows"
        );
    }

    #[test]
    fn duplicate_positions_keep_the_first_instance() {
        let series = vec![
            inst(2, 0.0, "ORIGINAL\\PRIMARY\\AXIAL", AXIAL),
            inst(1, 0.0, "ORIGINAL\\PRIMARY\\AXIAL", AXIAL),
            inst(3, -5.0, "ORIGINAL\\PRIMARY\\AXIAL", AXIAL),
        ];
        match select(&series, &rules(32)) {
            Selection::Selected {
                key_images,
                candidates,
                ..
            } => {
                assert_eq!(candidates, 2);
                assert_eq!(key_images[0].sop_instance_uid, "1.2.1");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn key_images_spread_over_the_z_extent_not_the_index() {
        // dense slices at the top, sparse below: picks follow z, not the list index
        let mut series: Vec<Instance> = (0..90)
            .map(|i| inst(i, -(i as f64) * 1.0, "ORIGINAL\\PRIMARY\\AXIAL", AXIAL))
            .collect();
        series.extend((0..10).map(|i| {
            inst(
                1000 + i,
                -100.0 - (i as f64) * 10.0,
                "ORIGINAL\\PRIMARY\\AXIAL",
                AXIAL,
            )
        }));
        // targets 0, -47.5, -95, -142.5, -190: the nearest images (ties go head-first)
        let picked = zs(&select(&series, &rules(5)));
        assert_eq!(picked, vec![0.0, -47.0, -100.0, -140.0, -190.0]);
    }

    #[test]
    fn all_means_all() {
        let series: Vec<Instance> = (0..50)
            .map(|i| inst(i, -(i as f64), "ORIGINAL\\PRIMARY\\AXIAL", AXIAL))
            .collect();
        let s = select(
            &series,
            &SelectionRules {
                key_images: KeyImageCount::All,
                axial_tolerance_deg: 35.0,
            },
        );
        assert_eq!(zs(&s).len(), 50);
    }

    #[test]
    fn derived_images_are_used_only_when_there_is_no_original() {
        let derived = vec![
            inst(1, 0.0, "DERIVED\\SECONDARY\\AXIAL", AXIAL),
            inst(2, -5.0, "DERIVED\\SECONDARY\\AXIAL", AXIAL),
        ];
        assert!(matches!(
            select(&derived, &rules(32)),
            Selection::Selected {
                derived_only: true,
                ..
            }
        ));
        let mut mixed = derived.clone();
        mixed.push(inst(3, -10.0, "ORIGINAL\\PRIMARY\\AXIAL", AXIAL));
        assert_eq!(zs(&select(&mixed, &rules(32))), vec![-10.0]);
    }

    #[test]
    fn nothing_axial_is_skipped_with_the_reason() {
        let mut series = vec![inst(1, 0.0, "ORIGINAL\\PRIMARY\\LOCALIZER", AXIAL)];
        series.push(inst(
            2,
            0.0,
            "DERIVED\\SECONDARY\\REFORMATTED",
            "1\\0\\0\\0\\0\\-1",
        ));
        let mut sc = inst(3, 0.0, "DERIVED\\SECONDARY", AXIAL);
        sc.sop_class_uid = uids::SECONDARY_CAPTURE_IMAGE_STORAGE.into();
        series.push(sc);
        match select(&series, &rules(32)) {
            Selection::Skipped { reason } => {
                assert!(
                    reason.contains("1 not CT images")
                        && reason.contains("1 localizers")
                        && reason.contains("1 not axial"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(select(&[], &rules(32)), Selection::Skipped { .. }));
    }
}
