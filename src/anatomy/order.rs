//! The most probable labelling of a series' images that respects the body's fixed order
//! along z (head, neck, lungs, liver, mid-abdomen, pelvis, legs).
//!
//! Why: on scanners the model never saw, single images go wrong in ways no body allows — a
//! pelvis image called *neck*, a *liver* below the liver. A moving average only dilutes such
//! an image; the order rules it out. So the images are sorted head to foot by their z
//! position (DICOM +z is superior, whatever the patient position or the order images
//! arrived in) and a Viterbi pass picks the labelling with the highest summed
//! log-probability among those that only ever move foot-wards through the states below.
//!
//! Costs, in nats (natural-log units of probability), so they weigh against the model's own
//! evidence: every change of state costs `switch_penalty`; passing over a region without an
//! image in it costs up to `skip_penalty`, scaled by how little of the region's minimal
//! length fits between the two images (a region can be missed between images 400 mm apart,
//! not between images 5 mm apart). Series may start and end in any state: partial coverage
//! is the rule. One image, or a model that gives one class everywhere, decodes to the
//! argmax.

use super::coverage::Labelled;

/// Probabilities are floored before the logarithm: a model certain of a wrong class still
/// costs only −ln(1e-4) ≈ 9.2 nats to overrule, and log(0) never enters the sums.
const PROBABILITY_FLOOR: f32 = 1e-4;

/// The states, head to foot: the class each reads from the model, and the shortest length
/// (mm) the region has in an adult, below which it cannot lie unseen between two images.
/// `other` appears three times because the model's `other` is whatever is not one of the
/// paper's five regions: the head (and arms raised above it), the mid-abdomen between the
/// liver and the iliac crests, and anything below the legs. An arms-only series (a limb
/// alone in the field) is `other` throughout and stays in the first state.
const STATES: [(&str, f64); 8] = [
    ("other", 0.0),
    ("neck", 40.0),
    ("lungs", 100.0),
    ("liver", 60.0),
    ("other", 20.0),
    ("pelvis", 80.0),
    ("legs", 150.0),
    ("other", 0.0),
];

/// The five classes the decoder knows by name, besides `other`.
const REGIONS: [&str; 5] = ["neck", "lungs", "liver", "pelvis", "legs"];

/// How the decoder weighs changes of state (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OrderRules {
    /// Cost of each change of region along z (nats).
    pub switch_penalty: f64,
    /// Cost of passing over a whole region between two images at the same z (nats); it falls
    /// linearly to 0 as the distance reaches the region's minimal length.
    pub skip_penalty: f64,
}

impl Default for OrderRules {
    fn default() -> Self {
        Self {
            switch_penalty: 1.0,
            skip_penalty: 4.0,
        }
    }
}

/// Why a model's labels cannot be decoded along z.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownClasses(pub String);

struct State {
    class: usize,
    min_len_mm: f64,
}

/// The states this model's classes feed (the `other` states only if it has `other`), or why
/// the decoder does not know them.
fn states(classes: &[String]) -> Result<Vec<State>, UnknownClasses> {
    let known = |c: &String| c == "other" || REGIONS.contains(&c.as_str());
    let unknown: Vec<&String> = classes.iter().filter(|c| !known(c)).collect();
    let missing: Vec<&str> = REGIONS
        .iter()
        .copied()
        .filter(|r| !classes.iter().any(|c| c == r))
        .collect();
    let repeated = classes
        .iter()
        .enumerate()
        .any(|(i, c)| classes[..i].contains(c));
    if !unknown.is_empty() || !missing.is_empty() || repeated {
        return Err(UnknownClasses(format!(
            "the model's classes {classes:?} are not neck, lungs, liver, pelvis, legs \
             (and optionally other), each once"
        )));
    }
    Ok(STATES
        .iter()
        .filter_map(|&(name, min_len_mm)| {
            let class = classes.iter().position(|c| c == name)?;
            Some(State { class, min_len_mm })
        })
        .collect())
}

