//! The figures of `anatomy-node eval`, computed from class probabilities and true class
//! indices. Every definition matches training/metrics.py, so both sides report the same
//! numbers for the same probabilities:
//!
//! - slice error: share of scored images whose argmax (first maximum on a tie) is not the
//!   true class; accuracy = 1 − error;
//! - NLL: mean of −ln(max(p_true, 1e-12));
//! - one-vs-rest ROC AUC per class: the Mann-Whitney statistic with mid-ranks for tied
//!   scores (= the trapezoid area under the ROC curve, a tie counting one half); `None`
//!   for a class without positives or without negatives, and such classes are left out
//!   of the mean;
//! - expected calibration error over [`ECE_BINS`] equal-width bins of the confidence (the
//!   largest probability), bin `i` holding `(i/15, (i+1)/15]`:
//!   `ECE = Σ_bins (n_bin / n) · |accuracy_bin − mean confidence_bin|`.
//!
//! Patients: majority vote, see [`patients`].

/// Confidence bins of the calibration error and the reliability table.
pub const ECE_BINS: usize = 15;
/// Floor of the true-class probability in the NLL (as training/metrics.py).
const NLL_FLOOR: f64 = 1e-12;

/// Index of the largest value, the first one on a tie (numpy's argmax).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// Figures over scored images.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceMetrics {
    pub images: usize,
    pub errors: usize,
    pub error: f64,
    pub nll: f64,
    /// One-vs-rest AUC per class; `None` where the class has no positives or no negatives.
    pub auc: Vec<Option<f64>>,
    /// Mean over the classes whose AUC is defined; `None` when none is.
    pub mean_auc: Option<f64>,
    /// Rows: true class, columns: predicted class, both in the model's class order.
    pub confusion: Vec<Vec<usize>>,
}

impl SliceMetrics {
    /// 1 − recall of each class; `None` for a class without images.
    pub fn per_class_error(&self) -> Vec<Option<f64>> {
        self.confusion
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let n: usize = row.iter().sum();
                (n > 0).then(|| 1.0 - row[i] as f64 / n as f64)
            })
            .collect()
    }
}

/// `probabilities[i]` has one value per class; `targets[i]` is the true class index. Both
/// must be non-empty and of equal length, every target below the number of classes.
pub fn slice_metrics(
    probabilities: &[Vec<f32>],
    targets: &[usize],
    classes: usize,
) -> SliceMetrics {
    let n = targets.len();
    let predictions: Vec<usize> = probabilities.iter().map(|p| argmax(p)).collect();
    let mut confusion = vec![vec![0usize; classes]; classes];
    for (&t, &p) in targets.iter().zip(&predictions) {
        confusion[t][p] += 1;
    }
    let errors = targets
        .iter()
        .zip(&predictions)
        .filter(|(t, p)| t != p)
        .count();
    let auc: Vec<Option<f64>> = (0..classes)
        .map(|c| {
            let scores: Vec<f64> = probabilities.iter().map(|p| f64::from(p[c])).collect();
            let positive: Vec<bool> = targets.iter().map(|&t| t == c).collect();
            auc_one_vs_rest(&scores, &positive)
        })
        .collect();
    SliceMetrics {
        images: n,
        errors,
        error: errors as f64 / n as f64,
        nll: nll(probabilities, targets),
        mean_auc: mean_defined(&auc),
        auc,
        confusion,
    }
}

fn nll(probabilities: &[Vec<f32>], targets: &[usize]) -> f64 {
    let sum: f64 = probabilities
        .iter()
        .zip(targets)
        .map(|(p, &t)| -f64::from(p[t]).clamp(NLL_FLOOR, 1.0).ln())
        .sum();
    sum / targets.len() as f64
}

/// Mean of the defined values, `None` when there are none.
pub fn mean_defined(values: &[Option<f64>]) -> Option<f64> {
    let defined: Vec<f64> = values.iter().flatten().copied().collect();
    (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64)
}

