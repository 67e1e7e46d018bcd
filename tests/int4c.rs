//! Int4Channel keys (DESIGN §1, §2): full blocks quantized per channel, the open
//! block kept F16. Every GPU against the CPU reference around block boundaries
//! (codes, factors, open blocks, attention), the CPU against the format's
//! definition (`quant::stored_sequence`), truncation into a full block, and what
//! bad input gets.

mod common;

use std::sync::Arc;

use common::{Rng, gpus};
use kvq::cpu::CpuBackend;
use kvq::quant::stored_sequence;
use kvq::reference::{attention_f64, error_stats};
use kvq::wgpu::WgpuBackend;
use kvq::{AttnParams, Backend, CacheConfig, Error, KvCache, KvDtype, SeqId};

const D: usize = 64;
const HEADS: usize = 2;
const Q_HEADS: usize = 4;
const BS: usize = 32;
/// Largest share of codes a GPU may round one off the CPU (GPU division is not
/// correctly rounded); factors and F16 words must be equal.
const MAX_OFF_BY_ONE_RATE: f64 = 1e-3;
/// NMSE of GPU attention against the CPU's over the same cache.
const GPU_CPU_NMSE: f64 = 1e-9;
/// NMSE of the CPU's attention against f64 attention over the format's values.
const CPU_FORMAT_NMSE: f64 = 1e-9;

/// Appends per round of three sequences: lengths cross block boundaries by one,
/// fill blocks exactly, and span several blocks in one append.
const ROUNDS: [[usize; 3]; 6] = [
    [1, 31, 32],
    [31, 1, 33],
    [1, 32, 5],
    [64, 2, 30],
    [3, 67, 1],
    [29, 1, 95],
];

fn config(v: KvDtype, rotate: bool) -> CacheConfig {
    CacheConfig::new(1, HEADS, D, 1024)
        .with_dtypes(KvDtype::Int4Channel, v)
        .with_rotation(rotate)
        .with_open_blocks(4)
}

/// wgpu's `attention.wgsl` (what GPUs run), summing over lanes with subgroups and
/// through workgroup memory, where the adapter would choose `attention_lanes.wgsl`.
fn generic_kernels() -> Vec<Arc<dyn Backend>> {
    let Some(gpu) = common::gpu() else {
        return Vec::new();
    };
    let open = || WgpuBackend::open_named(&gpu.info().name).unwrap();
    if !open().uses_lanes() {
        return Vec::new(); // gpus() runs attention.wgsl already
    }
    vec![
        Arc::new(open().without_lanes()),
        Arc::new(open().without_lanes().without_subgroups()),
    ]
}

struct Pair {
    cpu: KvCache,
    gpu: KvCache,
    seqs: Vec<(SeqId, SeqId)>,
    /// Every key and value appended, per sequence, `[tokens, HEADS, D]`.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl Pair {
    fn new(gpu: &Arc<dyn Backend>, cfg: CacheConfig) -> Pair {
        let mut cpu = KvCache::new(Arc::new(CpuBackend::new()), cfg).unwrap();
        let mut gpu = KvCache::new(gpu.clone(), cfg).unwrap();
        let seqs = (0..3)
            .map(|_| (cpu.add_sequence(), gpu.add_sequence()))
            .collect();
        Pair {
            cpu,
            gpu,
            seqs,
            k: vec![Vec::new(); 3],
            v: vec![Vec::new(); 3],
        }
    }

    /// One append of `counts` tokens per sequence, all in one batch.
    fn append(&mut self, rng: &mut Rng, counts: [usize; 3]) {
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for (i, &n) in counts.iter().enumerate() {
            // Channel 3 is an outlier channel, as real keys have.
            let mut ki = rng.normals(n * HEADS * D);
            ki.iter_mut().skip(3).step_by(D).for_each(|x| *x += 20.0);
            let vi = rng.normals(n * HEADS * D);
            self.k[i].extend(&ki);
            self.v[i].extend(&vi);
            k.extend(ki);
            v.extend(vi);
        }
        let batch = |side: usize| -> Vec<(SeqId, usize)> {
            self.seqs
                .iter()
                .zip(counts)
                .map(|(s, n)| (if side == 0 { s.0 } else { s.1 }, n))
                .collect()
        };
        self.cpu.append(&batch(0), &k, &v).unwrap();
        self.gpu.append(&batch(1), &k, &v).unwrap();
    }

