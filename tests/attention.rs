//! Attention on every backend against the f64 reference (DESIGN §3).
//!
//! Two budgets: against f64 attention over the *dequantized* cache, a backend may
//! only add f32 rounding (`KERNEL_*`); against f64 attention over the *unquantized*
//! inputs, each format has its own error budget (`FORMAT_NMSE`).

mod common;

use std::sync::Arc;

use common::{Rng, backends, filled, stored};
use kvq::reference::{attention_f64, error_stats};
use kvq::{AttnParams, Backend, CacheConfig, Error, KvCache, KvDtype};

/// Largest NMSE a kernel may add over f64 attention on the dequantized cache.
const KERNEL_NMSE: f64 = 1e-9;
/// Largest absolute difference a kernel may add (outputs are O(1)).
const KERNEL_MAX_ABS: f64 = 2e-4;

/// NMSE of attention over the quantized cache against unquantized f64 attention,
/// Gaussian K/V, D = 128.
fn format_nmse(d: KvDtype) -> f64 {
    match d {
        KvDtype::F16 => 1e-6,
        KvDtype::Bf16 => 1e-4,
        KvDtype::Int8 => 1e-3,
        KvDtype::Fp8E4M3 => 4e-3,
        KvDtype::Fp8E5M2 => 1.5e-2,
        KvDtype::Int4 { .. } | KvDtype::Int4Channel => 4e-2,
    }
}

const PAIRS: [(KvDtype, KvDtype); 10] = [
    (KvDtype::F16, KvDtype::F16),
    (KvDtype::Int8, KvDtype::Int8),
    (KvDtype::Int4 { group: 32 }, KvDtype::Int4 { group: 32 }),
    (KvDtype::Int8, KvDtype::Int4 { group: 32 }),
    (KvDtype::Int4 { group: 64 }, KvDtype::Int8),
    (KvDtype::F16, KvDtype::Int4 { group: 128 }),
    (KvDtype::Bf16, KvDtype::Fp8E4M3),
    (KvDtype::Fp8E5M2, KvDtype::Bf16),
    (KvDtype::Fp8E4M3, KvDtype::Int4 { group: 32 }),
    (KvDtype::Int8, KvDtype::Fp8E5M2),
];

fn name(b: &Arc<dyn Backend>) -> String {
    format!("{}:{}", b.info().kind, b.info().name)
}

/// Decode for a batch of sequences of varied lengths, checked per sequence against
/// f64 attention over the dequantized and over the unquantized K/V.
fn check_decode(
    b: &Arc<dyn Backend>,
    k: KvDtype,
    v: KvDtype,
    d: usize,
    ratio: usize,
    params: AttnParams,
) {
    check_decode_rotated(b, k, v, d, ratio, params, false)
}

fn check_decode_rotated(
    b: &Arc<dyn Backend>,
    k: KvDtype,
    v: KvDtype,
    d: usize,
    ratio: usize,
    params: AttnParams,
    rotate: bool,
) {
    let kv_heads = 2;
    let lens = [1, 15, 16, 17, 100, 333];
    let cfg = CacheConfig::new(1, kv_heads, d, 1024)
        .with_dtypes(k, v)
        .with_rotation(rotate);
    let (cache, seqs, ks, vs) = filled(b.clone(), cfg, &lens, 7);
    let hq = kv_heads * ratio;
    let params = AttnParams {
        q_heads: hq,
        ..params
    };
    let q = Rng::new(3).normals(seqs.len() * hq * d);
    let out = cache.decode(0, &seqs, &q, &params).unwrap();
    let p = params.resolve(kv_heads, d).unwrap();
    for (i, _) in seqs.iter().enumerate() {
        let qi = &q[i * hq * d..(i + 1) * hq * d];
        let got = &out[i * hq * d..(i + 1) * hq * d];
        let deq = attention_f64(
            qi,
            &stored(k, rotate, &ks[i], d),
            &stored(v, rotate, &vs[i], d),
            kv_heads,
            d,
            &p,
        );
        let e = error_stats(got, &deq, d);
        assert!(
            e.nmse <= KERNEL_NMSE && e.max_abs <= KERNEL_MAX_ABS,
            "{} K {k} V {v} D {d} ratio {ratio} rotate {rotate} len {}: kernel error {e:?}",
            name(b),
            lens[i]
        );
        let exact = attention_f64(qi, &ks[i], &vs[i], kv_heads, d, &p);
        let e = error_stats(got, &exact, d);
        let budget = format_nmse(k).max(format_nmse(v));
        assert!(
            e.nmse <= budget,
            "{} K {k} V {v} len {}: format error {e:?} > {budget}",
            name(b),
            lens[i]
        );
    }
}