/// The class index of each image (in the order given) on the most probable head-to-foot
/// path, or why the classes cannot be decoded.
pub fn decode(
    images: &[Labelled],
    classes: &[String],
    rules: &OrderRules,
) -> Result<Vec<usize>, UnknownClasses> {
    let states = states(classes)?;
    if images.is_empty() {
        return Ok(Vec::new());
    }
    let order = head_to_foot(images);
    let emission = |image: &Labelled, s: &State| {
        let p = image.probabilities.get(s.class).copied().unwrap_or(0.0);
        // `max` also maps a NaN probability to the floor.
        f64::from(p.max(PROBABILITY_FLOOR)).ln()
    };
    let n = states.len();
    let mut score: Vec<f64> = Vec::with_capacity(n);
    let mut back: Vec<Vec<usize>> = Vec::with_capacity(order.len());
    for (step, &i) in order.iter().enumerate() {
        let image = &images[i];
        if step == 0 {
            score = states.iter().map(|s| emission(image, s)).collect();
            back.push((0..n).collect());
            continue;
        }
        let gap = (images[order[step - 1]].z_mm - image.z_mm).abs();
        let gap = if gap.is_finite() { gap } else { 0.0 };
        let mut next = vec![f64::NEG_INFINITY; n];
        let mut from = vec![0; n];
        for to in 0..n {
            // Only head-to-foot moves; ties go to the state nearer the head, so equal
            // evidence never invents a region.
            for (prev, &before) in score.iter().enumerate().take(to + 1) {
                let candidate = before - transition(&states, prev, to, gap, rules);
                if candidate > next[to] {
                    next[to] = candidate;
                    from[to] = prev;
                }
            }
            next[to] += emission(image, &states[to]);
        }
        score = next;
        back.push(from);
    }
    let mut state = (0..n).fold(0, |best, s| if score[s] > score[best] { s } else { best });
    let mut labels = vec![0; images.len()];
    for step in (0..order.len()).rev() {
        labels[order[step]] = states[state].class;
        state = back[step][state];
    }
    Ok(labels)
}

/// Cost of moving from state `from` to `to` (`from <= to`) between images `gap_mm` apart.
fn transition(states: &[State], from: usize, to: usize, gap_mm: f64, rules: &OrderRules) -> f64 {
    if from == to {
        return 0.0;
    }
    let skipped: f64 = states[from + 1..to]
        .iter()
        .map(|s| rules.skip_penalty * (1.0 - gap_mm / s.min_len_mm.max(1.0)).max(0.0))
        .sum();
    rules.switch_penalty + skipped
}

