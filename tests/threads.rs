//! Threads (DESIGN §6: backends are `Send + Sync`; a cache can be used from several
//! threads): one backend shared by several threads, each with its own cache; several
//! threads on one cache behind a `Mutex`, and behind an `RwLock` whose readers
//! attend at once. Every thread's outputs are bit-identical to the same work run
//! one after another on one thread, on every backend; a deadlock fails the test
//! (after a timeout) instead of hanging it.

mod common;

use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use common::{Rng, backends};
use kvq::backend::{Pool, Prepared};
use kvq::{
    AttnParams, Backend, CacheConfig, DeviceBuffer, Error, KvCache, KvDtype, Plan, SeqId, Tensor,
};

const LAYERS: usize = 2;
const KV_HEADS: usize = 2;
const Q_HEADS: usize = 4;
const D: usize = 32;
const THREADS: usize = 4;
/// Steps of each thread's work: a prefill, then decodes.
const STEPS: usize = 6;
/// How long the work of one test may take before it counts as a deadlock.
const DEADLOCK: Duration = Duration::from_secs(120);

fn assert_send_sync<T: Send + Sync + ?Sized>() {}

/// Compile-time: what an application shares between threads.
#[test]
fn public_types_are_send_and_sync() {
    assert_send_sync::<KvCache>();
    assert_send_sync::<Arc<dyn Backend>>();
    assert_send_sync::<dyn Backend>();
    assert_send_sync::<DeviceBuffer>();
    assert_send_sync::<Pool>();
    assert_send_sync::<Prepared>();
    assert_send_sync::<Plan>();
    assert_send_sync::<Error>();
    assert_send_sync::<CacheConfig>();
    assert_send_sync::<AttnParams>();
    assert_send_sync::<SeqId>();
    assert_send_sync::<kvq::Selected>();
    assert_send_sync::<kvq::cpu::CpuBackend>();
    assert_send_sync::<kvq::wgpu::WgpuBackend>();
    #[cfg(feature = "cuda")]
    assert_send_sync::<kvq::cuda::CudaBackend>();
}

fn name(b: &Arc<dyn Backend>) -> String {
    format!("{}:{}", b.info().kind, b.info().name)
}

/// Runs `f` on a thread of its own and fails if it does not finish within
/// [`DEADLOCK`] (a deadlock), or if it panics (with its message).
fn with_timeout(what: &str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    let handle = thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(DEADLOCK) {
        Ok(Ok(())) => {
            // Joined, so that its drops end before the process exits: a thread
            // still freeing GL objects while Mesa's exit handlers run corrupts the heap.
            let _ = handle.join();
            eprintln!("{what}: {:.2} s", start.elapsed().as_secs_f64())
        }
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("{what}: not finished after {DEADLOCK:?}: deadlock"),
    }
}

/// Joins every handle, re-raising the first panic.
fn join_all<T>(handles: Vec<thread::JoinHandle<T>>) -> Vec<T> {
    handles
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        .collect()
}

/// The storage formats a thread's cache uses: threads differ, so that they build
/// different pipelines (kernels) on the shared backend at the same time. (The
/// shapes are those of tests/nonfinite.rs, whose pipelines a warm shader cache
/// then holds.)
fn config(i: usize) -> CacheConfig {
    let (k, v) = match i % 2 {
        0 => (KvDtype::Int8, KvDtype::Int4 { group: 16 }),
        _ => (KvDtype::F16, KvDtype::F16),
    };
    CacheConfig::new(LAYERS, KV_HEADS, D, 1024)
        .with_dtypes(k, v)
        .with_block_size(16)
}

/// The bits of `x`.
fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// One step of sequence work through the host API: append `batch`'s new tokens
/// (every layer), then attend with one query per new token (a prefill, or a decode
/// where every count is 1) in every layer. Returns the outputs' bits.
fn host_step(cache: &mut KvCache, batch: &[(SeqId, usize)], rng: &mut Rng) -> Vec<u32> {
    let tokens: usize = batch.iter().map(|b| b.1).sum();
    let k = rng.normals(LAYERS * tokens * KV_HEADS * D);
    let v = rng.normals(LAYERS * tokens * KV_HEADS * D);
    cache.append(batch, &k, &v).unwrap();
    attend(cache, batch, rng)
}

