//! A [`Query`] as one SELECT over the index — values only ever as bind parameters — and
//! its rows as C-FIND response identifiers.
//!
//! The conditions are written so the indexes of migrations/*/0003_find.sql serve them:
//! `=` and `IN` for exact values, GLOB (SQLite, case-sensitive) or LIKE (PostgreSQL) for
//! wild cards, LIKE on a NOCASE index (SQLite) or `lower()` (PostgreSQL) for Patient Name,
//! byte-wise comparison (`COLLATE "C"` on PostgreSQL) for date and time ranges, and a
//! correlated `EXISTS` on an indexed column for the keys of other tables (regions,
//! modalities): SQLite would always drive from an `id IN (SELECT ...)` list, even when a
//! week of study dates selects a hundred times fewer rows.

use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR};
use dicom_object::InMemDicomObject;
use sqlx::any::{AnyArguments, AnyRow};
use sqlx::{Any, Row};

use super::identifier::{Query, RequestedKey};
use super::keys::{self, ItemKey, Join, KeyImageField, Level, Matching, Source};
use super::matching::{self, Bounds, Condition, TextValue};
use crate::index::Backend;

#[derive(Debug, Clone, PartialEq)]
enum Bind {
    Text(String),
    Integer(i64),
}

/// The SELECT for one query, and where each requested key is in its rows.
#[derive(Debug)]
pub struct Select {
    pub sql: String,
    binds: Vec<Bind>,
    /// Per requested key (in `Query::keys` order): its column, if it is read from the row.
    slots: Vec<Option<usize>>,
    /// IMAGE level with key-image keys: the first of the columns `i.id, k.frame, k.label,
    /// k.smoothed_label (decoded along z), k.probabilities`; rows of one instance come together.
    key_images: Option<usize>,
}

impl Select {
    pub fn query(&self) -> sqlx::query::Query<'_, Any, AnyArguments<'_>> {
        // Not prepared and cached: each query has its own shape, and PostgreSQL plans an
        // unnamed statement with the values bound, so LIKE prefixes can use the indexes.
        let mut q = sqlx::query(&self.sql).persistent(false);
        for b in &self.binds {
            q = match b {
                Bind::Text(t) => q.bind(t.clone()),
                Bind::Integer(i) => q.bind(*i),
            };
        }
        q
    }

    pub fn bind_count(&self) -> usize {
        self.binds.len()
    }
}

struct Builder {
    backend: Backend,
    binds: Vec<Bind>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    Sensitive,
    Insensitive,
}

impl Builder {
    fn bind(&mut self, b: Bind) -> String {
        self.binds.push(b);
        format!("${}", self.binds.len())
    }

    fn text(&mut self, t: &str) -> String {
        self.bind(Bind::Text(t.to_string()))
    }

    /// `column` as compared byte-wise: DICOM dates and times sort as strings.
    fn bytewise(&self, column: &str) -> String {
        match self.backend {
            Backend::Postgres => format!("{column} COLLATE \"C\""),
            Backend::Sqlite => column.to_string(),
        }
    }

    fn any_of(parts: Vec<String>) -> String {
        if parts.len() == 1 {
            parts.into_iter().next().unwrap_or_default()
        } else {
            format!("({})", parts.join(" OR "))
        }
    }

