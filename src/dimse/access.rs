//! Who may open an association: the called AE title must be ours, and the calling AE title
//! (optionally with its source address) must be on `dicom.allowed_peers`, unless
//! `dicom.allow_any_peer` is set. Rejections carry the PS3.8 reason the peer needs.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use dicom_ul::association::server::AccessControl;
use dicom_ul::pdu::{AssociationRJServiceUserReason, UserIdentity};

use crate::audit::{AuditEvent, AuditLog, EventType, Outcome};
use crate::config::AllowedPeer;

#[derive(Debug, Clone)]
pub struct PeerAccess {
    allow_any: bool,
    peers: Arc<Vec<AllowedPeer>>,
    source: IpAddr,
    /// Where refusals are recorded, with the peer's address.
    audit: Option<(AuditLog, SocketAddr)>,
}

impl PeerAccess {
    pub fn new(allow_any: bool, peers: Arc<Vec<AllowedPeer>>, source: IpAddr) -> Self {
        Self {
            allow_any,
            peers,
            source: canonical(source),
            audit: None,
        }
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
        reason: AssociationRJServiceUserReason,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if let Some((audit, peer)) = &self.audit {
            let why = match reason {
                AssociationRJServiceUserReason::CalledAETitleNotRecognized => {
                    format!("called AE title {:?} is not ours", called.trim())
                }
                _ => "calling AE title not on dicom.allowed_peers (for this address)".into(),
            };
            audit.record(
                AuditEvent::new(
                    EventType::AssociationRefused,
                    Outcome::Refused,
                    calling.trim(),
                )
                .peer(peer)
                .object(format!("called AE {}", called.trim()))
                .detail(why),
            );
        }
        Err(reason)
    }

    fn calling_allowed(&self, calling: &str) -> bool {
        self.allow_any
            || self.peers.iter().any(|p| {
                p.ae_title.trim() == calling && p.host.is_none_or(|h| canonical(h) == self.source)
            })
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
                AssociationRJServiceUserReason::CalledAETitleNotRecognized,
            );
        }
        if !self.calling_allowed(calling_ae_title.trim()) {
            return self.refuse(
                calling_ae_title,
                called_ae_title,
                AssociationRJServiceUserReason::CallingAETitleNotRecognized,
            );
        }
        Ok(())
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
            },
            AllowedPeer {
                ae_title: "ANYWHERE".into(),
                host: None,
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
    fn allow_any_peer_still_checks_called_title() {
        assert_eq!(
            access(true).check_access("ANATOMY", "STRANGER", "ANATOMY", None),
            Ok(())
        );
    }
}