/// Attention over what `batch`'s sequences hold, every layer.
fn attend(cache: &KvCache, batch: &[(SeqId, usize)], rng: &mut Rng) -> Vec<u32> {
    let p = AttnParams::new(Q_HEADS);
    let queries: usize = batch.iter().map(|b| b.1).sum();
    let mut out = Vec::new();
    for l in 0..LAYERS {
        let q = rng.normals(queries * Q_HEADS * D);
        let o = if batch.iter().all(|b| b.1 == 1) {
            let seqs: Vec<SeqId> = batch.iter().map(|b| b.0).collect();
            cache.decode(l, &seqs, &q, &p).unwrap()
        } else {
            cache.prefill(l, batch, &q, &p).unwrap()
        };
        out.extend(bits(&o));
    }
    out
}

/// One decode step through the device path: a plan, then every layer's append and
/// attention recorded in one submission on the backend's own encoder.
fn device_step(cache: &mut KvCache, seqs: &[SeqId], rng: &mut Rng) -> Vec<u32> {
    let b = cache.backend().clone();
    let p = AttnParams::new(Q_HEADS);
    let plan = cache.plan_decode(seqs, &p).unwrap();
    let n = seqs.len();
    let upload = |x: Vec<f32>| {
        let buf = b.alloc(x.len()).unwrap();
        b.upload(&buf, 0, &bits(&x)).unwrap();
        buf
    };
    let layers: Vec<[DeviceBuffer; 4]> = (0..LAYERS)
        .map(|_| {
            [
                upload(rng.normals(n * KV_HEADS * D)),
                upload(rng.normals(n * KV_HEADS * D)),
                upload(rng.normals(n * Q_HEADS * D)),
                upload(vec![f32::NAN; n * Q_HEADS * D]),
            ]
        })
        .collect();
    b.run(&mut |enc| {
        for (l, [k, v, q, out]) in layers.iter().enumerate() {
            cache.record_append(enc, &plan, l, &Tensor::f32(k), &Tensor::f32(v))?;
            cache.record_attention(enc, &plan, l, &Tensor::f32(q), &Tensor::f32(out))?;
        }
        Ok(())
    })
    .unwrap();
    let mut out = Vec::new();
    for [.., o] in &layers {
        out.extend(b.download(o, 0, o.words()).unwrap());
    }
    out
}

/// Thread `i`'s work on a cache of its own on `backend`: a prefill of two
/// sequences of different lengths, decodes through the host API, and a last
/// decode through the device path. Returns every output's bits.
fn own_cache_work(backend: Arc<dyn Backend>, i: usize) -> Vec<u32> {
    let mut cache = KvCache::new(backend, config(i)).unwrap();
    let seqs = [cache.add_sequence(), cache.add_sequence()];
    let mut rng = Rng::new(1000 + i as u64);
    let mut out = host_step(&mut cache, &[(seqs[0], 5 + 3 * i), (seqs[1], 11)], &mut rng);
    for _ in 1..STEPS - 1 {
        out.extend(host_step(
            &mut cache,
            &[(seqs[0], 1), (seqs[1], 1)],
            &mut rng,
        ));
    }
    out.extend(device_step(&mut cache, &seqs, &mut rng));
    out
}

#[test]
fn threads_with_their_own_caches_on_one_backend_match_running_one_after_another() {
    for b in backends() {
        let what = format!("{}: {THREADS} threads, a cache each", name(&b));
        with_timeout(&what.clone(), move || {
            let want: Vec<Vec<u32>> = (0..THREADS).map(|i| own_cache_work(b.clone(), i)).collect();
            // Twice, so that the second round finds the pipelines and workspaces
            // the first made (and leases them concurrently).
            for round in 0..2 {
                let start = Arc::new(Barrier::new(THREADS));
                let handles = (0..THREADS)
                    .map(|i| {
                        let (b, start) = (b.clone(), start.clone());
                        thread::spawn(move || {
                            start.wait();
                            own_cache_work(b, i)
                        })
                    })
                    .collect();
                check_threads(&format!("{what}, round {round}"), &join_all(handles), &want);
            }
        });
    }
}

/// The batches of sequence `seq`'s work on a shared cache: a prompt, then decodes.
fn shared_batches(seq: SeqId, i: usize) -> Vec<(SeqId, usize)> {
    (0..STEPS)
        .map(|s| (seq, if s == 0 { 3 + 4 * i } else { 1 }))
        .collect()
}

/// Thread `i`'s work on one cache shared behind a mutex: each step locks it,
/// appends to the thread's own sequence and attends, and unlocks. Returns every
/// output's bits.
fn mutex_work(cache: &Mutex<KvCache>, seq: SeqId, i: usize) -> Vec<u32> {
    let mut rng = Rng::new(2000 + i as u64);
    let mut out = Vec::new();
    for batch in shared_batches(seq, i) {
        let mut c = cache.lock().unwrap();
        out.extend(host_step(&mut c, &[batch], &mut rng));
        drop(c);
        thread::yield_now();
    }
    out
}