/// Area under the ROC curve of `scores` for the `positive` images: the Mann-Whitney U
/// statistic with mid-ranks for ties, divided by `n_pos · n_neg`. `None` when either side
/// is empty.
pub fn auc_one_vs_rest(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let n_pos = positive.iter().filter(|p| **p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let ranks = mid_ranks(scores);
    let rank_sum: f64 = ranks
        .iter()
        .zip(positive)
        .filter(|(_, p)| **p)
        .map(|(r, _)| r)
        .sum();
    let (n_pos, n_neg) = (n_pos as f64, n_neg as f64);
    Some((rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg))
}

/// 1-based ranks of `scores` in ascending order; tied scores share the mean of their ranks.
fn mid_ranks(scores: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut ranks = vec![0.0; scores.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        // positions start..end (0-based) share rank (start + 1 + end) / 2
        let mid = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = mid;
        }
        start = end;
    }
    ranks
}

/// The ROC curve of one class as (false positive rate, true positive rate) points, from
/// (0, 0) to (1, 1), one point per distinct score (highest first): tied scores make one
/// diagonal step, so the trapezoid area equals [`auc_one_vs_rest`]. `None` when either
/// side is empty.
pub fn roc_curve(scores: &[f64], positive: &[bool]) -> Option<Vec<(f64, f64)>> {
    let n_pos = positive.iter().filter(|p| **p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut points = vec![(0.0, 0.0)];
    let (mut tp, mut fp) = (0usize, 0usize);
    for (k, &i) in order.iter().enumerate() {
        if positive[i] {
            tp += 1;
        } else {
            fp += 1;
        }
        let last_of_tie = order
            .get(k + 1)
            .is_none_or(|&next| scores[next] != scores[i]);
        if last_of_tie {
            points.push((fp as f64 / n_neg as f64, tp as f64 / n_pos as f64));
        }
    }
    Some(points)
}

/// Trapezoid area under a curve of (x, y) points sorted by x.
pub fn trapezoid_area(points: &[(f64, f64)]) -> f64 {
    points
        .windows(2)
        .map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0)
        .sum()
}

/// One confidence bin of the reliability table.
#[derive(Debug, Clone, PartialEq)]
pub struct Bin {
    /// Exclusive lower edge.
    pub lower: f64,
    /// Inclusive upper edge.
    pub upper: f64,
    pub images: usize,
    /// Share of the bin's images whose prediction is right; `None` for an empty bin.
    pub accuracy: Option<f64>,
    /// Mean confidence of the bin's images; `None` for an empty bin.
    pub confidence: Option<f64>,
}

/// The calibration figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    pub ece: f64,
    pub bins: Vec<Bin>,
}

/// Edge `i` of `bins` equal-width bins over [0, 1], computed as numpy's `linspace`.
fn edge(i: usize, bins: usize) -> f64 {
    if i == bins {
        1.0
    } else {
        i as f64 * (1.0 / bins as f64)
    }
}

/// Reliability table and expected calibration error over `bins` equal-width bins, bin `i`
/// holding confidences in `(i/bins, (i+1)/bins]`.
pub fn calibration(probabilities: &[Vec<f32>], targets: &[usize], bins: usize) -> Calibration {
    let n = targets.len() as f64;
    let mut table: Vec<Bin> = (0..bins)
        .map(|i| Bin {
            lower: edge(i, bins),
            upper: edge(i + 1, bins),
            images: 0,
            accuracy: None,
            confidence: None,
        })
        .collect();
    let mut sums = vec![(0.0f64, 0.0f64); bins];
    for (p, &t) in probabilities.iter().zip(targets) {
        let predicted = argmax(p);
        let confidence = f64::from(p[predicted]);
        let Some(b) = table
            .iter()
            .position(|b| confidence > b.lower && confidence <= b.upper)
        else {
            continue; // a confidence of 0 (impossible for probabilities summing to 1)
        };
        table[b].images += 1;
        sums[b].0 += f64::from(u8::from(predicted == t));
        sums[b].1 += confidence;
    }
    let mut ece = 0.0;
    for (bin, (correct, confidence)) in table.iter_mut().zip(sums) {
        if bin.images == 0 {
            continue;
        }
        let count = bin.images as f64;
        let (accuracy, confidence) = (correct / count, confidence / count);
        ece += count / n * (accuracy - confidence).abs();
        bin.accuracy = Some(accuracy);
        bin.confidence = Some(confidence);
    }
    Calibration { ece, bins: table }
}

