//! CPU twin of `shaders/quantize_append.wgsl`.

use crate::Result;
use crate::backend::Pool;
use crate::quant::{check_finite, hadamard, quantize};

use super::write;

/// Quantizes token `t`, head `h` of `k` and `v` (`[tokens, kv_heads, head_dim]`)
/// into slot `slots[t]` of each pool; slots were checked when the step was prepared.
pub fn quantize_append(
    (kp, vp): (&Pool, &Pool),
    slots: &[u32],
    k: &[f32],
    v: &[f32],
) -> Result<()> {
    check_finite("k", k)?;
    check_finite("v", v)?;
    append_pool(kp, k, slots)?;
    append_pool(vp, v, slots)
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
