//! QIDO-RS (PS3.18 10.6): searches for studies, series and instances, answered in DICOM
//! JSON from the index.
//!
//! A search is matched exactly as a C-FIND is: its query parameters become a C-FIND
//! identifier (keyword or tag → element, value as sent, `includefield` and the default
//! return attributes as empty keys), which goes through the C-FIND SCP's own parser
//! ([`identifier::parse`]: Single Value, List of UID, wild card, range, universal and
//! sequence matching, PS3.4 C.2.2.2), SQL builder ([`sql::build`]) and answer assembler
//! ([`sql::Assembler`]). Only paging (`limit`, `offset`, in index order) and the output
//! format are QIDO's own.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use dicom_core::dictionary::{DataDictionary, TagRange};
use dicom_core::header::Header as _;
use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use futures_util::StreamExt;

use super::error::WebError;
use super::request::{accepted, base_url, path_uid};
use super::{json, WebState};
use crate::dimse::find::identifier::{self, IdentifierError, Query as FindQuery};
use crate::dimse::find::keys::{self, Join, Level, Model};
use crate::dimse::find::sql;
use crate::private_block;

const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
const QUERY_RETRIEVE_LEVEL: Tag = Tag(0x0008, 0x0052);
const SPECIFIC_CHARACTER_SET: Tag = Tag(0x0008, 0x0005);
const RETRIEVE_URL: Tag = Tag(0x0008, 0x1190);
const STUDY_UID: Tag = Tag(0x0020, 0x000D);
const SERIES_UID: Tag = Tag(0x0020, 0x000E);
const SOP_INSTANCE_UID: Tag = Tag(0x0008, 0x0018);
pub const DICOM_JSON: &str = "application/dicom+json";

/// Returned for every study (PS3.18 Table 10.6.3-3, less what the index does not keep).
const STUDY_ATTRIBUTES: &[&str] = &[
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "InstanceAvailability",
    "ModalitiesInStudy",
    "StudyDescription",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
];

/// Returned for every series (Table 10.6.3-4), with what the node decided: the predicted
/// Body Part Examined, its coded regions, and the private block of the C-FIND SCP.
const SERIES_ATTRIBUTES: &[&str] = &[
    "StudyInstanceUID",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "SeriesInstanceUID",
    "NumberOfSeriesRelatedInstances",
    "BodyPartExamined",
    "AnatomicRegionSequence",
    "ReceivedBodyPartExamined",
    "PredictedDominantClass",
    "LabelStatus",
    "ModelVersion",
    "LabelledDateTime",
];

/// Returned for every instance (Table 10.6.3-5).
const INSTANCE_ATTRIBUTES: &[&str] = &[
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceAvailability",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
];

/// The study and series a search is restricted to by its path.
#[derive(Debug, Default, Clone)]
pub struct Scope {
    pub study: Option<String>,
    pub series: Option<String>,
}

/// A search, ready for the C-FIND machinery.
#[derive(Debug)]
pub struct Search {
    pub level: Level,
    pub identifier: InMemDicomObject,
    pub limit: u64,
    pub offset: u64,
    /// Said in Warning header fields: what was ignored.
    pub warnings: Vec<String>,
    /// An `accept` query parameter (PS3.18 8.3.3.1), checked like the Accept header.
    pub accept: Option<String>,
}

/// An attribute named in a query: its tag and the VR its key has here.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Attribute {
    tag: Tag,
    vr: VR,
}

/// A keyword (`PatientID`, or a name of our private block such as `LabelStatus`) or a tag
/// (`00100020`).
fn attribute(id: &str) -> Result<Attribute, WebError> {
    let id = id.trim();
    let tag = if id.len() == 8 && id.chars().all(|c| c.is_ascii_hexdigit()) {
        let group = u16::from_str_radix(&id[..4], 16).unwrap_or(0);
        let element = u16::from_str_radix(&id[4..], 16).unwrap_or(0);
        Tag(group, element)
    } else if let Some(key) = keys::KEYS.iter().find(|k| k.name == id) {
        key.tag
    } else if let Some(element) = private_block::by_name(id) {
        // An element of the block that is no search key (ClassProbabilities, ...): named,
        // so the search ignores it with a Warning like any other unsupported attribute.
        element.tag()
    } else {
        match StandardDataDictionary.by_name(id).map(|e| e.tag) {
            Some(TagRange::Single(tag)) => tag,
            _ => {
                return Err(WebError::BadRequest(format!(
                    "unknown attribute {id:?}: give a DICOM keyword (PatientID) or a tag (00100020)"
                )))
            }
        }
    };
    // Keys the C-FIND SCP supports have its VR; anything else goes as UN, so the parser
    // reports it as unsupported instead of failing on a value that does not fit a VR.
    let vr = keys::lookup(tag)
        .map(|k| k.vr)
        .or_else(|| keys::lookup_item(tag).map(|k| k.vr))
        .unwrap_or(VR::UN);
    Ok(Attribute { tag, vr })
}