/// One patient's figures. Truth and prediction of a patient are majority votes over its
/// scored images: the true class is the most frequent true label, the predicted class the
/// most frequent slice prediction; a tie goes to the class that comes first in the
/// model's class order.
#[derive(Debug, Clone, PartialEq)]
pub struct Patient {
    /// Index of the patient in the input.
    pub patient: usize,
    pub images: usize,
    pub errors: usize,
    /// Images per true class.
    pub true_counts: Vec<usize>,
    /// Images per predicted class.
    pub predicted_counts: Vec<usize>,
    pub true_class: usize,
    pub predicted_class: usize,
}

impl Patient {
    pub fn correct(&self) -> bool {
        self.true_class == self.predicted_class
    }

    pub fn error(&self) -> f64 {
        self.errors as f64 / self.images as f64
    }
}

/// Per-patient majority votes; `patient_of[i]` is the patient index of image `i`, and the
/// result lists the patients that have images, in index order.
pub fn patients(
    probabilities: &[Vec<f32>],
    targets: &[usize],
    patient_of: &[usize],
    classes: usize,
) -> Vec<Patient> {
    let count = patient_of.iter().max().map_or(0, |m| m + 1);
    let mut true_counts = vec![vec![0usize; classes]; count];
    let mut predicted_counts = vec![vec![0usize; classes]; count];
    let mut errors = vec![0usize; count];
    for ((p, &t), &who) in probabilities.iter().zip(targets).zip(patient_of) {
        let predicted = argmax(p);
        true_counts[who][t] += 1;
        predicted_counts[who][predicted] += 1;
        errors[who] += usize::from(predicted != t);
    }
    (0..count)
        .filter(|&who| true_counts[who].iter().any(|&n| n > 0))
        .map(|who| Patient {
            patient: who,
            images: true_counts[who].iter().sum(),
            errors: errors[who],
            true_class: majority(&true_counts[who]),
            predicted_class: majority(&predicted_counts[who]),
            true_counts: true_counts[who].clone(),
            predicted_counts: predicted_counts[who].clone(),
        })
        .collect()
}

