//! The device path on wgpu (DESIGN §7): a step is prepared once (its records
//! written into a leased workspace, its attention partitioned), then each layer's
//! append and attention are recorded into the application's command encoder with
//! cached pipelines and bind groups: no submit, no wait, nothing created once warm.

use super::append::{check_rotation, params, rows};
use super::attention::{Partition, partition};
use super::bindings::Range;
use super::gate::Gated;
use super::pipelines::PipelineKey;
use super::shaders::Kernel;
use super::windows::{Window, Windows};
use super::workspace::{UNIFORM_BLOCK, Workspace, lease};
use super::{NAME, ROW_WG, WgpuBackend};
use crate::backend::lease::Lease;
use crate::backend::{Elem, Encoder, Pool, Prepared, Step, Tensor};
use crate::{Error, Result};

/// A step as the wgpu backend keeps it.
#[derive(Debug)]
pub(crate) struct WgpuStep {
    lease: Lease<Workspace>,
    /// Bytes of records in the workspace's `meta` buffer: the append slots, the
    /// sequence records and work items, the block tables. Kernels bind the buffer
    /// whole, so that their bind groups stay the same from step to step, and find
    /// the regions at offsets given in their parameters.
    meta: u64,
    /// Grid of the append kernel.
    append_grid: [u32; 3],
    attention: Option<Partition>,
    /// How the pools are bound: append and attention run once per window.
    windows: Windows,
    /// Int4Channel keys: the grid of sealing the blocks the append fills (`None`
    /// when it fills none: then no key is staged either).
    seal_grid: Option<[u32; 3]>,
}

/// Uniform blocks in the workspace: the reduce pass's, then attention's and
/// append's for each window, then for an Int4Channel K pool (one window) those of
/// [`OpenUniform`].
const REDUCE_UNIFORM: u64 = 0;
fn attention_uniform(w: &Window) -> u64 {
    (1 + 2 * w.index as u64) * UNIFORM_BLOCK
}
fn append_uniform(w: &Window) -> u64 {
    (2 + 2 * w.index as u64) * UNIFORM_BLOCK
}

/// The uniform blocks of an Int4Channel K pool's append, after the window's.
#[derive(Debug, Clone, Copy)]
enum OpenUniform {
    /// Staging the new keys as F16.
    Stage = 0,
    /// Sealing the blocks the append fills.
    Seal = 1,
    /// Writing the other new keys into their open blocks.
    Tail = 2,
}

fn open_uniform(which: OpenUniform) -> u64 {
    (3 + which as u64) * UNIFORM_BLOCK
}

