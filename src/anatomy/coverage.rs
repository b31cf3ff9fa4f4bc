//! From per-image class probabilities along z to what a series covers: labels decoded
//! along z in the body's order ([`super::order`]), contiguous z-ranges per class, the dominant class, and the DICOM terms for the whole
//! series — Body Part Examined (0018,0015) and the Anatomic Region Sequence (0008,2218)
//! codes of CID 4031 — from PS3.16 Annex L (Table L-1, the correspondence of Body Part
//! Examined defined terms and SNOMED CT codes).

use serde::{Deserialize, Serialize};

use super::order::{self, OrderRules};

/// One anatomic region of PS3.16 CID 4031, with its Body Part Examined defined term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Region {
    pub body_part: &'static str,
    pub code_value: &'static str,
    pub coding_scheme: &'static str,
    pub code_meaning: &'static str,
}

const fn sct(
    body_part: &'static str,
    code_value: &'static str,
    code_meaning: &'static str,
) -> Region {
    Region {
        body_part,
        code_value,
        coding_scheme: "SCT",
        code_meaning,
    }
}

pub const NECK: Region = sct("NECK", "45048000", "Neck");
pub const CHEST: Region = sct("CHEST", "43799004", "Chest");
pub const ABDOMEN: Region = sct("ABDOMEN", "818981001", "Abdomen");
pub const PELVIS: Region = sct("PELVIS", "816092008", "Pelvis");
pub const LOWER_LIMB: Region = sct("LOWERLIMB", "61685007", "Lower limb");
pub const NECK_CHEST: Region = sct("NECKCHEST", "417437006", "Neck and Chest");
pub const NECK_CHEST_ABDOMEN: Region =
    sct("NECKCHESTABDOMEN", "416152001", "Neck, Chest and Abdomen");
pub const NECK_CHEST_ABDOMEN_PELVIS: Region = sct(
    "NECKCHESTABDPELV",
    "416319003",
    "Neck, Chest, Abdomen and Pelvis",
);
pub const CHEST_ABDOMEN: Region = sct("CHESTABDOMEN", "416550000", "Chest and Abdomen");
pub const CHEST_ABDOMEN_PELVIS: Region =
    sct("CHESTABDPELVIS", "416775004", "Chest, Abdomen and Pelvis");
pub const ABDOMEN_PELVIS: Region = sct("ABDOMENPELVIS", "818982008", "Abdomen and Pelvis");
pub const PELVIS_LOWER_LIMBS: Region = sct(
    "PELVISLOWEXTREMT",
    "1231522001",
    "Pelvis and lower extremities",
);

/// The region of each of the paper's classes, in head-to-foot order. Other classes a model
/// may add (e.g. `other`: head, mid-abdomen, arms) have no region.
pub fn region_of_class(class: &str) -> Option<(usize, Region)> {
    match class {
        "neck" => Some((0, NECK)),
        "lungs" => Some((1, CHEST)),
        "liver" => Some((2, ABDOMEN)),
        "pelvis" => Some((3, PELVIS)),
        "legs" => Some((4, LOWER_LIMB)),
        _ => None,
    }
}

/// The Body Part Examined term for the span of regions from `first` to `last` (indices in
/// head-to-foot order). Where PS3.3/PS3.16 define no term for the span (chest or abdomen
/// down to the legs), the term of the trunk part is used and the Anatomic Region Sequence
/// still lists every region.
pub fn term_for_span(first: usize, last: usize) -> Option<Region> {
    Some(match (first, last) {
        (0, 0) => NECK,
        (0, 1) => NECK_CHEST,
        (0, 2) => NECK_CHEST_ABDOMEN,
        (0, 3) | (0, 4) => NECK_CHEST_ABDOMEN_PELVIS,
        (1, 1) => CHEST,
        (1, 2) => CHEST_ABDOMEN,
        (1, 3) | (1, 4) => CHEST_ABDOMEN_PELVIS,
        (2, 2) => ABDOMEN,
        (2, 3) | (2, 4) => ABDOMEN_PELVIS,
        (3, 3) => PELVIS,
        (3, 4) => PELVIS_LOWER_LIMBS,
        (4, 4) => LOWER_LIMB,
        _ => return None,
    })
}

/// A labelled image at a position along the patient's long axis.
#[derive(Debug, Clone)]
pub struct Labelled {
    pub z_mm: f64,
    pub probabilities: Vec<f32>,
}

/// A contiguous run of key-images (in z order) with one decoded label.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Range {
    pub class: String,
    pub z_from_mm: f64,
    pub z_to_mm: f64,
    pub images: usize,
}

