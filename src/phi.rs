//! Protected health information in the log: patient names, IDs, birth dates and accession
//! numbers reach the log only when `log.phi = true`. UIDs are not PHI here and are logged.
//!
//! A value that might be logged is wrapped in [`Phi`]; it displays as `[redacted]` unless
//! the process was started with `log.phi = true` ([`set_allowed`], called once when logging
//! starts).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

static ALLOWED: AtomicBool = AtomicBool::new(false);

/// Whether PHI may be written to the log (`log.phi`).
pub fn set_allowed(allowed: bool) {
    ALLOWED.store(allowed, Ordering::Relaxed);
}

pub fn allowed() -> bool {
    ALLOWED.load(Ordering::Relaxed)
}

/// A patient attribute for a log line or an error message that may be logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phi(pub String);

impl fmt::Display for Phi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if allowed() {
            write!(f, "{:?}", self.0)
        } else {
            f.write_str("[redacted]")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_unless_allowed() {
        let v = Phi("DOE^JOHN".into());
        assert_eq!(v.to_string(), "[redacted]");
        set_allowed(true);
        assert_eq!(v.to_string(), "\"DOE^JOHN\"");
        set_allowed(false);
    }
}