/// Index of the largest count, the lowest index on a tie.
fn majority(counts: &[usize]) -> usize {
    let mut best = 0;
    for (i, &n) in counts.iter().enumerate() {
        if n > counts[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering;

    /// O(n²) definition: P(score⁺ > score⁻) + ½ P(score⁺ = score⁻).
    fn auc_by_pairs(scores: &[f64], positive: &[bool]) -> f64 {
        let (mut wins, mut pairs) = (0.0, 0.0);
        for (i, si) in scores.iter().enumerate() {
            for (j, sj) in scores.iter().enumerate() {
                if positive[i] && !positive[j] {
                    pairs += 1.0;
                    wins += match si.total_cmp(sj) {
                        Ordering::Greater => 1.0,
                        Ordering::Equal => 0.5,
                        Ordering::Less => 0.0,
                    };
                }
            }
        }
        wins / pairs
    }

    #[test]
    fn auc_counts_ties_as_half_and_matches_the_trapezoid() {
        let scores = [0.9, 0.8, 0.8, 0.8, 0.3, 0.3, 0.1, 0.95];
        let positive = [true, true, false, false, true, false, false, false];
        let auc = auc_one_vs_rest(&scores, &positive).expect("both sides");
        // pairs 3×5 = 15: 0.9 beats 4 of 5; 0.8 beats 0.3, 0.1 and ties two 0.8 (3);
        // 0.3 beats 0.1 and ties 0.3 (1.5)
        assert!((auc - 8.5 / 15.0).abs() < 1e-12, "{auc}");
        assert!((auc - auc_by_pairs(&scores, &positive)).abs() < 1e-12);
        let roc = roc_curve(&scores, &positive).expect("curve");
        assert_eq!(roc.first(), Some(&(0.0, 0.0)));
        assert_eq!(roc.last(), Some(&(1.0, 1.0)));
        assert!((trapezoid_area(&roc) - auc).abs() < 1e-12);
    }

    #[test]
    fn auc_is_undefined_without_positives_or_negatives() {
        assert_eq!(auc_one_vs_rest(&[0.1, 0.2], &[false, false]), None);
        assert_eq!(auc_one_vs_rest(&[0.1, 0.2], &[true, true]), None);
        assert_eq!(roc_curve(&[0.1], &[true]), None);
        assert_eq!(mean_defined(&[Some(1.0), None, Some(0.5)]), Some(0.75));
        assert_eq!(mean_defined(&[None]), None);
    }

    #[test]
    fn slice_figures_and_confusion() {
        let probabilities = vec![
            vec![0.7, 0.2, 0.1],
            vec![0.2, 0.5, 0.3],
            vec![0.4, 0.4, 0.2], // tie: argmax is the first, class 0
            vec![0.1, 0.1, 0.8],
        ];
        let targets = [0, 2, 1, 2];
        let m = slice_metrics(&probabilities, &targets, 3);
        assert_eq!(m.images, 4);
        assert_eq!(m.errors, 2);
        assert_eq!(m.error, 0.5);
        assert_eq!(m.confusion, [[1, 0, 0], [1, 0, 0], [0, 1, 1]]);
        assert_eq!(m.per_class_error(), [Some(0.0), Some(1.0), Some(0.5)]);
        let nll = -(0.7f32.ln() + 0.3f32.ln() + 0.4f32.ln() + 0.8f32.ln()) as f64 / 4.0;
        assert!((m.nll - nll).abs() < 1e-6);
    }

    #[test]
    fn calibration_bins_are_open_below_and_closed_above() {
        // A confidence on an edge belongs to the bin below it, 1.0 to the last bin; 0.6f32
        // (0.6000000238) is just above the edge 9/15 = 0.6.
        let probabilities = vec![
            vec![0.6, 0.4],
            vec![0.6, 0.4],
            vec![1.0, 0.0],
            vec![0.2, 0.8],
        ];
        let targets = [0, 1, 0, 1];
        let c = calibration(&probabilities, &targets, ECE_BINS);
        assert_eq!(c.bins.len(), 15);
        assert_eq!(c.bins[0].lower, 0.0);
        assert_eq!(c.bins[14].upper, 1.0);
        let bin_of = |x: f64| c.bins.iter().position(|b| x > b.lower && x <= b.upper);
        assert_eq!(bin_of(f64::from(0.6f32)), Some(9)); // (0.6, 0.667]: 0.6f32 > 0.6
        assert_eq!(c.bins[9].images, 2);
        assert_eq!(c.bins[9].accuracy, Some(0.5));
        assert_eq!(c.bins[12].images, 1); // 0.8f32 = 0.800000011920929 is in (0.8, 0.867]
        assert_eq!(c.bins[14].images, 1);
        let p6 = f64::from(0.6f32);
        let p8 = f64::from(0.8f32);
        let ece = 2.0 / 4.0 * (0.5 - p6).abs() + 1.0 / 4.0 * (1.0 - p8) + 0.0;
        assert!((c.ece - ece).abs() < 1e-12, "{} vs {ece}", c.ece);
        assert_eq!(c.bins[0].accuracy, None);
    }

    #[test]
    fn patients_vote_by_majority_with_ties_to_the_first_class() {
        let p = |c: usize| {
            let mut v = vec![0.1f32; 3];
            v[c] = 0.8;
            v
        };
        // patient 0: truth 0,0,1 → 0; predictions 1,1,0 → 1 (wrong)
        // patient 2: truth 2,1 → tie → 1; predictions 2,1 → tie → 1 (right)
        let probabilities = vec![p(1), p(1), p(0), p(2), p(1)];
        let targets = [0, 0, 1, 2, 1];
        let patient_of = [0, 0, 0, 2, 2];
        let result = patients(&probabilities, &targets, &patient_of, 3);
        assert_eq!(result.len(), 2, "patient 1 has no images");
        assert_eq!(result[0].patient, 0);
        assert_eq!((result[0].true_class, result[0].predicted_class), (0, 1));
        assert_eq!((result[0].images, result[0].errors), (3, 3));
        assert!(!result[0].correct());
        assert_eq!(result[1].patient, 2);
        assert_eq!(result[1].true_counts, [0, 1, 1]);
        assert_eq!((result[1].true_class, result[1].predicted_class), (1, 1));
        assert_eq!(result[1].errors, 0);
        assert!(result[1].correct());
    }
}
