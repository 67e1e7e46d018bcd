//! # kvq — quantized KV-cache attention on any GPU
//!
//! kvq stores an attention KV cache per token and per head as F16, INT8 or packed
//! INT4 (keys and values each their own format) in a paged layout, and computes
//! attention straight from the quantized cache, dequantizing in registers.
//!
//! * [`KvDtype`] and [`quant`]: the storage formats, bit-exact (DESIGN §1).
//! * [`cache`]: the paged layout and host-side block bookkeeping, and [`KvCache`].
//! * [`Backend`]: what every device implements — [`cpu`] (reference), [`wgpu`](mod@crate::wgpu)
//!   (WGSL on Vulkan, Metal, DX12, GL) and [`cuda`] (feature `cuda`).
//! * [`select`]: picks a backend by probing the machine's adapters.
//!
//! ```no_run
//! use kvq::{AttnParams, CacheConfig, KvCache, KvDtype, Preference};
//! let chosen = kvq::select(&Preference::default())?;
//! let config = CacheConfig::new(1, 8, 128, 4096).with_dtypes(KvDtype::Int8, KvDtype::Int4 { group: 32 });
//! let mut cache = KvCache::new(chosen.backend, config)?;
//! let seq = cache.add_sequence();
//! let (k, v) = (vec![0.5f32; 8 * 128], vec![0.25f32; 8 * 128]);
//! cache.append(&[(seq, 1)], &k, &v)?;
//! let out = cache.decode(0, &[seq], &vec![1.0f32; 32 * 128], &AttnParams::new(32))?;
//! # Ok::<(), kvq::Error>(())
//! ```

// Every `unsafe` operation sits in its own block with a `// SAFETY:` comment
// saying why it holds (trusted shader modules, CUDA driver calls and launches).
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod advisor;
pub mod attn;
pub mod backend;
pub mod cache;
pub mod cpu;
pub mod cuda;
pub mod dtype;
mod error;
pub mod levels;
pub mod quant;
pub mod reference;
#[cfg(feature = "wgpu")]
pub mod wgpu;

pub use attn::AttnParams;
pub use backend::{
    Backend, BackendInfo, BackendKind, DeviceBuffer, DeviceType, Elem, Encoder, Preference,
    Selected, Tensor, probe, probe_async, select, select_async,
};
pub use cache::{CacheConfig, KvCache, Plan, SeqId};
pub use dtype::KvDtype;
pub use error::{Error, Result};
pub use levels::{CacheLevel, WeightLevel};
