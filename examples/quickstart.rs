//! Builds a quantized KV cache on the best backend, appends a few hundred tokens of
//! synthetic K/V per dtype, runs decode attention and compares it with unquantized
//! f32 attention; then asks the advisor which dtypes a 7B-class model's cache
//! should use for a memory budget.
//!
//!     cargo run --release --example quickstart

use kvq::advisor::{KvShape, advise, next_more_compact};
use kvq::reference::{attention_f64, error_stats};
use kvq::{AttnParams, CacheConfig, KvCache, KvDtype, Preference, Result};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    // The CPU reference is allowed here so that the example runs anywhere; a GPU
    // adapter (even llvmpipe) ranks before it.
    let chosen = kvq::select(&Preference::allow_cpu())?;
    println!("backend: {}", chosen.reason);

    let (kv_heads, q_heads, head_dim, tokens) = (8, 32, 128, 500);
    let row = kv_heads * head_dim;
    // Synthetic activations with a few outlier channels, as real keys have.
    let mut seed = 0x2545F4914F6CDD1Du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let k: Vec<f32> = (0..tokens * row)
        .map(|i| next() * if i % head_dim < 4 { 8.0 } else { 1.0 })
        .collect();
    let v: Vec<f32> = (0..tokens * row).map(|_| next()).collect();
    let q: Vec<f32> = (0..q_heads * head_dim).map(|_| next()).collect();
    let params = AttnParams::new(q_heads);
    let exact = attention_f64(
        &q,
        &k,
        &v,
        kv_heads,
        head_dim,
        &params.resolve(kv_heads, head_dim)?,
    );

    println!(
        "\n{} tokens, {kv_heads} kv heads, {q_heads} q heads, head_dim {head_dim}\n",
        tokens
    );
    println!(
        "{:<10} {:<10} {:>14} {:>14} {:>12} {:>10}",
        "K", "V", "bytes/token", "saving vs f16", "NMSE", "min cos"
    );
    let pairs = [
        (KvDtype::F16, KvDtype::F16),
        (KvDtype::Bf16, KvDtype::Bf16),
        (KvDtype::Int8, KvDtype::Int8),
        (KvDtype::Fp8E4M3, KvDtype::Fp8E4M3),
        (KvDtype::Fp8E5M2, KvDtype::Fp8E5M2),
        (KvDtype::Int4 { group: 32 }, KvDtype::Int4 { group: 32 }),
        (KvDtype::Int4 { group: 128 }, KvDtype::Int4 { group: 128 }),
        (KvDtype::Int8, KvDtype::Int4 { group: 32 }),
        // Keys per channel over each 32-token block (random keys have no outlier
        // channels to isolate: see the README's real activations).
        (KvDtype::Int4Channel, KvDtype::Int4 { group: 32 }),
    ];
    for (kd, vd) in pairs {
        let config = CacheConfig::new(1, kv_heads, head_dim, 1024).with_dtypes(kd, vd);
        let mut cache = KvCache::new(chosen.backend.clone(), config)?;
        let seq = cache.add_sequence();
        cache.append(&[(seq, tokens)], &k, &v)?;
        let out = cache.decode(0, &[seq], &q, &params)?;
        let e = error_stats(&out, &exact, head_dim);
        let mem = cache.memory();
        println!(
            "{:<10} {:<10} {:>14} {:>13.1}% {:>12.3e} {:>10.6}",
            kd.to_string(),
            vd.to_string(),
            mem.bytes_per_token,
            100.0 * mem.saving_vs_f16(),
            e.nmse,
            e.min_cos
        );
    }

    // A 7B-class model (32 layers, 8 kv heads, head_dim 128) at 32k context x 8
    // sequences, on a 24 GiB budget for the cache.
    let shape = KvShape {
        layers: 32,
        kv_heads: 8,
        head_dim: 128,
    };
    let tokens = 32 * 1024 * 8;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!("\nadvisor: 32 layers x 8 kv heads x D 128, 32768 tokens x 8 sequences");
    for budget_gib in [48u64, 24, 12, 4] {
        match advise(budget_gib << 30, shape, tokens) {
            Ok(c) => {
                println!(
                    "  {budget_gib:>2} GiB: K {} V {} rotated {}: {:.1} GiB, measured NMSE {:.2e}",
                    c.k,
                    c.v,
                    c.rotate,
                    gib(c.bytes),
                    c.nmse
                );
                if let Some(n) = next_more_compact(c.k, c.v, shape.head_dim) {
                    println!(
                        "         under pressure, next: K {} V {} rotated {} (NMSE {:.2e})",
                        n.k, n.v, n.rotate, n.nmse
                    );
                }
            }
            Err(e) => println!("  {budget_gib:>2} GiB: {e}"),
        }
    }
    Ok(())
}