/// A key's value as an element of the identifier.
fn element(
    attr: Attribute,
    value: &str,
    name: &str,
) -> Result<DataElement<InMemDicomObject>, WebError> {
    let value = value.trim();
    let primitive = match attr.vr {
        _ if value.is_empty() => PrimitiveValue::Empty,
        VR::US => {
            let numbers: Result<Vec<u16>, _> = value
                .split(['\\', ','])
                .map(|v| v.trim().parse::<u16>())
                .collect();
            PrimitiveValue::U16(
                numbers
                    .map_err(|_| {
                        WebError::BadRequest(format!(
                            "{name}={value}: not an unsigned 16-bit integer"
                        ))
                    })?
                    .into(),
            )
        }
        VR::UN => PrimitiveValue::U8(value.as_bytes().to_vec().into()),
        // QIDO writes a list of UIDs with commas (PS3.18 8.3.4.1), C-FIND with backslashes.
        VR::UI => PrimitiveValue::from(value.replace(',', "\\")),
        _ => PrimitiveValue::from(value.to_string()),
    };
    Ok(DataElement::new(attr.tag, attr.vr, primitive))
}

/// The keys of a search: values to match, sequences with one item of item keys.
#[derive(Default)]
struct Keys {
    elements: Vec<DataElement<InMemDicomObject>>,
    /// Item keys of a sequence key, by the sequence's tag.
    items: Vec<(Tag, Vec<DataElement<InMemDicomObject>>)>,
}

impl Keys {
    fn has(&self, tag: Tag) -> bool {
        self.elements.iter().any(|e| e.tag() == tag) || self.items.iter().any(|(t, _)| *t == tag)
    }

    fn add_match(&mut self, id: &str, value: &str) -> Result<(), WebError> {
        let path: Vec<&str> = id.split('.').collect();
        match path.as_slice() {
            [one] => {
                let attr = attribute(one)?;
                if self.has(attr.tag) {
                    return Err(WebError::BadRequest(format!(
                        "{one} is given more than once; match several values with one \
                         parameter (UIDs separated by commas, text with wild cards)"
                    )));
                }
                if attr.vr == VR::SQ {
                    if !value.trim().is_empty() {
                        return Err(WebError::BadRequest(format!(
                            "{one} is a sequence: match its items, e.g. {one}.CodeValue=..."
                        )));
                    }
                    self.items.push((attr.tag, Vec::new()));
                } else {
                    self.elements.push(element(attr, value, one)?);
                }
                Ok(())
            }
            [sequence, item] => {
                let parent = attribute(sequence)?;
                if parent.vr != VR::SQ {
                    return Err(WebError::BadRequest(format!(
                        "{sequence} in {id} is not a sequence this node matches"
                    )));
                }
                let child = attribute(item)?;
                let items = match self.items.iter_mut().find(|(t, _)| *t == parent.tag) {
                    Some((_, items)) => items,
                    None => {
                        self.items.push((parent.tag, Vec::new()));
                        let last = self.items.len() - 1;
                        &mut self.items[last].1
                    }
                };
                if items.iter().any(|e| e.tag() == child.tag) {
                    return Err(WebError::BadRequest(format!(
                        "{id} is given more than once"
                    )));
                }
                items.push(element(child, value, id)?);
                Ok(())
            }
            _ => Err(WebError::BadRequest(format!(
                "{id}: only one level of sequence is matched (Sequence.Item=value)"
            ))),
        }
    }

    /// A return key (empty value), unless the attribute is already a key.
    fn add_return(&mut self, id: &str) -> Result<(), WebError> {
        let attr = attribute(id.split('.').next().unwrap_or(id))?;
        if self.has(attr.tag) {
            return Ok(());
        }
        if attr.vr == VR::SQ {
            self.items.push((attr.tag, Vec::new()));
        } else {
            self.elements
                .push(DataElement::new(attr.tag, attr.vr, PrimitiveValue::Empty));
        }
        Ok(())
    }