    /// Pools equal but for codes one off; open blocks and factors equal.
    fn assert_pools_agree(&self, what: &str) {
        let (a, b) = (self.cpu.pools(0).unwrap().0, self.gpu.pools(0).unwrap().0);
        let get = |c: &KvCache, p: &kvq::backend::Pool, data: bool| {
            let buf = if data { &p.data } else { &p.side };
            c.backend().download(buf, 0, buf.words()).unwrap()
        };
        assert_eq!(
            get(&self.cpu, a, false),
            get(&self.gpu, b, false),
            "{what}: factors or open blocks differ"
        );
        let (ca, cb) = (get(&self.cpu, a, true), get(&self.gpu, b, true));
        let (mut off, mut total) = (0, 0);
        for (x, y) in ca.iter().zip(&cb) {
            for i in 0..8 {
                let d = ((x >> (4 * i)) & 15) as i32 - ((y >> (4 * i)) & 15) as i32;
                assert!(d.abs() <= 1, "{what}: codes {x:#x} vs {y:#x}");
                off += d.unsigned_abs() as usize;
                total += 1;
            }
        }
        assert!(
            off as f64 <= MAX_OFF_BY_ONE_RATE * total as f64,
            "{what}: {off} of {total} codes off by one"
        );
    }

    /// Decode and prefill (the last `n` positions of every sequence) agree between
    /// the backends, and the CPU's with f64 attention over the format's values.
    fn assert_attention_agrees(&self, rng: &mut Rng, rotate: bool, v_dtype: KvDtype, what: &str) {
        // A sliding window whose first key is not a multiple of 8, and softcapping.
        for p in [
            AttnParams::new(Q_HEADS),
            AttnParams::new(Q_HEADS).with_window(45).with_softcap(8.0),
        ] {
            self.assert_attention_agrees_with(rng, rotate, v_dtype, &p, what);
        }
    }

    fn assert_attention_agrees_with(
        &self,
        rng: &mut Rng,
        rotate: bool,
        v_dtype: KvDtype,
        p: &AttnParams,
        what: &str,
    ) {
        let p = *p;
        let lens: Vec<usize> = self
            .seqs
            .iter()
            .map(|s| self.cpu.seq_len(s.0).unwrap())
            .collect();
        for n in [1usize, 7] {
            let chunks: Vec<usize> = lens.iter().map(|&l| n.min(l)).collect();
            let q = rng.normals(chunks.iter().sum::<usize>() * Q_HEADS * D);
            let batch = |side: usize| -> Vec<(SeqId, usize)> {
                self.seqs
                    .iter()
                    .zip(&chunks)
                    .map(|(s, &c)| (if side == 0 { s.0 } else { s.1 }, c))
                    .collect()
            };
            let a = self.cpu.prefill(0, &batch(0), &q, &p).unwrap();
            let b = self.gpu.prefill(0, &batch(1), &q, &p).unwrap();
            let e = error_stats(&b, &a, D);
            assert!(
                e.nmse <= GPU_CPU_NMSE,
                "{what} queries {n}: GPU vs CPU {e:?}"
            );
            // The CPU against the definition, sequence by sequence.
            let resolved = p.resolve(HEADS, D).unwrap();
            let mut at = 0;
            for (i, &c) in chunks.iter().enumerate() {
                let keys = stored_sequence(KvDtype::Int4Channel, rotate, &self.k[i], HEADS, D, BS)
                    .unwrap();
                let values = stored_sequence(v_dtype, rotate, &self.v[i], HEADS, D, BS).unwrap();
                let span = at..at + c * Q_HEADS * D;
                let want = attention_f64(&q[span.clone()], &keys, &values, HEADS, D, &resolved);
                let e = error_stats(&a[span], &want, D);
                assert!(
                    e.nmse <= CPU_FORMAT_NMSE,
                    "{what} seq {i} queries {n}: CPU vs format {e:?}"
                );
                at += c * Q_HEADS * D;
            }
        }
    }
}

