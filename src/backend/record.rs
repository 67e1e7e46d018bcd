//! The device path (DESIGN §7): a step is prepared once ([`Step`] →
//! [`Prepared`]), then each layer's append and attention are recorded into an
//! [`Encoder`] on [`Tensor`]s the application owns.

use std::any::Any;
use std::fmt;

use bytemuck::{Pod, Zeroable};

use super::DeviceBuffer;
use crate::attn::Resolved;
use crate::cache::PoolLayout;
use crate::{Error, Result};

/// Where a backend records work.
#[non_exhaustive]
pub enum Encoder<'a> {
    /// Nowhere: the work runs as it is recorded (the CPU reference).
    Immediate,
    /// A wgpu command encoder the application owns and submits.
    #[cfg(feature = "wgpu")]
    Wgpu(&'a mut ::wgpu::CommandEncoder),
    /// A CUDA stream: work is launched on it, in order, as it is recorded.
    #[cfg(feature = "cuda")]
    Cuda(&'a cudarc::driver::CudaStream),
    /// Holds the lifetime in a build with neither GPU backend.
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    #[doc(hidden)]
    None(std::marker::PhantomData<&'a mut ()>),
}

impl fmt::Debug for Encoder<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encoder::Immediate => "Encoder::Immediate",
            #[cfg(feature = "wgpu")]
            Encoder::Wgpu(_) => "Encoder::Wgpu",
            #[cfg(feature = "cuda")]
            Encoder::Cuda(_) => "Encoder::Cuda",
            #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
            Encoder::None(_) => "Encoder::None",
        })
    }
}

/// Element type of a tensor in device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Elem {
    /// IEEE binary32.
    F32,
    /// IEEE binary16, two per 32-bit word, the lower element in the low half.
    F16,
}

impl Elem {
    /// Bytes of `n` elements, rounded up to whole 32-bit words.
    pub fn bytes(self, n: usize) -> usize {
        match self {
            Elem::F32 => 4 * n,
            Elem::F16 => 4 * n.div_ceil(2),
        }
    }
}

/// A tensor of `Elem`s in a device buffer, from byte `offset` on; its shape is what
/// the call that takes it says (`[tokens, kv_heads, head_dim]` for K and V,
/// `[queries, q_heads, head_dim]` for q and the output).
#[derive(Debug, Clone, Copy)]
pub struct Tensor<'a> {
    /// The buffer.
    pub buffer: &'a DeviceBuffer,
    /// Where the tensor starts, in bytes (a multiple of the device's storage offset
    /// alignment, 256 on most GPUs).
    pub offset: u64,
    /// Element type.
    pub elem: Elem,
}

impl<'a> Tensor<'a> {
    /// f32 elements from the start of `buffer`.
    pub fn f32(buffer: &'a DeviceBuffer) -> Self {
        Tensor {
            buffer,
            offset: 0,
            elem: Elem::F32,
        }
    }

    /// f16 elements from the start of `buffer`.
    pub fn f16(buffer: &'a DeviceBuffer) -> Self {
        Tensor {
            elem: Elem::F16,
            ..Self::f32(buffer)
        }
    }

    /// The same tensor starting `offset` bytes into the buffer.
    pub fn at(self, offset: u64) -> Self {
        Tensor { offset, ..self }
    }

    /// Checks that `n` elements fit the buffer from the offset and that the offset
    /// is a multiple of `align` bytes; returns the bytes they take.
    pub fn check(&self, what: &'static str, n: usize, align: u64) -> Result<u64> {
        if align > 0 && self.offset % align != 0 {
            return Err(Error::InvalidConfig(format!(
                "{what}: offset {} is not a multiple of the device's storage offset alignment {align}",
                self.offset
            )));
        }
        let bytes = self.elem.bytes(n) as u64;
        let have = self.buffer.words() as u64 * 4;
        if self.offset.checked_add(bytes).is_none_or(|end| end > have) {
            let per_word = if self.elem == Elem::F16 { 2 } else { 1 };
            return Err(Error::ShapeMismatch {
                what,
                expected: n,
                got: (have.saturating_sub(self.offset) / 4) as usize * per_word,
            });
        }
        Ok(bytes)
    }
}

/// Per-sequence record read by attention kernels (5 u32 words).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable, Default)]
#[repr(C)]
pub struct SeqInfo {
    /// Tokens cached for this sequence (the queries included).
    pub kv_len: u32,
    /// Where its block table starts in the flat block-table array.
    pub table_offset: u32,
    /// Row of its first query in q and out.
    pub q_offset: u32,
    /// Queries: the last `q_len` cached positions (1 for decode).
    pub q_len: u32,
    /// Int4Channel keys: the open block holding the keys of its partly filled last
    /// block (any value when it has none).
    pub open: u32,
}

