//! The DIMSE service class provider: listener → association → message reassembly →
//! services (C-ECHO, C-STORE, C-FIND). Names follow the standard (PS3.7, PS3.8).

pub mod access;
pub mod association;
pub mod command;
pub mod find;
pub mod listener;
pub mod sop_classes;
pub mod status;

use std::sync::Arc;

use crate::config::{AllowedPeer, Config};
use crate::metrics::Metrics;
use crate::store::Store;

/// What every association needs, shared.
pub struct ServiceContext {
    pub config: Arc<Config>,
    pub allowed_peers: Arc<Vec<AllowedPeer>>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    /// The C-FIND SCP (queries the index).
    pub find: find::FindScp,
    /// The audit trail (associations, received instances, C-FIND).
    pub audit: crate::audit::AuditLog,
}
