//! CPU twin of `shaders/quantize_append.wgsl`.

use super::{floats, read, write};
use crate::backend::{AppendArgs, Pool};
use crate::quant::{check_finite, hadamard, quantize};
use crate::{Error, Result};

/// Quantizes token `t`, head `h` of the sources into slot `slots[t]` of each pool.
pub fn quantize_append(args: &AppendArgs<'_>) -> Result<()> {
    let slots = read(args.slots)?[..args.tokens.min(args.slots.words())].to_vec();
    for (pool, src) in [(args.k, args.k_src), (args.v, args.v_src)] {
        let x = floats(src)?;
        let l = &pool.layout;
        let row_len = l.kv_heads * l.head_dim;
        if x.len() < args.tokens * row_len || slots.len() < args.tokens {
            return Err(Error::ShapeMismatch {
                what: "append source",
                expected: args.tokens * row_len,
                got: x.len().min(slots.len() * row_len),
            });
        }
        let x = &x[..args.tokens * row_len];
        check_finite("append source", x)?;
        l.check()?;
        check_slots(pool, &slots)?;
        append_pool(pool, x, &slots)?;
    }
    Ok(())
}

fn check_slots(pool: &Pool, slots: &[u32]) -> Result<()> {
    let cap = pool.layout.num_blocks * pool.layout.block_size;
    match slots.iter().find(|&&s| s as usize >= cap) {
        Some(&s) => Err(Error::OutOfRange {
            what: "slot",
            value: s as usize,
            limit: cap,
        }),
        None => Ok(()),
    }
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
