//! Who may open an association: the called AE title must be ours, and the calling AE title
//! (optionally with its source address) must be on `dicom.allowed_peers`, unless
//! `dicom.allow_any_peer` is set. An allowed peer pinned to a client certificate
//! (`cert_subject`, `cert_sha256`) must also have shown that certificate in the TLS
//! handshake of this connection; its title alone, even with `allow_any_peer`, is not enough.
//! Rejections carry the PS3.8 reason the peer needs and are audited.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use dicom_ul::association::server::AccessControl;
use dicom_ul::pdu::{AssociationRJServiceUserReason, UserIdentity};

use crate::audit::{AuditEvent, AuditLog, EventType, Outcome};
use crate::config::AllowedPeer;
use crate::net::tls::ClientCertSlot;
use crate::net::CertificateIdentity;

/// What the calling AE title (with the address and certificate) comes to.
#[derive(Debug, PartialEq, Eq)]
enum Calling {
    Allowed,
    Unknown,
    /// On the list, but pinned to a certificate this connection did not show.
    CertificateMismatch,
}

#[derive(Debug, Clone)]
pub struct PeerAccess {
    allow_any: bool,
    peers: Arc<Vec<AllowedPeer>>,
    source: IpAddr,
    /// Where refusals are recorded, with the peer's address.
    audit: Option<(AuditLog, SocketAddr)>,
    /// The client certificate the TLS handshake accepted (empty on plain TCP).
    client_cert: ClientCertSlot,
}

impl PeerAccess {
    pub fn new(allow_any: bool, peers: Arc<Vec<AllowedPeer>>, source: IpAddr) -> Self {
        Self {
            allow_any,
            peers,
            source: canonical(source),
            audit: None,
            client_cert: ClientCertSlot::default(),
        }
    }

    /// Check pins against the certificate the connection's handshake puts in `slot`.
    pub fn with_client_cert(mut self, slot: ClientCertSlot) -> Self {
        self.client_cert = slot;
        self
    }

    /// Record each refusal in the audit trail (the calling AE title, the address, why).
    pub fn with_audit(mut self, audit: AuditLog, peer: SocketAddr) -> Self {
        self.audit = Some((audit, peer));
        self
    }

    fn refuse(
        &self,
        calling: &str,
        called: &str,
        why: String,
        reason: AssociationRJServiceUserReason,
    ) -> Result<(), AssociationRJServiceUserReason> {
        tracing::warn!(calling_ae = calling.trim(), reason = %why, "association refused");
        if let Some((audit, peer)) = &self.audit {
            audit.record(
                AuditEvent::new(
                    EventType::AssociationRefused,
                    Outcome::Refused,
                    calling.trim(),
                )
                .peer(peer)
                .certificate(self.client_cert.get().map(CertificateIdentity::of).as_ref())
                .object(format!("called AE {}", called.trim()))
                .detail(why),
            );
        }
        Err(reason)
    }

    fn calling(&self, calling: &str) -> Calling {
        let mut listed = self
            .peers
            .iter()
            .filter(|p| {
                p.ae_title.trim() == calling && p.host.is_none_or(|h| canonical(h) == self.source)
            })
            .peekable();
        if listed.peek().is_none() {
            return if self.allow_any {
                Calling::Allowed
            } else {
                Calling::Unknown
            };
        }
        let shown = self.client_cert.get().map(CertificateIdentity::of);
        let satisfied = |p: &AllowedPeer| {
            let pinned = p.cert_subject.is_some() || p.cert_sha256.is_some();
            !pinned
                || shown
                    .as_ref()
                    .is_some_and(|c| c.matches(p.cert_subject.as_deref(), p.cert_sha256.as_deref()))
        };
        if listed.any(satisfied) {
            Calling::Allowed
        } else {
            Calling::CertificateMismatch
        }
    }

    /// The client certificate, for messages.
    fn shown(&self) -> String {
        match self.client_cert.get() {
            Some(der) => format!("client certificate {}", CertificateIdentity::of(der)),
            None => "no client certificate".into(),
        }
    }
}

/// An IPv4 peer reaching a dual-stack socket shows up as ::ffff:a.b.c.d.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl AccessControl for PeerAccess {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if called_ae_title.trim() != this_ae_title.trim() {
            return self.refuse(
                calling_ae_title,
                called_ae_title,
                format!("called AE title {:?} is not ours", called_ae_title.trim()),
                AssociationRJServiceUserReason::CalledAETitleNotRecognized,
            );
        }
        let why = match self.calling(calling_ae_title.trim()) {
            Calling::Allowed => return Ok(()),
            Calling::Unknown => {
                "calling AE title not on dicom.allowed_peers (for this address)".to_string()
            }
            Calling::CertificateMismatch => format!(
                "calling AE title is pinned to a client certificate; {} does not match",
                self.shown()
            ),
        };
        self.refuse(
            calling_ae_title,
            called_ae_title,
            why,
            AssociationRJServiceUserReason::CallingAETitleNotRecognized,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(allow_any: bool) -> PeerAccess {
        let peers = vec![
            AllowedPeer {
                ae_title: "PACS".into(),
                host: Some("10.0.0.5".parse().unwrap()),
                ..Default::default()
            },
            AllowedPeer {
                ae_title: "ANYWHERE".into(),
                ..Default::default()
            },
            AllowedPeer {
                ae_title: "PINNED".into(),
                cert_sha256: Some("ab:cd".into()),
                ..Default::default()
            },
        ];
        PeerAccess::new(
            allow_any,
            Arc::new(peers),
            "::ffff:10.0.0.5".parse().unwrap(),
        )
    }

    #[test]
    fn called_title_must_be_ours() {
        assert_eq!(
            access(true).check_access("ANATOMY", "PACS", "OTHER", None),
            Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized)
        );
    }

    #[test]
    fn calling_title_and_address_are_checked() {
        let a = access(false);
        assert_eq!(a.check_access("ANATOMY", "PACS", "ANATOMY", None), Ok(()));
        assert_eq!(
            a.check_access("ANATOMY", "ANYWHERE", "ANATOMY", None),
            Ok(())
        );
        assert_eq!(
            a.check_access("ANATOMY", "STRANGER", "ANATOMY", None),
            Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
        );
        let elsewhere = PeerAccess::new(false, a.peers.clone(), "10.0.0.6".parse().unwrap());
        assert_eq!(
            elsewhere.check_access("ANATOMY", "PACS", "ANATOMY", None),
            Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
        );
    }

    #[test]
    fn a_pinned_peer_without_its_certificate_is_refused_even_with_allow_any() {
        for allow_any in [false, true] {
            assert_eq!(
                access(allow_any).check_access("ANATOMY", "PINNED", "ANATOMY", None),
                Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
            );
        }
    }

    #[test]
    fn allow_any_peer_still_checks_called_title() {
        assert_eq!(
            access(true).check_access("ANATOMY", "STRANGER", "ANATOMY", None),
            Ok(())
        );
    }
}
