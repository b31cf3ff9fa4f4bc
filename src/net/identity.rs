//! Who is at the other end of a connection: its address and, over TLS with a client
//! certificate, the certificate's subject and SHA-256 fingerprint (what an allowed peer
//! can be pinned to, and what the audit trail records).

use std::fmt;
use std::net::SocketAddr;

use rustls_pki_types::CertificateDer;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub addr: SocketAddr,
    /// The client certificate, when the connection is TLS and the client sent one.
    pub certificate: Option<CertificateIdentity>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateIdentity {
    /// The subject, `CN=...,O=...` in the certificate's order (empty when unreadable).
    pub subject: String,
    /// SHA-256 of the DER certificate, lowercase hex without separators.
    pub sha256: String,
}

impl PeerIdentity {
    pub fn with_certificate(addr: SocketAddr, der: Option<&CertificateDer<'_>>) -> Self {
        Self {
            addr,
            certificate: der.map(|d| CertificateIdentity::of(d)),
        }
    }
}

impl CertificateIdentity {
    pub fn of(der: &CertificateDer<'_>) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
        Self {
            subject: subject(der.as_ref()).unwrap_or_default(),
            sha256: digest.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
        }
    }

    /// Does this certificate satisfy a pin? Each pin given must match; fingerprints are
    /// compared without colons or case (as `openssl x509 -fingerprint -sha256` prints
    /// them), subjects without spaces around `=` and `,`.
    pub fn matches(&self, subject: Option<&str>, sha256: Option<&str>) -> bool {
        let fingerprint_ok = sha256.is_none_or(|pin| {
            let pin: String = pin
                .chars()
                .filter(|c| *c != ':')
                .collect::<String>()
                .to_ascii_lowercase();
            pin == self.sha256
        });
        let subject_ok = subject.is_none_or(|pin| normal_dn(pin) == normal_dn(&self.subject));
        fingerprint_ok && subject_ok
    }
}

impl fmt::Display for CertificateIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "subject {:?}, sha256 {}", self.subject, self.sha256)
    }
}

fn normal_dn(dn: &str) -> String {
    dn.split(',')
        .map(|rdn| match rdn.split_once('=') {
            Some((k, v)) => format!("{}={}", k.trim().to_ascii_uppercase(), v.trim()),
            None => rdn.trim().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// One DER TLV: (tag, contents, rest).
fn tlv(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = bytes.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;

/// The subject of a DER certificate as `CN=a,O=b` (attributes in the certificate's order).
fn subject(der: &[u8]) -> Option<String> {
    let (_, cert, _) = tlv(der).filter(|t| t.0 == SEQUENCE)?;
    let (_, tbs, _) = tlv(cert).filter(|t| t.0 == SEQUENCE)?;
    let mut rest = tbs;
    // [0] version is optional; then serial, signature algorithm, issuer, validity, subject.
    if rest.first() == Some(&0xa0) {
        rest = tlv(rest)?.2;
    }
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (_, mut name, _) = tlv(rest).filter(|t| t.0 == SEQUENCE)?;
    let mut parts = Vec::new();
    while !name.is_empty() {
        let (tag, set, next) = tlv(name)?;
        name = next;
        if tag != SET {
            return None;
        }
        let mut attributes = set;
        while !attributes.is_empty() {
            let (_, attribute, next) = tlv(attributes).filter(|t| t.0 == SEQUENCE)?;
            attributes = next;
            let (_, oid, value) = tlv(attribute).filter(|t| t.0 == OID)?;
            let (_, text, _) = tlv(value)?;
            parts.push(format!(
                "{}={}",
                attribute_name(oid),
                String::from_utf8_lossy(text)
            ));
        }
    }
    Some(parts.join(","))
}

/// The short name of an X.520 attribute (2.5.4.x), or its dotted OID.
fn attribute_name(oid: &[u8]) -> String {
    match oid {
        [0x55, 0x04, 0x03] => "CN".into(),
        [0x55, 0x04, 0x06] => "C".into(),
        [0x55, 0x04, 0x07] => "L".into(),
        [0x55, 0x04, 0x08] => "ST".into(),
        [0x55, 0x04, 0x0a] => "O".into(),
        [0x55, 0x04, 0x0b] => "OU".into(),
        [0x55, 0x04, 0x05] => "serialNumber".into(),
        other => other
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for CN=storescu,O=Test (openssl req -x509, EC P-256; its
    /// key was thrown away).
    const CERT_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBmjCCAT+gAwIBAgIUGUL3SS77D0jJKCkbz+BP8qZt+gswCgYIKoZIzj0EAwIw
IjERMA8GA1UEAwwIc3RvcmVzY3UxDTALBgNVBAoMBFRlc3QwHhcNMjYxMjA3MjE1
NzEzWhcNMzYxMjA0MjE1NzEzWjAiMREwDwYDVQQDDAhzdG9yZXNjdTENMAsGA1UE
CgwEVGVzdDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABAge3htQVCG+wves1pNb
rZtkmrOAAy9lXCcMdsDq5UhsxXK2RA454ysFAeBc8qLTyg3v6Y2YkbB8RXU6YctZ
+AajUzBRMB0GA1UdDgQWBBQ8vQ4dyJq2ZiTGLsrDHQdJBU/PlTAfBgNVHSMEGDAW
gBQ8vQ4dyJq2ZiTGLsrDHQdJBU/PlTAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49
BAMCA0kAMEYCIQC8D+YJo9tOkpktBXpr4oMTistlsyL1T47r+CJ/hquUnwIhAO3s
8hnOXwkG3JyRXlF6mbwFi79+eAwQT7o6FZoPgLTP
-----END CERTIFICATE-----
";

    fn cert() -> CertificateDer<'static> {
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(CERT_PEM.as_bytes()).unwrap()
    }

    #[test]
    fn the_subject_is_read_in_order() {
        assert_eq!(
            subject(cert().as_ref()).as_deref(),
            Some("CN=storescu,O=Test")
        );
    }

    #[test]
    fn pins_compare_loosely_but_exactly() {
        let id = CertificateIdentity::of(&cert());
        // As `openssl x509 -noout -fingerprint -sha256` prints it.
        let openssl = "06:CF:25:AE:EC:91:15:86:4C:28:53:5E:4C:55:D8:23:32:C9:E5:B2:92:93:0A:D4:73:D3:3B:C6:FE:EA:4A:CF";
        assert!(id.matches(None, Some(openssl)));
        assert!(id.matches(Some("CN = storescu, O = Test"), None));
        assert!(!id.matches(Some("CN=storescu"), None));
        assert!(!id.matches(None, Some("00")));
        assert!(id.matches(None, None));
    }

    #[test]
    fn garbage_has_no_subject() {
        assert_eq!(subject(&[0x30, 0x82, 0xff]), None);
        assert_eq!(subject(&[]), None);
    }
}
