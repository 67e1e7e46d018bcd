//! The CPU twin of the GPU forward pass: the same math in plain f32 Rust over the
//! same f16-rounded weights, attention by kvq's CPU reference backend.

use std::sync::Arc;

use kvq::cpu::CpuBackend;
use kvq::{KvDtype, Result};

use crate::model::{Forward, Matrix, Model, Sequence};

/// The model on the CPU, one sequence in a kvq cache.
pub struct CpuForward<'m> {
    model: &'m Model,
    s: Sequence,
}

impl<'m> CpuForward<'m> {
    /// `model` with a cache of `capacity` tokens of `(k, v)` dtypes.
    pub fn new(
        model: &'m Model,
        kv: (KvDtype, KvDtype),
        rotate: bool,
        capacity: usize,
    ) -> Result<Self> {
        let s = Sequence::new(model, Arc::new(CpuBackend::new()), kv, rotate, capacity)?;
        Ok(CpuForward { model, s })
    }
}

/// `y[r] = W x[r]` for each row of `x` (`[rows, W.cols]`); each row of W is
/// widened once and used for every row of `x`.
pub fn matmul(w: &Matrix, x: &[f32]) -> Vec<f32> {
    let rows = x.len() / w.cols;
    let mut y = vec![0f32; rows * w.rows];
    let mut wide = vec![0f32; w.cols];
    for (o, wr) in w.data.chunks_exact(w.cols).enumerate() {
        for (a, b) in wide.iter_mut().zip(wr) {
            *a = b.to_f32();
        }
        for (r, xr) in x.chunks_exact(w.cols).enumerate() {
            y[r * w.rows + o] = wide.iter().zip(xr).map(|(a, b)| a * b).sum();
        }
    }
    y
}

/// RMSNorm of each row of `x`, times `w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    x.chunks_exact(w.len())
        .flat_map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
            let s = 1.0 / (ms + eps).sqrt();
            row.iter().zip(w).map(move |(v, g)| v * s * g)
        })
        .collect()
}

/// Rotates each head of each row of `x` (`[rows, heads, d]`) by `table`'s row.
pub fn rope(x: &mut [f32], heads: usize, d: usize, table: &[[f32; 2]]) {
    for (r, row) in x.chunks_exact_mut(heads * d).enumerate() {
        let cs = &table[r * d / 2..(r + 1) * d / 2];
        for head in row.chunks_exact_mut(d) {
            for (pair, [c, s]) in head.chunks_exact_mut(2).zip(cs) {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * c - b * s;
                pair[1] = a * s + b * c;
            }
        }
    }
}

/// `silu(g) * u`, elementwise.
pub fn swiglu(g: &[f32], u: &[f32]) -> Vec<f32> {
    g.iter()
        .zip(u)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect()
}

impl Forward for CpuForward<'_> {
    fn forward(&mut self, tokens: &[u32], logit_rows: usize) -> Result<Vec<f32>> {
        let m = self.model;
        let c = &m.config;
        let w = &m.weights;
        let n = tokens.len();
        let start = self.s.cache.seq_len(self.s.seq)?;
        let mut x: Vec<f32> = Vec::with_capacity(n * c.hidden);
        for &t in tokens {
            let t = t as usize;
            if t >= c.vocab {
                return Err(kvq::Error::InvalidConfig(format!(
                    "token {t} is past the vocabulary"
                )));
            }
            x.extend(
                w.embed.data[t * c.hidden..(t + 1) * c.hidden]
                    .iter()
                    .map(|v| v.to_f32()),
            );
        }
        let table = m.rope_table(start..start + n);
        let chunk = [(self.s.seq, n)];
        let r = self.s.cache.extend(&chunk)?;
        for (l, lw) in w.layers.iter().enumerate() {
            let h = rms_norm(&x, &lw.attn_norm, c.norm_eps);
            let mut q = matmul(&lw.wq, &h);
            let mut k = matmul(&lw.wk, &h);
            let v = matmul(&lw.wv, &h);
            rope(&mut q, c.q_heads, c.head_dim, &table);
            rope(&mut k, c.kv_heads, c.head_dim, &table);
            self.s.cache.write(l, &r, &k, &v)?;
            let att = self.s.cache.prefill(l, &chunk, &q, &self.s.params)?;
            for (x, o) in x.iter_mut().zip(matmul(&lw.wo, &att)) {
                *x += o;
            }
            let h = rms_norm(&x, &lw.ffn_norm, c.norm_eps);
            let act = swiglu(&matmul(&lw.gate, &h), &matmul(&lw.up, &h));
            for (x, o) in x.iter_mut().zip(matmul(&lw.down, &act)) {
                *x += o;
            }
        }
        let tail = &x[(n - logit_rows.min(n)) * c.hidden..];
        let h = rms_norm(tail, &w.out_norm, c.norm_eps);
        Ok(matmul(w.output(), &h))
    }

    fn sequence(&self) -> &Sequence {
        &self.s
    }

    fn sequence_mut(&mut self) -> &mut Sequence {
        &mut self.s
    }
}