/// What a series shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Coverage {
    /// Decoded label of each image, in the order given.
    pub labels: Vec<String>,
    /// How `labels` were read: `order` (decoded along z) or `none` (each image's argmax).
    pub decoding: Decoding,
    /// Why the labels are not decoded although `order` was asked for (the model's classes
    /// are not the ones the decoder knows).
    pub decoding_note: Option<String>,
    pub ranges: Vec<Range>,
    pub dominant_class: Option<String>,
    pub body_part_examined: Option<Region>,
    /// The regions present, head to foot (the Anatomic Region Sequence items).
    pub regions: Vec<Region>,
}

/// How per-image probabilities become labels (`classifier.decoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decoding {
    /// The most probable labelling in the body's head-to-foot order ([`order`]).
    #[default]
    Order,
    /// Each image's most probable class, alone.
    None,
}

/// Settings for turning labels into coverage.
#[derive(Debug, Clone, Copy)]
pub struct CoverageRules {
    pub decoding: Decoding,
    /// Costs of the order decoder.
    pub order: OrderRules,
    /// A region counts when its class labels at least this fraction of the images...
    pub min_region_fraction: f64,
    /// ...and at least this many of them.
    pub min_region_images: usize,
}

impl Default for CoverageRules {
    fn default() -> Self {
        Self {
            decoding: Decoding::Order,
            order: OrderRules::default(),
            min_region_fraction: 0.1,
            min_region_images: 2,
        }
    }
}

/// Coverage of images sorted along z (either direction: the decoder sorts for itself, the
/// ranges follow the order given).
pub fn coverage(images: &[Labelled], classes: &[String], rules: &CoverageRules) -> Coverage {
    let argmaxes = || images.iter().map(|i| argmax(&i.probabilities)).collect();
    let (decoding, decoding_note, indices): (_, _, Vec<usize>) = match rules.decoding {
        Decoding::None => (Decoding::None, None, argmaxes()),
        Decoding::Order => match order::decode(images, classes, &rules.order) {
            Ok(indices) => (Decoding::Order, None, indices),
            Err(why) => (
                Decoding::None,
                Some(format!("labels not decoded along z: {}", why.0)),
                argmaxes(),
            ),
        },
    };
    let labels: Vec<String> = indices
        .iter()
        .map(|&i| classes.get(i).cloned().unwrap_or_default())
        .collect();
    let ranges = runs(images, &labels);
    let dominant_class = dominant(&labels);
    let present = present_regions(&labels, rules);
    let body_part_examined = match (present.first(), present.last()) {
        (Some((first, _)), Some((last, _))) => term_for_span(*first, *last),
        _ => None,
    };
    Coverage {
        labels,
        decoding,
        decoding_note,
        ranges,
        dominant_class,
        body_part_examined,
        regions: present.into_iter().map(|(_, r)| r).collect(),
    }
}

