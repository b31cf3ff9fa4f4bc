//! Anonymised patient keys and the train/val/test split by patient.
//!
//! The split is stratified by label with the iterative stratification of Sechidis et al.
//! (2011), at patient level: the rarest label is placed first, each of its patients going
//! to the split that still wants most patients of that label. With 10 liver patients and
//! 70/15/15, val and test then get liver patients instead of whatever a shuffle leaves
//! them. Ties are broken by the seeded order of the patients, so a seed gives one split.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// The splits, in manifest order.
pub const SPLITS: [&str; 3] = ["train", "val", "test"];

/// Labels that do not steer the stratification (kept in the data, never scored).
const UNSCORED: [&str; 1] = ["ambiguous"];

/// `hex(SHA-256(subject id))[..16]`: stable, and not the subject id.
pub fn patient_key(subject_id: &str) -> String {
    let digest = Sha256::digest(subject_id.as_bytes());
    hex::encode(digest)[..16].to_string()
}

/// Proportions of patients for train, val and test, e.g. `70,15,15`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SplitRatios([f64; 3]);

impl SplitRatios {
    pub fn new(train: f64, val: f64, test: f64) -> Option<Self> {
        let parts = [train, val, test];
        let valid =
            parts.iter().all(|p| p.is_finite() && *p >= 0.0) && parts.iter().sum::<f64>() > 0.0;
        valid.then_some(Self(parts))
    }

    /// Shares of each split, summing to 1.
    pub fn shares(&self) -> [f64; 3] {
        let total: f64 = self.0.iter().sum();
        self.0.map(|p| p / total)
    }
}

impl Default for SplitRatios {
    fn default() -> Self {
        Self([70.0, 15.0, 15.0])
    }
}

impl fmt::Display for SplitRatios {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{},{}", self.0[0], self.0[1], self.0[2])
    }
}

impl FromStr for SplitRatios {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<f64> = s
            .split(',')
            .map(|p| p.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{s:?}: {e}"))?;
        match parts[..] {
            [train, val, test] => Self::new(train, val, test)
                .ok_or_else(|| format!("{s:?}: need three non-negative numbers, not all zero")),
            _ => Err(format!("{s:?}: need three numbers: train,val,test")),
        }
    }
}

/// The split (index into [`SPLITS`]) of every patient. `patients` maps a patient key to
/// the labels its images carry.
pub fn assign_splits(
    patients: &BTreeMap<String, BTreeSet<String>>,
    ratios: SplitRatios,
    seed: u64,
) -> BTreeMap<String, usize> {
    let shares = ratios.shares();
    let order = seeded_order(patients.keys().cloned().collect(), seed);
    let scored = |key: &String| -> Vec<String> {
        patients[key]
            .iter()
            .filter(|l| !UNSCORED.contains(&l.as_str()))
            .cloned()
            .collect()
    };
    let mut wanted = Wanted::new(&order, shares, scored);
    let mut remaining: Vec<String> = order;
    let mut assigned = BTreeMap::new();
    while !remaining.is_empty() {
        let label = rarest_label(&remaining, &scored);
        let (now, later): (Vec<String>, Vec<String>) = remaining
            .into_iter()
            .partition(|p| label.as_ref().is_none_or(|l| scored(p).contains(l)));
        for patient in now {
            let split = wanted.best_split(label.as_deref());
            wanted.take(split, &scored(&patient));
            assigned.insert(patient, split);
        }
        remaining = later;
    }
    assigned
}

/// How many more patients each split wants, in total and per label.
struct Wanted {
    total: [f64; 3],
    per_label: BTreeMap<String, [f64; 3]>,
}

impl Wanted {
    fn new(
        patients: &[String],
        shares: [f64; 3],
        labels_of: impl Fn(&String) -> Vec<String>,
    ) -> Self {
        let mut per_label: BTreeMap<String, [f64; 3]> = BTreeMap::new();
        for patient in patients {
            for label in labels_of(patient) {
                let wanted = per_label.entry(label).or_insert([0.0; 3]);
                for (w, share) in wanted.iter_mut().zip(shares) {
                    *w += share;
                }
            }
        }
        Self {
            total: shares.map(|s| s * patients.len() as f64),
            per_label,
        }
    }

    /// The split that wants most patients of `label`, then most patients overall; the
    /// earlier split on a tie (train before val before test).
    fn best_split(&self, label: Option<&str>) -> usize {
        let by_label = label
            .and_then(|l| self.per_label.get(l))
            .copied()
            .unwrap_or([0.0; 3]);
        (0..3)
            .max_by(|&a, &b| {
                by_label[a]
                    .total_cmp(&by_label[b])
                    .then(self.total[a].total_cmp(&self.total[b]))
                    .then(b.cmp(&a))
            })
            .unwrap_or(0)
    }