    fn into_identifier(self, level: Level) -> InMemDicomObject {
        let mut obj = InMemDicomObject::new_empty();
        obj.put(DataElement::new(
            SPECIFIC_CHARACTER_SET,
            VR::CS,
            PrimitiveValue::from("ISO_IR 192"),
        ));
        obj.put(DataElement::new(
            QUERY_RETRIEVE_LEVEL,
            VR::CS,
            PrimitiveValue::from(level.as_str()),
        ));
        let private = self
            .elements
            .iter()
            .map(|e| e.tag())
            .chain(self.items.iter().map(|(t, _)| *t))
            .any(|t| t.group() == keys::PRIVATE_GROUP);
        for e in self.elements {
            // The Private Creator is ours to write.
            if e.tag().group() == keys::PRIVATE_GROUP && e.tag().element() <= 0x00FF {
                continue;
            }
            obj.put(e);
        }
        for (tag, items) in self.items {
            let seq = if items.is_empty() {
                DataSetSequence::from(Vec::<InMemDicomObject>::new())
            } else {
                let mut item = InMemDicomObject::from_element_iter(items);
                // Return whole items: every item key this node has, universal unless given.
                for k in keys::REGION_ITEM_KEYS {
                    if item.get(k.tag).is_none() {
                        item.put(DataElement::new(k.tag, k.vr, PrimitiveValue::Empty));
                    }
                }
                DataSetSequence::from(vec![item])
            };
            obj.put(DataElement::new(tag, VR::SQ, seq));
        }
        if private {
            obj.put(DataElement::new(
                Tag(keys::PRIVATE_GROUP, u16::from(keys::PRIVATE_BLOCK)),
                VR::LO,
                PrimitiveValue::from(keys::PRIVATE_CREATOR),
            ));
        }
        obj
    }
}

fn unsigned(name: &str, value: &str) -> Result<u64, WebError> {
    value
        .trim()
        .parse::<u64>()
        .map_err(|_| WebError::BadRequest(format!("{name}={value}: not an unsigned integer")))
}

/// Turn the query parameters of a search at `level` within `scope` into a [`Search`].
pub fn parse(
    level: Level,
    scope: &Scope,
    params: &[(String, String)],
    max_results: u64,
) -> Result<Search, WebError> {
    let mut keys = Keys::default();
    let mut warnings = Vec::new();
    let (mut limit, mut offset, mut accept) = (None, None, None);
    let mut include: Vec<String> = Vec::new();
    for (name, value) in params {
        match name.as_str() {
            "limit" => limit = Some(unsigned(name, value)?),
            "offset" => offset = Some(unsigned(name, value)?),
            "includefield" => include.extend(
                value
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty()),
            ),
            "fuzzymatching" => {
                if value.trim().eq_ignore_ascii_case("true") {
                    warnings.push(
                        "The fuzzymatching parameter is not supported. Only literal matching \
                         has been performed."
                            .into(),
                    );
                }
            }
            "accept" => accept = Some(value.clone()),
            // Our answers are UTF-8 JSON whatever is asked.
            "charset" => {}
            _ => keys.add_match(name, value)?,
        }
    }
    for (uid, tag, what) in [
        (&scope.study, STUDY_UID, "StudyInstanceUID"),
        (&scope.series, SERIES_UID, "SeriesInstanceUID"),
    ] {
        if let Some(uid) = uid {
            if keys.has(tag) {
                return Err(WebError::BadRequest(format!(
                    "{what} is in the path; do not give it as a parameter too"
                )));
            }
            keys.elements.push(DataElement::new(
                tag,
                VR::UI,
                PrimitiveValue::from(uid.clone()),
            ));
        }
    }
    // The default return attributes: those of the level, and of the levels above that the
    // path does not fix (PS3.18 10.6.3.3).
    let mut defaults: Vec<&str> = Vec::new();
    if level == Level::Study || scope.study.is_none() {
        defaults.extend(STUDY_ATTRIBUTES);
    }
    if level >= Level::Series && (level == Level::Series || scope.series.is_none()) {
        defaults.extend(SERIES_ATTRIBUTES);
    }
    if level == Level::Image {
        defaults.extend(INSTANCE_ATTRIBUTES);
    }
    for name in defaults {
        keys.add_return(name)?;
    }
    for name in &include {
        if name == "all" {
            for k in keys::KEYS.iter().filter(|k| k.level <= level) {
                keys.add_return(k.name)?;
            }
        } else {
            keys.add_return(name)?;
        }
    }
    Ok(Search {
        level,
        identifier: keys.into_identifier(level),
        limit: limit.unwrap_or(max_results).min(max_results),
        offset: offset.unwrap_or(0),
        warnings,
        accept,
    })
}

