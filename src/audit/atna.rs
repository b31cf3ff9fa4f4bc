//! DICOM audit messages (PS3.15 Annex A.5, the RFC 3881-derived schema) for the events of
//! the audit trail, and their RFC 5424 syslog envelope, as IHE ATNA sends them.
//!
//! A message carries what the audit table holds and nothing more (UIDs, AE titles, principal
//! names, addresses, counts): no patient names or IDs, so a collector does not become a
//! second PHI store either. XML is written by hand: every attribute value is escaped.

use std::fmt::Write as _;

use super::{format_time, AuditEvent, EventType, Outcome};

/// A DICOM coded value (`DCM` coding scheme).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code {
    pub code: &'static str,
    pub meaning: &'static str,
}

const fn dcm(code: &'static str, meaning: &'static str) -> Code {
    Code { code, meaning }
}

pub const APPLICATION_ACTIVITY: Code = dcm("110100", "Application Activity");
pub const INSTANCES_ACCESSED: Code = dcm("110103", "DICOM Instances Accessed");
pub const INSTANCES_TRANSFERRED: Code = dcm("110104", "DICOM Instances Transferred");
pub const QUERY: Code = dcm("110112", "Query");
pub const SECURITY_ALERT: Code = dcm("110113", "Security Alert");
pub const USER_AUTHENTICATION: Code = dcm("110114", "User Authentication");
const APPLICATION_START: Code = dcm("110120", "Application Start");
const APPLICATION_STOP: Code = dcm("110121", "Application Stop");
const LOGIN: Code = dcm("110122", "Login");
const SECURITY_CONFIGURATION: Code = dcm("110129", "Security Configuration");
const APPLICATION: Code = dcm("110150", "Application");
const DESTINATION: Code = dcm("110152", "Destination Role ID");
const SOURCE: Code = dcm("110153", "Source Role ID");
const STUDY_UID: Code = dcm("110180", "Study Instance UID");

/// EventID, EventTypeCode and EventActionCode (C, R, U, D, E) of an event.
pub fn classify(event: &AuditEvent) -> (Code, Option<Code>, char) {
    match event.event_type {
        EventType::NodeStart => (APPLICATION_ACTIVITY, Some(APPLICATION_START), 'E'),
        EventType::NodeStop => (APPLICATION_ACTIVITY, Some(APPLICATION_STOP), 'E'),
        EventType::AssociationAccepted | EventType::AssociationRefused | EventType::AuthFailure => {
            (USER_AUTHENTICATION, Some(LOGIN), 'E')
        }
        EventType::InstancesReceived => (INSTANCES_TRANSFERRED, None, 'C'),
        EventType::Forward => (INSTANCES_TRANSFERRED, None, 'R'),
        EventType::CFind => (QUERY, None, 'E'),
        EventType::HttpRequest => http_request(event),
        EventType::ConfigReload => (SECURITY_ALERT, Some(SECURITY_CONFIGURATION), 'E'),
    }
}

/// STOW-RS creates instances; QIDO-RS (a `studies` route that is not WADO-RS) queries; the
/// rest (WADO-RS, rendered images, the page) reads.
fn http_request(event: &AuditEvent) -> (Code, Option<Code>, char) {
    let route = event.object.as_deref().unwrap_or_default();
    if route.starts_with("POST") && route.contains("/studies") {
        (INSTANCES_TRANSFERRED, None, 'C')
    } else if route.starts_with("GET") && is_query_route(route) {
        (QUERY, None, 'E')
    } else {
        (INSTANCES_ACCESSED, None, 'R')
    }
}

/// QIDO-RS searches end in `/studies`, `/series` or `/instances`.
fn is_query_route(route: &str) -> bool {
    let path = route.split_whitespace().nth(1).unwrap_or_default();
    ["/studies", "/series", "/instances"]
        .iter()
        .any(|end| path.trim_end_matches('/').ends_with(end))
}

/// RFC 3881 EventOutcomeIndicator: 0 success, 4 minor failure (refused, bad credentials),
/// 8 serious failure.
pub fn outcome_indicator(event: &AuditEvent) -> u8 {
    match (event.outcome, event.event_type) {
        (Outcome::Success, _) => 0,
        (Outcome::Refused, _) | (Outcome::Failure, EventType::AuthFailure) => 4,
        (Outcome::Failure, _) => 8,
    }
}