    fn text_condition(&mut self, column: &str, values: &[TextValue], case: Case) -> String {
        let mut parts = Vec::new();
        let mut exact = Vec::new();
        for v in values {
            match (v, case, self.backend) {
                (TextValue::Exact(e), Case::Sensitive, _) => exact.push(e.as_str()),
                (TextValue::Wildcard(w), Case::Sensitive, Backend::Sqlite) => {
                    let p = self.text(&matching::glob_pattern(w));
                    parts.push(format!("{column} GLOB {p}"));
                }
                (TextValue::Wildcard(w), Case::Sensitive, Backend::Postgres) => {
                    let p = self.text(&matching::like_pattern(w));
                    parts.push(format!("{column} LIKE {p} ESCAPE '!'"));
                }
                (TextValue::Exact(t) | TextValue::Wildcard(t), Case::Insensitive, backend) => {
                    let p = self.text(&matching::like_pattern(t));
                    parts.push(match backend {
                        // SQLite's LIKE folds ASCII letters; the NOCASE index serves it.
                        Backend::Sqlite => format!("{column} LIKE {p} ESCAPE '!'"),
                        Backend::Postgres => {
                            format!("lower({column}) LIKE lower({p}) ESCAPE '!'")
                        }
                    });
                }
            }
        }
        match exact.as_slice() {
            [] => {}
            [one] => {
                let p = self.text(one);
                parts.insert(0, format!("{column} = {p}"));
            }
            many => {
                let ps: Vec<String> = many.iter().map(|e| self.text(e)).collect();
                parts.insert(0, format!("{column} IN ({})", ps.join(", ")));
            }
        }
        Self::any_of(parts)
    }

    fn range_condition(&mut self, column: &str, bounds: &[Bounds<String>]) -> String {
        let col = self.bytewise(column);
        let parts = bounds
            .iter()
            .map(|b| match (&b.from, &b.to) {
                (Some(f), Some(t)) if f == t => format!("{col} = {}", self.text(f)),
                (Some(f), Some(t)) => {
                    let (f, t) = (self.text(f), self.text(t));
                    format!("({col} >= {f} AND {col} <= {t})")
                }
                (Some(f), None) => format!("{col} >= {}", self.text(f)),
                (None, Some(t)) => format!("{col} <= {}", self.text(t)),
                (None, None) => "1 = 1".to_string(),
            })
            .collect();
        Self::any_of(parts)
    }

    fn millis_condition(&mut self, column: &str, bounds: &[Bounds<i64>]) -> String {
        let parts = bounds
            .iter()
            .map(|b| {
                let mut c = Vec::new();
                if let Some(f) = b.from {
                    c.push(format!("{column} >= {}", self.bind(Bind::Integer(f))));
                }
                if let Some(t) = b.to {
                    c.push(format!("{column} <= {}", self.bind(Bind::Integer(t))));
                }
                if c.is_empty() {
                    "1 = 1".to_string()
                } else {
                    format!("({})", c.join(" AND "))
                }
            })
            .collect();
        Self::any_of(parts)
    }

    fn list_condition(&mut self, column: &str, binds: Vec<Bind>) -> String {
        let ps: Vec<String> = binds.into_iter().map(|b| self.bind(b)).collect();
        if ps.len() == 1 {
            format!("{column} = {}", ps[0])
        } else {
            format!("{column} IN ({})", ps.join(", "))
        }
    }

    /// The condition on `column` for a key matched as `matching`, if it restricts anything.
    fn condition(&mut self, column: &str, matching: Matching, c: &Condition) -> Option<String> {
        let case = if matching == Matching::PersonName {
            Case::Insensitive
        } else {
            Case::Sensitive
        };
        Some(match c {
            Condition::Universal => return None,
            Condition::Text(values) => self.text_condition(column, values, case),
            Condition::Uids(list) => {
                self.list_condition(column, list.iter().cloned().map(Bind::Text).collect())
            }
            Condition::Integers(list) => {
                self.list_condition(column, list.iter().copied().map(Bind::Integer).collect())
            }
            Condition::Range(bounds) => self.range_condition(column, bounds),
            Condition::Millis(bounds) => self.millis_condition(column, bounds),
        })
    }

    fn key_condition(&mut self, rk: &RequestedKey) -> Option<String> {
        let key = rk.key;
        match key.matching {
            Matching::ReturnOnly => None,
            Matching::ModalitiesInStudy => {
                let inner = self.condition("x.modality", Matching::Text, &rk.condition)?;
                Some(format!(
                    "EXISTS (SELECT 1 FROM series x WHERE x.study_ref = st.id AND {inner})"
                ))
            }
            Matching::AnatomicRegions => {
                let parts: Vec<String> = rk
                    .items
                    .iter()
                    .filter_map(|(item, c)| self.condition(item.column, Matching::Text, c))
                    .collect();
                if parts.is_empty() {
                    return None;
                }
                Some(format!(
                    "EXISTS (SELECT 1 FROM series_regions r WHERE r.series_ref = s.id AND {})",
                    parts.join(" AND ")
                ))
            }
            m => {
                let column = match key.source {
                    Source::KeyImage(field) => keys::key_image_column(field)?,
                    _ => key.column()?,
                };
                self.condition(column, m, &rk.condition)
            }
        }
    }
}

