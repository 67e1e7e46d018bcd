//! `CacheConfig` and the pool layout of DESIGN §2.

use crate::dtype::INT4C_BLOCK;
use crate::{Error, KvDtype, Result};

/// Default [`CacheConfig::open_blocks`].
pub const OPEN_BLOCKS: usize = 64;

/// Shape and formats of a paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Transformer layers; each has its own K and V pools.
    pub layers: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Elements per head vector (multiple of 8).
    pub head_dim: usize,
    /// Tokens per block (default 16).
    pub block_size: usize,
    /// Blocks per pool; capacity is `num_blocks * block_size` tokens over all sequences.
    pub num_blocks: usize,
    /// Key storage format.
    pub k_dtype: KvDtype,
    /// Value storage format.
    pub v_dtype: KvDtype,
    /// Store K and V Walsh–Hadamard rotated (head_dim a power of two); attention
    /// rotates q to match and rotates its output back, so results keep their meaning.
    pub rotate: bool,
    /// Int4Channel keys only: F16 blocks per layer for the partly filled block of
    /// each sequence, so at most this many sequences (and at most `num_blocks`)
    /// hold a partly filled block at once (default [`OPEN_BLOCKS`]).
    pub open_blocks: usize,
}

impl CacheConfig {
    /// A cache with Int8 keys and values, block size 16, room for `capacity_tokens`.
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, capacity_tokens: usize) -> Self {
        CacheConfig {
            layers,
            kv_heads,
            head_dim,
            block_size: 16,
            num_blocks: capacity_tokens.div_ceil(16),
            k_dtype: KvDtype::Int8,
            v_dtype: KvDtype::Int8,
            rotate: false,
            open_blocks: OPEN_BLOCKS,
        }
    }

    /// Sets the key and value formats. Int4Channel keys need blocks of at least
    /// [`INT4C_BLOCK`] tokens: a smaller block size is raised to it (capacity kept).
    pub fn with_dtypes(mut self, k: KvDtype, v: KvDtype) -> Self {
        self.k_dtype = k;
        self.v_dtype = v;
        if k.per_channel() && self.block_size < INT4C_BLOCK {
            self = self.with_block_size(INT4C_BLOCK);
        }
        self
    }

    /// Sets [`open_blocks`](Self::open_blocks).
    pub fn with_open_blocks(mut self, open_blocks: usize) -> Self {
        self.open_blocks = open_blocks;
        self
    }

    /// Turns the Walsh–Hadamard rotation of K and V on or off (see [`CacheConfig::rotate`]).
    pub fn with_rotation(mut self, rotate: bool) -> Self {
        self.rotate = rotate;
        self
    }

    /// Sets the block size, keeping at least the same token capacity.
    pub fn with_block_size(mut self, block_size: usize) -> Self {
        let tokens = self.num_blocks * self.block_size;
        self.block_size = block_size;
        self.num_blocks = tokens.div_ceil(block_size.max(1));
        self
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("layers", self.layers),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::InvalidConfig(format!("{name} is 0")));
            }
        }
        self.k_dtype.check(self.head_dim)?;
        self.v_dtype.check(self.head_dim)?;
        if self.v_dtype.per_channel() {
            return Err(Error::Unsupported(
                "int4c stores keys only: values are quantized per token (int4, int8, ...)".into(),
            ));
        }
        if self.k_dtype.per_channel() {
            if self.block_size < INT4C_BLOCK || self.block_size % 8 != 0 {
                return Err(Error::InvalidConfig(format!(
                    "int4c keys need a block_size of at least {INT4C_BLOCK} and a multiple of 8, got {}",
                    self.block_size
                )));
            }
            if self.open_blocks == 0 {
                return Err(Error::InvalidConfig(
                    "int4c keys need at least one open block".into(),
                ));
            }
        }
        self.layout(self.k_dtype).check()?;
        // Word indices must fit u32 on every device.
        for dtype in [self.k_dtype, self.v_dtype] {
            let per_row =
                dtype.words_per_head(self.head_dim) + dtype.side_words_per_head(self.head_dim);
            let words = [self.num_blocks, self.kv_heads, self.block_size, per_row]
                .iter()
                .try_fold(1u64, |a, &b| a.checked_mul(b as u64));
            if words.is_none_or(|w| w > u32::MAX as u64) {
                return Err(Error::InvalidConfig(format!(
                    "{} blocks x {} heads x {} tokens of {dtype} do not fit 32-bit indexing",
                    self.num_blocks, self.kv_heads, self.block_size
                )));
            }
        }
        // Sizes of the whole cache (bytes_per_token, KvCache::memory) must fit usize:
        // its size stored as f32, more than any format takes, does.
        let f32_bytes = [
            self.layers,
            2 * 4,
            self.kv_heads,
            self.head_dim,
            self.num_blocks,
            self.block_size,
        ]
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b));
        if f32_bytes.is_none() {
            return Err(Error::InvalidConfig(format!(
                "{} layers of {} blocks x {} heads x {} tokens x head_dim {} do not fit in memory",
                self.layers, self.num_blocks, self.kv_heads, self.block_size, self.head_dim
            )));
        }
        Ok(())
    }

    /// Layout of one pool stored as `dtype`.
    pub fn layout(&self, dtype: KvDtype) -> PoolLayout {
        PoolLayout {
            dtype,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            rotated: self.rotate,
            open_blocks: if dtype.per_channel() {
                self.open_blocks.min(self.num_blocks)
            } else {
                0
            },
        }
    }

    /// Token capacity over all sequences.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Bytes one token occupies over all layers, K and V (open blocks left out).
    pub fn bytes_per_token(&self) -> usize {
        let block =
            self.layout(self.k_dtype).block_bytes() + self.layout(self.v_dtype).block_bytes();
        self.layers * block.div_ceil(self.block_size)
    }
}