/// Who runs the node, for AuditSourceIdentification and the node's ActiveParticipant.
#[derive(Debug, Clone)]
pub struct Source {
    /// AuditSourceID (default: the node's AE title).
    pub id: String,
    /// The node's AE title.
    pub ae_title: String,
    /// The node's host name (NetworkAccessPointID of the node).
    pub host: String,
}

/// The DICOM audit message of `event`, without an XML declaration or BOM.
pub fn message(event: &AuditEvent, source: &Source) -> String {
    let (id, type_code, action) = classify(event);
    let mut xml = String::with_capacity(1024);
    xml.push_str("<AuditMessage>");
    let _ = write!(
        xml,
        "<EventIdentification EventActionCode=\"{action}\" EventDateTime=\"{}\" \
         EventOutcomeIndicator=\"{}\">",
        format_time(event.occurred_at),
        outcome_indicator(event)
    );
    code_element(&mut xml, "EventID", id);
    if let Some(t) = type_code {
        code_element(&mut xml, "EventTypeCode", t);
    }
    if let Some(detail) = &event.detail {
        let _ = write!(
            xml,
            "<EventOutcomeDescription>{}</EventOutcomeDescription>",
            escape(detail)
        );
    }
    xml.push_str("</EventIdentification>");
    participants(&mut xml, event, source);
    let _ = write!(
        xml,
        "<AuditSourceIdentification AuditSourceID=\"{}\"/>",
        escape(&source.id)
    );
    participant_objects(&mut xml, event);
    xml.push_str("</AuditMessage>");
    xml
}

/// The peer and the node. In a transfer the sender has the Source role and the receiver the
/// Destination role; otherwise the peer (the actor) is the requestor.
fn participants(xml: &mut String, event: &AuditEvent, source: &Source) {
    let peer_host = event.peer.as_deref().map(host_of);
    let actor = event.actor.as_str();
    let cert = event.cert_subject.as_deref();
    match event.event_type {
        EventType::Forward => {
            // The node (as its calling AE title, the actor) sends to the destination.
            let destination = event.object.as_deref().unwrap_or("?");
            active_participant(xml, destination, None, false, peer_host, Some(DESTINATION));
            node_participant(xml, actor, source, true, SOURCE);
        }
        EventType::NodeStart | EventType::NodeStop | EventType::ConfigReload => {
            node_participant(xml, &source.ae_title, source, true, APPLICATION);
        }
        EventType::InstancesReceived => {
            active_participant(xml, actor, cert, true, peer_host, Some(SOURCE));
            node_participant(xml, &source.ae_title, source, false, DESTINATION);
        }
        _ => {
            active_participant(xml, actor, cert, true, peer_host, None);
            node_participant(xml, &source.ae_title, source, false, APPLICATION);
        }
    }
}

/// The node itself: `user` (an AE title), its process id, its host.
fn node_participant(xml: &mut String, user: &str, source: &Source, requestor: bool, role: Code) {
    let _ = write!(
        xml,
        "<ActiveParticipant UserID=\"{}\" AlternativeUserID=\"{}\" UserIsRequestor=\"{requestor}\" \
         NetworkAccessPointID=\"{}\" NetworkAccessPointTypeCode=\"{}\">",
        escape(user),
        std::process::id(),
        escape(&source.host),
        access_point_type(&source.host)
    );
    code_element(xml, "RoleIDCode", role);
    xml.push_str("</ActiveParticipant>");
}

fn active_participant(
    xml: &mut String,
    user: &str,
    cert_subject: Option<&str>,
    requestor: bool,
    host: Option<&str>,
    role: Option<Code>,
) {
    let _ = write!(
        xml,
        "<ActiveParticipant UserID=\"{}\" UserIsRequestor=\"{requestor}\"",
        escape(user)
    );
    if let Some(subject) = cert_subject {
        let _ = write!(xml, " UserName=\"{}\"", escape(subject));
    }
    if let Some(host) = host {
        let _ = write!(
            xml,
            " NetworkAccessPointID=\"{}\" NetworkAccessPointTypeCode=\"{}\"",
            escape(host),
            access_point_type(host)
        );
    }
    match role {
        Some(code) => {
            xml.push('>');
            code_element(xml, "RoleIDCode", code);
            xml.push_str("</ActiveParticipant>");
        }
        None => xml.push_str("/>"),
    }
}