#[test]
fn decode_matches_reference_for_every_dtype_pair() {
    for b in backends() {
        for (k, v) in PAIRS {
            check_decode(&b, k, v, 128, 4, AttnParams::new(0));
        }
    }
}

/// Every wgpu attention kernel on the GPU adapter: `attention_lanes.wgsl` (chosen
/// on CPU adapters with subgroups, such as llvmpipe) and `attention.wgsl`, summing
/// over a key's lanes with subgroups (where the adapter's hold a slot: D 64 and
/// the 16-dim Int8 lanes at D 128 on llvmpipe's 8) and through workgroup memory.
#[test]
fn every_wgpu_kernel_matches_reference() {
    let Some(gpu) = common::gpu() else { return };
    let open = || kvq::wgpu::WgpuBackend::open_named(&gpu.info().name).unwrap();
    let lanes = open();
    // Adapters are reopened by name, and llvmpipe's Vulkan and GL adapters share one.
    assert_eq!(lanes.info().api, gpu.info().api, "reopened another adapter");
    if gpu.info().name.contains("llvmpipe") && gpu.info().api == "Vulkan" {
        assert!(
            lanes.uses_lanes(),
            "llvmpipe should run attention_lanes.wgsl"
        );
    }
    let kernels: [Arc<dyn Backend>; 3] = [
        Arc::new(lanes),
        Arc::new(open().without_lanes()),
        Arc::new(open().without_lanes().without_subgroups()),
    ];
    for b in kernels {
        for (k, v) in PAIRS {
            check_decode(&b, k, v, 128, 4, AttnParams::new(0));
        }
        let g8 = KvDtype::Int4 { group: 8 };
        check_decode(&b, g8, g8, 64, 8, AttnParams::new(0));
        check_decode_rotated(&b, KvDtype::Int8, g8, 256, 2, AttnParams::new(0), true);
        // Heads blocks of 6 and 5 (GQA 11).
        check_decode(
            &b,
            KvDtype::Int8,
            KvDtype::int4_default(128),
            128,
            11,
            AttnParams::new(0),
        );
        check_prefill(&b);
    }
}

#[test]
fn decode_head_dims_and_gqa_ratios() {
    for b in backends() {
        for d in [64, 80, 96, 256] {
            let k = KvDtype::int4_default(d);
            check_decode(&b, KvDtype::Int8, k, d, 1, AttnParams::new(0));
            check_decode(&b, k, KvDtype::F16, d, 8, AttnParams::new(0));
        }
        // Blocks of q heads: 3, 5 and 7 whole; 16 as 8 + 8; 11 as 6 + 5.
        for ratio in [2, 3, 5, 7, 11, 16] {
            check_decode(
                &b,
                KvDtype::Int8,
                KvDtype::Int8,
                64,
                ratio,
                AttnParams::new(0),
            );
        }
    }
}

#[test]
fn decode_softcap_window_and_scale() {
    for b in backends() {
        let p = AttnParams::new(0).with_softcap(5.0).with_scale(0.3);
        check_decode(&b, KvDtype::Int8, KvDtype::Int4 { group: 32 }, 128, 4, p);
        // A window past 2^32 is no window (the kernels once wrapped t + window).
        for window in [1, 16, 50, usize::MAX] {
            let p = AttnParams::new(0).with_window(window);
            check_decode(&b, KvDtype::Int8, KvDtype::Int8, 64, 2, p);
        }
    }
}

