//! The `Backend` trait every device implements, what it reports, and selection.

mod buffer;
// Used by the GPU backends only.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub(crate) mod lease;
mod record;
mod select;

pub use buffer::DeviceBuffer;
pub use record::{Elem, Encoder, Prepared, Seal, SeqInfo, Step, Tensor};
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub(crate) use select::Opener;
pub use select::{
    Candidate, Preference, Probe, Selected, probe, probe_async, select, select_async,
};

use std::fmt;

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
    /// Largest buffer, in bytes: a pool past it is refused.
    pub max_buffer_bytes: u64,
    /// Largest range of a buffer one storage binding can address, in bytes: a pool
    /// past it is bound in windows of whole blocks (DESIGN §2).
    pub max_binding_bytes: u64,
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

impl Pool {
    /// Checks that the buffers hold the layout's code and side words; `names` name
    /// them in the error.
    pub fn check_buffers(&self, names: [&'static str; 2]) -> Result<()> {
        let l = &self.layout;
        self.data.check_range(names[0], 0, l.data_alloc_words())?;
        self.side.check_range(names[1], 0, l.side_words())
    }

    /// Checks the arguments of [`Backend::reopen`]: the pool's buffers, an
    /// Int4Channel pool, each move from a quantized slot to an open one.
    pub fn check_reopen(&self, moves: &[[u32; 2]]) -> Result<()> {
        let l = &self.layout;
        self.check_buffers(["pool data", "pool side"])?;
        if !l.dtype.per_channel() {
            return Err(Error::InvalidConfig(format!(
                "reopen: a {} pool has no open blocks",
                l.dtype
            )));
        }
        let (cap, opens) = (l.capacity(), l.open_blocks * l.block_size);
        let bad =
            |[q, o]: &&[u32; 2]| *q as usize >= cap || !(cap..cap + opens).contains(&(*o as usize));
        match moves.iter().find(bad) {
            Some(m) => Err(Error::OutOfRange {
                what: "reopen slot",
                value: m[0].max(m[1]) as usize,
                limit: cap + opens,
            }),
            None => Ok(()),
        }
    }

    /// Checks the arguments of [`Backend::reopen`] over `pools` (a cache's
    /// layers): each as [`Self::check_reopen`], all of one layout, which it
    /// returns (`None` for no pools).
    pub fn check_reopen_all<'p>(
        pools: &[&'p Pool],
        moves: &[[u32; 2]],
    ) -> Result<Option<&'p PoolLayout>> {
        let Some(first) = pools.first() else {
            return Ok(None);
        };
        for pool in pools {
            pool.check_reopen(moves)?;
            if pool.layout != first.layout {
                return Err(Error::InvalidConfig(
                    "reopen: the pools differ in layout".into(),
                ));
            }
        }
        Ok(Some(&first.layout))
    }

    /// Checks the arguments of [`Backend::dequantize`]: the layout and the pool's
    /// buffers, `tokens` slots in `slots`, and room for `[tokens, kv_heads,
    /// head_dim]` f32 in `out`.
    pub fn check_dequantize(
        &self,
        slots: &DeviceBuffer,
        tokens: usize,
        out: &DeviceBuffer,
    ) -> Result<()> {
        let l = &self.layout;
        l.check()?;
        self.check_buffers(["pool data", "pool side"])?;
        slots.check_range("dequantize slots", 0, tokens)?;
        let values = tokens
            .checked_mul(l.kv_heads * l.head_dim)
            .ok_or(Error::OutOfRange {
                what: "dequantize tokens",
                value: tokens,
                limit: usize::MAX / (l.kv_heads * l.head_dim).max(1),
            })?;
        out.check_range("dequantize out", 0, values)
    }
}

/// The slots of [`Backend::reopen`]'s moves as its kernels read them: every source
/// (quantized) slot, then every destination (open) slot.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub(crate) fn reopen_slots(moves: &[[u32; 2]]) -> Vec<u32> {
    moves
        .iter()
        .map(|m| m[0])
        .chain(moves.iter().map(|m| m[1]))
        .collect()
}