#[test]
fn gpu_matches_cpu_and_the_format_around_block_boundaries() {
    // Each V packing once, int4 rotated and not (every pipeline built costs
    // seconds on a software adapter).
    let int4 = KvDtype::Int4 { group: 32 };
    let all = [
        (int4, false),
        (int4, true),
        (KvDtype::Int8, true),
        (KvDtype::F16, false),
    ];
    let kernels = gpus().into_iter().map(|g| (g, &all[..]));
    let generic = generic_kernels().into_iter().map(|g| (g, &all[1..2]));
    for (gpu, formats) in kernels.chain(generic) {
        for &(v, rotate) in formats {
            let mut pair = Pair::new(&gpu, config(v, rotate));
            let mut rng = Rng::new(7);
            for (r, counts) in ROUNDS.iter().enumerate() {
                pair.append(&mut rng, *counts);
                let what = format!("{} V {v} rotate {rotate} round {r}", gpu.info().kind);
                pair.assert_pools_agree(&what);
                pair.assert_attention_agrees(&mut rng, rotate, v, &what);
            }
        }
    }
}

/// A cut inside a full block reopens it: its kept keys read back as they were
/// (now F16 of their dequantized values); refilled, it is quantized again, on
/// every backend alike.
#[test]
fn truncate_into_a_full_block_reopens_it() {
    for gpu in gpus() {
        for rotate in [false, true] {
            let mut pair = Pair::new(&gpu, config(KvDtype::Int4 { group: 32 }, rotate));
            let mut rng = Rng::new(11);
            pair.append(&mut rng, [70, 64, 33]);
            for (i, len) in [(0usize, 40usize), (1, 64), (2, 32)] {
                let (sa, sb) = pair.seqs[i];
                let positions: Vec<usize> = (0..len).collect();
                let before = pair.cpu.read_kv(0, sa, &positions).unwrap().0;
                pair.cpu.truncate(sa, len).unwrap();
                pair.gpu.truncate(sb, len).unwrap();
                pair.k[i].truncate(len * HEADS * D);
                pair.v[i].truncate(len * HEADS * D);
                for cache in [&pair.cpu, &pair.gpu] {
                    let s = if std::ptr::eq(cache, &pair.cpu) {
                        sa
                    } else {
                        sb
                    };
                    let after = cache.read_kv(0, s, &positions).unwrap().0;
                    let e = error_stats(&after, &before, D);
                    assert!(e.nmse <= 1e-6, "seq {i} to {len}: read back {e:?}");
                }
            }
            pair.assert_pools_agree("after truncate");
            pair.append(&mut rng, [30, 1, 40]);
            pair.assert_pools_agree("refilled");
            let p = AttnParams::new(Q_HEADS);
            let q = rng.normals(3 * Q_HEADS * D);
            let (sa, sb): (Vec<SeqId>, Vec<SeqId>) = pair.seqs.iter().copied().unzip();
            let a = pair.cpu.decode(0, &sa, &q, &p).unwrap();
            let b = pair.gpu.decode(0, &sb, &q, &p).unwrap();
            let e = error_stats(&b, &a, D);
            assert!(e.nmse <= GPU_CPU_NMSE, "refilled decode: {e:?}");
        }
    }
}

#[test]
fn read_kv_gives_the_format_values() {
    for backend in [
        vec![Arc::new(CpuBackend::new()) as Arc<dyn Backend>],
        gpus(),
    ]
    .concat()
    {
        let mut cache = KvCache::new(backend.clone(), config(KvDtype::Int8, true)).unwrap();
        let s = cache.add_sequence();
        let mut rng = Rng::new(3);
        let k = rng.normals(75 * HEADS * D);
        cache
            .append(&[(s, 75)], &k, &rng.normals(75 * HEADS * D))
            .unwrap();
        let got = cache.read_kv(0, s, &(0..75).collect::<Vec<_>>()).unwrap().0;
        let want = stored_sequence(KvDtype::Int4Channel, true, &k, HEADS, D, BS).unwrap();
        let e = error_stats(&got, &want, D);
        assert!(e.nmse <= 1e-9, "{}: {e:?}", backend.info().kind);
    }
}

