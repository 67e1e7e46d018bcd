//! CPU twin of the attention kernels (decode and prefill share it): f32 online softmax.

use super::{CpuStep, PoolView};
use crate::Result;
use crate::attn::Resolved;
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
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for s in &step.seqs {
        let table = &tables[s.table_offset as usize..];
        // Every key and value a query of the sequence sees, dequantized once:
        // `[t - t0][kv_head][d]`. Int4Channel keys of the partly filled last
        // block are in its open block.
        let (kv_len, q_len) = (s.kv_len as usize, s.q_len as usize);
        let t0 = p.first_key(kv_len - q_len);
        let sealed = kv_len / kl.block_size * kl.block_size;
        let width = kl.kv_heads * d;
        let seen = (kv_len - t0) * width;
        let (mut keys, mut vals) = (vec![0f32; seen], vec![0f32; seen]);
        for (t, (key, val)) in keys
            .chunks_exact_mut(width)
            .zip(vals.chunks_exact_mut(width))
            .enumerate()
        {
            let t = t0 + t;
            let slot = table[t / kl.block_size] as usize * kl.block_size + t % kl.block_size;
            let k_slot = if kl.dtype.per_channel() && t >= sealed {
                kl.capacity() + s.open as usize * kl.block_size + t % kl.block_size
            } else {
                slot
            };
            for kvh in 0..kl.kv_heads {
                kv.load(k_slot, kvh, &mut key[kvh * d..][..d]);
                vv.load(slot, kvh, &mut val[kvh * d..][..d]);
            }
        }
        // The queries' rows of the output, split between threads (the last part
        // on this one).
        let first = s.q_offset as usize * row;
        let rows = &mut out[first..first + q_len * row];
        let per = q_len.div_ceil(threads).max(1);
        let (keys, vals, q) = (&keys, &vals, &q);
        let part = move |c: usize, part: &mut [f32]| {
            for (j, o) in part.chunks_exact_mut(row).enumerate() {
                let i = c * per + j;
                let pos = kv_len - q_len + i;
                let qrow = &q[first + i * row..][..row];
                let span = p.first_key(pos) - t0..=pos - t0;
                query(&p, qrow, (keys, vals), width, span, o);
            }
        };
        let mut parts = rows.chunks_mut(per * row).enumerate();
        let last = parts.next_back();
        std::thread::scope(|scope| {
            for (c, rows) in parts {
                scope.spawn(move || part(c, rows));
            }
            if let Some((c, rows)) = last {
                part(c, rows);
            }
        });
    }
    // A rotated V pool makes the output H o: rotate it back (H H = I).
    if vp.layout.rotated {
        out.chunks_exact_mut(d).for_each(hadamard);
    }
    Ok(out)
}

/// One query's attention over `keys` and `vals` (`[t][kv_head][d]`) at rows
/// `span`, into `out` (`[q_heads][d]`): the online softmax, key by key.
fn query(
    p: &Resolved,
    q: &[f32],
    (keys, vals): (&[f32], &[f32]),
    width: usize,
    span: std::ops::RangeInclusive<usize>,
    out: &mut [f32],
) {
    let q_heads = p.q_heads as usize;
    let d = q.len() / q_heads;
    let ratio = p.group_ratio as usize;
    // Running max, sum and accumulator per q head.
    let mut m = vec![f32::NEG_INFINITY; q_heads];
    let mut l = vec![0f32; q_heads];
    let mut acc = vec![0f32; q.len()];
    for t in span {
        let (key, val) = (&keys[t * width..][..width], &vals[t * width..][..width]);
        for h in 0..q_heads {
            let kvh = h / ratio;
            let (key, val) = (&key[kvh * d..][..d], &val[kvh * d..][..d]);
            let dot: f32 = q[h * d..][..d].iter().zip(key).map(|(a, b)| a * b).sum();
            let score = p.cap(p.scale * dot);
            let m_new = m[h].max(score);
            let corr = (m[h] - m_new).exp();
            let w = (score - m_new).exp();
            l[h] = l[h] * corr + w;
            for (a, v) in acc[h * d..(h + 1) * d].iter_mut().zip(val) {
                *a = *a * corr + w * v;
            }
            m[h] = m_new;
        }
    }
    for h in 0..q_heads {
        for (o, a) in out[h * d..][..d].iter_mut().zip(&acc[h * d..]) {
            *o = a / l[h];
        }
    }
}