    fn take(&mut self, split: usize, labels: &[String]) {
        self.total[split] -= 1.0;
        for label in labels {
            if let Some(wanted) = self.per_label.get_mut(label) {
                wanted[split] -= 1.0;
            }
        }
    }
}

/// The label held by the fewest remaining patients (the earliest label on a tie), or
/// `None` when no remaining patient has a scored label.
fn rarest_label(
    remaining: &[String],
    labels_of: &impl Fn(&String) -> Vec<String>,
) -> Option<String> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for patient in remaining {
        for label in labels_of(patient) {
            *counts.entry(label).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .min_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)))
        .map(|(label, _)| label)
}

/// `items` in an order fixed by `seed` (Fisher–Yates with SplitMix64), independent of the
/// order they came in.
fn seeded_order(mut items: Vec<String>, seed: u64) -> Vec<String> {
    items.sort();
    let mut state = seed;
    for i in (1..items.len()).rev() {
        let j = (split_mix64(&mut state) % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
    items
}

fn split_mix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patients(spec: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
        spec.iter()
            .map(|(p, labels)| {
                (
                    p.to_string(),
                    labels.iter().map(|l| l.to_string()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn patient_key_is_a_stable_sha256_prefix() {
        // the FIPS 180-2 test vector: SHA-256("abc") = ba7816bf8f01cfea4141...
        assert_eq!(patient_key("abc"), "ba7816bf8f01cfea");
        assert_eq!(patient_key("vhp-female").len(), 16);
        assert_ne!(patient_key("a"), patient_key("b"));
    }

    #[test]
    fn ratios_parse_and_normalise() {
        let r: SplitRatios = "70,15,15".parse().expect("valid");
        assert_eq!(r.shares(), [0.7, 0.15, 0.15]);
        assert_eq!(
            "1, 1, 2".parse::<SplitRatios>().map(|r| r.shares()),
            Ok([0.25, 0.25, 0.5])
        );
        assert!("70,30".parse::<SplitRatios>().is_err());
        assert!("0,0,0".parse::<SplitRatios>().is_err());
        assert!("-1,1,1".parse::<SplitRatios>().is_err());
        assert!("a,b,c".parse::<SplitRatios>().is_err());
    }

    #[test]
    fn rare_labels_reach_every_split() {
        // 3 liver patients among 20 lung patients: each split gets one liver patient.
        let mut spec: Vec<(String, Vec<&str>)> = (0..20)
            .map(|i| (format!("lung{i:02}"), vec!["lungs"]))
            .collect();
        spec.extend((0..3).map(|i| (format!("liver{i}"), vec!["liver", "lungs"])));
        let spec: Vec<(&str, &[&str])> = spec
            .iter()
            .map(|(p, l)| (p.as_str(), l.as_slice()))
            .collect();
        for seed in 0..20 {
            let split = assign_splits(
                &patients(&spec),
                SplitRatios::new(1.0, 1.0, 1.0).expect("ok"),
                seed,
            );
            let liver_splits: BTreeSet<usize> = split
                .iter()
                .filter(|(p, _)| p.starts_with("liver"))
                .map(|(_, s)| *s)
                .collect();
            assert_eq!(liver_splits.len(), 3, "seed {seed}: {split:?}");
        }
    }

    #[test]
    fn proportions_follow_the_ratios() {
        let spec: Vec<(String, Vec<&str>)> = (0..100)
            .map(|i| (format!("p{i:03}"), vec!["legs"]))
            .collect();
        let spec: Vec<(&str, &[&str])> = spec
            .iter()
            .map(|(p, l)| (p.as_str(), l.as_slice()))
            .collect();
        let split = assign_splits(&patients(&spec), SplitRatios::default(), 7);
        let count = |s| split.values().filter(|v| **v == s).count();
        assert_eq!((count(0), count(1), count(2)), (70, 15, 15));
    }

    #[test]
    fn same_seed_same_split_other_seed_other_split() {
        let spec: Vec<(String, Vec<&str>)> = (0..30)
            .map(|i| (format!("p{i:02}"), vec!["neck"]))
            .collect();
        let spec: Vec<(&str, &[&str])> = spec
            .iter()
            .map(|(p, l)| (p.as_str(), l.as_slice()))
            .collect();
        let p = patients(&spec);
        let a = assign_splits(&p, SplitRatios::default(), 1);
        assert_eq!(a, assign_splits(&p, SplitRatios::default(), 1));
        assert_ne!(a, assign_splits(&p, SplitRatios::default(), 2));
    }

    #[test]
    fn ambiguous_only_patients_are_still_assigned() {
        let p = patients(&[("a", &["ambiguous"]), ("b", &["lungs"])]);
        let split = assign_splits(&p, SplitRatios::default(), 0);
        assert_eq!(split.len(), 2);
    }
}