/// The studies of a transfer (by Study Instance UID), and the route, destination, query
/// level or file concerned (the audit table's `object`).
fn participant_objects(xml: &mut String, event: &AuditEvent) {
    let studies = event.studies.as_deref().unwrap_or_default();
    for study in studies.split(',').filter(|s| !s.is_empty()) {
        let _ = write!(
            xml,
            "<ParticipantObjectIdentification ParticipantObjectID=\"{}\" \
             ParticipantObjectTypeCode=\"2\" ParticipantObjectTypeCodeRole=\"3\">",
            escape(study)
        );
        code_element(xml, "ParticipantObjectIDTypeCode", STUDY_UID);
        xml.push_str("</ParticipantObjectIdentification>");
    }
    if let Some(object) = &event.object {
        let _ = write!(
            xml,
            "<ParticipantObjectIdentification ParticipantObjectID=\"{}\" \
             ParticipantObjectTypeCode=\"2\" ParticipantObjectTypeCodeRole=\"{}\">\
             <ParticipantObjectIDTypeCode csd-code=\"12\" codeSystemName=\"RFC-3881\" \
             originalText=\"URI\"/></ParticipantObjectIdentification>",
            escape(object),
            if event.event_type == EventType::CFind {
                "24"
            } else {
                "13"
            }
        );
    }
}

fn code_element(xml: &mut String, name: &str, code: Code) {
    let _ = write!(
        xml,
        "<{name} csd-code=\"{}\" codeSystemName=\"DCM\" originalText=\"{}\"/>",
        code.code, code.meaning
    );
}

/// `1.2.3.4:5678` or `[::1]:5678` → the address without the port.
fn host_of(peer: &str) -> &str {
    if let Some(rest) = peer.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match peer.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => peer,
    }
}

/// RFC 3881: 1 machine name, 2 IP address.
fn access_point_type(host: &str) -> u8 {
    if host.parse::<std::net::IpAddr>().is_ok() {
        2
    } else {
        1
    }
}

/// XML attribute and text escaping; characters XML 1.0 cannot hold become `?`.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match entity(c) {
            Some(e) => out.push_str(e),
            None if c.is_control() && !matches!(c, '\t' | '\n' | '\r') => out.push('?'),
            None => out.push(c),
        }
    }
    out
}

/// The predefined XML entities.
fn entity(c: char) -> Option<&'static str> {
    Some(match c {
        '&' => "&amp;",
        '<' => "&lt;",
        '>' => "&gt;",
        '"' => "&quot;",
        '\'' => "&apos;",
        _ => return None,
    })
}

/// The syslog header fields of the node.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// HOSTNAME: printable ASCII without spaces, at most 255.
    pub host: String,
    /// APP-NAME: at most 48.
    pub app_name: String,
}

/// Facility 10 (security/authorization), severity 5 (notice), as IHE ATNA (ITI-20) sends.
const PRI: u8 = 10 * 8 + 5;
/// MSGID of DICOM audit messages in IHE ATNA.
const MSGID: &str = "IHE+RFC-3881";

impl Envelope {
    pub fn new(host: &str, app_name: &str) -> Envelope {
        Envelope {
            host: header_field(host, 255),
            app_name: header_field(app_name, 48),
        }
    }

    /// One RFC 5424 message: header, no structured data, a UTF-8 BOM and the XML.
    pub fn wrap(&self, event: &AuditEvent, xml: &str) -> Vec<u8> {
        let header = format!(
            "<{PRI}>1 {} {} {} {} {MSGID} - ",
            format_time(event.occurred_at),
            self.host,
            self.app_name,
            std::process::id()
        );
        let mut out = Vec::with_capacity(header.len() + 3 + xml.len());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(b"\xEF\xBB\xBF");
        out.extend_from_slice(xml.as_bytes());
        out
    }
}

/// RFC 5424 header fields: printable US-ASCII (33..=126), `-` when empty.
fn header_field(text: &str, max: usize) -> String {
    let clean: String = text
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if clean.is_empty() {
        "-".into()
    } else {
        clean
    }
}

