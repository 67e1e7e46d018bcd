//! CPU twin of `shaders/quantize_append.wgsl` and, for Int4Channel keys, of
//! `shaders/seal.wgsl`.

use super::{CpuStep, PoolView, write};
use crate::Result;
use crate::backend::{Pool, Seal};
use crate::quant::{
    check_finite, dequantize_f16, hadamard, quantize, quantize_f16, quantize_int4c,
};

/// Quantizes token `t`, head `h` of `k` and `v` (`[tokens, kv_heads, head_dim]`)
/// into slot `slots[t]` of each pool (an Int4Channel K pool: into its open blocks
/// and the blocks the step seals); records were checked when the step was prepared.
pub fn quantize_append(
    (kp, vp): (&Pool, &Pool),
    step: &CpuStep,
    k: &[f32],
    v: &[f32],
) -> Result<()> {
    check_finite("k", k)?;
    check_finite("v", v)?;
    if kp.layout.dtype.per_channel() {
        append_int4c(kp, k, step)?;
    } else {
        append_pool(kp, k, &step.slots)?;
    }
    append_pool(vp, v, &step.slots)
}

/// Int4Channel keys: every new key as the open block holds it (F16, rotated with
/// the pool), then each sealed block quantized from its open block's keys and the
/// new ones, then the new keys of blocks left open written into their open block.
/// Seals come first: an open block released by one sequence may be taken by another
/// in the same step.
fn append_int4c(pool: &Pool, x: &[f32], step: &CpuStep) -> Result<()> {
    let l = &pool.layout;
    let d = l.head_dim;
    let staged: Vec<u32> = x
        .chunks_exact(d)
        .flat_map(|v| {
            let mut r = v.to_vec();
            if l.rotated {
                hadamard(&mut r);
            }
            let mut words = vec![0; d / 2];
            quantize_f16(&r, &mut words);
            words
        })
        .collect();
    let mut data = write(&pool.data)?;
    let mut side = write(&pool.side)?;
    for seal in &step.seals {
        seal_block(l, seal, &staged, &mut data, &mut side);
    }
    let open_base = l.open_base();
    for (t, &slot) in step.open_slots.iter().enumerate() {
        if slot == u32::MAX {
            continue;
        }
        for h in 0..l.kv_heads {
            let row = l.row(slot as usize - l.capacity(), h);
            let src = (t * l.kv_heads + h) * d / 2;
            side[open_base + row * d / 2..][..d / 2].copy_from_slice(&staged[src..src + d / 2]);
        }
    }
    Ok(())
}

/// Quantizes one block of every kv head: its first `from_open` keys from the open
/// block, the rest from the staged new keys (F16 words, `[tokens, kv_heads, d / 2]`).
fn seal_block(
    l: &crate::cache::PoolLayout,
    seal: &Seal,
    staged: &[u32],
    data: &mut [u32],
    side: &mut [u32],
) {
    let (d, bs) = (l.head_dim, l.block_size);
    let mut block = vec![0f32; bs * d];
    let mut codes = vec![0u32; bs * d / 8];
    for h in 0..l.kv_heads {
        for (s, dst) in block.chunks_exact_mut(d).enumerate() {
            let words = if s < seal.from_open as usize {
                let row = l.row(seal.open as usize * bs + s, h);
                &side[l.open_base() + row * d / 2..][..d / 2]
            } else {
                let t = seal.first as usize + s - seal.from_open as usize;
                &staged[(t * l.kv_heads + h) * d / 2..][..d / 2]
            };
            dequantize_f16(words, dst);
        }
        let f = l.factors(seal.block as usize, h);
        quantize_int4c(&block, d, &mut codes, &mut side[f..f + d]);
        for s in 0..bs {
            let row = l.row(seal.block as usize * bs + s, h);
            data[row * d / 8..][..d / 8].copy_from_slice(&codes[s * d / 8..][..d / 8]);
        }
    }
}

/// CPU twin of a truncate's reopen (`shaders/dequantize.wgsl` unrotated, then
/// `shaders/quantize_append.wgsl` as F16): each (quantized slot, open slot) pair's
/// keys, dequantized in the pool's basis, stored F16 in the open block.
pub fn reopen(pools: &[&Pool], moves: &[[u32; 2]]) -> Result<()> {
    for pool in pools {
        pool.check_reopen(moves)?;
    }
    // Every pool's moved keys, read before any pool is written.
    let mut values = Vec::with_capacity(pools.len());
    for pool in pools {
        let l = &pool.layout;
        let d = l.head_dim;
        let mut kept = vec![0f32; moves.len() * l.kv_heads * d];
        let view = PoolView::new(pool)?;
        for (m, out) in moves.iter().zip(kept.chunks_exact_mut(l.kv_heads * d)) {
            for (h, v) in out.chunks_exact_mut(d).enumerate() {
                view.load(m[0] as usize, h, v);
            }
        }
        values.push(kept);
    }
    let mut sides = pools
        .iter()
        .map(|p| write(&p.side))
        .collect::<Result<Vec<_>>>()?;
    for ((pool, kept), side) in pools.iter().zip(&values).zip(&mut sides) {
        let l = &pool.layout;
        let (cap, d) = (l.capacity(), l.head_dim);
        for (m, vals) in moves.iter().zip(kept.chunks_exact(l.kv_heads * d)) {
            for (h, v) in vals.chunks_exact(d).enumerate() {
                let row = l.row(m[1] as usize - cap, h);
                quantize_f16(v, &mut side[l.open_base() + row * d / 2..][..d / 2]);
            }
        }
    }
    Ok(())
}

fn append_pool(pool: &Pool, x: &[f32], slots: &[u32]) -> Result<()> {
    let l = &pool.layout;
    let (w, s) = (l.words_per_head(), l.side_per_head());
    let mut data = write(&pool.data)?;
    let mut side = write(&pool.side)?;
    let mut rotated = vec![0f32; l.head_dim];
    for (t, &slot) in slots.iter().enumerate() {
        for h in 0..l.kv_heads {
            let row = l.row(slot as usize, h);
            let mut src = &x[(t * l.kv_heads + h) * l.head_dim..][..l.head_dim];
            if l.rotated {
                rotated.copy_from_slice(src);
                hadamard(&mut rotated);
                src = &rotated;
            }
            quantize(
                l.dtype,
                src,
                &mut data[row * w..(row + 1) * w],
                &mut side[row * s..(row + 1) * s],
            );
        }
    }
    Ok(())
}
