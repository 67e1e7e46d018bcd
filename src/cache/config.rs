//! `CacheConfig` and the pool layout of DESIGN §2.

use crate::{Error, KvDtype, Result};

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
        }
    }

    /// Sets the key and value formats.
    pub fn with_dtypes(mut self, k: KvDtype, v: KvDtype) -> Self {
        self.k_dtype = k;
        self.v_dtype = v;
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
        }
    }

    /// Token capacity over all sequences.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Bytes one token occupies over all layers, K and V.
    pub fn bytes_per_token(&self) -> usize {
        self.layers
            * self.kv_heads
            * (self.k_dtype.bytes_per_token_head(self.head_dim)
                + self.v_dtype.bytes_per_token_head(self.head_dim))
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

    /// Total side words.
    pub fn side_words(&self) -> usize {
        self.num_blocks * self.kv_heads * self.block_size * self.side_per_head()
    }

    /// Index of the (token slot, head) row: `(b * kv_heads + h) * block_size + s`,
    /// for a pool slot `slot = b * block_size + s`.
    pub fn row(&self, slot: usize, head: usize) -> usize {
        let (b, s) = (slot / self.block_size, slot % self.block_size);
        (b * self.kv_heads + head) * self.block_size + s
    }
}
