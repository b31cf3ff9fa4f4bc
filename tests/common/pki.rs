//! Test certificates made with the openssl CLI in a temporary directory (never committed):
//! a CA, a server certificate for localhost / 127.0.0.1 and client certificates it signs.
//! RSA keys, because DCMTK's default BCP 195 profile offers ECDHE-RSA suites.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A certificate and its private key (PEM files).
#[derive(Debug, Clone)]
pub struct KeyPair {
    pub key: PathBuf,
    pub cert: PathBuf,
}

impl KeyPair {
    /// `+tls KEY CERT`, as DCMTK tools take it.
    pub fn dcmtk_args(&self) -> Vec<String> {
        vec![
            "+tls".into(),
            self.key.display().to_string(),
            self.cert.display().to_string(),
        ]
    }

    /// SHA-256 fingerprint as `openssl x509 -fingerprint -sha256` prints it (AA:BB:...).
    pub fn sha256(&self) -> String {
        let out = openssl(&[
            "x509",
            "-noout",
            "-fingerprint",
            "-sha256",
            "-in",
            &s(&self.cert),
        ]);
        String::from_utf8_lossy(&out)
            .trim()
            .split_once('=')
            .map(|(_, f)| f.to_string())
            .expect("fingerprint")
    }
}

pub struct Ca {
    pub name: String,
    pub dir: PathBuf,
    pub cert: PathBuf,
    key: PathBuf,
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Run the openssl CLI; its stdout (the test fails with its stderr when it fails).
pub fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl (apt package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        super::text(&out)
    );
    out.stdout
}

impl Ca {
    /// A self-signed CA named `name`, its files in `dir/name.*`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let key = dir.join(format!("{name}.key"));
        let cert = dir.join(format!("{name}.crt"));
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "30",
            "-keyout",
            &s(&key),
            "-out",
            &s(&cert),
            "-subj",
            &format!("/CN={name}/O=Test"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        Ca {
            name: name.into(),
            dir: dir.to_path_buf(),
            cert,
            key,
        }
    }

    /// A certificate for `subject` (`/CN=.../O=...`) signed by this CA, valid `days` from
    /// now (-1: expired yesterday); `file` names it.
    fn issue(&self, file: &str, subject: &str, extensions: &str, days: i32) -> KeyPair {
        let days = days.to_string();
        let key = self.dir.join(format!("{file}.key"));
        let csr = self.dir.join(format!("{file}.csr"));
        let cert = self.dir.join(format!("{file}.crt"));
        let ext = self.dir.join(format!("{file}.ext"));
        std::fs::write(&ext, extensions).expect("extension file");
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &s(&key),
            "-out",
            &s(&csr),
            "-subj",
            subject,
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &s(&csr),
            "-CA",
            &s(&self.cert),
            "-CAkey",
            &s(&self.key),
            "-CAcreateserial",
            "-days",
            &days,
            "-out",
            &s(&cert),
            "-extfile",
            &s(&ext),
        ]);
        KeyPair { key, cert }
    }

    /// A server certificate for localhost and 127.0.0.1.
    pub fn server(&self, file: &str) -> KeyPair {
        self.issue(
            file,
            "/CN=localhost/O=Test",
            "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n",
            30,
        )
    }

    /// A client certificate with common name `cn` (subject `CN=cn,O=Test`).
    pub fn client(&self, cn: &str) -> KeyPair {
        self.client_valid_for(cn, 30)
    }

    /// A client certificate that expired yesterday.
    pub fn expired_client(&self, cn: &str) -> KeyPair {
        self.client_valid_for(cn, -1)
    }

    fn client_valid_for(&self, cn: &str, days: i32) -> KeyPair {
        self.issue(
            &format!("{}-{cn}-{days}", self.name),
            &format!("/CN={cn}/O=Test"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
             extendedKeyUsage=clientAuth\n",
            days,
        )
    }
}