/// The C-FIND query of a search, through the C-FIND SCP's parser.
pub fn find_query(search: &Search) -> Result<FindQuery, WebError> {
    let ts = TransferSyntaxRegistry
        .get(EXPLICIT_VR_LE)
        .ok_or_else(|| WebError::Internal("Explicit VR Little Endian is not registered".into()))?;
    let mut bytes = Vec::with_capacity(512);
    search
        .identifier
        .write_dataset_with_ts(&mut bytes, ts)
        .map_err(|e| WebError::Internal(format!("cannot encode the query: {e}")))?;
    identifier::parse(&bytes, EXPLICIT_VR_LE, Model::StudyRoot).map_err(|e| match e {
        IdentifierError::DoesNotMatch(m) | IdentifierError::Unsupported(m) => {
            WebError::BadRequest(m)
        }
        IdentifierError::Unparseable(m) => WebError::Internal(format!(
            "the query built from the parameters is unreadable: {m}"
        )),
    })
}

/// The answers of one page, and whether more matches follow.
pub struct Page {
    pub answers: Vec<InMemDicomObject>,
    pub more: bool,
}

/// Run `query` against the index: the matches from `offset`, at most `limit` of them, in
/// the order of the index (the same order for the same query: PS3.18 8.3.4.4.1).
pub async fn run(
    state: &WebState,
    query: &FindQuery,
    limit: u64,
    offset: u64,
) -> Result<Page, WebError> {
    let mut select = sql::build(query, state.index.backend());
    // Key-image keys give one row per key frame, so a page of answers is not a page of
    // rows; those are paged below. Otherwise the database pages (the numbers are ours).
    let rows_are_answers = !query.keys.iter().any(|k| k.key.join == Join::KeyImages)
        && !select.sql.contains(" ORDER BY ");
    let skip = if rows_are_answers {
        select.sql.push_str(&format!(
            " ORDER BY 1 LIMIT {} OFFSET {offset}",
            limit.saturating_add(1)
        ));
        0
    } else {
        offset
    };
    let mut assembler = sql::Assembler::new(&select, query, &state.config.dicom.ae_title);
    let mut rows = select.query().fetch(state.index.pool());
    let mut answers = Vec::new();
    let mut seen = 0u64;
    let mut more = false;
    let mut take = |answer: InMemDicomObject, answers: &mut Vec<InMemDicomObject>| {
        seen += 1;
        if seen <= skip {
            return true;
        }
        if answers.len() as u64 >= limit {
            return false;
        }
        answers.push(answer);
        true
    };
    loop {
        let Some(row) = rows.next().await else {
            if let Some(last) = assembler.finish()? {
                more = !take(last, &mut answers);
            }
            break;
        };
        if let Some(answer) = assembler.push(row?)? {
            if !take(answer, &mut answers) {
                more = true;
                break;
            }
        }
    }
    Ok(Page { answers, more })
}

fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .filter(|s| !s.is_empty())
}

/// A C-FIND answer as a QIDO result: no Query/Retrieve Level, a Retrieve URL.
fn result(mut answer: InMemDicomObject, level: Level, base: &str) -> serde_json::Value {
    answer.remove_element(QUERY_RETRIEVE_LEVEL);
    let study = text(&answer, STUDY_UID);
    let series = text(&answer, SERIES_UID);
    let instance = text(&answer, SOP_INSTANCE_UID);
    let url = match (level, study, series, instance) {
        (Level::Study, Some(st), _, _) => Some(format!("{base}/studies/{st}")),
        (Level::Series, Some(st), Some(se), _) => Some(format!("{base}/studies/{st}/series/{se}")),
        (Level::Image, Some(st), Some(se), Some(i)) => {
            Some(format!("{base}/studies/{st}/series/{se}/instances/{i}"))
        }
        _ => None,
    };
    if let Some(url) = url {
        answer.put(DataElement::new(
            RETRIEVE_URL,
            VR::UR,
            PrimitiveValue::from(url),
        ));
    }
    json::object(&answer)
}

