//! CPU twin of the attention kernels (decode and prefill share it): f32 online softmax.

use super::{PoolView, floats, read, write};
use crate::backend::AttnArgs;
use crate::quant::hadamard;
use crate::{Error, Result};

/// Attention for every query of every sequence in `args`.
pub fn attention(args: &AttnArgs<'_>) -> Result<()> {
    let kl = &args.k.layout;
    let d = kl.head_dim;
    let p = &args.params;
    let q_heads = p.q_heads as usize;
    let row = q_heads * d;
    let mut q = floats(args.q)?;
    args.check()?;
    // A rotated K pool holds H k: rotate q so that (H q) . (H k) = q . k.
    if kl.rotated {
        q.chunks_exact_mut(d).for_each(hadamard);
    }
    let seqs = args.seqs;
    let tables = read(args.block_tables)?.clone();
    check_blocks(args, &tables)?;

    let (kv, vv) = (PoolView::new(args.k)?, PoolView::new(args.v)?);
    let mut out = vec![0f32; args.queries() * row];
    let (mut key, mut val) = (vec![0f32; d], vec![0f32; d]);
    let ratio = p.group_ratio as usize;
    for s in seqs {
        let table = &tables[s.table_offset as usize..];
        for i in 0..s.q_len as usize {
            let pos = (s.kv_len - s.q_len) as usize + i;
            let qrow = (s.q_offset as usize + i) * row;
            // Running max, sum and accumulator per q head.
            let mut m = vec![f32::NEG_INFINITY; q_heads];
            let mut l = vec![0f32; q_heads];
            let mut acc = vec![0f32; row];
            for t in p.first_key(pos)..=pos {
                let slot = table[t / kl.block_size] as usize * kl.block_size + t % kl.block_size;
                for kvh in 0..kl.kv_heads {
                    kv.load(slot, kvh, &mut key);
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
    drop((kv, vv));
    // A rotated V pool makes the output H o: rotate it back (H H = I).
    if args.v.layout.rotated {
        out.chunks_exact_mut(d).for_each(hadamard);
    }
    write(args.out)?[..out.len()].copy_from_slice(bytemuck::cast_slice(&out));
    Ok(())
}

/// Checks that every block a sequence uses exists.
fn check_blocks(args: &AttnArgs<'_>, tables: &[u32]) -> Result<()> {
    let kl = &args.k.layout;
    for s in args.seqs {
        let blocks = (s.kv_len as usize).div_ceil(kl.block_size);
        let table = &tables[s.table_offset as usize..][..blocks];
        if let Some(&b) = table.iter().find(|&&b| b as usize >= kl.num_blocks) {
            return Err(Error::OutOfRange {
                what: "block",
                value: b as usize,
                limit: kl.num_blocks,
            });
        }
    }
    Ok(())
}
