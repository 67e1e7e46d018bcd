//! `KvCache`: a paged quantized KV cache on one backend.

use std::sync::Arc;

use crate::backend::{Backend, DeviceBuffer, Pool, Prepared, Tensor};
use crate::quant::{F16_MAX, check_finite, hadamard};
use crate::{AttnParams, Error, KvDtype, Result};

use super::{BlockManager, CacheConfig, Extension, SeqId};

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Slots reserved by [`KvCache::extend`] for new tokens, to be written layer by
/// layer with [`KvCache::write`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    ext: Extension,
    cache: u64,
    epoch: u64,
}

impl Reservation {
    /// Number of tokens reserved.
    pub fn tokens(&self) -> usize {
        self.ext.slots.len()
    }

    /// Pool slot (`block * block_size + offset`) of each token, in batch order.
    pub fn slots(&self) -> &[u32] {
        &self.ext.slots
    }

    /// Where the tokens' keys go in an Int4Channel K pool (open slots, seals).
    pub fn extension(&self) -> &Extension {
        &self.ext
    }
}

/// Memory held by a cache (all layers, K and V, codes and side data).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryReport {
    /// Bytes allocated on the device for the pools (Int4Channel open blocks included).
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
pub(super) struct LayerPools {
    pub(super) k: Pool,
    pub(super) v: Pool,
}