fn from_clause(level: Level, join: Join) -> String {
    let mut from = match level {
        Level::Patient => "patients p".to_string(),
        Level::Study => "studies st JOIN patients p ON p.id = st.patient_ref".to_string(),
        Level::Series => "series s JOIN studies st ON st.id = s.study_ref \
                          JOIN patients p ON p.id = st.patient_ref"
            .to_string(),
        Level::Image => "instances i JOIN series s ON s.id = i.series_ref \
                         JOIN studies st ON st.id = s.study_ref \
                         JOIN patients p ON p.id = st.patient_ref"
            .to_string(),
    };
    if join >= Join::Labels {
        from.push_str(
            " LEFT JOIN series_labels sl ON sl.series_ref = s.id \
             AND sl.generation = s.label_generation",
        );
    }
    if join >= Join::KeyImages {
        from.push_str(
            " LEFT JOIN key_images k ON k.series_label_ref = sl.id \
             AND k.sop_instance_uid = i.sop_instance_uid",
        );
    }
    from
}

/// The SELECT for `query`.
pub fn build(query: &Query, backend: Backend) -> Select {
    let mut b = Builder {
        backend,
        binds: Vec::new(),
    };
    let join = query
        .keys
        .iter()
        .map(|k| k.key.join)
        .max()
        .unwrap_or(Join::None);
    let id = match query.level {
        Level::Patient => "p.id",
        Level::Study => "st.id",
        Level::Series => "s.id",
        Level::Image => "i.id",
    };
    // Always one column, so a query that returns no key still selects something.
    let mut columns = vec![id.to_string()];
    let mut slots = Vec::with_capacity(query.keys.len());
    let mut conditions = Vec::new();
    for rk in &query.keys {
        if let Some(c) = b.key_condition(rk) {
            conditions.push(c);
        }
        let column = match rk.key.source {
            Source::Text(c)
            | Source::UpperText(c)
            | Source::Integer(c)
            | Source::EpochMillis(c) => Some(c.to_string()),
            Source::Modalities => Some(match backend {
                Backend::Sqlite => "(SELECT group_concat(DISTINCT x.modality) FROM series x \
                                    WHERE x.study_ref = st.id)"
                    .to_string(),
                Backend::Postgres => "(SELECT string_agg(DISTINCT x.modality, ',') FROM series x \
                                      WHERE x.study_ref = st.id)"
                    .to_string(),
            }),
            Source::Regions => Some("sl.anatomic_regions".to_string()),
            Source::KeyImage(_) | Source::RetrieveAeTitle | Source::Online => None,
        };
        slots.push(column.map(|c| {
            columns.push(c);
            columns.len() - 1
        }));
    }
    let key_images = (join == Join::KeyImages).then(|| {
        let first = columns.len();
        columns.extend(
            [
                "i.id",
                "k.frame",
                "k.label",
                "k.smoothed_label",
                "k.probabilities",
            ]
            .map(str::to_string),
        );
        first
    });
    let mut sql = format!(
        "SELECT {} FROM {}",
        columns.join(", "),
        from_clause(query.level, join)
    );
    if !conditions.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conditions.join(" AND "));
    }
    if key_images.is_some() {
        // The key-image rows of one instance must be adjacent to become one answer.
        sql.push_str(" ORDER BY i.id, k.frame");
    }
    Select {
        sql,
        binds: b.binds,
        slots,
        key_images,
    }
}

/// One key-image row of an instance.
#[derive(Debug, Clone, PartialEq)]
struct KeyImage {
    frame: i64,
    label: String,
    smoothed_label: String,
    probability: Option<f64>,
}

