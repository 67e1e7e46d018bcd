//! CPU twin of `shaders/dequantize.wgsl`: rotated pools are rotated back.

use super::{PoolView, read, write};
use crate::backend::{DeviceBuffer, Pool};
use crate::quant::hadamard;
use crate::{Error, Result};

/// Writes the dequantized vectors of `slots` into `out` as `[tokens, kv_heads, head_dim]`.
pub fn dequantize(
    pool: &Pool,
    slots: &DeviceBuffer,
    tokens: usize,
    out: &DeviceBuffer,
) -> Result<()> {
    pool.check_dequantize(slots, tokens, out)?;
    let l = &pool.layout;
    let row_len = l.kv_heads * l.head_dim;
    let slots = read(slots)?[..tokens].to_vec();
    let cap = l.capacity() + l.open_blocks * l.block_size;
    if let Some(&s) = slots.iter().find(|&&s| s as usize >= cap) {
        return Err(Error::OutOfRange {
            what: "slot",
            value: s as usize,
            limit: cap,
        });
    }
    let view = PoolView::new(pool)?;
    let mut values = vec![0f32; tokens * row_len];
    for (t, &slot) in slots.iter().enumerate() {
        for h in 0..l.kv_heads {
            let dst = &mut values[(t * l.kv_heads + h) * l.head_dim..][..l.head_dim];
            view.load(slot as usize, h, dst);
            if l.rotated {
                hadamard(dst);
            }
        }
    }
    drop(view);
    write(out)?[..values.len()].copy_from_slice(bytemuck::cast_slice(&values));
    Ok(())
}
