//! Figures per group of patients (`anatomy-node eval --groups FILE`): per source or scanner,
//! and per class within each, with the mean and the worst group. The grouping file is a CSV
//! with a header: one row per case, a key column and one or more group columns.
//! `../shared/data/sources.csv` is one as it stands (`case_id` → `source`, or `manufacturer`
//! and `model`).
//!
//! **The join.** The dataset's `manifest.csv` holds no case id, only `patient_key`, which
//! `anatomy-node dataset build` derives from the labels' `case_id` by
//! [`crate::dataset::patient_key`] (the first 16 hex digits of its SHA-256). A key value of
//! the grouping file matches a patient when it is that patient's case id (hashed the same way)
//! or its `patient_key` itself (for datasets written by `anatomy-node mine`, whose keys are
//! keyed hashes: write their keys into the file as they are).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::data::Row;
use super::metrics;
use super::report::Ordered;
use super::EvalError;
use crate::dataset::patient_key;

/// Default key column (`../shared/data/sources.csv`).
pub const DEFAULT_KEY: &str = "case_id";
/// Default group column.
pub const DEFAULT_GROUP_BY: &str = "source";
/// Joins the values of several group columns into one group name.
pub const JOIN: &str = " / ";
const MATCH_RULE: &str = "a key value matches a patient when it is the patient's case id \
     (patient_key = first 16 hex digits of SHA-256 of the case id, as `dataset build` derives \
     it) or its patient_key as written in manifest.csv";
const DEFINITION: &str = "per group: its scored images' slice error (share whose most probable \
     class is not the label) and per-class error (1 - recall); mean_error: unweighted mean over \
     the groups with scored images; worst: the group with the highest slice error (the first \
     in file order on a tie); per_class_mean and per_class_worst: the same over the groups \
     with scored images of the class";

/// Where the groups come from (`--groups`, `--group-key`, `--group-by`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupOptions {
    pub file: PathBuf,
    /// Column holding the case id (or the patient key).
    pub key: String,
    /// Columns whose values, joined by [`JOIN`], name the group.
    pub by: Vec<String>,
}

/// A grouping file, read and checked.
#[derive(Debug, Clone)]
pub struct Grouping {
    pub file: PathBuf,
    pub key_column: String,
    pub group_columns: Vec<String>,
    /// Group names in the order they first appear in the file.
    order: Vec<String>,
    /// Case id and its patient key → (key value as written, group, line).
    by_key: HashMap<String, (String, String, u64)>,
}

