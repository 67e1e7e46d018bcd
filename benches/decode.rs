//! Criterion: decode attention over a 4096-token cache per dtype, device-synchronised,
//! reported as bytes of cache read per second. `examples/bench.rs` adds the roofline.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvq::{AttnParams, CacheConfig, KvCache, KvDtype, Preference};

fn decode(c: &mut Criterion) {
    let chosen = kvq::select(&Preference::allow_cpu()).expect("a backend");
    let backend = chosen.backend;
    let (kv_heads, q_heads, d, context) = (8, 32, 128, 4096);
    let mut group = c.benchmark_group(format!("decode/{}", backend.info().name));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    for dtype in [KvDtype::F16, KvDtype::Int8, KvDtype::Int4 { group: 32 }] {
        let cfg = CacheConfig::new(1, kv_heads, d, context).with_dtypes(dtype, dtype);
        let mut cache = KvCache::new(backend.clone(), cfg).expect("cache");
        let seq = cache.add_sequence();
        let x: Vec<f32> = (0..context * kv_heads * d)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        cache.append(&[(seq, context)], &x, &x).expect("append");
        let q = vec![0.1f32; q_heads * d];
        let params = AttnParams::new(q_heads);
        group.throughput(Throughput::Bytes(
            (context * kv_heads * 2 * dtype.bytes_per_token_head(d)) as u64,
        ));
        group.bench_function(dtype.to_string(), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    // decode() downloads its output, so each call ends synchronised.
                    cache.decode(0, &[seq], &q, &params).expect("decode");
                }
                backend.synchronize().expect("sync");
                start.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
