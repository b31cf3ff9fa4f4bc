//! The keys this C-FIND SCP matches and returns at each level: the tables of the
//! conformance statement (README, "C-FIND (Query/Retrieve SCP)"), as data.
//!
//! A key belongs to one entity (patient, study, series, image). A query at some level may
//! use the keys of that level and of the levels above it (the unique keys of the levels
//! above, as PS3.4 C.4.1.2.2.1 asks, and any other of their keys); keys of lower levels
//! are not supported there (status FF01).

use dicom_core::{Tag, VR};
use dicom_dictionary_std::uids;

use crate::private_block;

/// The Query/Retrieve Level (0008,0052), top to bottom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Patient,
    Study,
    Series,
    Image,
}

impl Level {
    pub fn parse(text: &str) -> Option<Level> {
        match text {
            "PATIENT" => Some(Level::Patient),
            "STUDY" => Some(Level::Study),
            "SERIES" => Some(Level::Series),
            "IMAGE" => Some(Level::Image),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Patient => "PATIENT",
            Level::Study => "STUDY",
            Level::Series => "SERIES",
            Level::Image => "IMAGE",
        }
    }
}

/// The Query/Retrieve Information Model of the presentation context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    PatientRoot,
    StudyRoot,
}

impl Model {
    pub fn of_sop_class(uid: &str) -> Option<Model> {
        match uid {
            uids::PATIENT_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND => Some(Model::PatientRoot),
            uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND => Some(Model::StudyRoot),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Model::PatientRoot => "Patient Root",
            Model::StudyRoot => "Study Root",
        }
    }

    /// Study Root has no PATIENT level: its top entity is the study (PS3.4 C.6.2).
    pub fn has_level(self, level: Level) -> bool {
        !(self == Model::StudyRoot && level == Level::Patient)
    }
}

/// How the value of a key is matched (PS3.4 C.2.2.2). An empty value, or a value of only
/// `*` where wild cards apply, is Universal Matching for every kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matching {
    /// Single Value and List of UID Matching.
    Uid,
    /// Single Value (case-sensitive) and Wild Card Matching; several values match any of them.
    Text,
    /// As `Text`, case-insensitive (PN).
    PersonName,
    /// As `Text`; upper case on the wire, lower case in the index (label status).
    LowerCase,
    /// Single Value and Range Matching on DA.
    Date,
    /// Single Value and Range Matching on TM.
    Time,
    /// Single Value and Range Matching on DT, against a column of epoch milliseconds.
    DateTime,
    /// Single Value Matching on IS / US.
    Integer,
    /// A study matches when one of its series has a matching Modality.
    ModalitiesInStudy,
    /// Sequence Matching on the coded regions of the series' latest label.
    AnatomicRegions,
    /// Returned, not matched: a value given for it is ignored and reported with FF01.
    ReturnOnly,
}

/// What a key-image row of an instance gives (IMAGE level, private block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyImageField {
    Label,
    Probability,
    SmoothedLabel,
    FrameNumber,
}

