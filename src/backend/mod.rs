//! The `Backend` trait every device implements, what it reports, and selection.

mod buffer;
mod select;

pub use buffer::DeviceBuffer;
pub(crate) use select::Opener;
pub use select::{Candidate, Preference, Probe, Selected, probe, select};

use std::fmt;

use bytemuck::{Pod, Zeroable};

use crate::attn::Resolved;
use crate::cache::PoolLayout;
use crate::{Error, Result};

/// Which implementation a backend is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// The CPU reference.
    Cpu,
    /// wgpu (Vulkan, Metal, DX12, GL) with WGSL kernels.
    Wgpu,
    /// CUDA through cudarc and NVRTC.
    Cuda,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        })
    }
}

impl std::str::FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(BackendKind::Cpu),
            "wgpu" => Ok(BackendKind::Wgpu),
            "cuda" => Ok(BackendKind::Cuda),
            other => Err(Error::InvalidConfig(format!(
                "unknown backend {other:?}: expected cuda, wgpu or cpu"
            ))),
        }
    }
}

/// Kind of device, in the order selection prefers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceType {
    /// A discrete GPU.
    Discrete,
    /// A GPU sharing memory with the CPU.
    Integrated,
    /// A virtualised GPU.
    Virtual,
    /// A software rasteriser (llvmpipe, lavapipe, WARP) or the CPU itself.
    Cpu,
    /// Anything the driver does not classify.
    Other,
}

/// Limits that decide what a backend can hold and run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Largest buffer one binding can address, in bytes.
    pub max_buffer_bytes: u64,
    /// Workgroup (shared) memory, in bytes.
    pub max_workgroup_storage_bytes: u32,
    /// Invocations per workgroup.
    pub max_invocations_per_workgroup: u32,
    /// Workgroups per dispatch dimension.
    pub max_workgroups_per_dimension: u32,
}

/// What a backend is and runs on.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendInfo {
    /// The implementation.
    pub kind: BackendKind,
    /// Adapter or device name.
    pub name: String,
    /// Device type.
    pub device_type: DeviceType,
    /// Platform API (Vulkan, Metal, CUDA, …).
    pub api: String,
    /// Driver name and version.
    pub driver: String,
    /// Limits.
    pub limits: DeviceLimits,
    /// Optional features in use (e.g. `shader-f16`, `timestamp-query`).
    pub features: Vec<String>,
}

/// One K or V pool of one layer: codes and side data in DESIGN §2's layout.
#[derive(Debug, Clone)]
pub struct Pool {
    /// Shape and dtype.
    pub layout: PoolLayout,
    /// Code words.
    pub data: DeviceBuffer,
    /// Side words (scales, mins); at least one word so that it can be bound.
    pub side: DeviceBuffer,
}

/// Per-sequence record read by attention kernels (4 u32 words).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable, Default)]
#[repr(C)]
pub struct SeqInfo {
    /// Tokens cached for this sequence (the queries included).
    pub kv_len: u32,
    /// Where its block table starts in the flat block-table buffer.
    pub table_offset: u32,
    /// Row of its first query in q and out.
    pub q_offset: u32,
    /// Queries: the last `q_len` cached positions (1 for decode).
    pub q_len: u32,
}

/// Quantize-and-append: token `t` of `k_src`/`v_src` (`[tokens, kv_heads, head_dim]` f32)
/// goes to pool slot `slots[t]` (= block * block_size + slot in block).
#[derive(Debug, Clone, Copy)]
pub struct AppendArgs<'a> {
    /// Key pool.
    pub k: &'a Pool,
    /// Value pool.
    pub v: &'a Pool,
    /// New keys, f32 bits.
    pub k_src: &'a DeviceBuffer,
    /// New values, f32 bits.
    pub v_src: &'a DeviceBuffer,
    /// Destination slot of each token.
    pub slots: &'a DeviceBuffer,
    /// Number of tokens.
    pub tokens: usize,
}

/// Attention over the paged cache, decode or causal prefill.
#[derive(Debug, Clone, Copy)]
pub struct AttnArgs<'a> {
    /// Key pool.
    pub k: &'a Pool,
    /// Value pool.
    pub v: &'a Pool,
    /// Queries `[queries, q_heads, head_dim]`, f32 bits.
    pub q: &'a DeviceBuffer,
    /// Output, same shape as `q`.
    pub out: &'a DeviceBuffer,
    /// Flat block tables.
    pub block_tables: &'a DeviceBuffer,
    /// One record per sequence (host side: small, uploaded by the backend as needed).
    pub seqs: &'a [SeqInfo],
    /// Resolved parameters.
    pub params: Resolved,
}

