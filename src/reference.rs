//! Naive f64 attention over dense, unquantized K/V: the ground truth that tests,
//! examples and the eval tool compare every backend against.

use crate::attn::Resolved;

/// Causal attention of `n_q` queries (`q`: `[n_q, q_heads, head_dim]`) at the last
/// `n_q` positions of one sequence whose keys and values are `[T, kv_heads, head_dim]`.
/// Two-pass softmax in f64. Returns `[n_q, q_heads, head_dim]`.
pub fn attention_f64(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kv_heads: usize,
    head_dim: usize,
    p: &Resolved,
) -> Vec<f32> {
    let (d, hq) = (head_dim, p.q_heads as usize);
    let t_len = k.len() / (kv_heads * d);
    let n_q = q.len() / (hq * d);
    let ratio = p.group_ratio as usize;
    let mut out = vec![0f32; q.len()];
    for i in 0..n_q {
        let pos = t_len - n_q + i;
        let keys = p.first_key(pos)..=pos;
        for h in 0..hq {
            let kvh = h / ratio;
            let qv = &q[(i * hq + h) * d..][..d];
            let scores: Vec<f64> = keys
                .clone()
                .map(|t| {
                    let kv = &k[(t * kv_heads + kvh) * d..][..d];
                    let dot: f64 = qv.iter().zip(kv).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let s = p.scale as f64 * dot;
                    let c = p.softcap as f64;
                    if c > 0.0 { c * (s / c).tanh() } else { s }
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = w.iter().sum();
            let o = &mut out[(i * hq + h) * d..][..d];
            for (e, oe) in o.iter_mut().enumerate() {
                let acc: f64 = keys
                    .clone()
                    .zip(&w)
                    .map(|(t, wt)| wt * v[(t * kv_heads + kvh) * d + e] as f64)
                    .sum();
                *oe = (acc / sum) as f32;
            }
        }
    }
    out
}

/// Error of `got` against `want`: normalised MSE, minimum cosine over rows of
/// `row` values, and largest absolute difference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ErrorStats {
    /// `sum (got - want)^2 / sum want^2`.
    pub nmse: f64,
    /// Smallest cosine similarity of a row (one head's output vector).
    pub min_cos: f64,
    /// Largest absolute difference.
    pub max_abs: f64,
}

/// Compares `got` with `want`, rows of `row` values.
pub fn error_stats(got: &[f32], want: &[f32], row: usize) -> ErrorStats {
    let (mut num, mut den, mut max_abs) = (0f64, 0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        let diff = g as f64 - w as f64;
        num += diff * diff;
        den += (w as f64) * (w as f64);
        max_abs = max_abs.max(diff.abs());
    }
    let min_cos = got
        .chunks(row.max(1))
        .zip(want.chunks(row.max(1)))
        .map(|(g, w)| {
            let dot: f64 = g.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum();
            let ng: f64 = g.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
            let nw: f64 = w.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
            if ng == 0.0 && nw == 0.0 {
                1.0
            } else {
                dot / (ng * nw)
            }
        })
        .fold(1.0, f64::min);
    ErrorStats {
        nmse: if den > 0.0 { num / den } else { num },
        min_cos,
        max_abs,
    }
}
