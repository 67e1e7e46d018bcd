//! Stand-in for the CUDA backend when the `cuda` feature is off.

use std::sync::Arc;

use crate::backend::{Backend, BackendInfo};
use crate::{Error, Result};

/// Number of CUDA devices; always an error without the `cuda` feature.
pub fn device_count() -> Result<usize> {
    Err(Error::CudaNotCompiled)
}

/// Opens CUDA device `ordinal`; always an error without the `cuda` feature.
pub fn open(ordinal: usize) -> Result<Arc<dyn Backend>> {
    let _ = ordinal;
    Err(Error::CudaNotCompiled)
}

/// Describes CUDA device `ordinal`; always an error without the `cuda` feature.
pub fn describe(ordinal: usize) -> Result<BackendInfo> {
    let _ = ordinal;
    Err(Error::CudaNotCompiled)
}

/// CUDA candidates for selection: none without the feature.
pub(crate) fn probe() -> Vec<crate::backend::Candidate> {
    Vec::new()
}
