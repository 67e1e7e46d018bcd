//! The device path of [`KvCache`] (DESIGN §7): one [`Plan`] per generation step
//! does the host work (slots reserved, sequence records and block tables built and
//! uploaded, keys partitioned); then each layer's append and attention are recorded
//! on tensors in device memory, with no host work beyond recording.

use std::sync::atomic::{AtomicBool, Ordering};

use super::Extension;
use crate::attn::Resolved;
use crate::backend::{Encoder, Prepared, SeqInfo, Step, Tensor};
use crate::{AttnParams, Error, Result};

use super::{KvCache, SeqId};

/// One step planned on a cache: valid until the cache next changes (an `extend`,
/// `free_sequence`, `truncate` or another plan that appends), after which the
/// cache refuses it. Keep it alive until the work recorded with it is submitted:
/// its device workspace is reused once it is dropped, by later work that the queue
/// (wgpu) or the stream (CUDA) orders after it. On CUDA, a plan whose work is
/// recorded on one stream and the next plan's on another need that first work
/// finished (or an event between the streams) before the plan is dropped.
#[derive(Debug)]
pub struct Plan {
    prepared: Prepared,
    batch: Vec<(SeqId, usize)>,
    cache: u64,
    epoch: u64,
    /// Layers whose append has been recorded with this plan: attention in a
    /// step that appends reads the new tokens, so it needs its layer's first.
    appended: Vec<AtomicBool>,
}

impl Plan {
    /// New tokens each layer appends (in batch order).
    pub fn tokens(&self) -> usize {
        self.prepared.tokens
    }

    /// Queries each layer attends: rows of q and of the output.
    pub fn queries(&self) -> usize {
        self.prepared.queries
    }

    /// The sequences and their counts of new tokens (or queries), in batch order.
    pub fn batch(&self) -> &[(SeqId, usize)] {
        &self.batch
    }

    /// The backend's prepared state, for driving a [`Backend`](crate::Backend) directly.
    pub fn prepared(&self) -> &Prepared {
        &self.prepared
    }
}

impl KvCache {
    /// Plans a decode step: reserves one new token for each listed sequence, whose
    /// K/V each layer then appends ([`Self::record_append`]) before attending with
    /// one query per sequence at its new last position ([`Self::record_attention`]).
    /// All or nothing.
    pub fn plan_decode(&mut self, seqs: &[SeqId], params: &AttnParams) -> Result<Plan> {
        let batch: Vec<_> = seqs.iter().map(|&s| (s, 1)).collect();
        self.plan_step(&batch, params)
    }

    /// Plans a prefill step: reserves `n` new tokens for each `(seq, n)`, which each
    /// layer appends and then attends causally (queries at the new positions, each
    /// seeing every key at or before it). All or nothing.
    pub fn plan_prefill(&mut self, chunks: &[(SeqId, usize)], params: &AttnParams) -> Result<Plan> {
        self.plan_step(chunks, params)
    }

    /// Plans attention over what is cached, appending nothing: for each `(seq, n)`,
    /// queries at the sequence's last `n` positions (decode when every `n` is 1).
    pub fn plan_attention(&self, batch: &[(SeqId, usize)], params: &AttnParams) -> Result<Plan> {
        let params = self.check_step(batch, params)?;
        let prepared = self.prepare_step(batch, &Extension::default(), Some(params))?;
        Ok(self.plan(prepared, batch))
    }

