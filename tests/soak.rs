//! Soak (ignored by default; CI runs it bounded by time): thousands of generation
//! steps on the device path with sequences added, prefilled, truncated and freed.
//! The block accounting returns exactly to zero, and once warm the backend creates
//! no device objects (buffers, bind groups, pipelines) however the batch changes.
//!
//!     KVQ_SOAK_SECS=120 cargo test --test soak -- --ignored --nocapture

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Rng, own_backends};
use kvq::backend::Tensor;
use kvq::{AttnParams, Backend, CacheConfig, DeviceBuffer, KvCache, KvDtype, SeqId};

const LAYERS: usize = 2;
const KV_HEADS: usize = 2;
const Q_HEADS: usize = 8;
const D: usize = 64;
/// Live sequences at most, and tokens each before it is cut back.
const MAX_SEQS: usize = 8;
const MAX_LEN: usize = 700;
/// Tokens of a prefill chunk at most.
const MAX_CHUNK: usize = 16;

/// Device tensors big enough for any step: K/V and q/out rows for every token.
struct Tensors {
    kv: DeviceBuffer,
    q: DeviceBuffer,
    out: DeviceBuffer,
}

fn tensors(b: &Arc<dyn Backend>) -> Tensors {
    let tokens = MAX_SEQS * MAX_CHUNK;
    let fill = |words: usize, seed: u64| {
        let buf = b.alloc(words).unwrap();
        let x = Rng::new(seed).normals(words);
        b.upload(&buf, 0, bytemuck::cast_slice(&x)).unwrap();
        buf
    };
    Tensors {
        kv: fill(tokens * KV_HEADS * D, 1),
        q: fill(tokens * Q_HEADS * D, 2),
        out: b.alloc(tokens * Q_HEADS * D).unwrap(),
    }
}

/// What the soak did.
#[derive(Debug, Default)]
struct Counts {
    steps: usize,
    tokens: usize,
    added: usize,
    freed: usize,
    truncated: usize,
    prefills: usize,
}

/// Runs steps on `b` until `until`; returns the counts, and the objects the
/// backend created in the second half of the run (after the first half warmed it).
fn soak(b: &Arc<dyn Backend>, until: Duration) -> (Counts, u64) {
    let cfg = CacheConfig::new(LAYERS, KV_HEADS, D, MAX_SEQS * (MAX_LEN + MAX_CHUNK))
        .with_dtypes(KvDtype::Int8, KvDtype::Int4 { group: 32 });
    let blocks = cfg.num_blocks;
    let mut cache = KvCache::new(b.clone(), cfg).unwrap();
    let t = tensors(b);
    let params = AttnParams::new(Q_HEADS);
    let mut rng = Rng::new(7);
    let mut live: Vec<SeqId> = Vec::new();
    let mut c = Counts::default();
    let start = Instant::now();
    let mut half: Option<u64> = None;
    while start.elapsed() < until {
        if half.is_none() && start.elapsed() >= until / 2 {
            b.synchronize().unwrap();
            half = Some(b.creations());
        }
        // Sequences come and go, and are cut back before they outgrow the cache.
        if live.len() < MAX_SEQS && (live.is_empty() || rng.below(20) == 0) {
            live.push(cache.add_sequence());
            c.added += 1;
        }
        if live.len() > 1 && rng.below(40) == 0 {
            let s = live.swap_remove(rng.below(live.len()));
            cache.free_sequence(s).unwrap();
            c.freed += 1;
        }
        for &s in &live {
            let len = cache.seq_len(s).unwrap();
            if len >= MAX_LEN || (len > 0 && rng.below(60) == 0) {
                cache.truncate(s, rng.below(len)).unwrap();
                c.truncated += 1;
            }
        }
        // A prefill chunk now and then, else a decode step of every live sequence.
        let plan = if rng.below(10) == 0 {
            let chunks: Vec<(SeqId, usize)> = live
                .iter()
                .map(|&s| (s, 1 + rng.below(MAX_CHUNK)))
                .collect();
            c.prefills += 1;
            cache.plan_prefill(&chunks, &params).unwrap()
        } else {
            cache.plan_decode(&live, &params).unwrap()
        };
        b.run(&mut |enc| {
            for l in 0..LAYERS {
                let kv = Tensor::f32(&t.kv);
                cache.record_append(enc, &plan, l, &kv, &kv)?;
                let (q, out) = (Tensor::f32(&t.q), Tensor::f32(&t.out));
                cache.record_attention(enc, &plan, l, &q, &out)?;
            }
            Ok(())
        })
        .unwrap();
        c.tokens += plan.tokens();
        c.steps += 1;
    }
    b.synchronize().unwrap();
    let late = b.creations() - half.unwrap_or(b.creations());

    // The last step's outputs are finite, and freeing everything frees every block.
    let out = b.download(&t.out, 0, Q_HEADS * D).unwrap();
    assert!(out.iter().all(|&w| f32::from_bits(w).is_finite()));
    for s in live {
        cache.free_sequence(s).unwrap();
    }
    let bm = cache.blocks();
    assert_eq!(bm.used_blocks(), 0, "blocks still in use");
    assert_eq!(bm.free_blocks(), blocks, "free blocks");
    assert_eq!(bm.tokens(), 0, "tokens still counted");
    assert_eq!(bm.sequences().count(), 0, "sequences still live");
    (c, late)
}

#[test]
#[ignore = "soak: run with --ignored (CI does, bounded by KVQ_SOAK_SECS)"]
fn generation_steps_leak_nothing() {
    let secs: u64 = std::env::var("KVQ_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let backends = own_backends();
    let each = Duration::from_secs(secs) / backends.len() as u32;
    for b in &backends {
        let (c, late) = soak(b, each);
        eprintln!(
            "{} {}: {c:?}; objects created in the second half: {late}",
            b.info().kind,
            b.info().name
        );
        assert!(c.steps >= 1000, "only {} steps in {each:?}", c.steps);
        assert_eq!(late, 0, "{}: objects created once warm", b.info().name);
    }
}