#[test]
fn decode_with_rotation() {
    for b in backends() {
        for (k, v) in PAIRS {
            check_decode_rotated(&b, k, v, 128, 4, AttnParams::new(0), true);
        }
        let p = AttnParams::new(0).with_softcap(5.0).with_window(50);
        check_decode_rotated(
            &b,
            KvDtype::Int8,
            KvDtype::Int4 { group: 64 },
            64,
            2,
            p,
            true,
        );
        check_decode_rotated(
            &b,
            KvDtype::Int4 { group: 256 },
            KvDtype::Int8,
            256,
            1,
            p,
            true,
        );
    }
}

/// One case worked by hand: scale ln(3)/2 makes the scores 0 and ln 3, so the
/// weights are 1/4 and 3/4 and the output is [1, 3, 0, ...].
#[test]
fn hand_worked_case() {
    for b in backends() {
        for dt in [
            KvDtype::F16,
            KvDtype::Bf16,
            KvDtype::Int8,
            KvDtype::Fp8E4M3,
            KvDtype::Fp8E5M2,
            KvDtype::Int4 { group: 8 },
        ] {
            let cfg = CacheConfig::new(1, 1, 8, 16).with_dtypes(dt, dt);
            let mut cache = KvCache::new(b.clone(), cfg).unwrap();
            let s = cache.add_sequence();
            let mut k = vec![0.0f32; 16];
            k[8] = 2.0;
            let mut v = vec![0.0f32; 16];
            v[0] = 4.0;
            v[9] = 4.0;
            cache.append(&[(s, 2)], &k, &v).unwrap();
            let mut q = vec![0.0f32; 8];
            q[0] = 1.0;
            let p = AttnParams::new(1).with_scale(3f32.ln() / 2.0);
            let out = cache.decode(0, &[s], &q, &p).unwrap();
            let want = [1.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
            // Int4 stores 4.0 as 15 * f16(4/15) = 3.99902 (and 2.0 likewise): 1e-3 off.
            let tol = match dt {
                KvDtype::F16 | KvDtype::Bf16 | KvDtype::Fp8E4M3 | KvDtype::Fp8E5M2 => 1e-6,
                KvDtype::Int8 => 1e-5,
                KvDtype::Int4 { .. } | KvDtype::Int4Channel => 2e-3,
            };
            for (i, (g, w)) in out.iter().zip(want).enumerate() {
                assert!(
                    (g - w).abs() < tol,
                    "{} {dt}: out[{i}] = {g}, want {w}",
                    name(&b)
                );
            }
        }
    }
}

/// Scattered block tables give exactly what one contiguous sequence gives.
#[test]
fn paged_equals_contiguous() {
    for b in backends() {
        let cfg = CacheConfig::new(1, 2, 64, 2048)
            .with_dtypes(KvDtype::Int8, KvDtype::Int4 { group: 32 });
        let (mut scattered, seqs, ks, vs) = filled(b.clone(), cfg, &[200, 90, 333], 11);
        scattered.free_sequence(seqs[1]).unwrap();
        let q = Rng::new(5).normals(8 * 64);
        let p = AttnParams::new(8);
        let got = scattered.decode(0, &[seqs[2]], &q, &p).unwrap();
        let table = scattered.blocks().block_table(seqs[2]).unwrap();
        assert!(
            table.windows(2).any(|w| w[1] != w[0] + 1),
            "table not scattered: {table:?}"
        );
        let mut plain = KvCache::new(b.clone(), cfg).unwrap();
        let s = plain.add_sequence();
        plain.append(&[(s, 333)], &ks[2], &vs[2]).unwrap();
        let want = plain.decode(0, &[s], &q, &p).unwrap();
        let e = error_stats(&got, &want, 64);
        assert!(e.max_abs <= 1e-6, "{}: paged vs contiguous {e:?}", name(&b));
    }
}

/// Block sizes that are not powers of two (and one token per block) page correctly.
#[test]
fn odd_block_sizes() {
    for b in backends() {
        for bs in [1usize, 12, 48] {
            let cfg = CacheConfig::new(1, 2, 64, 1024)
                .with_dtypes(KvDtype::Int8, KvDtype::Int4 { group: 32 })
                .with_block_size(bs);
            let (cache, seqs, ks, vs) = filled(b.clone(), cfg, &[1, 11, 12, 13, 150], 17);
            let q = Rng::new(8).normals(seqs.len() * 4 * 64);
            let p = AttnParams::new(4);
            let out = cache.decode(0, &seqs, &q, &p).unwrap();
            let rp = p.resolve(2, 64).unwrap();
            for i in 0..seqs.len() {
                let n = 4 * 64;
                let want = attention_f64(
                    &q[i * n..(i + 1) * n],
                    &stored(KvDtype::Int8, false, &ks[i], 64),
                    &stored(KvDtype::Int4 { group: 32 }, false, &vs[i], 64),
                    2,
                    64,
                    &rp,
                );
                let e = error_stats(&out[i * n..(i + 1) * n], &want, 64);
                assert!(
                    e.nmse <= KERNEL_NMSE && e.max_abs <= KERNEL_MAX_ABS,
                    "{} block size {bs} seq {i}: {e:?}",
                    name(&b)
                );
            }
        }
    }
}

/// Prefill in chunks: each chunk's queries see the cached prefix and the chunk, causally.
#[test]
fn prefill_matches_reference() {
    for b in backends() {
        check_prefill(&b);
    }
}

/// Causal prefill in two chunks per sequence, with GQA, a sliding window and
/// rotation, against f64 attention over the stored cache.
fn check_prefill(b: &Arc<dyn Backend>) {
    for (k, v) in [
        (KvDtype::F16, KvDtype::F16),
        (KvDtype::Int8, KvDtype::Int4 { group: 32 }),
    ] {
        // GQA 3 and 9: one head x 8 positions per workgroup, 3 and 9 workgroups per group.
        for (ratio, rotate) in [(1, false), (3, false), (4, false), (4, true), (9, false)] {
            let (kv_heads, d) = (2, 64);
            let hq = kv_heads * ratio;
            let cfg = CacheConfig::new(1, kv_heads, d, 512)
                .with_dtypes(k, v)
                .with_rotation(rotate);
            let mut cache = KvCache::new(b.clone(), cfg).unwrap();
            let mut rng = Rng::new(21);
            let (sa, sb) = (cache.add_sequence(), cache.add_sequence());
            let lens = [(sa, 37usize), (sb, 70usize)];
            let kk: Vec<Vec<f32>> = lens
                .iter()
                .map(|l| rng.normals(l.1 * kv_heads * d))
                .collect();
            let vv: Vec<Vec<f32>> = lens
                .iter()
                .map(|l| rng.normals(l.1 * kv_heads * d))
                .collect();
            let p = AttnParams::new(hq).with_window(50);
            let rp = p.resolve(kv_heads, d).unwrap();
            // Two chunks per sequence: [0, c) then [c, len).
            let cuts = [20usize, 33];
            for phase in 0..2 {
                let mut batch = Vec::new();
                let (mut nk, mut nv, mut q, mut spans) = (vec![], vec![], vec![], vec![]);
                for (i, &(s, len)) in lens.iter().enumerate() {
                    let (a, z) = if phase == 0 {
                        (0, cuts[i])
                    } else {
                        (cuts[i], len)
                    };
                    batch.push((s, z - a));
                    nk.extend_from_slice(&kk[i][a * kv_heads * d..z * kv_heads * d]);
                    nv.extend_from_slice(&vv[i][a * kv_heads * d..z * kv_heads * d]);
                    q.extend(rng.normals((z - a) * hq * d));
                    spans.push((a, z));
                }
                cache.append(&batch, &nk, &nv).unwrap();
                let out = cache.prefill(0, &batch, &q, &p).unwrap();
                let mut off = 0;
                for (i, &(a, z)) in spans.iter().enumerate() {
                    let n = (z - a) * hq * d;
                    let kd = stored(k, rotate, &kk[i][..z * kv_heads * d], d);
                    let vd = stored(v, rotate, &vv[i][..z * kv_heads * d], d);
                    let want = attention_f64(&q[off..off + n], &kd, &vd, kv_heads, d, &rp);
                    let e = error_stats(&out[off..off + n], &want, d);
                    assert!(
                        e.nmse <= KERNEL_NMSE && e.max_abs <= KERNEL_MAX_ABS,
                        "{} K {k} V {v} ratio {ratio} rotate {rotate} seq {i} chunk {a}..{z}: {e:?}",
                        name(b)
                    );
                    off += n;
                }
            }
        }
    }
}

#[test]
fn bad_attention_input_is_an_error_and_changes_nothing() {
    for b in backends() {
        let cfg = CacheConfig::new(1, 2, 64, 64);
        let (mut cache, seqs, _, _) = filled(b.clone(), cfg, &[10], 1);
        let before = cache.blocks().clone();
        let q = vec![0.5f32; 4 * 64];
        let p = AttnParams::new(4);
        let s = seqs[0];
        let other = cache.add_sequence();
        cache.free_sequence(other).unwrap();
        let before_free = cache.blocks().clone();
        assert!(matches!(
            cache.decode(0, &[other], &q, &p),
            Err(Error::UnknownSequence(_))
        ));
        assert!(matches!(
            cache.decode(0, &[s], &q[1..], &p),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            cache.decode(1, &[s], &q, &p),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            cache.decode(0, &[s, s], &[q.clone(), q.clone()].concat(), &p),
            Err(Error::DuplicateSequence(_))
        ));
        assert!(matches!(
            cache.decode(0, &[s], &q, &AttnParams::new(3)),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            cache.decode(0, &[s], &q, &AttnParams::new(4).with_window(0)),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            cache.decode(0, &[s], &q, &AttnParams::new(4).with_softcap(-1.0)),
            Err(Error::InvalidConfig(_))
        ));
        let mut nan = q.clone();
        nan[17] = f32::NAN;
        assert!(matches!(
            cache.decode(0, &[s], &nan, &p),
            Err(Error::NonFinite { index: 17, .. })
        ));
        assert!(matches!(
            cache.prefill(0, &[(s, 11)], &vec![0.0; 11 * 4 * 64], &p),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            cache.prefill(0, &[(s, 0)], &[], &p),
            Err(Error::OutOfRange { .. })
        ));
        assert_eq!(cache.blocks(), &before_free);
        assert_eq!(before.tokens(), cache.blocks().tokens());
        // Still answers correctly afterwards.
        assert!(
            cache
                .decode(0, &[s], &q, &p)
                .unwrap()
                .iter()
                .all(|x| x.is_finite())
        );
    }
}

/// Timing (timestamp queries, for benchmarks): a decode's kernels report a device
/// time once, where the device records it; the CPU reference records none. Each
/// backend is its own, so that no other test's kernels are timed.
#[test]
fn device_time_of_a_decode_is_recorded_where_the_device_can() {
    for b in common::own_backends() {
        let cfg = CacheConfig::new(1, 2, 64, 256);
        let (cache, seqs, _, _) = filled(b.clone(), cfg, &[100], 3);
        let q = Rng::new(4).normals(4 * 64);
        let timed = b.set_timing(true);
        let gpu = b.info().kind != kvq::BackendKind::Cpu;
        let timestamps = b.info().features.iter().any(|f| f == "timestamp-query");
        assert_eq!(timed, gpu && timestamps, "{}", name(&b));
        cache.decode(0, &seqs, &q, &AttnParams::new(4)).unwrap();
        let first = b.take_device_time().unwrap();
        assert_eq!(first.is_some(), timed, "{}: {first:?}", name(&b));
        assert!(first.is_none_or(|d| d > std::time::Duration::ZERO));
        assert_eq!(b.take_device_time().unwrap(), None, "{}", name(&b));
        assert!(!b.set_timing(false));
        cache.decode(0, &seqs, &q, &AttnParams::new(4)).unwrap();
        assert_eq!(b.take_device_time().unwrap(), None, "{}", name(&b));
    }
}
