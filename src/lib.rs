//! anatomy-node: a DICOM node that stores CT series durably, tells which part of the
//! body each series shows, and routes labelled studies to CAD modules.
//!
//! The modules follow an instance from socket to label:
//! [`dimse`] (associations, C-ECHO, C-STORE) → [`store`] (durable files) →
//! [`index`] (database) → [`series`] (completion) → [`anatomy`] (labels) → [`forward`]
//! (routing, tagged copies, C-STORE to CAD modules) … and [`web`], [`metrics`] beside them.

pub mod anatomy;
pub mod audit;
pub mod classify_cli;
pub mod config;
pub mod dataset;
pub mod dimse;
pub mod error_text;
pub mod eval;
pub mod forward;
pub mod fuzz;
pub mod index;
pub mod metrics;
pub mod mine;
pub mod net;
pub mod node;
pub mod phi;
pub mod private_block;
pub mod series;
pub mod store;
pub mod synth;
pub mod web;