#[test]
fn open_blocks_run_out_with_a_clear_error_and_nothing_changes() {
    let cfg = config(KvDtype::Int8, false).with_open_blocks(2);
    let mut cache = KvCache::new(Arc::new(CpuBackend::new()), cfg).unwrap();
    let s: Vec<SeqId> = (0..3).map(|_| cache.add_sequence()).collect();
    let x = vec![0.5; 3 * HEADS * D];
    cache
        .append(
            &[(s[0], 1), (s[1], 1)],
            &x[..2 * HEADS * D],
            &x[..2 * HEADS * D],
        )
        .unwrap();
    let before = cache.blocks().clone();
    let err = cache
        .append(&[(s[2], 1)], &x[..HEADS * D], &x[..HEADS * D])
        .unwrap_err();
    assert!(
        matches!(err, Error::OpenBlocksExhausted { needed: 1, free: 0 }),
        "{err}"
    );
    assert!(err.to_string().contains("open_blocks"), "{err}");
    assert_eq!(cache.blocks(), &before);
    // Filling a block releases its open block, which another sequence may take in
    // the same append; a whole block needs none.
    let n = BS - 1;
    let x = vec![0.5; (n + 1 + BS) * HEADS * D];
    cache
        .append(&[(s[0], n), (s[2], 1), (s[1], BS)], &x, &x)
        .unwrap();
    assert_eq!(cache.blocks().open_block(s[0]).unwrap(), None);
    assert!(cache.blocks().open_block(s[2]).unwrap().is_some());
}