/// Where a returned value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A text column.
    Text(&'static str),
    /// A lower-case text column, answered in upper case (CS).
    UpperText(&'static str),
    /// An integer column or expression.
    Integer(&'static str),
    /// A column of Unix epoch milliseconds, answered as DT in UTC.
    EpochMillis(&'static str),
    /// The distinct modalities of the study's series.
    Modalities,
    /// The Anatomic Region Sequence of the series' latest label.
    Regions,
    /// The key-image rows of the instance in the series' latest label.
    KeyImage(KeyImageField),
    /// This node's AE title: it holds every instance it answers for.
    RetrieveAeTitle,
    /// Every instance is on this node's disk: ONLINE.
    Online,
}

/// The tables beyond the level's own that a key needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Join {
    None,
    /// The series' latest `series_labels` row.
    Labels,
    /// The instance's rows in `key_images` (implies `Labels`).
    KeyImages,
}

#[derive(Debug)]
pub struct Key {
    pub tag: Tag,
    pub vr: VR,
    pub name: &'static str,
    pub level: Level,
    pub matching: Matching,
    pub source: Source,
    pub join: Join,
}

impl Key {
    /// The SQL expression matched against (the returned column).
    pub fn column(&self) -> Option<&'static str> {
        match self.source {
            Source::Text(c)
            | Source::UpperText(c)
            | Source::Integer(c)
            | Source::EpochMillis(c) => Some(c),
            _ => None,
        }
    }
}

/// Private Creator of our block ([`crate::private_block`], PS3.5 7.8.1).
pub const PRIVATE_CREATOR: &str = private_block::CREATOR;
pub const PRIVATE_GROUP: u16 = private_block::GROUP;
/// The block the table below uses; a request may reserve another, answers use the request's.
pub const PRIVATE_BLOCK: u8 = private_block::DEFAULT_BLOCK;

/// A key of the private block: tag, VR and name are the element's.
const fn private(
    element: &private_block::Element,
    level: Level,
    matching: Matching,
    source: Source,
) -> Key {
    key(
        element.tag_in(PRIVATE_BLOCK),
        element.vr,
        element.name,
        level,
        matching,
        source,
    )
}

const fn key(
    tag: Tag,
    vr: VR,
    name: &'static str,
    level: Level,
    matching: Matching,
    source: Source,
) -> Key {
    Key {
        tag,
        vr,
        name,
        level,
        matching,
        source,
        join: Join::None,
    }
}

const fn joined(mut k: Key, join: Join) -> Key {
    k.join = join;
    k
}

use private_block as P;
use KeyImageField as F;
use Level::{Image, Patient, Series, Study};
use Matching as M;
use Source as S;

/// Every key this SCP supports. QueryRetrieveLevel and Specific Character Set are handled
/// apart (they are not matched).
#[rustfmt::skip]
pub static KEYS: &[Key] = &[
    // PATIENT (in Study Root: attributes of the study entity)
    key(Tag(0x0010, 0x0010), VR::PN, "PatientName", Patient, M::PersonName, S::Text("p.patient_name")),
    key(Tag(0x0010, 0x0020), VR::LO, "PatientID", Patient, M::Text, S::Text("p.patient_id")),
    key(Tag(0x0010, 0x0021), VR::LO, "IssuerOfPatientID", Patient, M::Text, S::Text("p.issuer_of_patient_id")),
    key(Tag(0x0010, 0x0030), VR::DA, "PatientBirthDate", Patient, M::Date, S::Text("p.patient_birth_date")),
    key(Tag(0x0010, 0x0040), VR::CS, "PatientSex", Patient, M::Text, S::Text("p.patient_sex")),
    key(Tag(0x0020, 0x1200), VR::IS, "NumberOfPatientRelatedStudies", Patient, M::ReturnOnly,
        S::Integer("(SELECT COUNT(*) FROM studies x WHERE x.patient_ref = p.id)")),
    key(Tag(0x0020, 0x1202), VR::IS, "NumberOfPatientRelatedSeries", Patient, M::ReturnOnly,
        S::Integer("(SELECT COUNT(*) FROM series x JOIN studies y ON y.id = x.study_ref WHERE y.patient_ref = p.id)")),
    key(Tag(0x0020, 0x1204), VR::IS, "NumberOfPatientRelatedInstances", Patient, M::ReturnOnly,
        S::Integer("(SELECT COUNT(*) FROM instances x JOIN series y ON y.id = x.series_ref JOIN studies z ON z.id = y.study_ref WHERE z.patient_ref = p.id)")),
    // any level
    key(Tag(0x0008, 0x0054), VR::AE, "RetrieveAETitle", Patient, M::ReturnOnly, S::RetrieveAeTitle),
    key(Tag(0x0008, 0x0056), VR::CS, "InstanceAvailability", Patient, M::ReturnOnly, S::Online),
    // STUDY
    key(Tag(0x0008, 0x0020), VR::DA, "StudyDate", Study, M::Date, S::Text("st.study_date")),
    key(Tag(0x0008, 0x0030), VR::TM, "StudyTime", Study, M::Time, S::Text("st.study_time")),
    key(Tag(0x0008, 0x0050), VR::SH, "AccessionNumber", Study, M::Text, S::Text("st.accession_number")),
    key(Tag(0x0008, 0x0061), VR::CS, "ModalitiesInStudy", Study, M::ModalitiesInStudy, S::Modalities),
    key(Tag(0x0008, 0x1030), VR::LO, "StudyDescription", Study, M::Text, S::Text("st.study_description")),
    key(Tag(0x0020, 0x000D), VR::UI, "StudyInstanceUID", Study, M::Uid, S::Text("st.study_uid")),
    key(Tag(0x0020, 0x0010), VR::SH, "StudyID", Study, M::Text, S::Text("st.study_id")),
    key(Tag(0x0020, 0x1206), VR::IS, "NumberOfStudyRelatedSeries", Study, M::ReturnOnly,
        S::Integer("(SELECT COUNT(*) FROM series x WHERE x.study_ref = st.id)")),
    key(Tag(0x0020, 0x1208), VR::IS, "NumberOfStudyRelatedInstances", Study, M::ReturnOnly,
        S::Integer("(SELECT COUNT(*) FROM instances x JOIN series y ON y.id = x.series_ref WHERE y.study_ref = st.id)")),
    // SERIES
    key(Tag(0x0008, 0x0060), VR::CS, "Modality", Series, M::Text, S::Text("s.modality")),
    key(Tag(0x0008, 0x103E), VR::LO, "SeriesDescription", Series, M::Text, S::Text("s.series_description")),
    joined(key(Tag(0x0008, 0x2218), VR::SQ, "AnatomicRegionSequence", Series, M::AnatomicRegions, S::Regions), Join::Labels),
    key(Tag(0x0018, 0x0015), VR::CS, "BodyPartExamined", Series, M::Text, S::Text("s.predicted_body_part")),
    key(Tag(0x0020, 0x000E), VR::UI, "SeriesInstanceUID", Series, M::Uid, S::Text("s.series_uid")),
    key(Tag(0x0020, 0x0011), VR::IS, "SeriesNumber", Series, M::Integer, S::Integer("s.series_number")),
    key(Tag(0x0020, 0x1209), VR::IS, "NumberOfSeriesRelatedInstances", Series, M::ReturnOnly,
        S::Integer("(SELECT COUNT(*) FROM instances x WHERE x.series_ref = s.id)")),
    // the private block (crate::private_block): what the node decided
    joined(private(&P::MODEL_VERSION, Series, M::Text, S::Text("sl.model_version")), Join::Labels),
    private(&P::DOMINANT_CLASS, Series, M::Text, S::Text("s.predicted_class")),
    private(&P::LABEL_STATUS, Series, M::LowerCase, S::UpperText("s.label_status")),
    private(&P::RECEIVED_BODY_PART, Series, M::Text, S::Text("s.body_part_examined")),
    joined(private(&P::LABELLED_DATE_TIME, Series, M::DateTime, S::EpochMillis("sl.labelled_at")), Join::Labels),
    // IMAGE
    key(Tag(0x0008, 0x0016), VR::UI, "SOPClassUID", Image, M::Uid, S::Text("i.sop_class_uid")),
    key(Tag(0x0008, 0x0018), VR::UI, "SOPInstanceUID", Image, M::Uid, S::Text("i.sop_instance_uid")),
    key(Tag(0x0020, 0x0013), VR::IS, "InstanceNumber", Image, M::Integer, S::Integer("i.instance_number")),
    key(Tag(0x0028, 0x0008), VR::IS, "NumberOfFrames", Image, M::Integer, S::Integer("i.number_of_frames")),
    key(Tag(0x0028, 0x0010), VR::US, "Rows", Image, M::Integer, S::Integer("i.image_rows")),
    key(Tag(0x0028, 0x0011), VR::US, "Columns", Image, M::Integer, S::Integer("i.image_columns")),
    // the private block: the instance's key frames
    joined(private(&P::KEY_IMAGE_LABEL, Image, M::Text, S::KeyImage(F::Label)), Join::KeyImages),
    joined(private(&P::KEY_IMAGE_PROBABILITY, Image, M::ReturnOnly, S::KeyImage(F::Probability)), Join::KeyImages),
    joined(private(&P::KEY_IMAGE_SMOOTHED_LABEL, Image, M::Text, S::KeyImage(F::SmoothedLabel)), Join::KeyImages),
    joined(private(&P::KEY_IMAGE_FRAME, Image, M::Integer, S::KeyImage(F::FrameNumber)), Join::KeyImages),
];

/// The SQL expression a key-image field is matched against.
pub fn key_image_column(field: KeyImageField) -> Option<&'static str> {
    match field {
        KeyImageField::Label => Some("k.label"),
        KeyImageField::SmoothedLabel => Some("k.smoothed_label"),
        KeyImageField::FrameNumber => Some("(k.frame + 1)"),
        KeyImageField::Probability => None,
    }
}