/// Turns rows into answers; at IMAGE level with key-image keys, the rows of one instance
/// (one per key frame) into one answer.
pub struct Assembler<'a> {
    select: &'a Select,
    query: &'a Query,
    ae_title: &'a str,
    pending: Option<(i64, AnyRow, Vec<KeyImage>)>,
}

impl<'a> Assembler<'a> {
    pub fn new(select: &'a Select, query: &'a Query, ae_title: &'a str) -> Self {
        Self {
            select,
            query,
            ae_title,
            pending: None,
        }
    }

    /// The next row; an answer when one is complete.
    pub fn push(&mut self, row: AnyRow) -> Result<Option<InMemDicomObject>, sqlx::Error> {
        let Some(first) = self.select.key_images else {
            return self.answer(&row, &[]).map(Some);
        };
        let instance: i64 = row.try_get(first)?;
        let key_image = read_key_image(&row, first)?;
        if let Some((id, _, frames)) = &mut self.pending {
            if *id == instance {
                frames.extend(key_image);
                return Ok(None);
            }
        }
        let done = self
            .pending
            .replace((instance, row, key_image.into_iter().collect()));
        match done {
            Some((_, row, frames)) => self.answer(&row, &frames).map(Some),
            None => Ok(None),
        }
    }

    /// The last answer, once the rows have run out.
    pub fn finish(&mut self) -> Result<Option<InMemDicomObject>, sqlx::Error> {
        match self.pending.take() {
            Some((_, row, frames)) => self.answer(&row, &frames).map(Some),
            None => Ok(None),
        }
    }

    fn answer(&self, row: &AnyRow, frames: &[KeyImage]) -> Result<InMemDicomObject, sqlx::Error> {
        let mut a = Answer::default();
        a.text(
            Tag(0x0008, 0x0052),
            VR::CS,
            Some(self.query.level.as_str().into()),
        );
        for (rk, slot) in self.query.keys.iter().zip(&self.select.slots) {
            let key = rk.key;
            let tag = self.query.answer_tag(key);
            let text = |row: &AnyRow| -> Result<Option<String>, sqlx::Error> {
                match slot {
                    Some(i) => row.try_get::<Option<String>, _>(*i),
                    None => Ok(None),
                }
            };
            let integer = |row: &AnyRow| -> Result<Option<i64>, sqlx::Error> {
                match slot {
                    Some(i) => row.try_get::<Option<i64>, _>(*i),
                    None => Ok(None),
                }
            };
            match key.source {
                Source::Text(_) => a.text(tag, key.vr, text(row)?),
                Source::UpperText(_) => a.text(tag, key.vr, text(row)?.map(|t| t.to_uppercase())),
                Source::Integer(_) => a.integer(tag, key.vr, integer(row)?),
                Source::EpochMillis(_) => {
                    a.text(tag, key.vr, integer(row)?.map(matching::format_datetime))
                }
                Source::Modalities => a.text(
                    tag,
                    key.vr,
                    text(row)?.map(|m| m.split(',').collect::<Vec<_>>().join("\\")),
                ),
                Source::Regions => a.regions(tag, rk, text(row)?.as_deref()),
                Source::KeyImage(field) => {
                    let values: Vec<String> = frames
                        .iter()
                        .map(|k| match field {
                            KeyImageField::Label => k.label.clone(),
                            KeyImageField::SmoothedLabel => k.smoothed_label.clone(),
                            KeyImageField::FrameNumber => (k.frame + 1).to_string(),
                            KeyImageField::Probability => {
                                k.probability.map(format_ds).unwrap_or_default()
                            }
                        })
                        .collect();
                    a.text(tag, key.vr, (!values.is_empty()).then(|| values.join("\\")));
                }
                Source::RetrieveAeTitle => a.text(tag, key.vr, Some(self.ae_title.to_string())),
                Source::Online => a.text(tag, key.vr, Some("ONLINE".into())),
            }
        }
        if self.query.has_private_keys() {
            let block = self.query.private_block.unwrap_or(keys::PRIVATE_BLOCK);
            a.text(
                Tag(keys::PRIVATE_GROUP, u16::from(block)),
                VR::LO,
                Some(keys::PRIVATE_CREATOR.into()),
            );
        }
        Ok(a.finish())
    }
}

