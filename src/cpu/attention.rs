//! CPU twin of the attention kernels (decode and prefill share it): f32 online softmax.

use super::{CpuStep, PoolView};
use crate::Result;
use crate::backend::Pool;
use crate::quant::hadamard;

/// Attention for every query of every sequence of the step; `q` is
/// `[queries, q_heads, head_dim]`, and so is the result.
pub fn attention((kp, vp): (&Pool, &Pool), step: &CpuStep, q: &[f32]) -> Result<Vec<f32>> {
    let kl = &kp.layout;
    let d = kl.head_dim;
    let Some(p) = step.params else {
        return Ok(Vec::new());
    };
    let q_heads = p.q_heads as usize;
    let row = q_heads * d;
    let mut q = q.to_vec();
    // A rotated K pool holds H k: rotate q so that (H q) . (H k) = q . k.
    if kl.rotated {
        q.chunks_exact_mut(d).for_each(hadamard);
    }
    let tables = &step.tables;
    let (kv, vv) = (PoolView::new(kp)?, PoolView::new(vp)?);
    let mut out = vec![0f32; q.len()];
    let (mut key, mut val) = (vec![0f32; d], vec![0f32; d]);
    let ratio = p.group_ratio as usize;
    for s in &step.seqs {
        let table = &tables[s.table_offset as usize..];
        for i in 0..s.q_len as usize {
            let pos = (s.kv_len - s.q_len) as usize + i;
            let qrow = (s.q_offset as usize + i) * row;
            // Running max, sum and accumulator per q head.
            let mut m = vec![f32::NEG_INFINITY; q_heads];
            let mut l = vec![0f32; q_heads];
            let mut acc = vec![0f32; row];
            // Int4Channel keys of the partly filled last block are in its open block.
            let sealed = s.kv_len as usize / kl.block_size * kl.block_size;
            for t in p.first_key(pos)..=pos {
                let slot = table[t / kl.block_size] as usize * kl.block_size + t % kl.block_size;
                let k_slot = if kl.dtype.per_channel() && t >= sealed {
                    kl.capacity() + s.open as usize * kl.block_size + t % kl.block_size
                } else {
                    slot
                };
                for kvh in 0..kl.kv_heads {
                    kv.load(k_slot, kvh, &mut key);
                    vv.load(slot, kvh, &mut val);
                    for h in kvh * ratio..(kvh + 1) * ratio {
                        let qv = &q[qrow + h * d..][..d];
                        let dot: f32 = qv.iter().zip(&key).map(|(a, b)| a * b).sum();
                        let score = p.cap(p.scale * dot);
                        let m_new = m[h].max(score);
                        let corr = (m[h] - m_new).exp();
                        let w = (score - m_new).exp();
                        l[h] = l[h] * corr + w;
                        for (a, v) in acc[h * d..(h + 1) * d].iter_mut().zip(&val) {
                            *a = *a * corr + w * v;
                        }
                        m[h] = m_new;
                    }
                }
            }
            for h in 0..q_heads {
                for (o, a) in out[qrow + h * d..][..d].iter_mut().zip(&acc[h * d..]) {
                    *o = a / l[h];
                }
            }
        }
    }
    // A rotated V pool makes the output H o: rotate it back (H H = I).
    if vp.layout.rotated {
        out.chunks_exact_mut(d).for_each(hadamard);
    }
    Ok(out)
}
