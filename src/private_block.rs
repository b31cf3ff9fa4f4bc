//! The node's private block, defined once: the Private Creator, the group, and each element
//! with its offset in the block, VR, VM and name. The C-FIND SCP and QIDO-RS (keys of
//! [`crate::dimse::find::keys`]), the tagged copies ([`crate::forward::tagging`]) and the
//! DCMTK data dictionary `deploy/anatomy-node-private.dic` all use this table; a unit test
//! below checks the dictionary file and the README's table ("The private block") against it.
//!
//! A private element is `(GROUP, xxEE)`: `xx` is the block the creator holds in that data set
//! (reserved by `(GROUP, 00xx)` = [`CREATOR`], PS3.5 7.8.1) and `EE` the element's offset.
//! Readers must find the block by the creator; [`DEFAULT_BLOCK`] is the one the node uses when
//! it chooses (QIDO-RS answers, C-FIND requests without our creator, the first free block of a
//! copy is usually it too).
//!
//! Group 0x0099 rather than the low odd groups: 0x0009 (and 0x0019, 0x0029, ...) are used
//! heavily by vendors (GE's GEMS_* blocks above all; DCMTK's private dictionary knows some
//! 200 elements in group 0009 and one in 0099), so a CT series, or a tagged copy of one,
//! is far less likely to have its first blocks of 0x0099 taken, and a reader that ignores the
//! creator is less likely to confuse our elements with a vendor's.

use dicom_core::{Tag, VR};

/// Private Creator of the node's block (PS3.5 7.8.1).
pub const CREATOR: &str = "ANATOMY_NODE 1.0";
/// The odd group of the node's block.
pub const GROUP: u16 = 0x0099;
/// The block the node reserves when it chooses: (0099,0010).
pub const DEFAULT_BLOCK: u8 = 0x10;

/// One element of the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Element {
    /// The low byte of the element number: (0099,xx`offset`).
    pub offset: u8,
    pub vr: VR,
    /// Value multiplicity, as DCMTK's dictionary writes it (`1`, `1-n`).
    pub vm: &'static str,
    /// The keyword: DCMTK's dictionary name, and the keyword QIDO-RS accepts.
    pub name: &'static str,
}

impl Element {
    /// The element's tag in `block`.
    pub const fn tag_in(&self, block: u8) -> Tag {
        Tag(GROUP, ((block as u16) << 8) | self.offset as u16)
    }

    /// The element's tag in [`DEFAULT_BLOCK`].
    pub const fn tag(&self) -> Tag {
        self.tag_in(DEFAULT_BLOCK)
    }
}

const fn element(offset: u8, vr: VR, vm: &'static str, name: &'static str) -> Element {
    Element {
        offset,
        vr,
        vm,
        name,
    }
}

// Series: what the node decided and when.
/// Version of the model of the latest label.
pub const MODEL_VERSION: Element = element(0x10, VR::LO, "1", "ModelVersion");
/// Dominant class of the series, as the model names it (`lungs`).
pub const DOMINANT_CLASS: Element = element(0x11, VR::LO, "1", "PredictedDominantClass");
/// `LABELLED`, `SKIPPED`, `FAILED`.
pub const LABEL_STATUS: Element = element(0x12, VR::CS, "1", "LabelStatus");
/// Body Part Examined (0018,0015) as the sender wrote it.
pub const RECEIVED_BODY_PART: Element = element(0x13, VR::CS, "1", "ReceivedBodyPartExamined");
/// When the latest label was stored (UTC).
pub const LABELLED_DATE_TIME: Element = element(0x14, VR::DT, "1", "LabelledDateTime");
// The model's output, as a tagged copy carries it.
/// The model's classes.
pub const CLASSES: Element = element(0x15, VR::LO, "1-n", "ModelClasses");
/// Their probabilities, in the order of [`CLASSES`].
pub const PROBABILITIES: Element = element(0x16, VR::FD, "1-n", "ClassProbabilities");
/// `IMAGE` or `SERIES`: whose probabilities [`PROBABILITIES`] are.
pub const PROBABILITY_SCOPE: Element = element(0x17, VR::CS, "1", "ProbabilityScope");
/// The coverage along z (JSON).
pub const COVERAGE: Element = element(0x18, VR::UT, "1", "CoverageJSON");
/// Every region present, `SCT:<code>`, head to foot.
pub const REGION_CODES: Element = element(0x19, VR::LO, "1-n", "RegionCodes");
// Instance: its key frames in the latest label.
/// Label of each key frame (the model's most probable class).
pub const KEY_IMAGE_LABEL: Element = element(0x20, VR::LO, "1-n", "KeyImageLabel");
/// Its probability.
pub const KEY_IMAGE_PROBABILITY: Element = element(0x21, VR::DS, "1-n", "KeyImageProbability");
/// The label decoded along z in the body's order (the keyword keeps its older name).
pub const KEY_IMAGE_SMOOTHED_LABEL: Element = element(0x22, VR::LO, "1-n", "KeyImageSmoothedLabel");
/// Frame number (1-based) of each key frame.
pub const KEY_IMAGE_FRAME: Element = element(0x23, VR::IS, "1-n", "KeyImageFrameNumber");