/// A Warning header field value (PS3.18 8.4.5): visible ASCII only.
pub fn warning(base: &str, text: &str) -> Option<HeaderValue> {
    let clean: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    HeaderValue::from_str(&format!("299 {base}: {clean}")).ok()
}

async fn search(
    state: WebState,
    level: Level,
    scope: Scope,
    params: Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let Query(params) =
        params.map_err(|e| WebError::BadRequest(format!("cannot read the query string: {e}")))?;
    let search = parse(level, &scope, &params, state.config.http.qido_max_results)?;
    let accept = accepted(&headers, search.accept.as_deref());
    if !accept.is_empty()
        && !accept
            .iter()
            .any(|m| m.covers(DICOM_JSON) || m.covers("application/json"))
    {
        return Err(WebError::NotAcceptable(format!(
            "searches are answered in {DICOM_JSON} only"
        )));
    }
    let query = find_query(&search)?;
    let page = run(&state, &query, search.limit, search.offset).await?;
    let base = base_url(&headers, &state.http_host());
    let mut warnings = search.warnings.clone();
    if !query.unsupported.is_empty() {
        let tags: Vec<String> = query
            .unsupported
            .iter()
            .map(|t| format!("{:04X}{:04X}", t.group(), t.element()))
            .collect();
        warnings.push(format!(
            "These attributes are not supported at this level and were ignored: {}",
            tags.join(", ")
        ));
    }
    if page.more {
        warnings.push(format!(
            "There are additional results that can be requested (offset={})",
            search.offset + page.answers.len() as u64
        ));
    }
    let results: Vec<serde_json::Value> = page
        .answers
        .into_iter()
        .map(|a| result(a, level, &base))
        .collect();
    let body = serde_json::to_vec(&results)
        .map_err(|e| WebError::Internal(format!("cannot write the results: {e}")))?;
    let mut response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static(DICOM_JSON))],
        body,
    )
        .into_response();
    for w in &warnings {
        if let Some(value) = warning(&base, w) {
            response.headers_mut().append(header::WARNING, value);
        }
    }
    Ok(response)
}

type Params = Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>;

pub async fn studies(
    State(state): State<WebState>,
    headers: HeaderMap,
    params: Params,
) -> Response {
    search(state, Level::Study, Scope::default(), params, headers)
        .await
        .into_response()
}

pub async fn series(State(state): State<WebState>, headers: HeaderMap, params: Params) -> Response {
    search(state, Level::Series, Scope::default(), params, headers)
        .await
        .into_response()
}