fn problem(path: &Path, problem: impl Into<String>) -> EvalError {
    EvalError::Groups {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

impl Grouping {
    /// Reads the grouping file; errors name the file, the line and the column.
    pub fn read(options: &GroupOptions) -> Result<Grouping, EvalError> {
        let path = options.file.as_path();
        let bytes =
            std::fs::read(path).map_err(|e| problem(path, format!("cannot be read: {e}")))?;
        Self::parse(options, &bytes)
    }

    /// [`Grouping::read`] on the file's bytes.
    pub fn parse(options: &GroupOptions, bytes: &[u8]) -> Result<Grouping, EvalError> {
        let path = options.file.as_path();
        if options.by.is_empty() {
            return Err(problem(path, "no group column given (--group-by)"));
        }
        let mut reader = csv::Reader::from_reader(bytes);
        let header: Vec<String> = reader
            .headers()
            .map_err(|e| problem(path, format!("line 1: {e}")))?
            .iter()
            .map(|h| h.trim().trim_start_matches('\u{feff}').to_string())
            .collect();
        let column = |name: &str, option: &str| -> Result<usize, EvalError> {
            header.iter().position(|h| h == name).ok_or_else(|| {
                problem(
                    path,
                    format!(
                        "line 1: no column `{name}` (the header has {}); choose the column with {option}",
                        header.iter().map(|h| format!("`{h}`")).collect::<Vec<_>>().join(", ")
                    ),
                )
            })
        };
        let key_index = column(&options.key, "--group-key")?;
        let group_indices = options
            .by
            .iter()
            .map(|c| column(c, "--group-by"))
            .collect::<Result<Vec<_>, _>>()?;
        let mut order: Vec<String> = Vec::new();
        let mut by_key: HashMap<String, (String, String, u64)> = HashMap::new();
        for record in reader.records() {
            let record = record.map_err(|e| {
                let line = e.position().map_or(0, |p| p.line());
                problem(path, format!("line {line}: {e}"))
            })?;
            let line = record.position().map_or(0, |p| p.line());
            let value = |index: usize| record.get(index).unwrap_or("").trim();
            let key = value(key_index).to_string();
            if key.is_empty() {
                return Err(problem(
                    path,
                    format!(
                        "line {line}, column `{}`: empty (every row needs a case id or patient key)",
                        options.key
                    ),
                ));
            }
            // an empty group cell (e.g. no scanner model in an anonymised header) is a value
            // of its own, named after the column
            let group = group_indices
                .iter()
                .zip(&options.by)
                .map(|(&i, name)| match value(i) {
                    "" => format!("(no {name})"),
                    v => v.to_string(),
                })
                .collect::<Vec<_>>()
                .join(JOIN);
            for lookup in [key.clone(), patient_key(&key)] {
                if let Some((_, earlier, earlier_line)) = by_key.get(&lookup) {
                    if *earlier != group {
                        return Err(problem(
                            path,
                            format!(
                                "line {line}, column `{}`: {key:?} is in group {group:?} here but in \
                                 {earlier:?} on line {earlier_line}",
                                options.key
                            ),
                        ));
                    }
                    continue;
                }
                by_key.insert(lookup, (key.clone(), group.clone(), line));
            }
            if !order.contains(&group) {
                order.push(group);
            }
        }
        if by_key.is_empty() {
            return Err(problem(path, "no row after the header"));
        }
        Ok(Grouping {
            file: path.to_path_buf(),
            key_column: options.key.clone(),
            group_columns: options.by.clone(),
            order,
            by_key,
        })
    }

    /// The key value (case id) and group of a patient of the manifest.
    pub fn lookup(&self, patient_key: &str) -> Option<(&str, &str)> {
        self.by_key
            .get(patient_key)
            .map(|(key, group, _)| (key.as_str(), group.as_str()))
    }

    /// Every selected row must have a group; otherwise the error says how many patients and
    /// images have none, and which.
    pub fn check_covers(&self, rows: &[&Row], dataset: &Path) -> Result<(), EvalError> {
        let mut missing: BTreeMap<&str, usize> = BTreeMap::new();
        for row in rows {
            if self.lookup(&row.patient_key).is_none() {
                *missing.entry(row.patient_key.as_str()).or_default() += 1;
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let patients: BTreeSet<&str> = rows.iter().map(|r| r.patient_key.as_str()).collect();
        let images: usize = missing.values().sum();
        let shown: Vec<String> = missing
            .iter()
            .take(20)
            .map(|(key, n)| format!("{key} ({n} images)"))
            .collect();
        let more = if missing.len() > shown.len() {
            format!(" and {} more", missing.len() - shown.len())
        } else {
            String::new()
        };
        Err(problem(
            &self.file,
            format!(
                "{} of the {} patients ({images} of the {} images) in the scored splits of dataset \
                 {} have no row here (column `{}`; {MATCH_RULE}): patient_key {}{more}",
                missing.len(),
                patients.len(),
                rows.len(),
                dataset.display(),
                self.key_column,
                shown.join(", ")
            ),
        ))
    }
}

/// Scored images of one class within a group.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassCell {
    pub patients: usize,
    pub images: usize,
    pub errors: usize,
    pub error: f64,
    /// What its wrong images were called, count per predicted class.
    pub called: Ordered<usize>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GroupRow {
    pub group: String,
    /// Patients with selected images, and their key values (case ids) in the grouping file.
    pub patients: usize,
    pub cases: Vec<String>,
    /// Images of the selected splits (scored or not).
    pub images: usize,
    pub scored: usize,
    pub errors: usize,
    /// Slice error of the scored images; null when there are none.
    pub error: Option<f64>,
    /// Classes with scored images, in the model's class order.
    pub per_class: Ordered<ClassCell>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Extreme {
    pub group: String,
    pub error: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassSummary {
    /// Groups with scored images of the class.
    pub groups: usize,
    pub mean_error: f64,
    pub worst: Extreme,
}

/// `metrics.json` `groups`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GroupSection {
    pub file: String,
    pub key_column: String,
    pub group_columns: Vec<String>,
    pub match_rule: &'static str,
    pub definition: &'static str,
    /// Groups with selected images, in the order they first appear in the file.
    pub groups: Vec<GroupRow>,
    /// Groups with scored images (those averaged).
    pub scored_groups: usize,
    pub mean_error: Option<f64>,
    pub worst: Option<Extreme>,
    pub per_class_mean: Ordered<ClassSummary>,
    /// patient_key → key value (case id) of every grouped patient, for the summary's tables.
    #[serde(skip)]
    pub case_of: BTreeMap<String, String>,
}

/// The per-group figures of the scored rows (`scored[i]` has `probabilities[i]`).
pub fn group_section(
    grouping: &Grouping,
    selected: &[&Row],
    scored: &[&Row],
    probabilities: &[Vec<f32>],
    classes: &[String],
) -> GroupSection {
    let group_of = |row: &Row| grouping.lookup(&row.patient_key).map_or("", |(_, g)| g);
    let mut groups = Vec::new();
    for name in &grouping.order {
        let mine: Vec<&Row> = selected
            .iter()
            .copied()
            .filter(|r| group_of(r) == name)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let cases: BTreeSet<String> = mine
            .iter()
            .filter_map(|r| grouping.lookup(&r.patient_key).map(|(k, _)| k.to_string()))
            .collect();
        let mut per_class = Vec::new();
        let (mut total, mut wrong) = (0, 0);
        for (c, class) in classes.iter().enumerate() {
            let mut cell_patients = BTreeSet::new();
            let (mut images, mut errors) = (0, 0);
            let mut called = vec![0usize; classes.len()];
            for (row, p) in scored.iter().zip(probabilities) {
                if group_of(row) != name || row.label != *class {
                    continue;
                }
                images += 1;
                cell_patients.insert(row.patient_key.as_str());
                let predicted = metrics::argmax(p);
                if predicted != c {
                    errors += 1;
                    called[predicted] += 1;
                }
            }
            if images == 0 {
                continue;
            }
            total += images;
            wrong += errors;
            per_class.push((
                class.clone(),
                ClassCell {
                    patients: cell_patients.len(),
                    images,
                    errors,
                    error: errors as f64 / images as f64,
                    called: Ordered(
                        classes
                            .iter()
                            .zip(&called)
                            .filter(|(_, n)| **n > 0)
                            .map(|(k, n)| (k.clone(), *n))
                            .collect(),
                    ),
                },
            ));
        }
        groups.push(GroupRow {
            group: name.clone(),
            patients: mine
                .iter()
                .map(|r| r.patient_key.as_str())
                .collect::<BTreeSet<_>>()
                .len(),
            cases: cases.into_iter().collect(),
            images: mine.len(),
            scored: total,
            errors: wrong,
            error: (total > 0).then(|| wrong as f64 / total as f64),
            per_class: Ordered(per_class),
        });
    }
    let errors: Vec<(&str, f64)> = groups
        .iter()
        .filter_map(|g| g.error.map(|e| (g.group.as_str(), e)))
        .collect();
    let per_class_mean = Ordered(
        classes
            .iter()
            .filter_map(|class| {
                let cells: Vec<(&str, f64)> = groups
                    .iter()
                    .filter_map(|g| g.per_class.get(class).map(|c| (g.group.as_str(), c.error)))
                    .collect();
                summarise(&cells).map(|(mean, worst)| {
                    (
                        class.clone(),
                        ClassSummary {
                            groups: cells.len(),
                            mean_error: mean,
                            worst,
                        },
                    )
                })
            })
            .collect(),
    );
    let summary = summarise(&errors);
    let case_of = selected
        .iter()
        .filter_map(|r| {
            grouping
                .lookup(&r.patient_key)
                .map(|(k, _)| (r.patient_key.clone(), k.to_string()))
        })
        .collect();
    GroupSection {
        file: grouping.file.display().to_string(),
        key_column: grouping.key_column.clone(),
        group_columns: grouping.group_columns.clone(),
        match_rule: MATCH_RULE,
        definition: DEFINITION,
        scored_groups: errors.len(),
        mean_error: summary.as_ref().map(|(m, _)| *m),
        worst: summary.map(|(_, w)| w),
        per_class_mean,
        groups,
        case_of,
    }
}

/// Mean and worst (first on a tie) of (group, error) pairs; none when empty.
fn summarise(errors: &[(&str, f64)]) -> Option<(f64, Extreme)> {
    let (first, rest) = errors.split_first()?;
    let worst = rest
        .iter()
        .fold(*first, |w, e| if e.1 > w.1 { *e } else { w });
    let mean = errors.iter().map(|(_, e)| e).sum::<f64>() / errors.len() as f64;
    Some((
        mean,
        Extreme {
            group: worst.0.to_string(),
            error: worst.1,
        },
    ))
}

fn percent(x: f64) -> String {
    format!("{:.2} %", 100.0 * x)
}

fn called_text(called: &Ordered<usize>) -> String {
    called
        .0
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl GroupSection {
    /// The summary's block.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let mean = self.mean_error.map_or("n/a".into(), percent);
        let worst = self.worst.as_ref().map_or("n/a".into(), |w| {
            format!("{} ({})", percent(w.error), w.group)
        });
        let _ = writeln!(
            s,
            "groups:   {} of {} (key `{}`): {} groups, {} with scored images; slice error mean {mean} over groups, worst {worst}",
            self.group_columns.join(JOIN),
            self.file,
            self.key_column,
            self.groups.len(),
            self.scored_groups,
        );
        let width = self
            .groups
            .iter()
            .map(|g| g.group.chars().count())
            .max()
            .unwrap_or(5)
            .max(5);
        let _ = writeln!(
            s,
            "  {:<width$}  {:>8}  {:>6}  {:>6}  {:>5}  {:>8}  per class: wrong/scored (called instead)",
            "group", "patients", "images", "scored", "wrong", "error"
        );
        for g in &self.groups {
            let cells: Vec<String> = g
                .per_class
                .0
                .iter()
                .map(|(class, c)| {
                    if c.errors == 0 {
                        format!("{class} 0/{}", c.images)
                    } else {
                        format!(
                            "{class} {}/{} ({})",
                            c.errors,
                            c.images,
                            called_text(&c.called)
                        )
                    }
                })
                .collect();
            let line = format!(
                "  {:<width$}  {:>8}  {:>6}  {:>6}  {:>5}  {:>8}  {}",
                g.group,
                g.patients,
                g.images,
                g.scored,
                g.errors,
                g.error.map_or("n/a".into(), percent),
                cells.join("; ")
            );
            let _ = writeln!(s, "{}", line.trim_end());
        }
        let classes: Vec<String> = self
            .per_class_mean
            .0
            .iter()
            .map(|(class, c)| {
                format!(
                    "{class} {} (worst {} {}, {} groups)",
                    percent(c.mean_error),
                    percent(c.worst.error),
                    c.worst.group,
                    c.groups
                )
            })
            .collect();
        if !classes.is_empty() {
            let _ = writeln!(s, "  per class, mean over groups: {}", classes.join("; "));
        }
        s
    }

    /// `groups.csv`: one row per group (`class` = `all`) and one per group and class.
    pub fn write_csv(&self, path: &Path) -> io::Result<()> {
        let mut writer = csv::Writer::from_writer(io::BufWriter::new(std::fs::File::create(path)?));
        writer.write_record([
            "group",
            "class",
            "patients",
            "images",
            "scored",
            "errors",
            "error",
            "called_instead",
        ])?;
        let number = |x: Option<f64>| x.map_or(String::new(), |e| format!("{e:.6}"));
        for g in &self.groups {
            let called: BTreeMap<&str, usize> = g
                .per_class
                .0
                .iter()
                .flat_map(|(_, c)| c.called.0.iter().map(|(k, n)| (k.as_str(), *n)))
                .fold(BTreeMap::new(), |mut m, (k, n)| {
                    *m.entry(k).or_default() += n;
                    m
                });
            let called = called
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join("; ");
            writer.write_record([
                g.group.clone(),
                "all".into(),
                g.patients.to_string(),
                g.images.to_string(),
                g.scored.to_string(),
                g.errors.to_string(),
                number(g.error),
                called,
            ])?;
            for (class, c) in &g.per_class.0 {
                writer.write_record([
                    g.group.clone(),
                    class.clone(),
                    c.patients.to_string(),
                    c.images.to_string(),
                    c.images.to_string(),
                    c.errors.to_string(),
                    number(Some(c.error)),
                    called_text(&c.called).replace(", ", "; "),
                ])?;
            }
        }
        writer.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(key: &str, by: &[&str]) -> GroupOptions {
        GroupOptions {
            file: PathBuf::from("groups.csv"),
            key: key.into(),
            by: by.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn case_ids_and_patient_keys_both_match() {
        let text =
            "case_id,source,model\nokbp-pt1,OpenKBP,A\nk-direct,Mined,B\nokbp-pt2,OpenKBP,\n";
        let g = Grouping::parse(&options("case_id", &["source", "model"]), text.as_bytes())
            .expect("valid");
        assert_eq!(
            g.lookup(&patient_key("okbp-pt1")),
            Some(("okbp-pt1", "OpenKBP / A"))
        );
        assert_eq!(g.lookup("k-direct"), Some(("k-direct", "Mined / B")));
        assert_eq!(g.lookup("nobody"), None);
        assert_eq!(
            g.lookup(&patient_key("okbp-pt2")).map(|(_, g)| g),
            Some("OpenKBP / (no model)")
        );
        assert_eq!(
            g.order,
            ["OpenKBP / A", "Mined / B", "OpenKBP / (no model)"]
        );
    }

    #[test]
    fn problems_name_the_line_and_column() {
        let err = |key: &str, by: &[&str], text: &str| {
            Grouping::parse(&options(key, by), text.as_bytes())
                .expect_err("invalid")
                .to_string()
        };
        let e = err("case_id", &["scanner"], "case_id,source\na,x\n");
        assert!(e.contains("groups.csv: line 1: no column `scanner`"), "{e}");
        assert!(
            e.contains("`case_id`, `source`") && e.contains("--group-by"),
            "{e}"
        );
        let e = err("case", &["source"], "case_id,source\na,x\n");
        assert!(
            e.contains("no column `case`") && e.contains("--group-key"),
            "{e}"
        );
        let e = err("case_id", &["source"], "case_id,source\na,x\n,y\n");
        assert!(e.contains("line 3, column `case_id`: empty"), "{e}");
        let e = err("case_id", &["source"], "case_id,source\na,x\nb,y\na,y\n");
        assert!(
            e.contains("line 4, column `case_id`") && e.contains("line 2"),
            "{e}"
        );
        let e = err("case_id", &["source"], "case_id,source\na,x\nb,y,z\n");
        assert!(e.contains("line 3"), "{e}");
        let e = err("case_id", &["source"], "case_id,source\n");
        assert!(e.contains("no row"), "{e}");
    }

    #[test]
    fn mean_and_worst_take_the_first_on_a_tie() {
        let (mean, worst) = summarise(&[("a", 0.5), ("b", 0.1), ("c", 0.5)]).expect("some");
        assert!((mean - 1.1 / 3.0).abs() < 1e-12);
        assert_eq!(worst.group, "a");
        assert!(summarise(&[]).is_none());
    }
}