/// RFC 5425 octet-counting framing: `LENGTH SP MESSAGE`.
pub fn octet_counted(message: &[u8]) -> Vec<u8> {
    let mut framed = format!("{} ", message.len()).into_bytes();
    framed.extend_from_slice(message);
    framed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> Source {
        Source {
            id: "ANATOMY@host".into(),
            ae_title: "ANATOMY".into(),
            host: "node1".into(),
        }
    }

    #[test]
    fn received_instances_are_a_transfer_with_studies() {
        let e = AuditEvent::new(EventType::InstancesReceived, Outcome::Success, "STORESCU")
            .peer("127.0.0.1:4000")
            .uids(&["1.2.3".into()], &["1.2.3.4".into()])
            .detail("4 stored, 0 failed");
        let xml = message(&e, &source());
        assert!(xml.contains("EventActionCode=\"C\""));
        assert!(xml.contains("<EventID csd-code=\"110104\" codeSystemName=\"DCM\""));
        assert!(xml.contains("EventOutcomeIndicator=\"0\""));
        assert!(xml.contains("ParticipantObjectID=\"1.2.3\""));
        assert!(xml.contains("NetworkAccessPointID=\"127.0.0.1\" NetworkAccessPointTypeCode=\"2\""));
        assert!(xml.contains("csd-code=\"110153\""), "{xml}");
    }

    #[test]
    fn refusals_and_bad_credentials_are_minor_failures_of_authentication() {
        let refused = AuditEvent::new(EventType::AssociationRefused, Outcome::Refused, "X");
        let bad = AuditEvent::new(EventType::AuthFailure, Outcome::Failure, "unauthenticated");
        for e in [refused, bad] {
            assert_eq!(classify(&e).0, USER_AUTHENTICATION);
            assert_eq!(outcome_indicator(&e), 4);
        }
        let qido = AuditEvent::new(EventType::HttpRequest, Outcome::Success, "token t")
            .object("GET /dicom-web/studies");
        assert_eq!(classify(&qido).0, QUERY);
        let wado = AuditEvent::new(EventType::HttpRequest, Outcome::Success, "token t")
            .object("GET /dicom-web/studies/1.2/series/3");
        assert_eq!(classify(&wado).0, INSTANCES_ACCESSED);
        let stow = AuditEvent::new(EventType::HttpRequest, Outcome::Success, "token t")
            .object("POST /dicom-web/studies");
        assert_eq!(classify(&stow).0, INSTANCES_TRANSFERRED);
    }

    #[test]
    fn a_forward_has_the_node_as_source_and_the_destination_as_destination() {
        let e = AuditEvent::new(EventType::Forward, Outcome::Success, "ANATOMY_FWD")
            .peer("10.0.0.9:104")
            .object("LUNG_CAD");
        let xml = message(&e, &source());
        let dest = xml.find("UserID=\"LUNG_CAD\"").expect("destination");
        let node = xml.find("UserID=\"ANATOMY_FWD\"").expect("node");
        let dest_role = xml[dest..].find("110152").expect("destination role") + dest;
        assert!(dest_role < node, "{xml}");
        assert!(xml[node..].contains("110153"), "{xml}");
        assert!(xml.contains("NetworkAccessPointID=\"10.0.0.9\""));
    }

    #[test]
    fn peer_text_is_escaped() {
        let e = AuditEvent::new(EventType::AssociationRefused, Outcome::Refused, "A\"<&>'")
            .peer("[::1]:104");
        let xml = message(&e, &source());
        assert!(
            xml.contains("UserID=\"A&quot;&lt;&amp;&gt;&apos;\""),
            "{xml}"
        );
        assert!(xml.contains("NetworkAccessPointID=\"::1\""));
    }

    #[test]
    fn syslog_header_is_rfc5424() {
        let mut e = AuditEvent::new(EventType::NodeStart, Outcome::Success, "node");
        e.occurred_at = 0;
        let env = Envelope::new("my host", "");
        let msg = env.wrap(&e, "<AuditMessage/>");
        let text = String::from_utf8_lossy(&msg);
        assert!(
            text.starts_with("<85>1 1970-01-01T00:00:00.000Z myhost - "),
            "{text}"
        );
        assert!(text.ends_with(" IHE+RFC-3881 - \u{feff}<AuditMessage/>"));
        assert!(octet_counted(b"abc").starts_with(b"3 abc"));
    }
}
