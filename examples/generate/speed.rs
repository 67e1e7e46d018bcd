//! Decode speed at a given context: the cache is filled to it with random K/V
//! through kvq's host path (a prefill of 8192 tokens would take minutes on a CPU
//! adapter and time nothing of interest), then decode steps run as generation
//! runs them, wall-clocked, and once more profiled for kvq's share.

use std::time::Instant;

use crate::gpu::{Gpu, GpuForward};
use crate::model::{Forward, Model};
use crate::perplexity::Choice;

/// Decode steps timed per measurement, after two warm-up steps.
const STEPS: usize = 24;

/// One choice at one context.
pub struct Speed {
    pub choice: Choice,
    pub tokens_per_s: f64,
    /// kvq's append and attention device time per step (ms) and its share of
    /// the step's device time, when the adapter has timestamp queries.
    pub kvq: Option<(f64, f64)>,
}

/// Fills `fwd`'s cache with `tokens` positions of values in [-2, 2).
fn fill(fwd: &mut GpuForward, model: &Model, tokens: usize) -> kvq::Result<()> {
    let c = &model.config;
    let s = fwd.sequence_mut();
    let r = s.cache.extend(&[(s.seq, tokens)])?;
    let mut uniform = crate::sample::Uniform::new(2);
    let mut values = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| (uniform.next() * 4.0 - 2.0) as f32)
            .collect()
    };
    let n = tokens * c.kv_heads * c.head_dim;
    for layer in 0..c.layers {
        s.cache.write(layer, &r, &values(n), &values(n))?;
    }
    Ok(())
}

/// Decode tokens/s of every choice at every context; with `profile`, prints
/// each one's device time per kernel.
pub fn run(
    model: &Model,
    gpu: &Gpu,
    choices: &[Choice],
    contexts: &[usize],
    profile: bool,
) -> Result<Vec<Speed>, String> {
    let mut out = Vec::new();
    for &choice in choices {
        for &context in contexts {
            // The timed steps run just past `context`, even past the model's
            // own: the cache's K/V are random anyway.
            if context == 0 {
                return Err("--speed 0: expected contexts of at least 1 token".into());
            }
            let e = |e: kvq::Error| format!("{choice} at {context}: {e}");
            let steps = 2 * STEPS + 2;
            let mut fwd = GpuForward::new(model, gpu, choice.kv, choice.rotate, context + steps)
                .map_err(e)?;
            fill(&mut fwd, model, context).map_err(e)?;
            let mut token = 0u32;
            let mut step = |fwd: &mut GpuForward| -> kvq::Result<()> {
                let logits = fwd.forward(&[token], 1)?;
                token = crate::sample::argmax(&logits);
                Ok(())
            };
            for _ in 0..2 {
                step(&mut fwd).map_err(e)?;
            }
            let started = Instant::now();
            for _ in 0..STEPS {
                step(&mut fwd).map_err(e)?;
            }
            let tokens_per_s = STEPS as f64 / started.elapsed().as_secs_f64();
            let kvq = match fwd.profile() {
                Ok(()) => {
                    for _ in 0..STEPS {
                        step(&mut fwd).map_err(e)?;
                    }
                    fwd.take_profile().map(|p| {
                        if profile {
                            eprint!("{choice} at {context}:\n{}", p.table());
                        }
                        (p.kvq.as_secs_f64() * 1e3 / p.steps as f64, p.kvq_share())
                    })
                }
                Err(_) => None,
            };
            eprintln!(
                "{choice} at {context}: {tokens_per_s:.1} tokens/s{}",
                kvq.map_or(String::new(), |(ms, share)| format!(
                    ", kvq {ms:.2} ms/step ({:.1}%)",
                    100.0 * share
                ))
            );
            out.push(Speed {
                choice,
                tokens_per_s,
                kvq,
            });
        }
    }
    Ok(out)
}

/// The speeds as a table: a row per choice, a column per context.
pub fn table(speeds: &[Speed], contexts: &[usize]) -> String {
    let mut out = format!("{:<22}", "tokens/s (kvq ms, %)");
    for c in contexts {
        out += &format!(" {:>24}", format!("ctx {c}"));
    }
    out += "\n";
    for row in speeds.chunks(contexts.len()) {
        out += &format!("{:<22}", row[0].choice.to_string());
        for s in row {
            let cell = match s.kvq {
                Some((ms, share)) => format!(
                    "{:.1} (kvq {ms:.1} ms {:.0}%)",
                    s.tokens_per_s,
                    100.0 * share
                ),
                None => format!("{:.1}", s.tokens_per_s),
            };
            out += &format!(" {cell:>24}");
        }
        out += "\n";
    }
    out
}