pub fn prepare(b: &WgpuBackend, step: &Step<'_>) -> Result<Prepared> {
    step.check()?;
    check_rotation(step.k)?;
    check_rotation(step.v)?;
    let attention = if step.seqs.is_empty() {
        None
    } else {
        Some(partition(b, step)?)
    };
    let append_grid = b.rows_grid(rows(step.slots.len(), step.k.kv_heads)?, ROW_WG)?;
    let windows = Windows::of(b, &[step.k, step.v])?;
    let count = windows.count();
    let per_channel = step.k.dtype.per_channel();
    if per_channel && count > 1 {
        return Err(Error::Unsupported(format!(
            "int4c K pools past one storage binding ({} bytes) on wgpu",
            b.pool_binding
        )));
    }
    let seal_grid = if step.seals.is_empty() {
        None
    } else {
        let octets = step.seals.len() * step.k.kv_heads * step.k.head_dim / 8;
        let octets = u32::try_from(octets).map_err(|_| Error::OutOfRange {
            what: "seals x kv_heads x head_dim / 8",
            value: octets,
            limit: u32::MAX as usize,
        })?;
        Some(b.rows_grid(octets, ROW_WG)?)
    };

    // The records, each region at the device's storage offset alignment.
    let align = b.device.limits().min_storage_buffer_offset_alignment as u64;
    let work = attention.as_ref().map_or(&[][..], |a| &a.work);
    let records = step.records(work, align);
    let meta = records.words.len() as u64 * 4;
    // Each window's partials follow the last's: splits x windows per row.
    let partial = attention
        .as_ref()
        .map_or(0, |a| (a.partial_words * count) as u64 * 4);
    // Staged new keys: F16, [tokens, kv_heads, head_dim / 2] words.
    let stage = match seal_grid {
        Some(_) => (step.slots.len() * step.k.kv_heads * step.k.head_dim * 2) as u64,
        None => 0,
    };
    b.check_binding(meta)?;
    b.check_binding(partial)?;
    b.check_binding(stage)?;
    let blocks = 1 + 2 * count as u64 + 3 * per_channel as u64;
    let uniform_bytes = blocks * UNIFORM_BLOCK;
    let lease = lease(
        &b.workspaces,
        &b.device,
        [meta, partial, uniform_bytes, stage],
        &b.created,
    )?;
    let ws = lease.get();
    if meta > 0 {
        b.queue
            .write_buffer(&ws.meta, 0, bytemuck::cast_slice(&records.words));
    }
    let mut uniform = vec![0u32; uniform_bytes as usize / 4];
    let at = |offset: u64| offset as usize / 4;
    let splits = attention.as_ref().map_or(0, |a| a.grid[1] * count as u32);
    if let Some(a) = &attention {
        let [rows, ..] = a.reduce_uniform;
        let r = at(REDUCE_UNIFORM);
        uniform[r..r + 4].copy_from_slice(&[rows, splits, 0, 0]);
    }
    let (work, tables) = (at(records.work.0) as u32, at(records.tables.0) as u32);
    for w in windows.iter() {
        if let Some(a) = &attention {
            let u = at(attention_uniform(&w));
            uniform[u..u + 12].copy_from_slice(&a.uniform);
            uniform[u + 10..u + 16].copy_from_slice(&[
                w.block0 as u32,
                w.blocks as u32,
                w.index as u32 * a.grid[1],
                splits,
                work,
                tables,
            ]);
        }
        let u = at(append_uniform(&w));
        let slots_base = at(records.slots.0) as u32;
        uniform[u..u + 8].copy_from_slice(&params(step.slots.len(), step.k, &w, slots_base));
    }
    if per_channel {
        let (k, tokens) = (step.k, step.slots.len() as u32);
        let (heads, bs) = (k.kv_heads as u32, k.block_size as u32);
        let stage = [
            tokens,
            heads,
            1,
            tokens,
            0,
            at(records.stage.0) as u32,
            0,
            0,
        ];
        let seal = [
            step.seals.len() as u32,
            heads,
            bs,
            at(records.seals.0) as u32,
            k.open_base() as u32,
            0,
            0,
            0,
        ];
        let capacity = k.capacity() as u32;
        let opens = (k.open_blocks * k.block_size) as u32;
        let tail = [
            tokens,
            heads,
            bs,
            opens,
            capacity,
            at(records.open_slots.0) as u32,
            0,
            0,
        ];
        for (which, words) in [
            (OpenUniform::Stage, stage),
            (OpenUniform::Seal, seal),
            (OpenUniform::Tail, tail),
        ] {
            let u = at(open_uniform(which));
            uniform[u..u + 8].copy_from_slice(&words);
        }
    }
    b.queue
        .write_buffer(&ws.uniform, 0, bytemuck::cast_slice(&uniform));
    Ok(Prepared::new(
        step,
        Gated::new(
            WgpuStep {
                lease,
                meta,
                append_grid,
                attention,
                windows,
                seal_grid,
            },
            b.gate,
        ),
    ))
}

pub fn record_append(
    b: &WgpuBackend,
    enc: &mut Encoder<'_>,
    prepared: &Prepared,
    pools: (&Pool, &Pool),
    k: &Tensor<'_>,
    v: &Tensor<'_>,
) -> Result<()> {
    let enc = wgpu_encoder(enc)?;
    let st = prepared.inner::<Gated<WgpuStep>>(NAME)?;
    prepared.check_pools(pools)?;
    let l = &pools.0.layout;
    let n = prepared.tokens * l.kv_heads * l.head_dim;
    let sources = [tensor_range(b, k, "k", n)?, tensor_range(b, v, "v", n)?];
    if prepared.tokens == 0 {
        return Ok(());
    }
    let ws = st.lease.get();
    let slots = b.rest(&ws.meta, (0, st.meta));
    let per_channel = l.dtype.per_channel();
    if per_channel {
        record_append_keys(b, enc, st, pools.0, &sources[0], k.elem == Elem::F16)?;
    }
    let skip = per_channel as usize;
    for w in st.windows.iter() {
        let uniform = Range::new(&ws.uniform, append_uniform(&w), 32);
        let pairs = [pools.0, pools.1].into_iter().zip(&sources).zip([k, v]);
        for ((pool, src), t) in pairs.skip(skip) {
            let key = PipelineKey::rows(Kernel::QuantizeAppend, &pool.layout)
                .with("SRC_F16", (t.elem == Elem::F16) as u32);
            let [data, side] = w.ranges(pool)?;
            let ranges = [uniform.clone(), src.clone(), slots.clone(), data, side];
            b.record(enc, &key, &ranges, st.append_grid);
        }
    }
    Ok(())
}

