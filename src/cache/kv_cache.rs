//! `KvCache`: a paged quantized KV cache on one backend.

use std::sync::Arc;

use crate::backend::{AppendArgs, AttnArgs, Backend, DeviceBuffer, Pool, SeqInfo};
use crate::quant::check_finite;
use crate::{AttnParams, Error, KvDtype, Result};

use super::{BlockManager, CacheConfig, SeqId};

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Slots reserved by [`KvCache::extend`] for new tokens, to be written layer by
/// layer with [`KvCache::write`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    slots: Vec<u32>,
    cache: u64,
    epoch: u64,
}

impl Reservation {
    /// Number of tokens reserved.
    pub fn tokens(&self) -> usize {
        self.slots.len()
    }

    /// Pool slot (`block * block_size + offset`) of each token, in batch order.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }
}

/// Memory held by a cache (all layers, K and V, codes and side data).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryReport {
    /// Bytes allocated on the device for the pools.
    pub bytes_reserved: usize,
    /// Bytes of the blocks in use.
    pub bytes_used: usize,
    /// Tokens stored over all sequences.
    pub tokens: usize,
    /// Bytes per token (all layers, K and V).
    pub bytes_per_token: usize,
    /// What one token would take stored as F16.
    pub f16_bytes_per_token: usize,
    /// What one token would take stored as F32.
    pub f32_bytes_per_token: usize,
}

impl MemoryReport {
    /// Fraction of memory saved against an F16 cache (0.48 for Int8 at head_dim 128).
    pub fn saving_vs_f16(&self) -> f64 {
        1.0 - self.bytes_per_token as f64 / self.f16_bytes_per_token as f64
    }

    /// Fraction of memory saved against an F32 cache.
    pub fn saving_vs_f32(&self) -> f64 {
        1.0 - self.bytes_per_token as f64 / self.f32_bytes_per_token as f64
    }
}

#[derive(Debug)]
struct LayerPools {
    k: Pool,
    v: Pool,
}

/// A paged KV cache: block bookkeeping on the host, pools on the backend's device.
///
/// Typical step: [`extend`](Self::extend) the sequences by their new tokens, then per
/// layer [`write`](Self::write) the new K/V and run [`decode`](Self::decode) or
/// [`prefill`](Self::prefill). [`append`](Self::append) does extend + write for all
/// layers at once, atomically.
#[derive(Debug)]
pub struct KvCache {
    backend: Arc<dyn Backend>,
    config: CacheConfig,
    layers: Vec<LayerPools>,
    blocks: BlockManager,
    /// Distinguishes caches, so that a reservation only fits the cache that made it.
    id: u64,
    epoch: u64,
}

