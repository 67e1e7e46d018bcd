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

/// Outputs of one block of [`matmul`]: its widened weights fill 16 SIMD lanes.
const BLOCK: usize = 16;

/// `y[r] = W x[r]` for each row of `x` (`[rows, W.cols]`). Blocks of
/// [`BLOCK`] outputs are widened to f32 once and used for every row of `x`,
/// spread over the CPU's threads; with AVX2 and FMA (checked at run time) the
/// inner loop is compiled for them.
pub fn matmul(w: &Matrix, x: &[f32]) -> Vec<f32> {
    let rows = x.len() / w.cols;
    let blocks = w.rows.div_ceil(BLOCK);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(blocks);
    // Each thread's blocks, each `[rows][BLOCK]`.
    let parts: Vec<Vec<(usize, Vec<f32>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut wide = vec![0f32; w.cols * BLOCK];
                    (t..blocks)
                        .step_by(threads)
                        .map(|b| {
                            widen(w, b * BLOCK, &mut wide);
                            let mut out = vec![0f32; rows * BLOCK];
                            block(&wide, x, w.cols, &mut out);
                            (b, out)
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a matmul thread panicked"))
            .collect()
    });
    let mut y = vec![0f32; rows * w.rows];
    for (b, out) in parts.into_iter().flatten() {
        let o0 = b * BLOCK;
        let width = BLOCK.min(w.rows - o0);
        for (yr, br) in y.chunks_exact_mut(w.rows).zip(out.chunks_exact(BLOCK)) {
            yr[o0..o0 + width].copy_from_slice(&br[..width]);
        }
    }
    y
}

/// Rows `o0..o0 + BLOCK` of `w` as f32, transposed to `[cols][BLOCK]` (rows past
/// the matrix are zero).
fn widen(w: &Matrix, o0: usize, wide: &mut [f32]) {
    wide.fill(0.0);
    for i in 0..BLOCK.min(w.rows - o0) {
        let row = &w.data[(o0 + i) * w.cols..(o0 + i + 1) * w.cols];
        for (k, v) in row.iter().enumerate() {
            wide[k * BLOCK + i] = v.to_f32();
        }
    }
}

/// `out[r] = wide^T x[r]` for a block, four rows at a time.
fn block(wide: &[f32], x: &[f32], cols: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        unsafe { block_avx2(wide, x, cols, out) };
        return;
    }
    block_rows::<false>(wide, x, cols, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn block_avx2(wide: &[f32], x: &[f32], cols: usize, out: &mut [f32]) {
    block_rows::<true>(wide, x, cols, out);
}

#[inline(always)]
fn block_rows<const FMA: bool>(wide: &[f32], x: &[f32], cols: usize, out: &mut [f32]) {
    let mut xs = x.chunks_exact(4 * cols);
    let mut outs = out.chunks_exact_mut(4 * BLOCK);
    for (x4, o4) in (&mut xs).zip(&mut outs) {
        rows_of::<4, FMA>(wide, x4, cols, o4);
    }
    for (x1, o1) in xs
        .remainder()
        .chunks_exact(cols)
        .zip(outs.into_remainder().chunks_exact_mut(BLOCK))
    {
        rows_of::<1, FMA>(wide, x1, cols, o1);
    }
}

#[inline(always)]
fn rows_of<const R: usize, const FMA: bool>(wide: &[f32], x: &[f32], cols: usize, out: &mut [f32]) {
    let mut acc = [[0f32; BLOCK]; R];
    for (k, wk) in wide.chunks_exact(BLOCK).enumerate() {
        for (r, a) in acc.iter_mut().enumerate() {
            let xv = x[r * cols + k];
            for (a, w) in a.iter_mut().zip(wk) {
                *a = if FMA { w.mul_add(xv, *a) } else { *a + w * xv };
            }
        }
    }
    for (o, a) in out.chunks_exact_mut(BLOCK).zip(&acc) {
        o.copy_from_slice(a);
    }
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