impl SeqInfo {
    /// Words of one record.
    pub const WORDS: usize = 5;
}

/// One block an append fills, for an Int4Channel K pool to quantize (4 u32 words):
/// its first `from_open` tokens come from open block `open`, the rest are the
/// step's new keys from token `first` on (DESIGN §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable, Default)]
#[repr(C)]
pub struct Seal {
    /// The pool block quantized.
    pub block: u32,
    /// The open block its earlier tokens are in.
    pub open: u32,
    /// How many of its tokens are in the open block.
    pub from_open: u32,
    /// The step's token (its index in k) of the block's first new token.
    pub first: u32,
}

/// The host's description of one step over a cache whose pools are laid out as
/// `k` and `v`: new tokens to append (their pool slots) and queries to attend.
#[derive(Debug, Clone, Copy)]
pub struct Step<'a> {
    /// Key pool layout.
    pub k: &'a PoolLayout,
    /// Value pool layout.
    pub v: &'a PoolLayout,
    /// Pool slot of each new token, in batch order (empty: nothing to append).
    pub slots: &'a [u32],
    /// Int4Channel keys: each new token's key slot in its open block, or `u32::MAX`
    /// where a seal takes it (empty otherwise).
    pub open_slots: &'a [u32],
    /// Int4Channel keys: the blocks the append fills.
    pub seals: &'a [Seal],
    /// One record per sequence attended (empty: no attention).
    pub seqs: &'a [SeqInfo],
    /// Their block tables, flat.
    pub tables: &'a [u32],
    /// Attention parameters (`None` when nothing is attended).
    pub params: Option<Resolved>,
    /// Decode (one query per sequence, keys split across workgroups) or prefill.
    pub decode: bool,
}

/// A step's records in one array, each region (offset, bytes) at a multiple of the
/// alignment it was laid out with: the append slots, the attention kernel's work
/// records, the block tables, and for Int4Channel keys the open slots, the seals
/// and the identity slots that stage the new keys.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[derive(Debug, Clone)]
pub(crate) struct Records {
    pub(crate) words: Vec<u32>,
    pub(crate) slots: (u64, u64),
    pub(crate) work: (u64, u64),
    pub(crate) tables: (u64, u64),
    pub(crate) open_slots: (u64, u64),
    pub(crate) seals: (u64, u64),
    pub(crate) stage: (u64, u64),
}

