//! The per-row kernels' parameters, and the dequantize dispatch
//! (`shaders/dequantize.wgsl`); appends are recorded by `step.rs`.

use super::bindings::Range;
use super::pipelines::PipelineKey;
use super::shaders::Kernel;
use super::windows::{Window, Windows};
use super::{ROW_WG, WgpuBackend};
use crate::backend::{DeviceBuffer, Pool};
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
    let windows = Windows::of(b, &[l])?;
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
    [
        tokens as u32,
        l.kv_heads as u32,
        l.block_size as u32,
        capacity,
        slot0,
        slots_base,
        0,
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
