//! The DICOM network layer: connections accepted (SCP roles) and opened (SCU roles), over
//! plain TCP or TLS (PS3.15 Annex B), and who the peer is. Every role goes through here,
//! so transport security is written once.

pub mod association;
pub mod identity;
pub mod tls;

pub use association::{ClientAssociation, Incoming, ServerAssociation, Transport};
pub use identity::{CertificateIdentity, PeerIdentity};
pub use tls::{ClientTls, ClientTlsConfig, ServerFiles, ServerTls, ServerTlsConfig, TlsError};
