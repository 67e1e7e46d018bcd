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