impl Step<'_> {
    /// The step's slots, `work` and tables in one array, each region starting at a
    /// multiple of `align` bytes (a storage binding's offset alignment, say).
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    pub(crate) fn records(&self, work: &[u32], align: u64) -> Records {
        let mut words = Vec::new();
        let mut region = |part: &[u32]| {
            let offset = (words.len() as u64 * 4).next_multiple_of(align.max(4));
            words.resize(offset as usize / 4, 0);
            words.extend_from_slice(part);
            (offset, part.len() as u64 * 4)
        };
        let slots = region(self.slots);
        let work = region(work);
        let tables = region(self.tables);
        let open_slots = region(self.open_slots);
        let seals = region(bytemuck::cast_slice(self.seals));
        let identity: Vec<u32> = if self.seals.is_empty() {
            Vec::new()
        } else {
            (0..self.slots.len() as u32).collect()
        };
        let stage = region(&identity);
        Records {
            words,
            slots,
            work,
            tables,
            open_slots,
            seals,
            stage,
        }
    }

    /// Checks the Int4Channel records: open slots (one per token) within the open
    /// blocks, seals of pool blocks from open blocks, their tokens within the step,
    /// and every sequence's open block.
    fn check_open(&self) -> Result<()> {
        let k = self.k;
        let bs = k.block_size;
        if !k.dtype.per_channel() {
            if self.open_slots.is_empty() && self.seals.is_empty() {
                return Ok(());
            }
            return Err(Error::InvalidConfig(
                "open slots and seals are for int4c key pools".into(),
            ));
        }
        if self.open_slots.len() != self.slots.len() {
            return Err(Error::ShapeMismatch {
                what: "open slots",
                expected: self.slots.len(),
                got: self.open_slots.len(),
            });
        }
        let (capacity, opens) = (k.capacity(), k.open_blocks * bs);
        let bad_slot =
            |&&s: &&u32| s != u32::MAX && !(capacity..capacity + opens).contains(&(s as usize));
        if let Some(&s) = self.open_slots.iter().find(bad_slot) {
            return Err(Error::OutOfRange {
                what: "open slot",
                value: s as usize,
                limit: capacity + opens,
            });
        }
        for s in self.seals {
            let tokens = (s.first as usize).checked_add(bs - (s.from_open as usize).min(bs));
            if s.block as usize >= k.num_blocks
                || s.open as usize >= k.open_blocks
                || s.from_open as usize >= bs
                || tokens.is_none_or(|end| end > self.slots.len())
            {
                return Err(Error::InvalidConfig(format!("bad seal {s:?}")));
            }
        }
        if let Some(s) = self
            .seqs
            .iter()
            .find(|s| s.kv_len as usize % bs != 0 && s.open as usize >= k.open_blocks)
        {
            return Err(Error::InvalidConfig(format!(
                "bad sequence record {s:?}: no open block"
            )));
        }
        Ok(())
    }

    /// Total queries.
    pub fn queries(&self) -> usize {
        self.seqs.iter().map(|s| s.q_len as usize).sum()
    }

    /// Longest kv_len.
    pub fn max_kv_len(&self) -> usize {
        self.seqs
            .iter()
            .map(|s| s.kv_len as usize)
            .max()
            .unwrap_or(0)
    }

    /// Checks the records against the pools: shapes agree, queries are contiguous,
    /// every table entry names a block of the pool. Backends call it in `prepare`.
    pub fn check(&self) -> Result<()> {
        let (k, v) = (self.k, self.v);
        if v.head_dim != k.head_dim
            || v.kv_heads != k.kv_heads
            || v.block_size != k.block_size
            || v.num_blocks != k.num_blocks
        {
            return Err(Error::InvalidConfig("K and V pools differ in shape".into()));
        }
        k.check()?;
        v.check()?;
        let capacity = k.num_blocks * k.block_size;
        if let Some(&s) = self.slots.iter().find(|&&s| s as usize >= capacity) {
            return Err(Error::OutOfRange {
                what: "slot",
                value: s as usize,
                limit: capacity,
            });
        }
        self.check_open()?;
        if let Some(&b) = self.tables.iter().find(|&&b| b as usize >= k.num_blocks) {
            return Err(Error::OutOfRange {
                what: "block",
                value: b as usize,
                limit: k.num_blocks,
            });
        }
        match self.params {
            Some(p) if p.q_heads == 0 || p.q_heads % k.kv_heads as u32 != 0 => {
                return Err(Error::InvalidConfig(format!(
                    "q_heads {} is not a positive multiple of kv_heads {}",
                    p.q_heads, k.kv_heads
                )));
            }
            None if !self.seqs.is_empty() => {
                return Err(Error::InvalidConfig(
                    "a step that attends needs attention parameters".into(),
                ));
            }
            _ => {}
        }
        let mut next_q = 0u32;
        for s in self.seqs {
            let blocks = (s.kv_len as usize).div_ceil(k.block_size);
            let in_tables = (s.table_offset as usize)
                .checked_add(blocks)
                .is_some_and(|end| end <= self.tables.len());
            if s.q_len == 0 || s.q_len > s.kv_len || s.q_offset != next_q || !in_tables {
                return Err(Error::InvalidConfig(format!("bad sequence record {s:?}")));
            }
            if self.decode && s.q_len != 1 {
                return Err(Error::InvalidConfig(
                    "decode takes one query per sequence".into(),
                ));
            }
            next_q += s.q_len;
        }
        Ok(())
    }
}

/// A step prepared by one backend: what it uploaded and decided once (slots,
/// records, tables, the split of the keys), for every layer's records to use.
pub struct Prepared {
    /// New tokens to append.
    pub tokens: usize,
    /// Queries to attend.
    pub queries: usize,
    /// Query heads.
    pub q_heads: usize,
    /// The pools' layouts it was prepared for.
    pub layouts: (PoolLayout, PoolLayout),
    inner: Box<dyn Any + Send + Sync>,
}

impl Prepared {
    /// Wraps a backend's own state for `step`.
    pub fn new<T: Any + Send + Sync>(step: &Step<'_>, inner: T) -> Self {
        Prepared {
            tokens: step.slots.len(),
            queries: step.queries(),
            q_heads: step.params.map_or(0, |p| p.q_heads as usize),
            layouts: (*step.k, *step.v),
            inner: Box::new(inner),
        }
    }

    /// The backend's own state, or `ForeignStep` if another backend prepared it.
    pub fn inner<T: Any>(&self, backend: &'static str) -> Result<&T> {
        self.inner
            .downcast_ref::<T>()
            .ok_or(Error::ForeignStep { expected: backend })
    }

    /// Checks that `(k, v)` are pools this step was prepared for.
    pub fn check_pools(&self, (k, v): (&super::Pool, &super::Pool)) -> Result<()> {
        if (k.layout, v.layout) != self.layouts {
            return Err(Error::InvalidConfig(
                "pools differ from those the step was prepared for".into(),
            ));
        }
        k.check_buffers(["K data", "K side"])?;
        v.check_buffers(["V data", "V side"])
    }
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prepared")
            .field("tokens", &self.tokens)
            .field("queries", &self.queries)
            .field("q_heads", &self.q_heads)
            .finish_non_exhaustive()
    }
}