    /// Records the append of the plan's new tokens into `layer`: `k` and `v` are
    /// `[tokens, kv_heads, head_dim]` in device memory, tokens in batch order.
    pub fn record_append(
        &self,
        enc: &mut Encoder<'_>,
        plan: &Plan,
        layer: usize,
        k: &Tensor<'_>,
        v: &Tensor<'_>,
    ) -> Result<()> {
        self.check_plan(plan)?;
        let pools = self.layer(layer)?;
        self.backend
            .record_append(enc, &plan.prepared, (&pools.k, &pools.v), k, v)?;
        plan.appended[layer].store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Records the plan's attention in `layer`: `q` and `out` are
    /// `[queries, q_heads, head_dim]` in device memory. In a step that appends,
    /// the layer's append must be recorded first (else an error: the attention
    /// would read slots the step has not written).
    pub fn record_attention(
        &self,
        enc: &mut Encoder<'_>,
        plan: &Plan,
        layer: usize,
        q: &Tensor<'_>,
        out: &Tensor<'_>,
    ) -> Result<()> {
        self.check_plan(plan)?;
        let pools = self.layer(layer)?;
        if plan.tokens() > 0 && !plan.appended[layer].load(Ordering::Relaxed) {
            return Err(Error::InvalidConfig(format!(
                "record_attention before record_append in layer {layer}: a step that appends attends to its new tokens, so record the layer's append first"
            )));
        }
        self.backend
            .record_attention(enc, &plan.prepared, (&pools.k, &pools.v), q, out)
    }

    /// Reserves the batch's new tokens, builds the records and has the backend
    /// prepare them; on any error the cache is as it was.
    fn plan_step(&mut self, batch: &[(SeqId, usize)], params: &AttnParams) -> Result<Plan> {
        let params = self.check_step(batch, params)?;
        let before = self.blocks.clone();
        let ext = self.blocks.extend(batch)?;
        match self.prepare_step(batch, &ext, Some(params)) {
            Ok(prepared) => {
                self.epoch += 1;
                Ok(self.plan(prepared, batch))
            }
            Err(e) => {
                self.blocks = before;
                Err(e)
            }
        }
    }

    /// Checks a step's batch (known, distinct sequences, each with at least one
    /// token) and resolves its parameters.
    fn check_step(&self, batch: &[(SeqId, usize)], params: &AttnParams) -> Result<Resolved> {
        let resolved = params.resolve(self.config.kv_heads, self.config.head_dim)?;
        self.blocks.check_batch(batch.iter().map(|b| b.0))?;
        if batch.iter().any(|b| b.1 == 0) {
            return Err(Error::OutOfRange {
                what: "tokens of a sequence in a step (must be at least 1)",
                value: 0,
                limit: usize::MAX,
            });
        }
        Ok(resolved)
    }

    fn plan(&self, prepared: Prepared, batch: &[(SeqId, usize)]) -> Plan {
        Plan {
            prepared,
            batch: batch.to_vec(),
            cache: self.id,
            epoch: self.epoch,
            appended: (0..self.config.layers)
                .map(|_| AtomicBool::new(false))
                .collect(),
        }
    }

    /// The records and tables of `batch` (queries at each sequence's last `n`
    /// positions), prepared by the backend with the append `ext`.
    pub(super) fn prepare_step(
        &self,
        batch: &[(SeqId, usize)],
        ext: &Extension,
        params: Option<Resolved>,
    ) -> Result<Prepared> {
        let mut seqs = Vec::with_capacity(batch.len());
        let mut tables = Vec::new();
        let mut queries = 0usize;
        for &(id, n) in batch {
            let kv_len = self.blocks.len(id)?;
            if n > kv_len {
                return Err(Error::OutOfRange {
                    what: "queries of a sequence (must be 1..=its length)",
                    value: n,
                    limit: kv_len + 1,
                });
            }
            seqs.push(SeqInfo {
                kv_len: kv_len as u32,
                table_offset: tables.len() as u32,
                q_offset: queries as u32,
                q_len: n as u32,
                open: self.blocks.open_block(id)?.unwrap_or(u32::MAX),
            });
            tables.extend_from_slice(self.blocks.block_table(id)?);
            queries += n;
        }
        let (k, v) = (
            self.config.layout(self.config.k_dtype),
            self.config.layout(self.config.v_dtype),
        );
        self.backend.prepare(&Step {
            k: &k,
            v: &v,
            slots: &ext.slots,
            open_slots: &ext.open_slots,
            seals: &ext.seals,
            seqs: &seqs,
            tables: &tables,
            params,
            decode: batch.iter().all(|b| b.1 == 1),
        })
    }

    fn check_plan(&self, plan: &Plan) -> Result<()> {
        if plan.cache != self.id || plan.epoch != self.epoch {
            return Err(Error::StalePlan);
        }
        Ok(())
    }
}
