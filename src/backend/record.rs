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
    Wgpu(&'a mut ::wgpu::CommandEncoder),
    /// A CUDA stream: work is launched on it, in order, as it is recorded.
    #[cfg(feature = "cuda")]
    Cuda(&'a cudarc::driver::CudaStream),
}

impl fmt::Debug for Encoder<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encoder::Immediate => "Encoder::Immediate",
            Encoder::Wgpu(_) => "Encoder::Wgpu",
            #[cfg(feature = "cuda")]
            Encoder::Cuda(_) => "Encoder::Cuda",
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

/// Per-sequence record read by attention kernels (4 u32 words).
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
/// records, the block tables.
#[derive(Debug, Clone)]
pub(crate) struct Records {
    pub(crate) words: Vec<u32>,
    pub(crate) slots: (u64, u64),
    pub(crate) work: (u64, u64),
    pub(crate) tables: (u64, u64),
}

impl Step<'_> {
    /// The step's slots, `work` and tables in one array, each region starting at a
    /// multiple of `align` bytes (a storage binding's offset alignment, say).
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
        Records {
            words,
            slots,
            work,
            tables,
        }
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

    /// The backend's own state, or `ForeignBuffer` if another backend prepared it.
    pub fn inner<T: Any>(&self, backend: &'static str) -> Result<&T> {
        self.inner
            .downcast_ref::<T>()
            .ok_or(Error::ForeignBuffer { expected: backend })
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
