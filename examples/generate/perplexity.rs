//! Perplexity as llama.cpp's `llama-perplexity` defines it: the text's tokens cut
//! into chunks of `ctx`, each evaluated from an empty cache, the second half of
//! each scored (the logits at positions ctx/2 .. ctx-2 predicting the next token).
//! Every KV choice runs chunk by chunk beside an F16 cache, whose next-token
//! distributions give the KL divergence and top-1 agreement.

use std::fmt;
use std::time::{Duration, Instant};

use kvq::KvDtype;

use crate::cpu::CpuForward;
use crate::gpu::{Gpu, GpuForward, MAX_ROWS};
use crate::model::{Forward, Model};
use crate::sample::argmax;

/// One KV cache setting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    pub kv: (KvDtype, KvDtype),
    pub rotate: bool,
}

impl fmt::Display for Choice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (k, v) = self.kv;
        if k == v {
            write!(f, "{k}")?;
        } else {
            write!(f, "{k}/{v}")?;
        }
        if self.rotate {
            f.write_str(" rotated")?;
        }
        Ok(())
    }
}

const BASELINE: Choice = Choice {
    kv: (KvDtype::F16, KvDtype::F16),
    rotate: false,
};

/// Running sums of one choice.
#[derive(Debug, Default, Clone)]
struct Sums {
    scored: usize,
    nll: f64,
    nll2: f64,
    kl: f64,
    kl2: f64,
    same_top: usize,
    time: Duration,
    tokens: usize,
    kv_bytes_per_token: usize,
}

/// One row of the report.
#[derive(Debug, Clone)]
pub struct Row {
    pub choice: Choice,
    pub ppl: f64,
    pub ppl_err: f64,
    pub kl: f64,
    pub kl_err: f64,
    pub top1: f64,
    pub kv_bytes_per_token: usize,
    pub tokens_per_s: f64,
}

/// Perplexity of every choice.
#[derive(Debug, Clone)]
pub struct Report {
    pub ctx: usize,
    pub chunks: usize,
    pub scored: usize,
    pub baseline_ppl: f64,
    pub rows: Vec<Row>,
}

/// log-softmax of one row of logits, in f64.
pub fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    row.iter().map(|&l| l as f64 - lse).collect()
}

/// [`log_softmax`] of each row of `logits` (`[rows, vocab]`).
fn log_softmax_rows(logits: &[f32], vocab: usize) -> Vec<Vec<f64>> {
    logits.chunks_exact(vocab).map(log_softmax).collect()
}

/// The logits of positions `first..ctx-1` of `chunk`, from an empty cache.
fn chunk_logits(fwd: &mut dyn Forward, chunk: &[u32], first: usize) -> kvq::Result<Vec<f32>> {
    fwd.reset()?;
    let mut logits = Vec::new();
    let last = chunk.len() - 1;
    for (i, part) in chunk[..last].chunks(MAX_ROWS).enumerate() {
        let (a, b) = (i * MAX_ROWS, i * MAX_ROWS + part.len());
        let rows = b.saturating_sub(first.max(a));
        logits.extend(fwd.forward(part, rows)?);
    }
    Ok(logits)
}

/// Runs every choice on the first `chunks` chunks of `tokens` (all if `None`),
/// on `gpu` or, without one, on the CPU twin.
pub fn run(
    model: &Model,
    gpu: Option<&Gpu>,
    tokens: &[u32],
    ctx: usize,
    chunks: Option<usize>,
    choices: &[Choice],
) -> Result<Report, String> {
    if ctx < 4 || ctx > model.config.context {
        return Err(format!(
            "--ctx {ctx}: expected 4..={} (the model's context)",
            model.config.context
        ));
    }
    let available = tokens.len() / ctx;
    let n = chunks.map_or(available, |c| c.min(available));
    if n == 0 {
        return Err(format!(
            "the text has {} tokens: fewer than one chunk of {ctx}",
            tokens.len()
        ));
    }
    let open = |c: Choice| -> Result<Box<dyn Forward + '_>, String> {
        let r: kvq::Result<Box<dyn Forward + '_>> = match gpu {
            Some(g) => GpuForward::new(model, g, c.kv, c.rotate, ctx)
                .map(|f| Box::new(f) as Box<dyn Forward>),
            None => {
                CpuForward::new(model, c.kv, c.rotate, ctx).map(|f| Box::new(f) as Box<dyn Forward>)
            }
        };
        r.map_err(|e| format!("{c}: {e}"))
    };
    let mut base = open(BASELINE)?;
    let mut runs: Vec<(Choice, Box<dyn Forward + '_>, Sums)> = choices
        .iter()
        .filter(|&&c| c != BASELINE)
        .map(|&c| open(c).map(|f| (c, f, Sums::default())))
        .collect::<Result<_, _>>()?;
    let mut base_sums = Sums::default();
    let vocab = model.config.vocab;
    let first = ctx / 2;
    for i in 0..n {
        let chunk = &tokens[i * ctx..(i + 1) * ctx];
        let targets = &chunk[first + 1..];
        let started = Instant::now();
        let logits = chunk_logits(base.as_mut(), chunk, first).map_err(|e| e.to_string())?;
        base_sums.time += started.elapsed();
        base_sums.tokens += ctx;
        base_sums.kv_bytes_per_token = base.kv_bytes_per_token();
        let base_lp = log_softmax_rows(&logits, vocab);
        for (lp, &t) in base_lp.iter().zip(targets) {
            let nll = -lp[t as usize];
            base_sums.scored += 1;
            base_sums.nll += nll;
            base_sums.nll2 += nll * nll;
            base_sums.same_top += 1;
        }
        for (_, fwd, sums) in &mut runs {
            let started = Instant::now();
            let logits = chunk_logits(fwd.as_mut(), chunk, first).map_err(|e| e.to_string())?;
            sums.time += started.elapsed();
            sums.tokens += ctx;
            sums.kv_bytes_per_token = fwd.kv_bytes_per_token();
            for ((lp, bp), &t) in log_softmax_rows(&logits, vocab)
                .iter()
                .zip(&base_lp)
                .zip(targets)
            {
                let nll = -lp[t as usize];
                let kl: f64 = bp.iter().zip(lp).map(|(b, q)| b.exp() * (b - q)).sum();
                sums.scored += 1;
                sums.nll += nll;
                sums.nll2 += nll * nll;
                sums.kl += kl;
                sums.kl2 += kl * kl;
                sums.same_top += (argmax(lp) == argmax(bp)) as usize;
            }
        }
        let ppl = (base_sums.nll / base_sums.scored as f64).exp();
        eprintln!("chunk {}/{n}: F16 cache PPL {ppl:.4}", i + 1);
        if !runs.is_empty() {
            // The table so far, for long runs.
            eprint!("{}", report(ctx, i + 1, choices, &base_sums, &runs).table());
        }
    }
    Ok(report(ctx, n, choices, &base_sums, &runs))
}