/// A device that stores quantized KV pools and runs kvq's kernels on them.
///
/// Object safe: use it as `Arc<dyn Backend>`. All device data lives in
/// [`DeviceBuffer`]s. Work is *prepared* once per step ([`Backend::prepare`]: the
/// host's records and tables uploaded, the keys partitioned) and *recorded* per
/// layer into an [`Encoder`] ([`Backend::record_append`],
/// [`Backend::record_attention`]) on tensors the caller owns (DESIGN §7): into the
/// application's wgpu command encoder, or run at once on the CPU reference.
/// [`Backend::run`] records into an encoder of the backend's own and submits it.
pub trait Backend: Send + Sync + fmt::Debug {
    /// What this backend is and runs on.
    fn info(&self) -> &BackendInfo;

    /// Allocates `words` zeroed u32 words.
    fn alloc(&self, words: usize) -> Result<DeviceBuffer>;

    /// Copies host words into `buf` at `offset` (in words).
    fn upload(&self, buf: &DeviceBuffer, offset: usize, data: &[u32]) -> Result<()>;

    /// Copies `len` words at `offset` back to the host (waits for pending work).
    fn download(&self, buf: &DeviceBuffer, offset: usize, len: usize) -> Result<Vec<u32>>;

    /// Does a step's host work once: checks and uploads its append slots, sequence
    /// records and block tables, partitions its attention for this device, and
    /// readies the kernels. The returned state serves every layer's records.
    fn prepare(&self, step: &Step<'_>) -> Result<Prepared>;

    /// Records quantize-append of the step's new tokens, `k` and `v`
    /// (`[tokens, kv_heads, head_dim]`), into `pools` (K, V).
    /// Checks everything it can before recording anything.
    fn record_append(
        &self,
        enc: &mut Encoder<'_>,
        step: &Prepared,
        pools: (&Pool, &Pool),
        k: &Tensor<'_>,
        v: &Tensor<'_>,
    ) -> Result<()>;

    /// Records the step's attention (decode or causal prefill) of `q`
    /// (`[queries, q_heads, head_dim]`) over the pools, into `out` (same shape).
    /// Checks everything it can before recording anything.
    fn record_attention(
        &self,
        enc: &mut Encoder<'_>,
        step: &Prepared,
        pools: (&Pool, &Pool),
        q: &Tensor<'_>,
        out: &Tensor<'_>,
    ) -> Result<()>;

    /// Runs `record` on an encoder of this backend's own, submits what it recorded
    /// and reports device errors raised meanwhile.
    fn run(&self, record: &mut dyn FnMut(&mut Encoder<'_>) -> Result<()>) -> Result<()>;

    /// Moves the keys of Int4Channel pool slots back into open blocks in every
    /// one of `pools` (a cache's K pools, one per layer), for each (quantized
    /// slot, open slot) pair: dequantized, then stored F16 as the open block
    /// holds keys (a truncate into a full block reopens it, DESIGN §2). All or
    /// nothing: every pool and move is checked and everything allocated before
    /// the first pool is written. Waits until done.
    fn reopen(&self, pools: &[&Pool], moves: &[[u32; 2]]) -> Result<()> {
        let _ = (pools, moves);
        Err(Error::Unsupported(format!(
            "int4c keys on the {} backend",
            self.info().kind
        )))
    }

    /// Dequantizes the tokens at `slots` of `pool` into `out` (`[tokens, kv_heads, head_dim]`
    /// f32 bits); for tests and debugging. An Int4Channel pool's slots past its
    /// capacity address its open blocks.
    fn dequantize(
        &self,
        pool: &Pool,
        slots: &DeviceBuffer,
        tokens: usize,
        out: &DeviceBuffer,
    ) -> Result<()>;

    /// Reads `words` words of `buf` with a trivial streaming kernel and waits: the
    /// roofline that attention's bytes per second are compared with (DESIGN §5).
    fn stream(&self, buf: &DeviceBuffer, words: usize) -> Result<()>;

    /// Waits until all submitted work is done.
    fn synchronize(&self) -> Result<()>;

    /// Device objects (buffers, bind groups, pipelines, …) created so far: a warm
    /// step should create none.
    fn creations(&self) -> u64;

    /// Turns recording of device time on or off (timestamp queries around each
    /// kernel, for benchmarks; DESIGN §5). Returns whether the device records it.
    /// Meant for one thread: kernels other threads submit meanwhile are timed too.
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