/// Every element of the block, by offset.
pub static ELEMENTS: &[Element] = &[
    MODEL_VERSION,
    DOMINANT_CLASS,
    LABEL_STATUS,
    RECEIVED_BODY_PART,
    LABELLED_DATE_TIME,
    CLASSES,
    PROBABILITIES,
    PROBABILITY_SCOPE,
    COVERAGE,
    REGION_CODES,
    KEY_IMAGE_LABEL,
    KEY_IMAGE_PROBABILITY,
    KEY_IMAGE_SMOOTHED_LABEL,
    KEY_IMAGE_FRAME,
];

/// The element of this name.
pub fn by_name(name: &str) -> Option<&'static Element> {
    ELEMENTS.iter().find(|e| e.name == name)
}

/// The element at this offset.
pub fn by_offset(offset: u8) -> Option<&'static Element> {
    ELEMENTS.iter().find(|e| e.offset == offset)
}

/// The entries of DCMTK's data dictionary for the block, one line each (the body of
/// `deploy/anatomy-node-private.dic`).
pub fn dcmtk_dictionary() -> String {
    ELEMENTS
        .iter()
        .map(|e| {
            format!(
                "({GROUP:04X},\"{CREATOR}\",{:02X})\t{}\t{}\t{}\tPrivateTag\n",
                e.offset,
                e.vr.to_string(),
                e.name,
                e.vm
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_names_are_unique_and_not_standard_keywords() {
        use dicom_core::dictionary::DataDictionary;
        use dicom_dictionary_std::StandardDataDictionary;
        assert_eq!(GROUP % 2, 1, "a private group is odd");
        for (i, e) in ELEMENTS.iter().enumerate() {
            assert!(ELEMENTS[i + 1..].iter().all(|o| o.offset > e.offset));
            assert!(ELEMENTS[i + 1..].iter().all(|o| o.name != e.name));
            assert!(e.offset >= 0x10, "{}", e.name);
            assert!(
                StandardDataDictionary.by_name(e.name).is_none(),
                "{} is a standard keyword",
                e.name
            );
            assert!(matches!(e.vm, "1" | "1-n"), "{}", e.name);
        }
        assert_eq!(MODEL_VERSION.tag(), Tag(0x0099, 0x1010));
        assert_eq!(KEY_IMAGE_FRAME.tag_in(0x11), Tag(0x0099, 0x1123));
    }

    #[test]
    fn the_dcmtk_dictionary_file_lists_every_element() {
        let file = include_str!("../deploy/anatomy-node-private.dic");
        let entries: String = file
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(entries, dcmtk_dictionary());
    }

    #[test]
    fn the_readme_table_lists_every_element() {
        let readme = include_str!("../README.md");
        for e in ELEMENTS {
            let row = format!(
                "| ({GROUP:04X},xx{:02X}) | {} | {} | `{}` |",
                e.offset,
                e.vr.to_string(),
                e.vm,
                e.name
            );
            assert!(readme.contains(&row), "README lacks {row}");
        }
    }
}