/// The item keys of the Anatomic Region Sequence (Code Sequence Macro, PS3.3 8.8).
#[derive(Debug)]
pub struct ItemKey {
    pub tag: Tag,
    pub vr: VR,
    pub name: &'static str,
    /// Column of `series_regions`.
    pub column: &'static str,
    /// Field of the JSON in `series_labels.anatomic_regions`.
    pub field: &'static str,
}

pub static REGION_ITEM_KEYS: &[ItemKey] = &[
    ItemKey {
        tag: Tag(0x0008, 0x0100),
        vr: VR::SH,
        name: "CodeValue",
        column: "r.code_value",
        field: "code_value",
    },
    ItemKey {
        tag: Tag(0x0008, 0x0102),
        vr: VR::SH,
        name: "CodingSchemeDesignator",
        column: "r.coding_scheme",
        field: "coding_scheme",
    },
    ItemKey {
        tag: Tag(0x0008, 0x0104),
        vr: VR::LO,
        name: "CodeMeaning",
        column: "r.code_meaning",
        field: "code_meaning",
    },
];

pub fn lookup(tag: Tag) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.tag == tag)
}

pub fn lookup_item(tag: Tag) -> Option<&'static ItemKey> {
    REGION_ITEM_KEYS.iter().find(|k| k.tag == tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_unique_and_vrs_match_the_dictionary() {
        use dicom_core::dictionary::DataDictionary;
        use dicom_dictionary_std::StandardDataDictionary;
        for (i, k) in KEYS.iter().enumerate() {
            assert!(KEYS[i + 1..].iter().all(|o| o.tag != k.tag), "{}", k.name);
            if k.tag.group() != PRIVATE_GROUP {
                let entry = StandardDataDictionary
                    .by_tag(k.tag)
                    .unwrap_or_else(|| panic!("{} not in the dictionary", k.name));
                assert_eq!(entry.alias, k.name, "{:?}", k.tag);
                assert_eq!(entry.vr.relaxed(), k.vr, "{}", k.name);
            } else {
                assert_eq!(k.tag.element() >> 8, u16::from(PRIVATE_BLOCK), "{}", k.name);
                let element = private_block::by_offset(k.tag.element() as u8)
                    .unwrap_or_else(|| panic!("{} not in the private block", k.name));
                assert_eq!((element.vr, element.name), (k.vr, k.name), "{:?}", k.tag);
            }
        }
    }

    #[test]
    fn joins_follow_the_columns() {
        for k in KEYS {
            let uses_labels =
                k.column().is_some_and(|c| c.starts_with("sl.")) || k.source == Source::Regions;
            assert_eq!(uses_labels, k.join == Join::Labels, "{}", k.name);
            assert_eq!(
                matches!(k.source, Source::KeyImage(_)),
                k.join == Join::KeyImages,
                "{}",
                k.name
            );
            if k.join != Join::None {
                assert!(k.level >= Level::Series, "{}", k.name);
            }
        }
    }
}
