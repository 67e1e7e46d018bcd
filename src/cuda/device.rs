//! CUDA backend through cudarc (dynamic loading, NVRTC at run time).
//!
//! Not implemented yet: the entry points answer a clear error so that selection
//! reports CUDA devices as rejected rather than failing to build.

use std::sync::Arc;

use crate::backend::{Backend, BackendInfo};
use crate::{Error, Result};

fn not_yet() -> Error {
    Error::Unsupported("the CUDA backend's kernels are not implemented yet".into())
}

/// Number of CUDA devices the driver reports.
pub fn device_count() -> Result<usize> {
    Err(not_yet())
}

/// Opens CUDA device `ordinal`.
pub fn open(ordinal: usize) -> Result<Arc<dyn Backend>> {
    let _ = ordinal;
    Err(not_yet())
}

/// Describes CUDA device `ordinal`.
pub fn describe(ordinal: usize) -> Result<BackendInfo> {
    let _ = ordinal;
    Err(not_yet())
}

/// CUDA candidates for selection.
pub(crate) fn probe() -> Vec<crate::backend::Candidate> {
    Vec::new()
}