/// The report of the chunks scored so far.
fn report(
    ctx: usize,
    chunks: usize,
    choices: &[Choice],
    base_sums: &Sums,
    runs: &[(Choice, Box<dyn Forward + '_>, Sums)],
) -> Report {
    let row = |choice: Choice, s: &Sums| {
        let m = s.scored as f64;
        let mean = s.nll / m;
        let var = (s.nll2 / m - mean * mean).max(0.0);
        let ppl = mean.exp();
        let kl = s.kl / m;
        let kl_var = (s.kl2 / m - kl * kl).max(0.0);
        Row {
            choice,
            ppl,
            ppl_err: ppl * (var / (m - 1.0).max(1.0)).sqrt(),
            kl,
            kl_err: (kl_var / (m - 1.0).max(1.0)).sqrt(),
            top1: s.same_top as f64 / m,
            kv_bytes_per_token: s.kv_bytes_per_token,
            tokens_per_s: s.tokens as f64 / s.time.as_secs_f64().max(1e-9),
        }
    };
    let base_row = row(BASELINE, base_sums);
    let baseline_ppl = base_row.ppl;
    let mut rows = Vec::new();
    for &c in choices {
        match runs.iter().find(|r| r.0 == c) {
            Some((_, _, s)) => rows.push(row(c, s)),
            None => rows.push(base_row.clone()),
        }
    }
    if !choices.contains(&BASELINE) {
        rows.insert(0, base_row);
    }
    Report {
        ctx,
        chunks,
        scored: base_sums.scored,
        baseline_ppl,
        rows,
    }
}

impl Report {
    /// The table a person reads.
    pub fn table(&self) -> String {
        let mut s = format!(
            "perplexity: {} chunks of {} tokens, {} scored\n{:<22} {:>18} {:>9} {:>14} {:>7} {:>10} {:>9}\n",
            self.chunks,
            self.ctx,
            self.scored,
            "KV cache",
            "PPL",
            "dPPL",
            "KL",
            "top-1",
            "KV B/tok",
            "tok/s"
        );
        for r in &self.rows {
            s += &format!(
                "{:<22} {:>9.4} ± {:<6.4} {:>+9.4} {:>9.6} ±{:.0e} {:>6.2}% {:>10} {:>9.1}\n",
                r.choice.to_string(),
                r.ppl,
                r.ppl_err,
                r.ppl - self.baseline_ppl,
                r.kl,
                r.kl_err,
                100.0 * r.top1,
                r.kv_bytes_per_token,
                r.tokens_per_s
            );
        }
        s
    }

    /// One JSON object.
    pub fn json(&self) -> String {
        let rows: Vec<String> = self
            .rows
            .iter()
            .map(|r| {
                format!(
                    r#"{{"kv":"{}","ppl":{},"ppl_err":{},"dppl":{},"kl":{},"kl_err":{},"top1":{},"kv_bytes_per_token":{},"tokens_per_s":{}}}"#,
                    r.choice,
                    r.ppl,
                    r.ppl_err,
                    r.ppl - self.baseline_ppl,
                    r.kl,
                    r.kl_err,
                    r.top1,
                    r.kv_bytes_per_token,
                    r.tokens_per_s
                )
            })
            .collect();
        format!(
            r#"{{"ctx":{},"chunks":{},"scored":{},"rows":[{}]}}"#,
            self.ctx,
            self.chunks,
            self.scored,
            rows.join(",")
        )
    }
}
