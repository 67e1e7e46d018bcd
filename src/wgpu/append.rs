//! The per-row kernels' parameters, and the dequantize dispatch
//! (`shaders/dequantize.wgsl`); appends are recorded by `step.rs`.

use super::bindings::Range;
use super::pipelines::PipelineKey;
use super::shaders::Kernel;
use super::windows::{Window, Windows};
use super::{ROW_WG, WgpuBackend};
use crate::backend::{Backend, DeviceBuffer, Pool};
use crate::cache::PoolLayout;
use crate::{Error, Result};

pub fn dequantize(
    b: &WgpuBackend,
    pool: &Pool,
    slots: &DeviceBuffer,
    tokens: usize,
    out: &DeviceBuffer,
) -> Result<()> {
    pool.check_dequantize(slots, tokens, out)?;
    let l = &pool.layout;
    check_rotation(l)?;
    if tokens == 0 {
        return Ok(());
    }
    let grid = b.rows_grid(rows(tokens, l.kv_heads)?, ROW_WG)?;
    let windows = windows_of(b, l)?;
    let (slots, out) = (WgpuBackend::raw(slots)?, WgpuBackend::raw(out)?);
    b.submit(|enc| {
        for w in windows.iter() {
            let [data, side] = w.ranges(pool)?;
            b.dispatch(
                enc,
                &PipelineKey::rows(Kernel::Dequantize, l),
                &params(tokens, l, &w, 0),
                &[Range::whole(slots), data, side, Range::whole(out)],
                grid,
            )?;
        }
        Ok(())
    })?;
    Ok(())
}

/// The windows of a pool; an Int4Channel pool must fit one.
fn windows_of(b: &WgpuBackend, l: &PoolLayout) -> Result<Windows> {
    let windows = Windows::of(b, &[l])?;
    if l.dtype.per_channel() && windows.count() > 1 {
        return Err(Error::Unsupported(format!(
            "int4c K pools past one storage binding ({} bytes) on wgpu",
            b.pool_binding
        )));
    }
    Ok(windows)
}

/// A truncate's reopen on Int4Channel pools of one layout (a cache's layers):
/// the moved keys dequantized in the pool's basis (dequantize.wgsl unrotated)
/// into a scratch buffer, then stored F16 into their open blocks
/// (quantize_append.wgsl as F16, unrotated). Everything is checked and allocated
/// first and every pool recorded into one submission, which submits nothing if
/// any recording fails. Waits.
pub fn reopen(b: &WgpuBackend, pools: &[&Pool], moves: &[[u32; 2]]) -> Result<()> {
    let Some(l) = Pool::check_reopen_all(pools, moves)? else {
        return Ok(());
    };
    let raws = pools
        .iter()
        .map(|p| Ok((WgpuBackend::raw(&p.data)?, WgpuBackend::raw(&p.side)?)))
        .collect::<Result<Vec<_>>>()?;
    if moves.is_empty() {
        return Ok(());
    }
    windows_of(b, l)?;
    let n = moves.len();
    let (d, heads) = (l.head_dim, l.kv_heads);
    let slots = crate::backend::reopen_slots(moves);
    let slots_buf = b.alloc(slots.len())?;
    b.upload(&slots_buf, 0, &slots)?;
    let scratch = b.alloc(n * heads * d)?;
    let grid = b.rows_grid(rows(n, heads)?, ROW_WG)?;
    let (slots_raw, scratch_raw) = (WgpuBackend::raw(&slots_buf)?, WgpuBackend::raw(&scratch)?);
    let basis = PoolLayout {
        rotated: false,
        ..*l
    };
    let open = basis.open_view();
    let opens = (l.open_blocks * l.block_size) as u32;
    let capacity = l.capacity() as u32;
    let store = [
        n as u32,
        heads as u32,
        l.block_size as u32,
        opens,
        capacity,
        n as u32,
        0,
        0,
    ];
    let offset = l.open_base() as u64 * 4;
    b.submit(|enc| {
        for &(data, side) in &raws {
            b.dispatch(
                enc,
                &PipelineKey::rows(Kernel::Dequantize, &basis),
                &params(n, &basis, &Window::whole(l.num_blocks), 0),
                &[
                    Range::whole(slots_raw),
                    Range::whole(data),
                    Range::whole(side),
                    Range::whole(scratch_raw),
                ],
                grid,
            )?;
            b.dispatch(
                enc,
                &PipelineKey::rows(Kernel::QuantizeAppend, &open).with("SRC_F16", 0),
                &store,
                &[
                    Range::whole(scratch_raw),
                    Range::whole(slots_raw),
                    Range::new(side, offset, side.size() - offset),
                    Range::whole(data),
                ],
                grid,
            )?;
        }
        Ok(())
    })?;
    Ok(())
}

/// Rotated rows are rotated in a 256-entry private array.
pub fn check_rotation(l: &PoolLayout) -> Result<()> {
    l.check()?;
    if l.rotated && l.head_dim > 256 {
        return Err(Error::Unsupported(format!(
            "rotated head_dim {} on wgpu: at most 256",
            l.head_dim
        )));
    }
    Ok(())
}

/// `AppendParams` of the per-row kernels for `tokens` rows of a pool laid out as `l`,
/// bound in window `w`, their slots from word `slots_base` of the slots' binding.
pub fn params(tokens: usize, l: &PoolLayout, w: &Window, slots_base: u32) -> [u32; 8] {
    let (slot0, capacity) = w.slots(l.block_size);
    let open_base = if l.dtype.per_channel() {
        l.open_base() as u32
    } else {
        0
    };
    [
        tokens as u32,
        l.kv_heads as u32,
        l.block_size as u32,
        capacity,
        slot0,
        slots_base,
        open_base,
        0,
    ]
}

/// Invocations of a per-row kernel: one per (token, kv head).
pub fn rows(tokens: usize, kv_heads: usize) -> Result<u32> {
    u32::try_from(tokens * kv_heads).map_err(|_| Error::OutOfRange {
        what: "tokens * kv_heads",
        value: tokens * kv_heads,
        limit: u32::MAX as usize,
    })
}
