//! Telling which part of the body a CT image shows (Roth et al. 2015).
//!
//! [`pixels`] turns a stored image into the array the model sees; it is the one
//! implementation of the preprocessing contract (docs/contracts.md), shared by the node and
//! by `anatomy-node dataset build`.

pub mod pixels;