pub async fn study_series(
    State(state): State<WebState>,
    Path(study): Path<String>,
    headers: HeaderMap,
    params: Params,
) -> Response {
    let scope = path_uid(&study, "Study Instance UID").map(|study| Scope {
        study: Some(study),
        series: None,
    });
    match scope {
        Ok(scope) => search(state, Level::Series, scope, params, headers)
            .await
            .into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn instances(
    State(state): State<WebState>,
    headers: HeaderMap,
    params: Params,
) -> Response {
    search(state, Level::Image, Scope::default(), params, headers)
        .await
        .into_response()
}

pub async fn study_instances(
    State(state): State<WebState>,
    Path(study): Path<String>,
    headers: HeaderMap,
    params: Params,
) -> Response {
    let scope = path_uid(&study, "Study Instance UID").map(|study| Scope {
        study: Some(study),
        series: None,
    });
    match scope {
        Ok(scope) => search(state, Level::Image, scope, params, headers)
            .await
            .into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn series_instances(
    State(state): State<WebState>,
    Path((study, series)): Path<(String, String)>,
    headers: HeaderMap,
    params: Params,
) -> Response {
    let scope = path_uid(&study, "Study Instance UID").and_then(|study| {
        Ok(Scope {
            study: Some(study),
            series: Some(path_uid(&series, "Series Instance UID")?),
        })
    });
    match scope {
        Ok(scope) => search(state, Level::Image, scope, params, headers)
            .await
            .into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dimse::find::matching::{Condition, TextValue};

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn query(level: Level, scope: &Scope, pairs: &[(&str, &str)]) -> FindQuery {
        let search = parse(level, scope, &params(pairs), 100).unwrap();
        find_query(&search).unwrap()
    }

    fn condition<'a>(q: &'a FindQuery, name: &str) -> &'a Condition {
        &q.keys
            .iter()
            .find(|k| k.key.name == name)
            .unwrap_or_else(|| panic!("no key {name}"))
            .condition
    }

    #[test]
    fn parameters_become_c_find_keys() {
        let q = query(
            Level::Study,
            &Scope::default(),
            &[
                ("PatientName", "Müller*"),
                ("00100020", "P1"),
                ("StudyDate", "20200101-20201231"),
                ("StudyInstanceUID", "1.2.3,1.2.4"),
            ],
        );
        assert_eq!(q.level, Level::Study);
        assert_eq!(
            condition(&q, "PatientName"),
            &Condition::Text(vec![TextValue::Wildcard("Müller*".into())])
        );
        assert_eq!(
            condition(&q, "PatientID"),
            &Condition::Text(vec![TextValue::Exact("P1".into())])
        );
        assert!(matches!(condition(&q, "StudyDate"), Condition::Range(_)));
        assert_eq!(
            condition(&q, "StudyInstanceUID"),
            &Condition::Uids(vec!["1.2.3".into(), "1.2.4".into()])
        );
        // The default return attributes are there, universal.
        assert_eq!(condition(&q, "ModalitiesInStudy"), &Condition::Universal);
        assert!(q.unsupported.is_empty(), "{:?}", q.unsupported);
    }

    #[test]
    fn series_keys_labels_and_private_block() {
        let scope = Scope {
            study: Some("1.2.3".into()),
            series: None,
        };
        let q = query(
            Level::Series,
            &scope,
            &[
                ("BodyPartExamined", "CHEST"),
                ("SeriesDescription", "*chest*"),
                ("LabelStatus", "LABELLED"),
                ("AnatomicRegionSequence.CodeValue", "43799004"),
                ("ProbabilityScope", "IMAGE"),
            ],
        );
        assert_eq!(
            condition(&q, "StudyInstanceUID"),
            &Condition::Uids(vec!["1.2.3".into()])
        );
        assert_eq!(q.private_block, Some(keys::PRIVATE_BLOCK));
        let status = q.keys.iter().find(|k| k.key.name == "LabelStatus").unwrap();
        assert_eq!(status.key.tag, Tag(0x0099, 0x1012));
        // An element of the block that only tagged copies carry: not a key, ignored.
        assert_eq!(q.unsupported, [Tag(0x0099, 0x1017)]);
        let regions = q
            .keys
            .iter()
            .find(|k| k.key.name == "AnatomicRegionSequence")
            .unwrap();
        assert_eq!(regions.items.len(), 3);
        // Study attributes are not returned when the path names the study.
        assert!(!q.keys.iter().any(|k| k.key.name == "PatientName"));
    }

    #[test]
    fn bad_parameters_are_refused_with_a_reason() {
        let bad = |pairs: &[(&str, &str)]| {
            let search = parse(Level::Study, &Scope::default(), &params(pairs), 100);
            match search.and_then(|s| find_query(&s)) {
                Err(WebError::BadRequest(m)) => m,
                other => panic!("{pairs:?}: {other:?}"),
            }
        };
        assert!(bad(&[("limit", "ten")]).contains("limit"));
        assert!(bad(&[("PatientIdentity", "x")]).contains("unknown attribute"));
        assert!(bad(&[("StudyDate", "yesterday")]).contains("date"));
        assert!(bad(&[("PatientID", "a"), ("00100020", "b")]).contains("more than once"));
        assert!(bad(&[("AnatomicRegionSequence", "CHEST")]).contains("sequence"));
    }

    #[test]
    fn unsupported_attributes_and_fuzzy_matching_are_warnings() {
        let search = parse(
            Level::Study,
            &Scope::default(),
            &params(&[("ReferringPhysicianName", "x"), ("fuzzymatching", "true")]),
            100,
        )
        .unwrap();
        assert_eq!(search.warnings.len(), 1);
        let q = find_query(&search).unwrap();
        assert_eq!(q.unsupported, [Tag(0x0008, 0x0090)]);
    }

    #[test]
    fn limit_is_capped() {
        let s = parse(
            Level::Study,
            &Scope::default(),
            &params(&[("limit", "5000")]),
            100,
        )
        .unwrap();
        assert_eq!((s.limit, s.offset), (100, 0));
    }
}
