//! Device faults (DESIGN §6): a lost device makes every later call an error, none
//! hangs or panics; a cache larger than the device can hold is refused up front.

mod common;

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use common::{Rng, gpu};
use kvq::wgpu::WgpuBackend;
use kvq::{AttnParams, Backend, CacheConfig, Error, KvCache, KvDtype};

/// Runs `f` on a thread of its own and fails if it does not finish in `secs`.
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what}: no answer within {secs} s (hung or panicked)"))
}

#[test]
fn after_device_loss_every_call_is_an_error_and_none_hangs() {
    let Some(shared) = gpu() else {
        return;
    };
    let wgpu = Arc::new(WgpuBackend::open_named(&shared.info().name).unwrap());
    let b: Arc<dyn Backend> = wgpu.clone();
    let cfg = CacheConfig::new(1, 2, 64, 256);
    let mut cache = KvCache::new(b.clone(), cfg).unwrap();
    let seq = cache.add_sequence();
    let row = 2 * 64;
    let (k, v) = (Rng::new(1).normals(20 * row), Rng::new(2).normals(20 * row));
    cache.append(&[(seq, 20)], &k, &v).unwrap();
    let params = AttnParams::new(4);
    let q = Rng::new(3).normals(4 * 64);
    cache.decode(0, &[seq], &q, &params).unwrap();
    let buf = b.alloc(row).unwrap();

    wgpu.device().destroy();

    let answers = within(120, "calls after loss", move || {
        let answers: Vec<(&str, kvq::Result<()>)> = vec![
            ("alloc", b.alloc(16).map(drop)),
            ("upload", b.upload(&buf, 0, &[1, 2, 3])),
            ("download", b.download(&buf, 0, 4).map(drop)),
            ("synchronize", b.synchronize()),
            ("stream", b.stream(&buf, 64)),
            (
                "dequantize",
                b.dequantize(cache.pools(0).unwrap().0, &buf, 1, &buf),
            ),
            ("append", cache.append(&[(seq, 1)], &k[..row], &v[..row])),
            ("decode", cache.decode(0, &[seq], &q, &params).map(drop)),
            (
                "prefill",
                cache
                    .prefill(0, &[(seq, 2)], &q.repeat(2), &params)
                    .map(drop),
            ),
            ("plan", cache.plan_attention(&[(seq, 1)], &params).map(drop)),
            ("new cache", KvCache::new(b.clone(), cfg).map(drop)),
            ("run", b.run(&mut |_| Ok(()))),
        ];
        (answers, cache.seq_len(seq))
    });
    let (answers, len) = answers;
    for (what, answer) in &answers {
        eprintln!("{what}: {answer:?}");
    }
    for (what, answer) in &answers {
        assert!(
            matches!(answer, Err(Error::DeviceLost(_))),
            "{what} after device loss answered {answer:?}"
        );
    }
    assert_eq!(len.unwrap(), 20, "the failed append changed nothing");
}

#[test]
fn a_cache_larger_than_the_device_holds_is_refused_up_front() {
    for b in common::backends() {
        let max = b.info().limits.max_buffer_bytes;
        if max >= 1 << 40 {
            continue; // the CPU reference: host memory is the limit
        }
        // F16, 8 kv heads x D 128: 2 KiB a token per pool.
        let tokens = (max / 2048 + 1024) as usize;
        let before = b.creations();
        let cfg = CacheConfig::new(1, 8, 128, tokens).with_dtypes(KvDtype::F16, KvDtype::F16);
        match KvCache::new(b.clone(), cfg) {
            Err(Error::DeviceLimit {
                limit,
                requested,
                max: m,
            }) => {
                eprintln!("{}: {limit}: {requested} > {m}", b.info().name);
                assert!(requested > m);
            }
            other => panic!(
                "{}: a {tokens}-token cache answered {other:?}",
                b.info().name
            ),
        }
        assert_eq!(b.creations(), before, "nothing was allocated");
    }
}