/// Thread `i`'s work on one cache shared behind a read-write lock: appends hold it
/// for writing, attention only for reading, so that the threads' attention calls
/// run at once on one cache.
fn rwlock_work(cache: &RwLock<KvCache>, seq: SeqId, i: usize) -> Vec<u32> {
    let mut rng = Rng::new(3000 + i as u64);
    let mut out = Vec::new();
    for batch in shared_batches(seq, i) {
        let n = batch.1 * LAYERS * KV_HEADS * D;
        let (k, v) = (rng.normals(n), rng.normals(n));
        cache.write().unwrap().append(&[batch], &k, &v).unwrap();
        out.extend(attend(&cache.read().unwrap(), &[batch], &mut rng));
        thread::yield_now();
    }
    out
}

/// A shared cache on `b` with a sequence for each thread.
fn shared_cache(b: &Arc<dyn Backend>) -> (KvCache, Vec<SeqId>) {
    let mut cache = KvCache::new(b.clone(), config(0)).unwrap();
    let seqs = (0..THREADS).map(|_| cache.add_sequence()).collect();
    (cache, seqs)
}

/// Compares each thread's outputs with the sequential run's, which must be finite
/// (every output written).
fn check_threads(what: &str, got: &[Vec<u32>], want: &[Vec<u32>]) {
    assert_eq!(got.len(), want.len(), "{what}: threads");
    for (i, (got, want)) in got.iter().zip(want).enumerate() {
        assert!(
            !want.is_empty() && want.iter().all(|&w| f32::from_bits(w).is_finite()),
            "{what}: thread {i}'s sequential outputs are not all finite"
        );
        assert_eq!(got.len(), want.len(), "{what}: thread {i}");
        let first = got.iter().zip(want).position(|(g, w)| g != w);
        assert!(
            first.is_none(),
            "{what}: thread {i} differs from the sequential run at output word {first:?}"
        );
    }
}

#[test]
fn threads_on_one_cache_behind_a_lock_match_running_one_after_another() {
    for b in backends() {
        let what = format!("{}: {THREADS} threads, one Mutex<KvCache>", name(&b));
        let b2 = b.clone();
        with_timeout(&what.clone(), move || {
            let b = b2;
            // Sequentially: each thread's whole work in turn, on a fresh cache.
            let (cache, seqs) = shared_cache(&b);
            let cache = Mutex::new(cache);
            let want: Vec<Vec<u32>> = (0..THREADS)
                .map(|i| mutex_work(&cache, seqs[i], i))
                .collect();
            // Concurrently: the steps interleave in whatever order the lock is
            // taken, so blocks are handed out differently; each sequence's outputs
            // depend only on its own tokens.
            let (cache, seqs) = shared_cache(&b);
            let cache = Arc::new(Mutex::new(cache));
            let start = Arc::new(Barrier::new(THREADS));
            let handles = (0..THREADS)
                .map(|i| {
                    let (cache, start, seq) = (cache.clone(), start.clone(), seqs[i]);
                    thread::spawn(move || {
                        start.wait();
                        mutex_work(&cache, seq, i)
                    })
                })
                .collect();
            check_threads(&what, &join_all(handles), &want);
            // Every sequence holds all of its tokens.
            let c = cache.lock().unwrap();
            for (i, &s) in seqs.iter().enumerate() {
                let len: usize = shared_batches(s, i).iter().map(|b| b.1).sum();
                assert_eq!(c.seq_len(s).unwrap(), len, "{what}: sequence {i}");
            }
        });
        let what = format!("{}: {THREADS} threads, one RwLock<KvCache>", name(&b));
        with_timeout(&what.clone(), move || {
            let (cache, seqs) = shared_cache(&b);
            let cache = RwLock::new(cache);
            let want: Vec<Vec<u32>> = (0..THREADS)
                .map(|i| rwlock_work(&cache, seqs[i], i))
                .collect();
            let (cache, seqs) = shared_cache(&b);
            let cache = Arc::new(RwLock::new(cache));
            let start = Arc::new(Barrier::new(THREADS));
            let handles = (0..THREADS)
                .map(|i| {
                    let (cache, start, seq) = (cache.clone(), start.clone(), seqs[i]);
                    thread::spawn(move || {
                        start.wait();
                        rwlock_work(&cache, seq, i)
                    })
                })
                .collect();
            check_threads(&what, &join_all(handles), &want);
        });
    }
}