/// A paged KV cache: block bookkeeping on the host, pools on the backend's device.
///
/// On the device (DESIGN §7): one [`plan_decode`](Self::plan_decode) or
/// [`plan_prefill`](Self::plan_prefill) per generation step, then per layer
/// [`record_append`](Self::record_append) and
/// [`record_attention`](Self::record_attention) on device tensors, into the
/// application's encoder. From the host: [`extend`](Self::extend) the sequences by
/// their new tokens, then per layer [`write`](Self::write) the new K/V and run
/// [`decode`](Self::decode) or [`prefill`](Self::prefill), each a round trip;
/// [`append`](Self::append) does extend + write for all layers at once, atomically.
#[derive(Debug)]
pub struct KvCache {
    pub(super) backend: Arc<dyn Backend>,
    pub(super) config: CacheConfig,
    layers: Vec<LayerPools>,
    pub(super) blocks: BlockManager,
    /// Distinguishes caches, so that a reservation or plan only fits the cache that
    /// made it.
    pub(super) id: u64,
    /// Bumped by every change of the bookkeeping: older reservations and plans are
    /// stale.
    pub(super) epoch: u64,
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
        let mut blocks = BlockManager::new(config.num_blocks, config.block_size);
        if config.k_dtype.per_channel() {
            blocks = blocks.with_open_blocks(config.layout(config.k_dtype).open_blocks);
        }
        Ok(KvCache {
            blocks,
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

    /// Shortens a sequence (e.g. to roll back rejected speculative tokens). With
    /// Int4Channel keys, a cut inside a block that was full reopens it: its kept
    /// keys are dequantized back into the sequence's open block (F16), so the block
    /// is quantized again when it refills. All or nothing.
    pub fn truncate(&mut self, id: SeqId, len: usize) -> Result<()> {
        // Only open blocks give a truncate device work that can fail after it.
        let before = self
            .config
            .k_dtype
            .per_channel()
            .then(|| self.blocks.clone());
        let moves = self.blocks.truncate(id, len)?;
        if let Some(before) = before.filter(|_| !moves.is_empty()) {
            let pools: Vec<&Pool> = self.layers.iter().map(|l| &l.k).collect();
            if let Err(e) = self.backend.reopen(&pools, &moves) {
                self.blocks = before;
                return Err(e);
            }
        }
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
        let ext = self.blocks.extend(batch)?;
        self.epoch += 1;
        Ok(Reservation {
            ext,
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
        let step = self.prepare_append(&r.ext)?;
        let (k, v) = (self.upload_f32(k)?, self.upload_f32(v)?);
        self.backend.run(&mut |enc| {
            self.backend.record_append(
                enc,
                &step,
                (&pools.k, &pools.v),
                &Tensor::f32(&k),
                &Tensor::f32(&v),
            )
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
        self.check_rotated("k", self.config.k_dtype, k)?;
        self.check_rotated("v", self.config.v_dtype, v)?;
        let before = (self.blocks.clone(), self.epoch);
        let r = self.extend(batch)?;
        let written = self.write_layers(&r, per_layer, k, v);
        if written.is_err() {
            (self.blocks, self.epoch) = before;
        }
        written
    }

    /// Writes the reserved tokens of every layer (`k`, `v`: `[layers, tokens, ..]`)
    /// in one submission.
    fn write_layers(&self, r: &Reservation, per_layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        if per_layer == 0 {
            return Ok(());
        }
        let step = self.prepare_append(&r.ext)?;
        let layers = (0..self.config.layers)
            .map(|l| {
                let span = l * per_layer..(l + 1) * per_layer;
                Ok((
                    self.upload_f32(&k[span.clone()])?,
                    self.upload_f32(&v[span])?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        self.backend.run(&mut |enc| {
            for (pools, (k, v)) in self.layers.iter().zip(&layers) {
                self.backend.record_append(
                    enc,
                    &step,
                    (&pools.k, &pools.v),
                    &Tensor::f32(k),
                    &Tensor::f32(v),
                )?;
            }
            Ok(())
        })
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
        self.attend(layer, &batch, q, params)
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
        self.attend(layer, chunks, q, params)
    }

    /// Reads back the stored K and V of `positions` of `seq` in `layer`, dequantized
    /// by the backend's dequantize kernel: what layer-cache APIs offer as
    /// `get_key` / `get_value`, for inspection, debugging and engines that need
    /// them. Returns `(k, v)`, each `[positions.len(), kv_heads, head_dim]` f32, row
    /// `i` holding position `positions[i]`; positions may repeat and come in any
    /// order.
    ///
    /// Values are in the model's basis, comparable with what was written: a rotated
    /// cache ([`CacheConfig::with_rotation`]) stores each head vector
    /// Hadamard-rotated, and the read-back is rotated back. They differ from the
    /// written K and V by the storage format's rounding only.
    ///
    /// Checks everything before any device work: the layer ([`Error::OutOfRange`]
    /// `"layer"`), the sequence ([`Error::UnknownSequence`]), then every position
    /// ([`Error::OutOfRange`] `"position"`, the sequence's length as limit). Then one
    /// round trip that waits: uploads the slots, dequantizes both pools, downloads.
    /// No positions is no device work. Nothing in the cache changes.
    pub fn read_kv(
        &self,
        layer: usize,
        seq: SeqId,
        positions: &[usize],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let pools = self.layer(layer)?;
        let slots = self.read_slots(seq, positions)?;
        if slots.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let k_slots = self.key_slots(seq, positions, &slots)?;
        let n = slots.len();
        // Every row is memory the caller asked for: past usize, nothing can hold it.
        let values = n
            .checked_mul(self.config.kv_heads * self.config.head_dim)
            .ok_or(Error::OutOfRange {
                what: "positions",
                value: n,
                limit: usize::MAX / (self.config.kv_heads * self.config.head_dim).max(1),
            })?;
        let read = |pool: &Pool, slots: &[u32]| -> Result<Vec<f32>> {
            let slots = self.upload(slots)?;
            let out = self.backend.alloc(values)?;
            self.backend.dequantize(pool, &slots, n, &out)?;
            let words = self.backend.download(&out, 0, values)?;
            Ok(bytemuck::cast_slice(&words).to_vec())
        };
        Ok((read(&pools.k, &k_slots)?, read(&pools.v, &slots)?))
    }

    /// The K pool's slots of `positions` (checked, at pool `slots`): an Int4Channel
    /// pool keeps the partly filled block's keys in the sequence's open block.
    fn key_slots(&self, seq: SeqId, positions: &[usize], slots: &[u32]) -> Result<Vec<u32>> {
        let Some(open) = self.blocks.open_block(seq)? else {
            return Ok(slots.to_vec());
        };
        let bs = self.config.block_size;
        let sealed = self.blocks.len(seq)? / bs * bs;
        let capacity = self.config.capacity_tokens() as u32;
        Ok(positions
            .iter()
            .zip(slots)
            .map(|(&p, &s)| {
                if p < sealed {
                    s
                } else {
                    capacity + open * bs as u32 + (p % bs) as u32
                }
            })
            .collect())
    }

    /// Pool slots of `positions` of `seq`, each checked against its length.
    fn read_slots(&self, seq: SeqId, positions: &[usize]) -> Result<Vec<u32>> {
        let len = self.blocks.len(seq)?;
        let table = self.blocks.block_table(seq)?;
        let bs = self.config.block_size;
        positions
            .iter()
            .map(|&p| {
                if p >= len {
                    return Err(Error::OutOfRange {
                        what: "position",
                        value: p,
                        limit: len,
                    });
                }
                // Below the length: its block is in the table, and the slot fits
                // u32 (the configuration's pools are 32-bit indexed).
                Ok(table[p / bs] * bs as u32 + (p % bs) as u32)
            })
            .collect()
    }

    /// Memory held and used.
    pub fn memory(&self) -> MemoryReport {
        let c = &self.config;
        let (k, v) = (c.layout(c.k_dtype), c.layout(c.v_dtype));
        let block_bytes = c.layers * (k.block_bytes() + v.block_bytes());
        let open_bytes = c.layers * k.open_blocks * c.kv_heads * c.block_size * c.head_dim * 2;
        let plain = |bytes: usize| c.layers * c.kv_heads * 2 * c.head_dim * bytes;
        MemoryReport {
            bytes_reserved: block_bytes * c.num_blocks + open_bytes,
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
    ) -> Result<Vec<f32>> {
        let pools = self.layer(layer)?;
        let plan = self.plan_attention(batch, params)?;
        // No q can hold more values than memory has: an overflow is a mismatch.
        let q_words = plan
            .queries()
            .checked_mul(params.q_heads)
            .and_then(|n| n.checked_mul(self.config.head_dim))
            .unwrap_or(usize::MAX);
        check_len("q", q_words, q.len())?;
        check_finite("q", q)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (q, out) = (self.upload_f32(q)?, self.backend.alloc(q_words)?);
        self.backend.run(&mut |enc| {
            self.backend.record_attention(
                enc,
                plan.prepared(),
                (&pools.k, &pools.v),
                &Tensor::f32(&q),
                &Tensor::f32(&out),
            )
        })?;
        let words = self.backend.download(&out, 0, q_words)?;
        Ok(bytemuck::cast_slice(&words).to_vec())
    }

    /// A step that only appends, as `ext` says.
    fn prepare_append(&self, ext: &Extension) -> Result<Prepared> {
        self.prepare_step(&[], ext, None)
    }

    fn check_kv(&self, tokens: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let want = tokens * self.config.kv_heads * self.config.head_dim;
        check_len("k", want, k.len())?;
        check_len("v", want, v.len())?;
        check_finite("k", k)?;
        check_finite("v", v)?;
        self.check_rotated("k", self.config.k_dtype, k)?;
        self.check_rotated("v", self.config.v_dtype, v)
    }

    /// A rotated pool stores each head vector of `x` rotated, whose components
    /// reach up to sqrt(head_dim) times the largest input: where f16 is stored (F16
    /// codes, Int4 minimum and scale) they must stay in f16's range too, else the
    /// token would hold ±Inf. Names the first rotated component past it (its index
    /// in `x` and rotated value).
    fn check_rotated(&self, what: &'static str, dtype: KvDtype, x: &[f32]) -> Result<()> {
        let d = self.config.head_dim;
        if !self.config.rotate || !dtype.f16_bounded() {
            return Ok(());
        }
        // No rotated component exceeds sqrt(d) * max |x| (with room for rounding).
        let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        if max * (d as f32).sqrt() <= 0.999 * F16_MAX {
            return Ok(());
        }
        let mut r = vec![0f32; d];
        for (i, head) in x.chunks_exact(d).enumerate() {
            r.copy_from_slice(head);
            hadamard(&mut r);
            // Finite: the inputs were checked.
            if let Some(j) = r.iter().position(|v| v.abs() > F16_MAX) {
                return Err(Error::NonFinite {
                    what,
                    index: i * d + j,
                    value: r[j],
                });
            }
        }
        Ok(())
    }

    pub(super) fn layer(&self, layer: usize) -> Result<&LayerPools> {
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