/// Every word of every pool of `cache`, layer by layer (K data, K side, V data,
/// V side).
fn pool_words(b: &dyn Backend, cache: &KvCache) -> Vec<Vec<u32>> {
    (0..cache.config().layers)
        .flat_map(|layer| {
            let (k, v) = cache.pools(layer).unwrap();
            [&k.data, &k.side, &v.data, &v.side].map(|buf| b.download(buf, 0, buf.words()).unwrap())
        })
        .collect()
}

/// What a cache holds, as its API reads it: each sequence's length and K/V.
fn contents(cache: &KvCache, seqs: &[kvq::SeqId]) -> Vec<(usize, Vec<f32>, Vec<f32>)> {
    let mut out = Vec::new();
    for &s in seqs {
        let len = cache.seq_len(s).unwrap();
        let positions: Vec<usize> = (0..len).collect();
        for layer in 0..cache.config().layers {
            let (k, v) = cache.read_kv(layer, s, &positions).unwrap();
            out.push((len, k, v));
        }
    }
    out
}

#[test]
fn a_failed_int4c_truncate_leaves_every_pool_word_as_it_was() {
    let Some(shared) = gpu() else {
        return;
    };
    // A backend of its own: the injected faults are the backend's.
    let wgpu = Arc::new(WgpuBackend::open_named(&shared.info().name).unwrap());
    let b: Arc<dyn Backend> = wgpu.clone();
    let (layers, heads, d, bs) = (3, 2, 64, 32);
    let cfg = CacheConfig::new(layers, heads, d, 8 * bs)
        .with_block_size(bs)
        .with_dtypes(KvDtype::Int4Channel, KvDtype::Int8)
        .with_rotation(true);
    let mut cache = KvCache::new(b.clone(), cfg).unwrap();
    // Two full blocks and 6 tokens in the open one; a second sequence beside it.
    let (a, other) = (cache.add_sequence(), cache.add_sequence());
    for (seq, n, seed) in [(a, 2 * bs + 6, 1), (other, bs + 3, 2)] {
        let row = layers * n * heads * d;
        let (k, v) = (
            Rng::new(seed).normals(row),
            Rng::new(seed + 10).normals(row),
        );
        cache.append(&[(seq, n)], &k, &v).unwrap();
    }
    let words = pool_words(b.as_ref(), &cache);
    let held = contents(&cache, &[a, other]);
    // Cutting a at 40 reopens its second block; fail each allocation and
    // submission of that in turn until the truncate gets through.
    let mut failed = 0;
    for n in 1.. {
        wgpu.inject_fault(n);
        let result = cache.truncate(a, bs + 8);
        wgpu.inject_fault(0);
        match result {
            Err(e) => {
                eprintln!("fault {n}: {e}");
                assert!(matches!(e, Error::Device(_)), "fault {n}: {e:?}");
                failed += 1;
                assert_eq!(cache.seq_len(a).unwrap(), 2 * bs + 6, "fault {n}: length");
                assert!(
                    pool_words(b.as_ref(), &cache) == words,
                    "fault {n}: pool words changed"
                );
                assert!(
                    contents(&cache, &[a, other]) == held,
                    "fault {n}: contents changed"
                );
            }
            Ok(()) => break,
        }
        assert!(n < 20, "the truncate never got through");
    }
    assert!(
        failed >= 3,
        "a reopen allocates twice and submits once: {failed} faults hit it"
    );
    // The truncate that got through kept the first 40 keys (the reopened ones as
    // F16 of their dequantized values) and left the other sequence alone.
    let after = contents(&cache, &[a, other]);
    for layer in 0..layers {
        let (len, k, v) = &after[layer];
        assert_eq!(*len, bs + 8);
        let (_, k0, v0) = &held[layer];
        // F16 rounding in the rotated basis, rotated back: |error| stays under
        // 2^-11 of the head's norm (8 for these normals), and a margin.
        let gap = k
            .iter()
            .zip(k0)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        eprintln!("layer {layer}: reopened keys within {gap:e}");
        assert!(gap <= 8e-3, "layer {layer}: reopened keys off by {gap}");
        assert_eq!(v[..], v0[..v.len()], "layer {layer}: values");
        assert!(
            after[layers + layer] == held[layers + layer],
            "the other sequence"
        );
    }
}