fn read_key_image(row: &AnyRow, first: usize) -> Result<Option<KeyImage>, sqlx::Error> {
    let Some(frame) = row.try_get::<Option<i64>, _>(first + 1)? else {
        return Ok(None);
    };
    let label: String = row
        .try_get::<Option<String>, _>(first + 2)?
        .unwrap_or_default();
    let smoothed_label = row
        .try_get::<Option<String>, _>(first + 3)?
        .unwrap_or_default();
    let probabilities: Option<String> = row.try_get(first + 4)?;
    let probability = probabilities
        .and_then(|p| serde_json::from_str::<serde_json::Value>(&p).ok())
        .and_then(|p| p.get(&label).and_then(serde_json::Value::as_f64));
    Ok(Some(KeyImage {
        frame,
        label,
        smoothed_label,
        probability,
    }))
}

/// A DS value (at most 16 characters) for a probability.
fn format_ds(p: f64) -> String {
    let s = format!("{p:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() {
        "0".into()
    } else {
        s.to_string()
    }
}

/// A response identifier being built; remembers whether any value needs UTF-8.
struct Answer {
    object: InMemDicomObject,
    non_ascii: bool,
}

impl Default for Answer {
    fn default() -> Self {
        Answer {
            object: InMemDicomObject::new_empty(),
            non_ascii: false,
        }
    }
}

impl Answer {
    fn text(&mut self, tag: Tag, vr: VR, value: Option<String>) {
        let value = match value {
            Some(v) => {
                self.non_ascii |= !v.is_ascii();
                PrimitiveValue::from(v)
            }
            None => PrimitiveValue::Empty,
        };
        self.object.put(DataElement::new(tag, vr, value));
    }

    /// IS as text; US (Rows, Columns) as the binary value it is.
    fn integer(&mut self, tag: Tag, vr: VR, value: Option<i64>) {
        let value = match (vr, value) {
            (_, None) => PrimitiveValue::Empty,
            (VR::US, Some(n)) => match u16::try_from(n) {
                Ok(n) => PrimitiveValue::from(n),
                Err(_) => PrimitiveValue::Empty,
            },
            (_, Some(n)) => PrimitiveValue::from(n.to_string()),
        };
        self.object.put(DataElement::new(tag, vr, value));
    }

    /// Sequence Matching's answer: the matching items, with the item keys asked for.
    fn regions(&mut self, tag: Tag, rk: &RequestedKey, json: Option<&str>) {
        let regions: Vec<serde_json::Value> = json
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default();
        let wanted: Vec<&ItemKey> = if rk.items.is_empty() {
            keys::REGION_ITEM_KEYS.iter().collect()
        } else {
            rk.items.iter().map(|(k, _)| *k).collect()
        };
        let field = |r: &serde_json::Value, k: &ItemKey| {
            r.get(k.field)
                .and_then(serde_json::Value::as_str)
                .map(str::to_string)
        };
        let mut items = Vec::new();
        for r in &regions {
            let matches = rk
                .items
                .iter()
                .all(|(k, c)| matching::text_matches(c, field(r, k).as_deref()));
            if !matches {
                continue;
            }
            let mut item = Answer::default();
            for k in &wanted {
                item.text(k.tag, k.vr, field(r, k));
            }
            self.non_ascii |= item.non_ascii;
            items.push(item.object);
        }
        self.object
            .put(DataElement::new(tag, VR::SQ, DataSetSequence::from(items)));
    }

