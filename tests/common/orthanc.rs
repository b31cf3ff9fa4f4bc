//! Orthanc (Debian package `orthanc`, optionally with `orthanc-dicomweb`) on loopback, on
//! free ports, in a folder of its own; killed when dropped. The tests use it as a PACS to
//! mine from, as a downstream AE that receives forwarded copies, and as a peer that queries
//! the node.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use super::free_port;

pub const DICOMWEB_PLUGIN: &str = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so";

/// Whether Orthanc is installed (benches skip without it; tests require it).
pub fn installed() -> bool {
    Command::new("Orthanc")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[derive(Clone, Debug)]
pub struct OrthancOptions {
    /// Orthanc's own AE title.
    pub ae_title: String,
    /// Refuse associations that call another AE title.
    pub check_called_ae_title: bool,
    /// Load the DICOMweb plugin (QIDO-RS, WADO-RS, STOW-RS under /dicom-web/).
    pub dicomweb: bool,
    /// DicomModalities: (name, AE title, port on 127.0.0.1): C-MOVE destinations, and the
    /// peers Orthanc itself queries.
    pub modalities: Vec<(String, String, u16)>,
    /// Answer C-FIND, C-MOVE and C-GET from any calling AE title.
    pub allow_any_query: bool,
    /// Orthanc's `LimitFindResults`: at most this many answers to a C-FIND at the patient,
    /// study or series level (0: no limit). Orthanc 1.10 then sends that many and a final
    /// status Cancel (FE00).
    pub limit_find_results: u32,
    /// DICOM TLS on the DICOM port (then TLS only): Orthanc's certificate, its key and the
    /// CA bundle client certificates must chain to (a client certificate is required).
    pub dicom_tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

impl Default for OrthancOptions {
    fn default() -> Self {
        OrthancOptions {
            ae_title: "ORTHANC".into(),
            check_called_ae_title: true,
            dicomweb: false,
            modalities: Vec::new(),
            allow_any_query: false,
            limit_find_results: 0,
            dicom_tls: None,
        }
    }
}

pub struct Orthanc {
    pub ae_title: String,
    pub dicom_port: u16,
    pub http_port: u16,
    dir: tempfile::TempDir,
    child: Child,
    agent: ureq::Agent,
}

impl Orthanc {
    pub fn start(options: OrthancOptions) -> Orthanc {
        let dir = tempfile::tempdir().expect("orthanc dir");
        let (dicom_port, http_port) = (free_port(), free_port());
        let modalities: serde_json::Map<String, Value> = options
            .modalities
            .iter()
            .map(|(name, ae, port)| {
                let entry = if options.dicom_tls.is_some() {
                    // Orthanc then also sends (C-MOVE sub-operations) over TLS.
                    json!({"AET": ae, "Host": "127.0.0.1", "Port": port, "UseDicomTls": true})
                } else {
                    json!([ae, "127.0.0.1", port])
                };
                (name.clone(), entry)
            })
            .collect();
        let plugins: Vec<&str> = if options.dicomweb {
            assert!(
                Path::new(DICOMWEB_PLUGIN).is_file(),
                "{DICOMWEB_PLUGIN} is missing (apt package orthanc-dicomweb)"
            );
            vec![DICOMWEB_PLUGIN]
        } else {
            Vec::new()
        };
        let config = json!({
            "Name": "anatomy-node-test",
            "StorageDirectory": dir.path().join("storage"),
            "IndexDirectory": dir.path().join("index"),
            "DicomAet": options.ae_title,
            "DicomPort": dicom_port,
            "HttpPort": http_port,
            "HttpServerEnabled": true,
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "StorageCompression": false,
            "DicomCheckCalledAet": options.check_called_ae_title,
            "DicomModalities": modalities,
            "DicomAlwaysAllowFind": options.allow_any_query,
            "DicomAlwaysAllowMove": options.allow_any_query,
            "DicomAlwaysAllowGet": options.allow_any_query,
            "LimitFindResults": options.limit_find_results,
            "Plugins": plugins,
            "DicomWeb": { "Enable": options.dicomweb, "Root": "/dicom-web/" },
        });
        let mut config = config;
        if let Some((cert, key, trusted)) = &options.dicom_tls {
            config["DicomTlsEnabled"] = json!(true);
            config["DicomTlsCertificate"] = json!(cert);
            config["DicomTlsPrivateKey"] = json!(key);
            config["DicomTlsTrustedCertificates"] = json!(trusted);
            config["DicomTlsRemoteCertificateRequired"] = json!(true);
        }
        let path = dir.path().join("orthanc.json");
        std::fs::write(&path, config.to_string()).expect("orthanc config");
        let log = std::fs::File::create(dir.path().join("orthanc.log")).expect("orthanc log");
        let child = Command::new("Orthanc")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start Orthanc (apt package orthanc)");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let orthanc = Orthanc {
            ae_title: options.ae_title,
            dicom_port,
            http_port,
            dir,
            child,
            agent,
        };
        assert!(
            super::wait_until(30, || TcpStream::connect(("127.0.0.1", dicom_port)).is_ok()
                && orthanc.get("/system").is_some()),
            "Orthanc did not start: {}",
            orthanc.log()
        );
        orthanc
    }

    /// What Orthanc wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("orthanc.log")).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    /// The DICOMweb base URL (with the plugin loaded).
    pub fn dicomweb_url(&self) -> String {
        self.url("/dicom-web")
    }

    /// A request to the REST API: status and body.
    pub fn request(&self, method: &str, path: &str, body: Option<(&str, &[u8])>) -> (u16, Vec<u8>) {
        let url = self.url(path);
        let response = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            ("POST", Some((content_type, bytes))) => self
                .agent
                .post(&url)
                .header("Content-Type", content_type)
                .send(bytes),
            ("POST", None) => self.agent.post(&url).send_empty(),
            ("PUT", Some((content_type, bytes))) => self
                .agent
                .put(&url)
                .header("Content-Type", content_type)
                .send(bytes),
            (m, _) => panic!("method {m} not supported by the test client"),
        };
        match response {
            Ok(mut r) => {
                let status = r.status().as_u16();
                let bytes = r
                    .body_mut()
                    .with_config()
                    .limit(1 << 30)
                    .read_to_vec()
                    .unwrap_or_default();
                (status, bytes)
            }
            Err(e) => (0, e.to_string().into_bytes()),
        }
    }

    /// GET a JSON resource; None unless 200.
    pub fn get(&self, path: &str) -> Option<Value> {
        let (status, body) = self.request("GET", path, None);
        (status == 200)
            .then(|| serde_json::from_slice(&body).ok())
            .flatten()
    }

    /// POST JSON; the JSON answer, None unless 200.
    pub fn post_json(&self, path: &str, body: &Value) -> Option<Value> {
        let text = body.to_string();
        let (status, answer) =
            self.request("POST", path, Some(("application/json", text.as_bytes())));
        (status == 200)
            .then(|| serde_json::from_slice(&answer).ok())
            .flatten()
    }

    /// Store a DICOM file through the REST API (POST /instances); its Orthanc id.
    pub fn upload(&self, file: &Path) -> String {
        let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let (status, body) =
            self.request("POST", "/instances", Some(("application/dicom", &bytes)));
        assert_eq!(
            status,
            200,
            "Orthanc refused {}: {}",
            file.display(),
            String::from_utf8_lossy(&body)
        );
        let answer: Value = serde_json::from_slice(&body).expect("Orthanc's answer");
        answer["ID"].as_str().expect("instance ID").to_string()
    }

    pub fn upload_all(&self, files: &[PathBuf]) {
        for f in files {
            self.upload(f);
        }
    }

    /// SOP Instance UIDs stored, with their Orthanc ids, sorted.
    pub fn instances(&self) -> Vec<(String, String)> {
        let list = self.get("/instances?expand").unwrap_or_default();
        let mut out: Vec<(String, String)> = list
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| {
                        (
                            i["MainDicomTags"]["SOPInstanceUID"]
                                .as_str()
                                .unwrap_or_default()
                                .to_string(),
                            i["ID"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// C-FIND from Orthanc to the modality `name` (POST /modalities/{name}/query): the
    /// answers, simplified (keyword → value).
    pub fn query(&self, name: &str, level: &str, query: Value) -> Vec<Value> {
        let body = json!({ "Level": level, "Query": query });
        let created = self
            .post_json(&format!("/modalities/{name}/query"), &body)
            .unwrap_or_else(|| panic!("Orthanc query {body} failed"));
        let id = created["ID"].as_str().expect("query ID").to_string();
        let answers = self
            .get(&format!("/queries/{id}/answers?expand&simplify"))
            .expect("answers");
        answers.as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