#[test]
fn configurations_int4c_cannot_take_are_refused() {
    let cpu: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    // Keys only.
    let cfg = CacheConfig::new(1, HEADS, D, 256).with_dtypes(KvDtype::Int8, KvDtype::Int4Channel);
    assert!(matches!(
        KvCache::new(cpu.clone(), cfg),
        Err(Error::Unsupported(_))
    ));
    // with_dtypes raises the default block of 16 to 32; a smaller one set after is refused.
    let cfg = CacheConfig::new(1, HEADS, D, 256).with_dtypes(KvDtype::Int4Channel, KvDtype::Int8);
    assert_eq!(cfg.block_size, BS);
    assert!(cfg.capacity_tokens() >= 256);
    let small = cfg.with_block_size(16);
    assert!(matches!(
        KvCache::new(cpu.clone(), small),
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(
        KvCache::new(cpu, cfg.with_open_blocks(0)),
        Err(Error::InvalidConfig(_))
    ));
    // Five bits per element at 32-token blocks, as Int4 group 32.
    assert_eq!(KvDtype::Int4Channel.bits_per_element(128), 5.0);
    assert_eq!(
        cfg.bytes_per_token(),
        KvDtype::Int4Channel.bytes_per_token_head(D) * HEADS
            + KvDtype::Int8.bytes_per_token_head(D) * HEADS
    );
    assert_eq!("int4c".parse::<KvDtype>().unwrap(), KvDtype::Int4Channel);
    // The reference of the format refuses shapes it cannot store.
    let x = vec![0.5; 3 * HEADS * D];
    let i4c = KvDtype::Int4Channel;
    assert!(stored_sequence(i4c, false, &x, HEADS, D, 0).is_err());
    assert!(stored_sequence(i4c, false, &x, 0, D, BS).is_err());
    assert!(stored_sequence(i4c, false, &x[1..], HEADS, D, BS).is_err());
    assert!(stored_sequence(i4c, true, &x, HEADS * 2, D / 2 + 8, BS).is_err());
    assert_eq!(KvDtype::Int4Channel.to_string(), "int4c");
}

/// Random appends, truncations and frees keep the open blocks straight: a sequence
/// holds one exactly while its last block is partly filled, no two share one, none
/// is lost; each append seals exactly the blocks it fills, and sends every other new
/// key to its sequence's open block; a failed call changes nothing.
#[test]
fn open_block_bookkeeping_under_random_use() {
    use kvq::cache::BlockManager;
    let (blocks, bs, opens) = (48usize, 8usize, 5usize);
    let mut m = BlockManager::new(blocks, bs).with_open_blocks(opens);
    let mut rng = Rng::new(5);
    let mut seqs: Vec<SeqId> = Vec::new();
    let mut outcomes = [0usize; 2]; // calls that succeeded, that ran out
    for step in 0..3000 {
        let before = m.clone();
        let op = rng.below(10);
        let result = if (op == 0 && seqs.len() < 8) || seqs.is_empty() {
            seqs.push(m.add());
            Ok(())
        } else if op == 1 {
            let s = seqs.swap_remove(rng.below(seqs.len()));
            m.remove(s)
        } else if op <= 3 {
            let s = seqs[rng.below(seqs.len())];
            let len = m.len(s).unwrap();
            let to = rng.below(len + 1);
            let old_open = m.open_block(s).unwrap();
            m.truncate(s, to).map(|moves| {
                // Moves only when the cut lands inside a block that was full.
                let reopened = to % bs != 0 && len >= (to / bs + 1) * bs;
                assert_eq!(
                    moves.len(),
                    if reopened { to % bs } else { 0 },
                    "step {step}"
                );
                if to % bs != 0 && len / bs == to / bs {
                    assert_eq!(m.open_block(s).unwrap(), old_open, "same open block");
                }
            })
        } else {
            let n = 1 + rng.below(3);
            let mut batch: Vec<(SeqId, usize)> = Vec::new();
            for _ in 0..n {
                let s = seqs[rng.below(seqs.len())];
                if batch.iter().all(|b| b.0 != s) {
                    batch.push((s, 1 + rng.below(2 * bs)));
                }
            }
            let lens: Vec<usize> = batch.iter().map(|b| m.len(b.0).unwrap()).collect();
            m.extend(&batch).map(|ext| {
                let filled: usize = batch
                    .iter()
                    .zip(&lens)
                    .map(|(b, &l)| (l + b.1) / bs - l / bs)
                    .sum();
                assert_eq!(ext.seals.len(), filled, "step {step}: seals");
                let mut t = 0;
                for (b, &l) in batch.iter().zip(&lens) {
                    let new = l + b.1;
                    let open = m.open_block(b.0).unwrap();
                    for p in l..new {
                        let want = if p >= new / bs * bs {
                            let o = open.expect("a partly filled block has an open block");
                            (blocks * bs) as u32 + o * bs as u32 + (p % bs) as u32
                        } else {
                            u32::MAX
                        };
                        assert_eq!(ext.open_slots[t], want, "step {step}: token {t}");
                        t += 1;
                    }
                }
            })
        };
        match result {
            Ok(()) => outcomes[0] += 1,
            Err(Error::OpenBlocksExhausted { .. } | Error::CapacityExceeded { .. }) => {
                assert_eq!(
                    m, before,
                    "step {step}: a failed call changed the bookkeeping"
                );
                outcomes[1] += 1;
            }
            Err(e) => panic!("step {step}: {e}"),
        }
        let mut held = Vec::new();
        for &s in &seqs {
            let partly = m.len(s).unwrap() % bs != 0;
            let open = m.open_block(s).unwrap();
            assert_eq!(open.is_some(), partly, "step {step}: {s:?}");
            held.extend(open);
        }
        held.sort_unstable();
        held.dedup();
        assert_eq!(
            held.len() + m.free_open_blocks(),
            opens,
            "step {step}: open blocks lost or shared"
        );
    }
    assert!(outcomes[0] > 1000 && outcomes[1] > 100, "{outcomes:?}");
}

/// wgpu binds an Int4Channel pool whole: one past a storage binding is refused
/// with a clear error (other pools are bound in windows), and nothing changes.
#[test]
fn wgpu_refuses_int4c_pools_past_one_binding() {
    let Some(gpu) = common::gpu() else { return };
    let small = WgpuBackend::open_named(&gpu.info().name)
        .unwrap()
        .with_pool_binding_limit(32 << 10);
    let mut cache = KvCache::new(Arc::new(small), config(KvDtype::Int8, false)).unwrap();
    let s = cache.add_sequence();
    let before = cache.blocks().clone();
    let x = vec![0.5; 40 * HEADS * D];
    let err = cache.append(&[(s, 40)], &x, &x).unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported(m) if m.contains("int4c")),
        "{err}"
    );
    assert_eq!(cache.blocks(), &before);
}
