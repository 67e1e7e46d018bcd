//! A generation loop: each step appends one token per sequence and decodes over
//! everything cached, in every layer. Times a step (one token per sequence) two
//! ways on the same backend: the host API (per layer `write` then `decode`, each a
//! round trip) and the device path (one `plan_decode`, then every layer's append
//! and attention recorded on device tensors and submitted once). Prints the time
//! per token, the host time spent recording a layer, and device objects created
//! per warm step.
//!
//!     cargo run --release --example decode_loop -- [--layers 32] [--batch 1,4]
//!         [--context 64,4096] [--steps 10] [--dtypes int8/int4] [--q-heads 32]
//!         [--kv-heads 8] [--head-dim 128]

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use kvq::{
    AttnParams, Backend, CacheConfig, DeviceBuffer, KvCache, KvDtype, Preference, Result, SeqId,
    Tensor,
};

/// A generation loop, timed two ways: through the host API (per layer `write` then
/// `decode`) and the device path (one plan, every layer recorded, one submission).
#[derive(clap::Parser)]
#[command(name = "decode_loop")]
struct Opts {
    /// Layers of the cache.
    #[arg(long, default_value_t = 32, value_parser = positive)]
    layers: usize,
    /// Batch sizes (sequences per step), comma-separated.
    #[arg(long = "batch", value_name = "N,..", value_delimiter = ',', value_parser = positive,
          default_value = "1,4")]
    batches: Vec<usize>,
    /// Tokens cached per sequence before the timed steps, comma-separated.
    #[arg(long = "context", value_name = "N,..", value_delimiter = ',', value_parser = positive,
          default_value = "64,4096")]
    contexts: Vec<usize>,
    /// Timed steps (after two warm-up steps; with int4c keys, 34).
    #[arg(long, default_value_t = 10, value_parser = positive)]
    steps: usize,
    #[arg(long = "dtypes", value_name = "K[/V]", default_value = "int8/int4",
          value_parser = KvDtype::parse_pair,
          help = format!("K/V dtypes: `K` or `K/V` (e.g. int8/int4), each one of {}", KvDtype::NAMES))]
    kv: (KvDtype, KvDtype),
    /// Query heads.
    #[arg(long, default_value_t = 32, value_parser = positive)]
    q_heads: usize,
    /// KV heads.
    #[arg(long, default_value_t = 8, value_parser = positive)]
    kv_heads: usize,
    /// Head dimension.
    #[arg(long, default_value_t = 128, value_parser = positive)]
    head_dim: usize,
}

/// A positive count (spaces around it allowed).
fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be positive".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let o = Opts::parse();
    let (k, v) = o.kv;
    let chosen = kvq::select(&Preference::allow_cpu())?;
    let b = chosen.backend;
    println!("backend: {}", chosen.reason);
    println!(
        "K {} V {}, {} layers, {} q / {} kv heads, head_dim {}; per step: one token per sequence; medians of {} steps\n",
        k, v, o.layers, o.q_heads, o.kv_heads, o.head_dim, o.steps
    );
    println!(
        "{:>5} {:>7} {:>14} {:>16} {:>8} {:>17} {:>16}",
        "batch",
        "context",
        "host API ms",
        "device path ms",
        "ratio",
        "record us/layer",
        "created/step"
    );
    for &batch in &o.batches {
        for &context in &o.contexts {
            let r = measure(&b, &o, batch, context)?;
            println!(
                "{batch:>5} {context:>7} {:>14.2} {:>16.2} {:>7.2}x {:>17.1} {:>16.1}",
                r.host_ms,
                r.device_ms,
                r.device_ms / r.host_ms,
                r.record_us_per_layer,
                r.created_per_step
            );
        }
    }
    Ok(())
}

struct Measured {
    host_ms: f64,
    device_ms: f64,
    record_us_per_layer: f64,
    created_per_step: f64,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// A device buffer of `n` values in [-1, 1).
fn noise(b: &Arc<dyn Backend>, n: usize, seed: u32) -> Result<DeviceBuffer> {
    let mut x = seed | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as f32 / (1 << 23) as f32 - 1.0
        })
        .collect();
    let buf = b.alloc(n)?;
    b.upload(&buf, 0, bytemuck::cast_slice(&v))?;
    Ok(buf)
}

