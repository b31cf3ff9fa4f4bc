//! Where an instance lives under the storage directory.
//!
//! Only values that fit the DICOM UID grammar (PS3.5 9.1) become path components; anything
//! else a peer sends (hex "UIDs" from anonymisers, `../`, empty values) is named by a hash,
//! so nothing a peer controls can address a file outside the storage directory.

use std::path::PathBuf;

use sha2::{Digest, Sha256};

/// Trim the padding DICOM allows after a UID (NUL) and that senders add anyway (space).
pub fn trim_uid(raw: &str) -> &str {
    raw.trim_end_matches(['\0', ' ']).trim_start_matches(' ')
}

/// PS3.5 9.1: components of digits separated by '.', no leading zero in a multi-digit
/// component, at most 64 characters.
pub fn is_valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_digit())
                && (c == "0" || !c.starts_with('0'))
        })
}

/// The file-system name for a UID value: the UID itself when valid, else `h` + hash.
pub fn path_component(raw_uid: &str) -> String {
    let uid = trim_uid(raw_uid);
    if is_valid_uid(uid) {
        uid.to_string()
    } else {
        let digest = Sha256::digest(raw_uid.as_bytes());
        format!("h{}", &hex::encode(digest)[..40])
    }
}

/// Relative path of an instance: `<study>/<series>/<sop>.dcm`.
pub fn instance_path(study_uid: &str, series_uid: &str, sop_uid: &str) -> PathBuf {
    let mut path = PathBuf::from(path_component(study_uid));
    path.push(path_component(series_uid));
    path.push(format!("{}.dcm", path_component(sop_uid)));
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Component;

    #[test]
    fn valid_uids_are_kept() {
        assert!(is_valid_uid("1.2.840.10008.5.1.4.1.1.2"));
        assert!(is_valid_uid("2.25.0.10"));
        assert_eq!(path_component("1.2.3\0"), "1.2.3");
    }

    #[test]
    fn grammar_violations_are_hashed() {
        for bad in [
            "",
            "../../etc/passwd",
            "1.2.3/../../x",
            "1..2",
            "1.02.3",
            ".1.2",
            "1.2.",
            "a3f9c0de11",
            "1.2.3 4",
            &"1.".repeat(40),
        ] {
            assert!(!is_valid_uid(trim_uid(bad)), "{bad:?} accepted");
            let name = path_component(bad);
            assert!(
                name.starts_with('h') && name.len() == 41,
                "{bad:?} -> {name}"
            );
            assert!(name.bytes().all(|b| b.is_ascii_alphanumeric()));
        }
    }

    #[test]
    fn instance_paths_stay_relative_and_normal() {
        let p = instance_path("../..", "/abs/olute", "..\\x");
        assert!(p.components().all(|c| matches!(c, Component::Normal(_))));
        assert_eq!(p.components().count(), 3);
    }

    #[test]
    fn distinct_invalid_values_get_distinct_names() {
        assert_ne!(path_component("abc"), path_component("abd"));
    }
}