impl AttnArgs<'_> {
    /// Total queries (rows of q).
    pub fn queries(&self) -> usize {
        self.seqs.iter().map(|s| s.q_len as usize).sum()
    }

    /// Longest kv_len in the batch.
    pub fn max_kv_len(&self) -> usize {
        self.seqs
            .iter()
            .map(|s| s.kv_len as usize)
            .max()
            .unwrap_or(0)
    }

    /// Checks the records against the pools and buffers; every backend calls this
    /// before touching device memory.
    pub fn check(&self) -> Result<()> {
        let kl = &self.k.layout;
        if self.v.layout.head_dim != kl.head_dim
            || self.v.layout.kv_heads != kl.kv_heads
            || self.v.layout.block_size != kl.block_size
        {
            return Err(Error::InvalidConfig("K and V pools differ in shape".into()));
        }
        kl.check()?;
        self.v.layout.check()?;
        for (data, side, pool) in [("K data", "K side", self.k), ("V data", "V side", self.v)] {
            pool.data
                .check_range(data, 0, pool.layout.data_alloc_words())?;
            pool.side.check_range(side, 0, pool.layout.side_words())?;
        }
        let row = self.params.q_heads as usize * kl.head_dim;
        let rows = self.queries() * row;
        self.q.check_range("q", 0, rows)?;
        self.out.check_range("out", 0, rows)?;
        let mut next_q = 0u32;
        for s in self.seqs {
            let blocks = (s.kv_len as usize).div_ceil(kl.block_size);
            if s.q_len == 0 || s.q_len > s.kv_len || s.q_offset != next_q {
                return Err(Error::InvalidConfig(format!("bad sequence record {s:?}")));
            }
            next_q += s.q_len;
            self.block_tables
                .check_range("block table", s.table_offset as usize, blocks)?;
        }
        Ok(())
    }
}

/// A device that stores quantized KV pools and runs kvq's kernels on them.
///
/// Object safe: use it as `Arc<dyn Backend>`. All device data lives in
/// [`DeviceBuffer`]s; host code (the cache bookkeeping) only moves small tensors.
pub trait Backend: Send + Sync + fmt::Debug {
    /// What this backend is and runs on.
    fn info(&self) -> &BackendInfo;

    /// Allocates `words` zeroed u32 words.
    fn alloc(&self, words: usize) -> Result<DeviceBuffer>;

    /// Copies host words into `buf` at `offset` (in words).
    fn upload(&self, buf: &DeviceBuffer, offset: usize, data: &[u32]) -> Result<()>;

    /// Copies `len` words at `offset` back to the host (waits for pending work).
    fn download(&self, buf: &DeviceBuffer, offset: usize, len: usize) -> Result<Vec<u32>>;

    /// Quantizes new K/V tokens and writes them into their pool slots.
    fn quantize_append(&self, args: &AppendArgs<'_>) -> Result<()>;

    /// Dequantizes the tokens at `slots` of `pool` into `out` (`[tokens, kv_heads, head_dim]`
    /// f32 bits); for tests and debugging.
    fn dequantize(
        &self,
        pool: &Pool,
        slots: &DeviceBuffer,
        tokens: usize,
        out: &DeviceBuffer,
    ) -> Result<()>;

    /// Decode attention: one query per sequence over all its cached tokens.
    fn decode(&self, args: &AttnArgs<'_>) -> Result<()>;

    /// Causal prefill attention: `q_len` queries per sequence, at its last positions.
    fn prefill(&self, args: &AttnArgs<'_>) -> Result<()>;

    /// Reads `words` words of `buf` with a trivial streaming kernel and waits: the
    /// roofline that attention's bytes per second are compared with (DESIGN §5).
    fn stream(&self, buf: &DeviceBuffer, words: usize) -> Result<()>;

    /// Waits until all submitted work is done.
    fn synchronize(&self) -> Result<()>;

    /// Turns recording of device time on or off (timestamp queries around each
    /// kernel, for benchmarks; DESIGN §5). Returns whether the device records it.
    fn set_timing(&self, on: bool) -> bool {
        let _ = on;
        false
    }

    /// Device time of the kernels submitted since the last call while timing was
    /// on, once they are done (waits); `None` if none were timed.
    fn take_device_time(&self) -> Result<Option<std::time::Duration>> {
        Ok(None)
    }
}