impl KvCache {
    /// Allocates the pools of every layer on `backend`.
    pub fn new(backend: Arc<dyn Backend>, config: CacheConfig) -> Result<Self> {
        config.validate()?;
        let pool = |dtype: KvDtype| -> Result<Pool> {
            let layout = config.layout(dtype);
            Ok(Pool {
                data: backend.alloc(layout.data_alloc_words())?,
                side: backend.alloc(layout.side_words().max(1))?,
                layout,
            })
        };
        let layers = (0..config.layers)
            .map(|_| {
                Ok(LayerPools {
                    k: pool(config.k_dtype)?,
                    v: pool(config.v_dtype)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(KvCache {
            blocks: BlockManager::new(config.num_blocks, config.block_size),
            backend,
            config,
            layers,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            epoch: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// The backend the pools live on.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Host-side bookkeeping (block tables, lengths, free blocks).
    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    /// The K and V pools of a layer (for kernels driven directly, e.g. benchmarks).
    pub fn pools(&self, layer: usize) -> Result<(&Pool, &Pool)> {
        let l = self.layer(layer)?;
        Ok((&l.k, &l.v))
    }

    /// Starts an empty sequence.
    pub fn add_sequence(&mut self) -> SeqId {
        self.blocks.add()
    }

    /// Frees a sequence and its blocks.
    pub fn free_sequence(&mut self, id: SeqId) -> Result<()> {
        self.blocks.remove(id)?;
        self.epoch += 1;
        Ok(())
    }

    /// Shortens a sequence (e.g. to roll back rejected speculative tokens).
    pub fn truncate(&mut self, id: SeqId, len: usize) -> Result<()> {
        self.blocks.truncate(id, len)?;
        self.epoch += 1;
        Ok(())
    }

    /// Tokens stored in a sequence.
    pub fn seq_len(&self, id: SeqId) -> Result<usize> {
        self.blocks.len(id)
    }

    /// Reserves slots for `n` new tokens of each listed sequence (all or nothing).
    /// Lengths grow now; write the tokens' K/V into every layer with [`Self::write`].
    pub fn extend(&mut self, batch: &[(SeqId, usize)]) -> Result<Reservation> {
        let slots = self.blocks.extend(batch)?;
        self.epoch += 1;
        Ok(Reservation {
            slots,
            cache: self.id,
            epoch: self.epoch,
        })
    }

    /// Quantizes and writes the reserved tokens' K and V (`[tokens, kv_heads, head_dim]`,
    /// f32) into `layer`. Checks everything before writing anything.
    pub fn write(&self, layer: usize, r: &Reservation, k: &[f32], v: &[f32]) -> Result<()> {
        if r.cache != self.id || r.epoch != self.epoch {
            return Err(Error::StaleReservation);
        }
        let pools = self.layer(layer)?;
        self.check_kv(r.tokens(), k, v)?;
        if r.tokens() == 0 {
            return Ok(());
        }
        let k_src = self.upload_f32(k)?;
        let v_src = self.upload_f32(v)?;
        let slots = self.upload(&r.slots)?;
        self.backend.quantize_append(&AppendArgs {
            k: &pools.k,
            v: &pools.v,
            k_src: &k_src,
            v_src: &v_src,
            slots: &slots,
            tokens: r.tokens(),
        })
    }

    /// Appends tokens to every layer at once: `k` and `v` are
    /// `[layers, tokens, kv_heads, head_dim]`, tokens in batch order. All or nothing.
    pub fn append(&mut self, batch: &[(SeqId, usize)], k: &[f32], v: &[f32]) -> Result<()> {
        self.blocks.check_batch(batch.iter().map(|b| b.0))?;
        let c = &self.config;
        let too_many = || Error::CapacityExceeded {
            needed: usize::MAX,
            free: self.blocks.free_blocks(),
        };
        let tokens = batch
            .iter()
            .try_fold(0usize, |a, b| a.checked_add(b.1))
            .ok_or_else(too_many)?;
        let per_layer = tokens
            .checked_mul(c.kv_heads * c.head_dim)
            .ok_or_else(too_many)?;
        let whole = per_layer.checked_mul(c.layers).ok_or_else(too_many)?;
        check_len("k", whole, k.len())?;
        check_len("v", whole, v.len())?;
        check_finite("k", k)?;
        check_finite("v", v)?;
        let before = (self.blocks.clone(), self.epoch);
        let r = self.extend(batch)?;
        for layer in 0..self.config.layers {
            let span = layer * per_layer..(layer + 1) * per_layer;
            if let Err(e) = self.write(layer, &r, &k[span.clone()], &v[span]) {
                (self.blocks, self.epoch) = before;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Decode attention in `layer`: one query per listed sequence, at its last
    /// position. `q` is `[seqs, q_heads, head_dim]`; returns the same shape.
    pub fn decode(
        &self,
        layer: usize,
        seqs: &[SeqId],
        q: &[f32],
        params: &AttnParams,
    ) -> Result<Vec<f32>> {
        let batch: Vec<_> = seqs.iter().map(|&s| (s, 1)).collect();
        self.attend(layer, &batch, q, params, true)
    }

    /// Causal prefill attention in `layer`: for each `(seq, n)`, queries for the
    /// sequence's last `n` cached positions, each seeing every key at or before its
    /// position. `q` is `[sum n, q_heads, head_dim]`; returns the same shape.
    pub fn prefill(
        &self,
        layer: usize,
        chunks: &[(SeqId, usize)],
        q: &[f32],
        params: &AttnParams,
    ) -> Result<Vec<f32>> {
        self.attend(layer, chunks, q, params, false)
    }

    /// Memory held and used.
    pub fn memory(&self) -> MemoryReport {
        let c = &self.config;
        let per_block = |d: KvDtype| c.kv_heads * c.block_size * d.bytes_per_token_head(c.head_dim);
        let block_bytes = c.layers * (per_block(c.k_dtype) + per_block(c.v_dtype));
        let plain = |bytes: usize| c.layers * c.kv_heads * 2 * c.head_dim * bytes;
        MemoryReport {
            bytes_reserved: block_bytes * c.num_blocks,
            bytes_used: block_bytes * self.blocks.used_blocks(),
            tokens: self.blocks.tokens(),
            bytes_per_token: c.bytes_per_token(),
            f16_bytes_per_token: plain(2),
            f32_bytes_per_token: plain(4),
        }
    }

    fn attend(
        &self,
        layer: usize,
        batch: &[(SeqId, usize)],
        q: &[f32],
        params: &AttnParams,
        decode: bool,
    ) -> Result<Vec<f32>> {
        let pools = self.layer(layer)?;
        let c = &self.config;
        let p = params.resolve(c.kv_heads, c.head_dim)?;
        self.blocks.check_batch(batch.iter().map(|b| b.0))?;
        let mut infos = Vec::with_capacity(batch.len());
        let mut tables = Vec::new();
        let mut queries = 0usize;
        for &(id, n) in batch {
            let kv_len = self.blocks.len(id)?;
            if n == 0 || n > kv_len {
                return Err(Error::OutOfRange {
                    what: "queries of a sequence (must be 1..=its length)",
                    value: n,
                    limit: kv_len + 1,
                });
            }
            infos.push(SeqInfo {
                kv_len: kv_len as u32,
                table_offset: tables.len() as u32,
                q_offset: queries as u32,
                q_len: n as u32,
            });
            tables.extend_from_slice(self.blocks.block_table(id)?);
            queries += n;
        }
        let q_words = queries * p.q_heads as usize * c.head_dim;
        check_len("q", q_words, q.len())?;
        check_finite("q", q)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let out = self.backend.alloc(q_words)?;
        let args = AttnArgs {
            k: &pools.k,
            v: &pools.v,
            q: &self.upload_f32(q)?,
            out: &out,
            block_tables: &self.upload(&tables)?,
            seqs: &infos,
            params: p,
        };
        if decode {
            self.backend.decode(&args)?;
        } else {
            self.backend.prefill(&args)?;
        }
        let words = self.backend.download(&out, 0, q_words)?;
        Ok(bytemuck::cast_slice(&words).to_vec())
    }

    fn check_kv(&self, tokens: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let want = tokens * self.config.kv_heads * self.config.head_dim;
        check_len("k", want, k.len())?;
        check_len("v", want, v.len())?;
        check_finite("k", k)?;
        check_finite("v", v)
    }

    fn layer(&self, layer: usize) -> Result<&LayerPools> {
        self.layers.get(layer).ok_or(Error::OutOfRange {
            what: "layer",
            value: layer,
            limit: self.layers.len(),
        })
    }

    fn upload(&self, words: &[u32]) -> Result<DeviceBuffer> {
        let buf = self.backend.alloc(words.len().max(1))?;
        self.backend.upload(&buf, 0, words)?;
        Ok(buf)
    }

    fn upload_f32(&self, x: &[f32]) -> Result<DeviceBuffer> {
        self.upload(bytemuck::cast_slice(x))
    }
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            what,
            expected,
            got,
        })
    }
}
