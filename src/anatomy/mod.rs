//! Telling which part of the body a CT image shows (Roth et al. 2015).
//!
//! [`pixels`] turns a stored image into the array the model sees; it is the one
//! implementation of the preprocessing contract (docs/contracts.md), shared by the node and
//! by `anatomy-node dataset build`. [`model`] runs the ONNX classifier on those arrays
//! (ONNX Runtime, CUDA or CPU) after checking the model file against the same contract.
//! [`classify`] joins them: chosen images in, per-image class probabilities out (the
//! classification worker and `anatomy-node classify` both call it).

pub mod classify;
pub mod coverage;
pub mod model;
pub mod order;

pub mod pixels;
pub mod select;
pub mod worker;
