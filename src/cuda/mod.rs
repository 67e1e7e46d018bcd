//! The CUDA backend (feature `cuda`). The module exists either way so that callers
//! compile the same; without the feature every entry point answers
//! [`Error::CudaNotCompiled`](crate::Error::CudaNotCompiled).

#[cfg(not(feature = "cuda"))]
mod stub;
#[cfg(not(feature = "cuda"))]
pub use stub::*;

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
pub mod kernels;
#[cfg(feature = "cuda")]
pub use device::*;
