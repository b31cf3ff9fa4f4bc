//! DIMSE status codes (PS3.7 Annex C, PS3.4 B.2.3) that this node sends, each chosen on
//! purpose, with the Error Comment (0000,0902) that tells the peer what went wrong.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: u16,
    /// Error Comment, at most 64 characters (LO).
    pub comment: Option<String>,
}

impl Status {
    pub const SUCCESS: u16 = 0x0000;
    /// PS3.7 C.5.12: the instance is already stored with other content.
    pub const DUPLICATE_SOP_INSTANCE: u16 = 0x0111;
    /// PS3.7 C.5.19: the command is not one this service class performs.
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
    /// PS3.7 C.5.20: SOP class not supported on this presentation context.
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// PS3.4 B.2.3: Refused, out of resources (disk full, write error, database down).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// PS3.4 B.2.3: Error, data set does not match SOP class.
    pub const DATASET_DOES_NOT_MATCH: u16 = 0xA900;
    /// PS3.4 B.2.3: Error, cannot understand.
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// PS3.4 C.4.1.1.4: Failed, unable to process (C-FIND).
    pub const UNABLE_TO_PROCESS: u16 = 0xC001;
    /// PS3.4 C.4.1.1.4: matching terminated due to a C-CANCEL-RQ.
    pub const CANCEL: u16 = 0xFE00;
    /// PS3.4 C.4.1.1.4: pending, matches are continuing.
    pub const PENDING: u16 = 0xFF00;
    /// PS3.4 C.4.1.1.4: pending, but one or more optional keys were not supported.
    pub const PENDING_WARNING: u16 = 0xFF01;

    pub fn success() -> Status {
        Status {
            code: Self::SUCCESS,
            comment: None,
        }
    }

    pub fn failure(code: u16, comment: impl AsRef<str>) -> Status {
        Status {
            code,
            comment: Some(truncate_lo(comment.as_ref())),
        }
    }

    /// A status without an Error Comment (success, pending, cancel).
    pub fn of(code: u16) -> Status {
        Status {
            code,
            comment: None,
        }
    }

    pub fn is_success(&self) -> bool {
        self.code == Self::SUCCESS
    }
}

/// LO values hold at most 64 characters and no backslash or control characters.
fn truncate_lo(text: &str) -> String {
    text.chars()
        .map(|c| if c == '\\' || c.is_control() { ' ' } else { c })
        .filter(char::is_ascii)
        .take(64)
        .collect::<String>()
        .trim_end()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_fit_lo() {
        let s = Status::failure(Status::CANNOT_UNDERSTAND, "a\\b\nc".repeat(40));
        let c = s.comment.unwrap();
        assert!(c.len() <= 64);
        assert!(!c.contains('\\') && !c.contains('\n'));
    }
}