/// The keys' append into an Int4Channel pool: the new keys staged as F16 (rotated
/// with the pool) and the blocks they fill sealed, then the other new keys written
/// into their open blocks, after the seals read them.
fn record_append_keys(
    b: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    st: &WgpuStep,
    pool: &Pool,
    src: &Range,
    src_f16: bool,
) -> Result<()> {
    let ws = st.lease.get();
    let l = &pool.layout;
    let meta = b.rest(&ws.meta, (0, st.meta));
    let (data, side) = (WgpuBackend::raw(&pool.data)?, WgpuBackend::raw(&pool.side)?);
    let f16 =
        PipelineKey::rows(Kernel::QuantizeAppend, &l.open_view()).with("SRC_F16", src_f16 as u32);
    let uniform = |which| Range::new(&ws.uniform, open_uniform(which), 32);
    if let Some(seal_grid) = st.seal_grid {
        let stage = Range::whole(&ws.stage);
        let ranges = [
            uniform(OpenUniform::Stage),
            src.clone(),
            meta.clone(),
            stage.clone(),
            Range::whole(data),
        ];
        b.record(enc, &f16, &ranges, st.append_grid);
        let ranges = [
            uniform(OpenUniform::Seal),
            stage,
            meta.clone(),
            Range::whole(data),
            Range::whole(side),
        ];
        b.record(enc, &PipelineKey::seal(l), &ranges, seal_grid);
    }
    let opens = b.rest(side, (l.open_base() as u64 * 4, 0));
    let ranges = [
        uniform(OpenUniform::Tail),
        src.clone(),
        meta,
        opens,
        Range::whole(data),
    ];
    b.record(enc, &f16, &ranges, st.append_grid);
    Ok(())
}

pub fn record_attention(
    b: &WgpuBackend,
    enc: &mut Encoder<'_>,
    prepared: &Prepared,
    pools: (&Pool, &Pool),
    q: &Tensor<'_>,
    out: &Tensor<'_>,
) -> Result<()> {
    let enc = wgpu_encoder(enc)?;
    let st = prepared.inner::<Gated<WgpuStep>>(NAME)?;
    prepared.check_pools(pools)?;
    let n = prepared.queries * prepared.q_heads * pools.0.layout.head_dim;
    // q is read in one pass and out written in the next, so they may be one tensor.
    let (q_range, out_range) = (tensor_range(b, q, "q", n)?, tensor_range(b, out, "out", n)?);
    let Some(a) = &st.attention else {
        return Ok(());
    };
    let ws = st.lease.get();
    let bytes = (a.partial_words * st.windows.count()) as u64 * 4;
    let partial = b.rest(&ws.partial, (0, bytes));
    let meta = b.rest(&ws.meta, (0, st.meta));
    let key = a
        .attention
        .clone()
        .with("Q_F16", (q.elem == Elem::F16) as u32);
    for w in st.windows.iter() {
        let [k_data, k_side] = w.ranges(pools.0)?;
        let [v_data, v_side] = w.ranges(pools.1)?;
        let ranges = [
            Range::new(&ws.uniform, attention_uniform(&w), 64),
            q_range.clone(),
            meta.clone(),
            meta.clone(),
            k_data,
            k_side,
            v_data,
            v_side,
            partial.clone(),
        ];
        b.record(enc, &key, &ranges, a.grid);
    }
    let key = a
        .reduce
        .clone()
        .with("OUT_F16", (out.elem == Elem::F16) as u32);
    let ranges = [
        Range::new(&ws.uniform, REDUCE_UNIFORM, 16),
        partial,
        out_range,
    ];
    b.record(enc, &key, &ranges, a.reduce_grid);
    Ok(())
}

impl WgpuBackend {
    /// A region of a buffer bound from its start to the end of the buffer (within
    /// one binding), so that the binding, and the cached bind group, stay the same
    /// while the region grows from step to step.
    fn rest(&self, buffer: &wgpu::Buffer, (offset, bytes): (u64, u64)) -> Range {
        let max = self.info.limits.max_binding_bytes.max(bytes);
        Range::new(buffer, offset, (buffer.size() - offset).min(max))
    }
}

fn wgpu_encoder<'a, 'b>(enc: &'a mut Encoder<'b>) -> Result<&'a mut wgpu::CommandEncoder> {
    match enc {
        Encoder::Wgpu(e) => Ok(e),
        other => Err(Error::InvalidConfig(format!(
            "the wgpu backend records into Encoder::Wgpu, not {other:?}"
        ))),
    }
}

/// The binding of `n` elements of `t`, checked: this backend's buffer, usable as
/// storage, offset at the device's alignment, size within the buffer and within
/// one binding. It binds the buffer from the offset on (as far as one binding
/// reaches), so that steps of other sizes on the same tensors reuse the bind group.
fn tensor_range(b: &WgpuBackend, t: &Tensor<'_>, what: &'static str, n: usize) -> Result<Range> {
    let limits = b.device.limits();
    let bytes = t.check(what, n, limits.min_storage_buffer_offset_alignment as u64)?;
    let buffer = WgpuBackend::raw(t.buffer)?;
    if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
        return Err(Error::InvalidConfig(format!(
            "{what}: its buffer was not created with BufferUsages::STORAGE"
        )));
    }
    b.check_binding(bytes)?;
    Ok(b.rest(buffer, (t.offset, bytes)))
}