pub fn argmax(p: &[f32]) -> usize {
    p.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

fn runs(images: &[Labelled], labels: &[String]) -> Vec<Range> {
    let mut out: Vec<Range> = Vec::new();
    for (img, label) in images.iter().zip(labels) {
        match out.last_mut() {
            Some(r) if &r.class == label => {
                r.z_to_mm = img.z_mm;
                r.images += 1;
            }
            _ => out.push(Range {
                class: label.clone(),
                z_from_mm: img.z_mm,
                z_to_mm: img.z_mm,
                images: 1,
            }),
        }
    }
    out
}

fn dominant(labels: &[String]) -> Option<String> {
    let mut counts: Vec<(&String, usize)> = Vec::new();
    for l in labels {
        match counts.iter_mut().find(|(c, _)| *c == l) {
            Some((_, n)) => *n += 1,
            None => counts.push((l, 1)),
        }
    }
    // Ties go to the class seen first along z, so the answer does not depend on hashing.
    counts
        .into_iter()
        .fold(None, |best: Option<(&String, usize)>, (c, n)| match best {
            Some((_, bn)) if bn >= n => best,
            _ => Some((c, n)),
        })
        .map(|(c, _)| c.clone())
}

/// Regions whose class labels enough images, head to foot.
fn present_regions(labels: &[String], rules: &CoverageRules) -> Vec<(usize, Region)> {
    let needed = ((labels.len() as f64) * rules.min_region_fraction)
        .ceil()
        .max(rules.min_region_images as f64)
        .min(labels.len() as f64) as usize;
    let mut present: Vec<(usize, Region)> = labels
        .iter()
        .filter_map(|l| region_of_class(l))
        .fold(Vec::new(), |mut acc, r| {
            if !acc.contains(&r) {
                acc.push(r);
            }
            acc
        })
        .into_iter()
        .filter(|(_, region)| {
            let class_count = labels
                .iter()
                .filter(|l| region_of_class(l).map(|(_, r)| r) == Some(*region))
                .count();
            class_count >= needed.max(1)
        })
        .collect();
    present.sort_by_key(|(i, _)| *i);
    present
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes() -> Vec<String> {
        ["neck", "lungs", "liver", "pelvis", "legs", "other"]
            .map(String::from)
            .to_vec()
    }

    fn one_hot(class: usize, z: f64) -> Labelled {
        let mut p = vec![0.0; 6];
        p[class] = 1.0;
        Labelled {
            z_mm: z,
            probabilities: p,
        }
    }

    fn series(spec: &[(usize, usize)]) -> Vec<Labelled> {
        let mut out = Vec::new();
        for &(class, n) in spec {
            for _ in 0..n {
                let z = -(out.len() as f64) * 10.0;
                out.push(one_hot(class, z));
            }
        }
        out
    }

    #[test]
    fn chest_abdomen_pelvis_scan() {
        let imgs = series(&[(1, 12), (2, 6), (5, 4), (3, 10)]);
        let c = coverage(&imgs, &classes(), &CoverageRules::default());
        assert_eq!(c.body_part_examined, Some(CHEST_ABDOMEN_PELVIS));
        assert_eq!(c.regions, vec![CHEST, ABDOMEN, PELVIS]);
        assert_eq!(c.dominant_class.as_deref(), Some("lungs"));
        assert_eq!(c.ranges.len(), 4);
        assert_eq!(c.ranges[0].images, 12);
        assert_eq!(c.ranges[0].z_from_mm, 0.0);
        assert_eq!(c.ranges[0].z_to_mm, -110.0);
    }

    #[test]
    fn a_single_stray_image_is_decoded_away_and_a_small_region_does_not_count() {
        let mut imgs = series(&[(1, 30), (2, 2)]);
        imgs[10] = one_hot(4, imgs[10].z_mm); // one "legs" in the middle of the chest
        let c = coverage(&imgs, &classes(), &CoverageRules::default());
        assert!(c.labels.iter().all(|l| l != "legs"), "{:?}", c.labels);
        assert_eq!(
            c.body_part_examined,
            Some(CHEST),
            "2 of 32 liver images stay below 10 %"
        );
    }

    #[test]
    fn a_neck_below_the_liver_is_decoded_unless_decoding_is_off() {
        let mut imgs = series(&[(1, 8), (2, 5), (5, 3), (3, 8)]);
        imgs[20] = one_hot(0, imgs[20].z_mm); // a pelvis image the model calls neck
        let c = coverage(&imgs, &classes(), &CoverageRules::default());
        assert_eq!(c.decoding, Decoding::Order);
        assert_eq!(c.labels[20], "pelvis");
        assert!(c.labels[..8].iter().all(|l| l == "lungs"), "{:?}", c.labels);
        let rules = CoverageRules {
            decoding: Decoding::None,
            ..CoverageRules::default()
        };
        let raw = coverage(&imgs, &classes(), &rules);
        assert_eq!(raw.decoding, Decoding::None);
        assert_eq!(raw.decoding_note, None);
        assert_eq!(raw.labels[20], "neck");
    }

    #[test]
    fn classes_the_decoder_does_not_know_fall_back_to_each_images_argmax() {
        let odd: Vec<String> = ["a", "b", "c", "d", "e", "f"].map(String::from).to_vec();
        let mut imgs = series(&[(1, 8), (2, 5)]);
        imgs[10] = one_hot(0, imgs[10].z_mm);
        let c = coverage(&imgs, &odd, &CoverageRules::default());
        assert_eq!(c.decoding, Decoding::None);
        let note = c.decoding_note.expect("says why");
        assert!(
            note.contains("not decoded") && note.contains("\"f\""),
            "{note}"
        );
        assert_eq!(c.labels[10], "a");
        assert_eq!(c.labels[9], "c");
    }

    #[test]
    fn spans_without_a_defined_term_use_the_trunk_term_and_list_every_region() {
        let imgs = series(&[(2, 10), (3, 10), (4, 10)]);
        let c = coverage(&imgs, &classes(), &CoverageRules::default());
        assert_eq!(c.body_part_examined, Some(ABDOMEN_PELVIS));
        assert_eq!(c.regions, vec![ABDOMEN, PELVIS, LOWER_LIMB]);
    }

    #[test]
    fn only_other_images_have_no_body_part() {
        let imgs = series(&[(5, 8)]);
        let c = coverage(&imgs, &classes(), &CoverageRules::default());
        assert_eq!(c.body_part_examined, None);
        assert!(c.regions.is_empty());
        assert_eq!(c.dominant_class.as_deref(), Some("other"));
    }

    #[test]
    fn every_span_has_a_term_of_at_most_16_characters() {
        for first in 0..5 {
            for last in first..5 {
                let t = term_for_span(first, last).expect("term");
                assert!(t.body_part.len() <= 16, "{}", t.body_part);
            }
        }
        assert_eq!(term_for_span(3, 2), None);
    }
}