/// Image indices sorted head to foot (z descending). Images at the same z are ordered by
/// their probabilities, so the result never depends on the order the images came in.
fn head_to_foot(images: &[Labelled]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..images.len()).collect();
    order.sort_by(|&a, &b| {
        let (ia, ib) = (&images[a], &images[b]);
        ib.z_mm.total_cmp(&ia.z_mm).then_with(|| {
            ia.probabilities
                .iter()
                .zip(&ib.probabilities)
                .map(|(x, y)| x.total_cmp(y))
                .find(|o| o.is_ne())
                .unwrap_or(std::cmp::Ordering::Equal)
        })
    });
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    const NECK: usize = 0;
    const LUNGS: usize = 1;
    const LIVER: usize = 2;
    const PELVIS: usize = 3;
    const LEGS: usize = 4;
    const OTHER: usize = 5;

    fn classes() -> Vec<String> {
        ["neck", "lungs", "liver", "pelvis", "legs", "other"]
            .map(String::from)
            .to_vec()
    }

    /// `confidence` on `class`, the rest shared by the other five classes.
    fn image(z_mm: f64, class: usize, confidence: f32) -> Labelled {
        let mut probabilities = vec![(1.0 - confidence) / 5.0; 6];
        probabilities[class] = confidence;
        Labelled {
            z_mm,
            probabilities,
        }
    }

    /// Images `step_mm` apart, head to foot from z = 0, each class `n` times, confident.
    fn series(spec: &[(usize, usize)], step_mm: f64) -> Vec<Labelled> {
        let mut out = Vec::new();
        for &(class, n) in spec {
            for _ in 0..n {
                out.push(image(-(out.len() as f64) * step_mm, class, 0.9));
            }
        }
        out
    }

    fn decoded(images: &[Labelled]) -> Vec<usize> {
        decode(images, &classes(), &OrderRules::default()).expect("known classes")
    }

    fn argmaxes(images: &[Labelled]) -> Vec<usize> {
        images
            .iter()
            .map(|i| super::super::coverage::argmax(&i.probabilities))
            .collect()
    }

    fn expand(spec: &[(usize, usize)]) -> Vec<usize> {
        spec.iter()
            .flat_map(|&(c, n)| std::iter::repeat_n(c, n))
            .collect()
    }

    const CHEST_TO_LEGS: [(usize, usize); 6] = [
        (LUNGS, 8),
        (LIVER, 5),
        (OTHER, 3),
        (PELVIS, 6),
        (LEGS, 6),
        (OTHER, 0),
    ];

    #[test]
    fn a_clean_series_keeps_its_labels() {
        let images = series(&CHEST_TO_LEGS, 20.0);
        assert_eq!(decoded(&images), expand(&CHEST_TO_LEGS));
    }

    #[test]
    fn an_isolated_neck_or_liver_below_the_liver_is_corrected() {
        for wrong in [NECK, LIVER, LUNGS] {
            let mut images = series(&CHEST_TO_LEGS, 20.0);
            // A pelvis image the model is sure shows the neck (or the liver, or the lungs).
            images[19] = image(images[19].z_mm, wrong, 0.95);
            assert_eq!(
                argmaxes(&images)[19],
                wrong,
                "the model's own label is wrong"
            );
            assert_eq!(decoded(&images), expand(&CHEST_TO_LEGS), "wrong = {wrong}");
        }
    }

    #[test]
    fn a_genuine_short_region_is_kept() {
        // Two liver images, and one neck image at the top, between long runs.
        let spec = [
            (OTHER, 3),
            (NECK, 1),
            (LUNGS, 8),
            (LIVER, 2),
            (OTHER, 4),
            (PELVIS, 6),
        ];
        let mut images = series(&spec, 25.0);
        images[3] = image(images[3].z_mm, NECK, 0.7);
        images[12] = image(images[12].z_mm, LIVER, 0.7);
        assert_eq!(decoded(&images), expand(&spec));
    }

    #[test]
    fn input_order_and_patient_position_do_not_change_the_labels() {
        let mut images = series(&CHEST_TO_LEGS, 15.0);
        images[10] = image(images[10].z_mm, NECK, 0.8);
        images[20] = image(images[20].z_mm, LUNGS, 0.6);
        let expected = decoded(&images);
        assert_eq!(expected, expand(&CHEST_TO_LEGS));
        // Received feet first: the same images, listed foot to head.
        let reversed: Vec<Labelled> = images.iter().rev().cloned().collect();
        let mut labels = decoded(&reversed);
        labels.reverse();
        assert_eq!(labels, expected);
        // Shuffled, and the whole body shifted to positive z (another origin).
        let mut shuffled: Vec<(usize, Labelled)> = images.iter().cloned().enumerate().collect();
        shuffled.sort_by_key(|(i, _)| (i * 7) % 11);
        for (_, image) in &mut shuffled {
            image.z_mm += 1200.0;
        }
        let only: Vec<Labelled> = shuffled.iter().map(|(_, i)| i.clone()).collect();
        let labels = decoded(&only);
        for ((i, _), label) in shuffled.iter().zip(labels) {
            assert_eq!(label, expected[*i], "image {i}");
        }
    }

    #[test]
    fn partial_coverage_is_the_rule() {
        for spec in [
            vec![(NECK, 3), (LUNGS, 12)],
            vec![(LUNGS, 12)],
            vec![(PELVIS, 5), (LEGS, 20)],
            vec![(LIVER, 4), (OTHER, 4), (PELVIS, 5)],
            vec![(OTHER, 10)],
        ] {
            let images = series(&spec, 10.0);
            assert_eq!(decoded(&images), expand(&spec), "{spec:?}");
        }
    }

    #[test]
    fn a_long_gap_lets_regions_be_skipped_a_short_one_does_not() {
        // Neck images, then pelvis images: the lungs, liver and mid-abdomen lie between.
        let mut images = series(&[(NECK, 4)], 5.0);
        let mut pelvis = series(&[(PELVIS, 4)], 5.0);
        for (k, image) in pelvis.iter_mut().enumerate() {
            *image = image_like(image, -20.0 - 500.0 - 5.0 * k as f64);
        }
        images.extend(pelvis.iter().cloned());
        // Unsure images either side of the gap.
        images[3] = mixed(images[3].z_mm, &[(NECK, 0.5), (LUNGS, 0.4)]);
        images[4] = mixed(images[4].z_mm, &[(PELVIS, 0.5), (OTHER, 0.4)]);
        let far = decoded(&images);
        assert_eq!(
            far,
            expand(&[(NECK, 4), (PELVIS, 4)]),
            "500 mm hold every region"
        );
        // The same images 5 mm apart: lungs, liver and mid-abdomen cannot all be missing.
        for (k, image) in images.iter_mut().enumerate().skip(4) {
            image.z_mm = -5.0 * k as f64;
        }
        let near = decoded(&images);
        assert_ne!(near, far, "{near:?}");
        assert!(near[3] == LUNGS || near[4] == OTHER, "{near:?}");
    }

    fn image_like(image: &Labelled, z_mm: f64) -> Labelled {
        Labelled {
            z_mm,
            probabilities: image.probabilities.clone(),
        }
    }

    fn mixed(z_mm: f64, parts: &[(usize, f32)]) -> Labelled {
        let rest: f32 = 1.0 - parts.iter().map(|(_, p)| p).sum::<f32>();
        let mut probabilities = vec![rest / (6 - parts.len()) as f32; 6];
        for &(c, p) in parts {
            probabilities[c] = p;
        }
        Labelled {
            z_mm,
            probabilities,
        }
    }

    #[test]
    fn one_image_is_its_argmax() {
        for class in 0..6 {
            let images = [image(-300.0, class, 0.4)];
            assert_eq!(decoded(&images), vec![class]);
        }
        assert!(decoded(&[]).is_empty());
    }

    #[test]
    fn images_at_the_same_z_decode_the_same_in_any_order() {
        let a = image(-100.0, LIVER, 0.6);
        let b = image(-100.0, LUNGS, 0.7);
        let c = image(-100.0, LIVER, 0.9);
        let forward = decoded(&[a.clone(), b.clone(), c.clone()]);
        let backward = decoded(&[c, b, a]);
        assert_eq!(forward, backward.into_iter().rev().collect::<Vec<_>>());
    }

    #[test]
    fn nan_and_zero_probabilities_decode_without_nan() {
        let mut images = series(&[(LUNGS, 3), (LIVER, 3)], 10.0);
        images[1].probabilities = vec![f32::NAN; 6];
        images[4].probabilities = vec![0.0; 6];
        images[5].z_mm = f64::NAN;
        let labels = decoded(&images);
        assert_eq!(labels.len(), 6);
        assert_eq!(labels[0], LUNGS);
    }

    #[test]
    fn classes_the_decoder_does_not_know_are_refused() {
        let images = series(&[(LUNGS, 3)], 10.0);
        for odd in [
            vec!["neck", "lungs", "liver", "pelvis", "legs", "brain"],
            vec!["a", "b", "c"],
            vec!["neck", "lungs", "liver", "pelvis"],
            vec!["neck", "neck", "lungs", "liver", "pelvis", "legs"],
        ] {
            let odd: Vec<String> = odd.into_iter().map(String::from).collect();
            let err = decode(&images, &odd, &OrderRules::default()).unwrap_err();
            assert!(err.0.contains("are not neck"), "{}", err.0);
        }
        // The paper's five classes alone are known (no `other` states then).
        let five: Vec<String> = classes()[..5].to_vec();
        let images: Vec<Labelled> = [(NECK, 0.8), (LUNGS, 0.8), (NECK, 0.6), (LUNGS, 0.9)]
            .iter()
            .enumerate()
            .map(|(k, &(c, p))| {
                let mut probabilities = vec![(1.0 - p) / 4.0; 5];
                probabilities[c] = p;
                Labelled {
                    z_mm: -10.0 * k as f64,
                    probabilities,
                }
            })
            .collect();
        let labels = decode(&images, &five, &OrderRules::default()).unwrap();
        assert_eq!(labels, vec![NECK, LUNGS, LUNGS, LUNGS]);
    }

    #[test]
    fn skipping_costs_less_the_more_room_there_is() {
        let states = states(&classes()).unwrap();
        let rules = OrderRules::default();
        let near = transition(&states, 1, 5, 5.0, &rules); // neck to pelvis, 5 mm apart
        let far = transition(&states, 1, 5, 500.0, &rules);
        assert_eq!(far, rules.switch_penalty);
        assert!(near > far + 2.0 * rules.skip_penalty, "{near}");
        assert_eq!(transition(&states, 2, 2, 0.0, &rules), 0.0);
    }

    #[derive(serde::Deserialize)]
    struct FixtureCase {
        classes: Vec<String>,
        z_mm: Vec<f64>,
        probabilities: Vec<Vec<f32>>,
        switch_penalty: f64,
        skip_penalty: f64,
        decoded: Vec<usize>,
    }

    /// training/order.py is a port of this decoder (self-training tools decode offline as the
    /// node does); the fixture holds its answers, which this decoder must give too.
    #[test]
    fn python_port_agrees() {
        #[derive(serde::Deserialize)]
        struct Fixture {
            cases: Vec<FixtureCase>,
        }
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/order/cases.json"
        );
        let text = std::fs::read_to_string(path).expect("fixture written by order_fixture.py");
        let fixture: Fixture = serde_json::from_str(&text).expect("fixture JSON");
        assert!(fixture.cases.len() >= 20);
        for (n, case) in fixture.cases.iter().enumerate() {
            let images: Vec<Labelled> = case
                .z_mm
                .iter()
                .zip(&case.probabilities)
                .map(|(&z_mm, p)| Labelled {
                    z_mm,
                    probabilities: p.clone(),
                })
                .collect();
            let rules = OrderRules {
                switch_penalty: case.switch_penalty,
                skip_penalty: case.skip_penalty,
            };
            let labels = decode(&images, &case.classes, &rules).expect("known classes");
            assert_eq!(labels, case.decoded, "case {n}");
        }
    }
}