    fn finish(mut self) -> InMemDicomObject {
        if self.non_ascii {
            self.object.put(DataElement::new(
                Tag(0x0008, 0x0005),
                VR::CS,
                PrimitiveValue::from("ISO_IR 192"),
            ));
        }
        self.object
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dimse::find::identifier;
    use crate::dimse::find::keys::Model;
    use dicom_encoding::TransferSyntaxIndex;
    use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

    fn query(level: &str, keys: &[(Tag, VR, &str)]) -> Query {
        let mut elements = vec![DataElement::new(
            Tag(0x0008, 0x0052),
            VR::CS,
            PrimitiveValue::from(level),
        )];
        for (t, vr, v) in keys {
            elements.push(DataElement::new(*t, *vr, PrimitiveValue::from(*v)));
        }
        let obj = InMemDicomObject::from_element_iter(elements);
        let ts = TransferSyntaxRegistry.get("1.2.840.10008.1.2.1").unwrap();
        let mut bytes = Vec::new();
        obj.write_dataset_with_ts(&mut bytes, ts).unwrap();
        identifier::parse(&bytes, "1.2.840.10008.1.2.1", Model::StudyRoot).unwrap()
    }

    #[test]
    fn values_are_bound_never_spliced() {
        let evil = "x' OR '1'='1";
        let q = query(
            "SERIES",
            &[
                (Tag(0x0008, 0x103E), VR::LO, evil),
                (Tag(0x0010, 0x0010), VR::PN, "o'brien*"),
                (Tag(0x0008, 0x0020), VR::DA, "20240101-20240131"),
                (Tag(0x0020, 0x000E), VR::UI, "1.2\\1.3"),
            ],
        );
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let s = build(&q, backend);
            assert!(
                !s.sql.contains("brien") && !s.sql.contains("'1'"),
                "{}",
                s.sql
            );
            assert!(!s.sql.contains("2024"), "{}", s.sql);
            assert_eq!(s.bind_count(), 6, "{}", s.sql);
        }
        let sqlite = build(&q, Backend::Sqlite);
        assert!(
            sqlite.sql.contains("s.series_description = $3"),
            "{}",
            sqlite.sql
        );
        assert!(
            sqlite.sql.contains("p.patient_name LIKE $4 ESCAPE '!'"),
            "{}",
            sqlite.sql
        );
        assert!(sqlite
            .sql
            .contains("st.study_date >= $1 AND st.study_date <= $2"));
        assert!(sqlite.sql.contains("s.series_uid IN ($5, $6)"));
        let pg = build(&q, Backend::Postgres);
        assert!(pg
            .sql
            .contains("lower(p.patient_name) LIKE lower($4) ESCAPE '!'"));
        assert!(pg.sql.contains("st.study_date COLLATE \"C\" >= $1"));
    }

    #[test]
    fn wildcards_per_backend() {
        let q = query("SERIES", &[(Tag(0x0008, 0x103E), VR::LO, "Thorax*")]);
        let s = build(&q, Backend::Sqlite);
        assert!(
            s.sql.ends_with("WHERE s.series_description GLOB $1"),
            "{}",
            s.sql
        );
        assert_eq!(s.binds, [Bind::Text("Thorax*".into())]);
        let p = build(&q, Backend::Postgres);
        assert!(
            p.sql
                .ends_with("WHERE s.series_description LIKE $1 ESCAPE '!'"),
            "{}",
            p.sql
        );
        assert_eq!(p.binds, [Bind::Text("Thorax%".into())]);
    }

    #[test]
    fn joins_only_when_needed() {
        let q = query("SERIES", &[(Tag(0x0018, 0x0015), VR::CS, "CHEST")]);
        let s = build(&q, Backend::Sqlite);
        assert!(!s.sql.contains("series_labels"), "{}", s.sql);
        let q = query("IMAGE", &[(Tag(0x0008, 0x0018), VR::UI, "")]);
        assert!(!build(&q, Backend::Sqlite).sql.contains("key_images"));
    }

    #[test]
    fn probabilities_fit_ds() {
        assert_eq!(format_ds(0.5), "0.5");
        assert_eq!(format_ds(1.0), "1");
        assert_eq!(format_ds(0.0), "0");
        assert_eq!(format_ds(0.123456789), "0.123457");
    }
}
