//! Quantize-and-append and dequantize dispatches (`shaders/quantize_append.wgsl`,
//! `shaders/dequantize.wgsl`).

use super::pipelines::PipelineKey;
use super::shaders::Kernel;
use super::{ROW_WG, WgpuBackend};
use crate::backend::{AppendArgs, DeviceBuffer, Pool};
use crate::cache::PoolLayout;
use crate::{Error, Result};

pub fn quantize_append(b: &WgpuBackend, args: &AppendArgs<'_>) -> Result<()> {
    let n = args.tokens;
    if n == 0 {
        return Ok(());
    }
    args.slots.check_range("append slots", 0, n)?;
    for (pool, src) in [(args.k, args.k_src), (args.v, args.v_src)] {
        let l = &pool.layout;
        check_rotation(l)?;
        src.check_range("append source", 0, n * l.kv_heads * l.head_dim)?;
    }
    b.submit(|enc| {
        for (pool, src) in [(args.k, args.k_src), (args.v, args.v_src)] {
            let l = &pool.layout;
            let rows = rows(n, l.kv_heads)?;
            b.dispatch_rows(
                enc,
                &PipelineKey::rows(Kernel::QuantizeAppend, l),
                &params(n, pool),
                &[src, args.slots, &pool.data, &pool.side],
                rows,
                ROW_WG,
            )?;
        }
        Ok(())
    })?;
    Ok(())
}

pub fn dequantize(
    b: &WgpuBackend,
    pool: &Pool,
    slots: &DeviceBuffer,
    tokens: usize,
    out: &DeviceBuffer,
) -> Result<()> {
    let l = &pool.layout;
    check_rotation(l)?;
    slots.check_range("dequantize slots", 0, tokens)?;
    out.check_range("dequantize out", 0, tokens * l.kv_heads * l.head_dim)?;
    if tokens == 0 {
        return Ok(());
    }
    b.submit(|enc| {
        b.dispatch_rows(
            enc,
            &PipelineKey::rows(Kernel::Dequantize, l),
            &params(tokens, pool),
            &[slots, &pool.data, &pool.side, out],
            rows(tokens, l.kv_heads)?,
            ROW_WG,
        )
    })?;
    Ok(())
}

/// Rotated rows are rotated in a 256-entry private array.
fn check_rotation(l: &PoolLayout) -> Result<()> {
    l.check()?;
    if l.rotated && l.head_dim > 256 {
        return Err(Error::Unsupported(format!(
            "rotated head_dim {} on wgpu: at most 256",
            l.head_dim
        )));
    }
    Ok(())
}

fn params(tokens: usize, pool: &Pool) -> [u32; 4] {
    let l = &pool.layout;
    [
        tokens as u32,
        l.kv_heads as u32,
        l.block_size as u32,
        (l.num_blocks * l.block_size) as u32,
    ]
}

fn rows(tokens: usize, kv_heads: usize) -> Result<u32> {
    u32::try_from(tokens * kv_heads).map_err(|_| Error::OutOfRange {
        what: "tokens * kv_heads",
        value: tokens * kv_heads,
        limit: u32::MAX as usize,
    })
}