/// Where each (block, head, slot) lives inside a pool's data and side arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLayout {
    /// Storage format.
    pub dtype: KvDtype,
    /// KV heads.
    pub kv_heads: usize,
    /// Elements per head vector.
    pub head_dim: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Vectors are stored Walsh–Hadamard rotated ([`crate::quant::hadamard`]).
    pub rotated: bool,
    /// Int4Channel: F16 open blocks after the factors in the side array (else 0).
    pub open_blocks: usize,
}

impl PoolLayout {
    /// Checks what kernels assume beyond the dtype: a rotated pool's head_dim is a
    /// power of two.
    pub fn check(&self) -> Result<()> {
        if self.rotated && !self.head_dim.is_power_of_two() {
            return Err(Error::InvalidConfig(format!(
                "rotation needs a power-of-two head_dim, got {}",
                self.head_dim
            )));
        }
        Ok(())
    }

    /// Code words per (token, head).
    pub fn words_per_head(&self) -> usize {
        self.dtype.words_per_head(self.head_dim)
    }

    /// Side words per (token, head).
    pub fn side_per_head(&self) -> usize {
        self.dtype.side_words_per_head(self.head_dim)
    }

    /// Total code words.
    pub fn data_words(&self) -> usize {
        self.num_blocks * self.kv_heads * self.block_size * self.words_per_head()
    }

    /// Words a pool's code buffer is allocated with: [`data_words`](Self::data_words)
    /// rounded up to whole 16-byte vectors, which the attention kernels load.
    pub fn data_alloc_words(&self) -> usize {
        self.data_words().next_multiple_of(4)
    }

    /// Total side words: for Int4Channel the factors, then the open blocks from
    /// [`open_base`](Self::open_base).
    pub fn side_words(&self) -> usize {
        if self.dtype.per_channel() {
            return self.open_base()
                + self.open_blocks * self.block_size * self.kv_heads * self.head_dim / 2;
        }
        self.num_blocks * self.kv_heads * self.block_size * self.side_per_head()
    }

    /// Int4Channel: where the factors of (block, head) start in the side array,
    /// one word per channel.
    pub fn factors(&self, block: usize, head: usize) -> usize {
        (block * self.kv_heads + head) * self.head_dim
    }

    /// Int4Channel: where the open blocks start in the side array (after the
    /// factors, at a 256-byte boundary so that kernels can bind them alone;
    /// `shaders/attn_common.wgsl` computes it too).
    pub fn open_base(&self) -> usize {
        (self.num_blocks * self.kv_heads * self.head_dim).next_multiple_of(64)
    }

    /// Slots of the quantized blocks; an Int4Channel pool's slots past them,
    /// `capacity + open * block_size + offset`, address its open blocks.
    pub fn capacity(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// An Int4Channel pool's open blocks as an F16 pool of their own (the side
    /// array from [`open_base`](Self::open_base) on), as the kernels that write them
    /// see it.
    pub fn open_view(&self) -> PoolLayout {
        PoolLayout {
            dtype: KvDtype::F16,
            num_blocks: self.open_blocks,
            open_blocks: 0,
            ..*self
        }
    }

    /// Bytes of one block of every kv head, codes and side data (open blocks left out).
    pub fn block_bytes(&self) -> usize {
        let side = if self.dtype.per_channel() {
            self.kv_heads * self.head_dim
        } else {
            self.kv_heads * self.block_size * self.side_per_head()
        };
        4 * (self.kv_heads * self.block_size * self.words_per_head() + side)
    }

    /// Index of the (token slot, head) row: `(b * kv_heads + h) * block_size + s`,
    /// for a pool slot `slot = b * block_size + s`.
    pub fn row(&self, slot: usize, head: usize) -> usize {
        let (b, s) = (slot / self.block_size, slot % self.block_size);
        (b * self.kv_heads + head) * self.block_size + s
    }
}
