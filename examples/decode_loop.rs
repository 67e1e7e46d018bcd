//! A generation-like loop: a few sequences each append one token per step and
//! decode over everything cached, in every layer; prints tokens/s and cache memory
//! per dtype.
//!
//!     cargo run --release --example decode_loop -- [steps]

use std::time::Instant;

use kvq::{AttnParams, CacheConfig, KvCache, KvDtype, Preference, Result};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let steps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let chosen = kvq::select(&Preference::allow_cpu())?;
    println!("backend: {}", chosen.reason);
    let (layers, kv_heads, q_heads, d, seqs_n, prompt) = (4, 8, 32, 128, 4, 1024);
    println!(
        "{seqs_n} sequences, prompt {prompt} tokens, {steps} steps, {layers} layers, {kv_heads} kv heads, {q_heads} q heads, head_dim {d}\n"
    );
    println!(
        "{:<10} {:<10} {:>10} {:>14} {:>12} {:>15}",
        "K", "V", "tokens/s", "cache MB used", "saving", "first call ms"
    );
    for (kd, vd) in [
        (KvDtype::F16, KvDtype::F16),
        (KvDtype::Int8, KvDtype::Int8),
        (KvDtype::Int8, KvDtype::Int4 { group: 32 }),
        (KvDtype::Int4 { group: 32 }, KvDtype::Int4 { group: 32 }),
    ] {
        let cfg =
            CacheConfig::new(layers, kv_heads, d, seqs_n * (prompt + steps)).with_dtypes(kd, vd);
        let mut cache = KvCache::new(chosen.backend.clone(), cfg)?;
        let seqs: Vec<_> = (0..seqs_n).map(|_| cache.add_sequence()).collect();
        let row = kv_heads * d;
        let fake = |n: usize, salt: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i + salt) * 2654435761) % 2000) as f32 / 1000.0 - 1.0)
                .collect()
        };
        for &s in &seqs {
            let kv = fake(layers * prompt * row, s.0 as usize);
            cache.append(&[(s, prompt)], &kv, &kv)?;
        }
        let params = AttnParams::new(q_heads);
        let q = fake(seqs_n * q_heads * d, 7);
        // The first call builds the pipelines (a shader compile per specialisation:
        // seconds on llvmpipe); it is reported apart from the loop.
        let first = Instant::now();
        cache.decode(0, &seqs, &q, &params)?;
        let first_ms = first.elapsed().as_secs_f64() * 1e3;
        let start = Instant::now();
        for step in 0..steps {
            let batch: Vec<_> = seqs.iter().map(|&s| (s, 1)).collect();
            let r = cache.extend(&batch)?;
            let kv = fake(seqs_n * row, step);
            for layer in 0..layers {
                cache.write(layer, &r, &kv, &kv)?;
                cache.decode(layer, &seqs, &q, &params)?;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let mem = cache.memory();
        println!(
            "{:<10} {:<10} {:>10.1} {:>14.2} {:>11.1}% {:>15.0}",
            kd.to_string(),
            vd.to_string(),
            (steps * seqs_n) as f64 / secs,
            mem.bytes_used as f64 / 1e6,
            100.0 * mem.saving_vs_f16(),
            first_ms
        );
    }
    Ok(())
}