/// A cache of `batch` sequences filled to `context` tokens in every layer (through
/// the device path, from one buffer of noise).
fn filled(
    b: &Arc<dyn Backend>,
    o: &Opts,
    batch: usize,
    context: usize,
) -> Result<(KvCache, Vec<SeqId>)> {
    let capacity = batch * (context + 2 * (o.steps + warm_steps(o)));
    let cfg =
        CacheConfig::new(o.layers, o.kv_heads, o.head_dim, capacity).with_dtypes(o.kv.0, o.kv.1);
    let mut cache = KvCache::new(b.clone(), cfg)?;
    let seqs: Vec<SeqId> = (0..batch).map(|_| cache.add_sequence()).collect();
    let kv = noise(b, context * o.kv_heads * o.head_dim, 7)?;
    let params = AttnParams::new(o.q_heads);
    for &s in &seqs {
        let plan = cache.plan_prefill(&[(s, context)], &params)?;
        let t = Tensor::f32(&kv);
        b.run(&mut |enc| {
            (0..o.layers).try_for_each(|l| cache.record_append(enc, &plan, l, &t, &t))
        })?;
    }
    b.synchronize()?;
    Ok((cache, seqs))
}

/// Steps run before measuring: two, and with Int4Channel keys a block's worth more,
/// so that every sequence has sealed a block (whose kernels' first use creates
/// their bind groups) before creations are counted.
fn warm_steps(o: &Opts) -> usize {
    if o.kv.0.per_channel() {
        2 + kvq::dtype::INT4C_BLOCK
    } else {
        2
    }
}

fn measure(b: &Arc<dyn Backend>, o: &Opts, batch: usize, context: usize) -> Result<Measured> {
    let warm = warm_steps(o);
    let params = AttnParams::new(o.q_heads);
    let row_kv = o.kv_heads * o.head_dim;
    let row_q = o.q_heads * o.head_dim;

    // Host API: per layer, write the new tokens' K/V, then decode (a download).
    let (mut cache, seqs) = filled(b, o, batch, context)?;
    let kv_host = vec![0.25f32; batch * row_kv];
    let q_host = vec![0.5f32; batch * row_q];
    let batch_1: Vec<_> = seqs.iter().map(|&s| (s, 1)).collect();
    let mut host = Vec::new();
    for step in 0..o.steps + warm {
        let start = Instant::now();
        let r = cache.extend(&batch_1)?;
        for l in 0..o.layers {
            cache.write(l, &r, &kv_host, &kv_host)?;
            cache.decode(l, &seqs, &q_host, &params)?;
        }
        if step >= warm {
            host.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    drop(cache);

    // Device path: one plan per step, every layer recorded, one submission.
    let (mut cache, seqs) = filled(b, o, batch, context)?;
    let kv = noise(b, batch * row_kv, 11)?;
    let q = noise(b, batch * row_q, 13)?;
    let out = b.alloc(batch * row_q)?;
    let (kv, q, out) = (Tensor::f32(&kv), Tensor::f32(&q), Tensor::f32(&out));
    let (mut device, mut record) = (Vec::new(), Vec::new());
    let mut created = 0;
    for step in 0..o.steps + warm {
        if step == warm {
            created = b.creations();
        }
        let start = Instant::now();
        let plan = cache.plan_decode(&seqs, &params)?;
        let mut recording = 0.0;
        b.run(&mut |enc| {
            let t = Instant::now();
            for l in 0..o.layers {
                cache.record_append(enc, &plan, l, &kv, &kv)?;
                cache.record_attention(enc, &plan, l, &q, &out)?;
            }
            recording = t.elapsed().as_secs_f64() * 1e6;
            Ok(())
        })?;
        b.synchronize()?;
        if step >= warm {
            device.push(start.elapsed().as_secs_f64() * 1e3);
            record.push(recording / o.layers as f64);
        }
    }
    Ok(Measured {
        host_ms: median(host),
        device_ms: median(device),
        record_us_per_layer: median(record),
        created_per_step: (b.creations() - created) as f64 / o.steps as f64,
    })
}
