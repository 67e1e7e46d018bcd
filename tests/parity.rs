//! GPU quantize-append against the CPU reference, word for word (DESIGN §1, §2):
//! codes equal except ±1 where `x / scale` lies within a few ulps of a rounding
//! boundary (GPU division is not correctly rounded), side data equal.

mod common;

use std::sync::Arc;

use common::{Rng, dtypes, gpus};
use kvq::cpu::CpuBackend;
use kvq::{Backend, CacheConfig, KvCache, KvDtype};

/// Largest share of codes allowed to differ by one.
const MAX_OFF_BY_ONE_RATE: f64 = 1e-4;

/// Code width in bits and code words' layout for comparing element by element.
fn codes(dtype: KvDtype, words: &[u32]) -> Vec<i32> {
    match dtype {
        KvDtype::F16 | KvDtype::Bf16 => words
            .iter()
            .flat_map(|w| [(w & 0xffff) as i32, (w >> 16) as i32])
            .collect(),
        // Sign and magnitude: adjacent magnitudes are adjacent codes.
        KvDtype::Fp8E4M3 | KvDtype::Fp8E5M2 => words
            .iter()
            .flat_map(|w| {
                (0..4).map(move |i| {
                    let c = (*w >> (8 * i)) & 0xff;
                    let m = (c & 0x7f) as i32;
                    if c & 0x80 != 0 { -m } else { m }
                })
            })
            .collect(),
        KvDtype::Int8 => words
            .iter()
            .flat_map(|w| (0..4).map(move |i| (*w >> (8 * i)) as u8 as i8 as i32))
            .collect(),
        KvDtype::Int4 { .. } | KvDtype::Int4Channel => words
            .iter()
            .flat_map(|w| (0..8).map(move |i| ((*w >> (4 * i)) & 15) as i32))
            .collect(),
    }
}

/// Same appends on both backends; returns (codes compared, codes off by one).
fn compare(
    gpu: &Arc<dyn Backend>,
    dtype: KvDtype,
    d: usize,
    rotate: bool,
    seed: u64,
) -> (usize, usize) {
    let kv_heads = 3;
    let cfg = CacheConfig::new(1, kv_heads, d, 600)
        .with_dtypes(dtype, dtype)
        .with_block_size(16)
        .with_rotation(rotate);
    let cpu: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let (mut a, mut b) = (
        KvCache::new(cpu, cfg).unwrap(),
        KvCache::new(gpu.clone(), cfg).unwrap(),
    );
    let mut rng = Rng::new(seed);
    let seqs: Vec<_> = (0..5)
        .map(|_| (a.add_sequence(), b.add_sequence()))
        .collect();
    // Interleaved appends of varied sizes scatter the block tables.
    for round in 0..6 {
        for (i, &(sa, sb)) in seqs.iter().enumerate() {
            let n = 1 + (round * 7 + i * 5) % 23;
            let row = kv_heads * d;
            // Mixed magnitudes, an exact-zero vector and a constant vector.
            let mut k: Vec<f32> = (0..n * row)
                .map(|_| rng.normal() * 10f32.powi(rng.below(5) as i32 - 2))
                .collect();
            if round == 1 {
                k[..d].fill(0.0);
                k[d..2 * d].fill(0.75);
            }
            let v: Vec<f32> = rng.normals(n * row);
            a.append(&[(sa, n)], &k, &v).unwrap();
            b.append(&[(sb, n)], &k, &v).unwrap();
        }
    }
    let (mut total, mut off) = (0, 0);
    for layer_pool in 0..2 {
        let (pa, pb) = (a.pools(0).unwrap(), b.pools(0).unwrap());
        let (pa, pb) = if layer_pool == 0 {
            (pa.0, pb.0)
        } else {
            (pa.1, pb.1)
        };
        let side_a = a.backend().download(&pa.side, 0, pa.side.words()).unwrap();
        let side_b = b.backend().download(&pb.side, 0, pb.side.words()).unwrap();
        assert_eq!(side_a, side_b, "{dtype} D {d}: side data differ");
        let ca = codes(
            dtype,
            &a.backend().download(&pa.data, 0, pa.data.words()).unwrap(),
        );
        let cb = codes(
            dtype,
            &b.backend().download(&pb.data, 0, pb.data.words()).unwrap(),
        );
        for (i, (x, y)) in ca.iter().zip(&cb).enumerate() {
            let diff = (x - y).abs();
            assert!(
                dtype != KvDtype::F16 || diff == 0,
                "{dtype} D {d}: f16 element {i}: {x:#x} vs {y:#x}"
            );
            assert!(diff <= 1, "{dtype} D {d}: code {i}: cpu {x} gpu {y}");
            off += diff as usize;
        }
        total += ca.len();
    }
    (total, off)
}

#[test]
fn gpu_append_matches_cpu_codes() {
    for gpu in gpus() {
        append_matches_cpu_codes(&gpu);
    }
}

fn append_matches_cpu_codes(gpu: &Arc<dyn Backend>) {
    let mut report = Vec::new();
    for d in [64usize, 80, 96, 128, 256] {
        for dtype in dtypes(d) {
            for rotate in [false, d.is_power_of_two()] {
                let (total, off) = compare(gpu, dtype, d, rotate, d as u64);
                let what = format!("{} {dtype} D {d} rotate {rotate}", gpu.info().kind);
                report.push(format!("{what}: {off} of {total} codes off by one"));
                assert!(
                    off as f64 <= MAX_OFF_BY_ONE_RATE * total as f64,
                    "{what}: {off} of {total} codes off by one"
                );
            }
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// Dequantize on the GPU equals the CPU reference's dequantization of the same pool.
#[test]
fn gpu_dequantize_matches_cpu() {
    for gpu in gpus() {
        dequantize_matches_cpu(&gpu);
    }
}

fn dequantize_matches_cpu(gpu: &Arc<dyn Backend>) {
    for (dtype, d, rotate) in [
        (KvDtype::F16, 80, false),
        (KvDtype::Int8, 80, false),
        (KvDtype::Int4 { group: 16 }, 80, false),
        (KvDtype::Int8, 64, true),
        (KvDtype::Int4 { group: 32 }, 128, true),
    ] {
        let cfg = CacheConfig::new(1, 2, d, 256)
            .with_dtypes(dtype, dtype)
            .with_rotation(rotate);
        let (cache, seqs, ks, _) = common::filled(gpu.clone(), cfg, &[40, 70], 4);
        let (kpool, _) = cache.pools(0).unwrap();
        let bs = cfg.block_size as u32;
        for (i, &s) in seqs.iter().enumerate() {
            let table = cache.blocks().block_table(s).unwrap();
            let n = cache.seq_len(s).unwrap();
            let slots: Vec<u32> = (0..n)
                .map(|p| table[p / bs as usize] * bs + (p as u32 % bs))
                .collect();
            let sb = gpu.alloc(n).unwrap();
            gpu.upload(&sb, 0, &slots).unwrap();
            let out = gpu.alloc(n * 2 * d).unwrap();
            gpu.dequantize(kpool, &sb, n, &out).unwrap();
            let got: Vec<f32> =
                bytemuck::cast_slice(&gpu.download(&out, 0, n * 2 * d).unwrap()).to_vec();
            let want = common::stored(dtype, rotate, &ks[i], d);
            for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                    "{dtype} rotate {rotate} seq {i} elem {j}: {g} vs {w}"
                );
            }
        }
    }
}

/// Dequantize refuses short slot, output and pool buffers with an error and writes
/// nothing, on every backend.
#[test]
fn bad_dequantize_input_is_an_error_and_changes_nothing() {
    for b in common::backends() {
        let cfg = CacheConfig::new(1, 2, 64, 64).with_dtypes(KvDtype::Int8, KvDtype::Int8);
        let (cache, seqs, _, _) = common::filled(b.clone(), cfg, &[5], 1);
        let table = cache.blocks().block_table(seqs[0]).unwrap();
        let slots: Vec<u32> = (0..5).map(|p| table[0] * 16 + p).collect();
        let sb = b.alloc(5).unwrap();
        b.upload(&sb, 0, &slots).unwrap();
        let n = 5 * 2 * 64;
        let out = b.alloc(n).unwrap();
        let marker = vec![7u32; n];
        b.upload(&out, 0, &marker).unwrap();
        let (pool, _) = cache.pools(0).unwrap();
        let short = |words| b.alloc(words).unwrap();
        let bad_pools = [
            kvq::backend::Pool {
                data: short(1),
                ..pool.clone()
            },
            kvq::backend::Pool {
                side: short(1),
                ..pool.clone()
            },
        ];
        let name = &b.info().name;
        for p in &bad_pools {
            let e = b.dequantize(p, &sb, 5, &out);
            assert!(
                matches!(e, Err(kvq::Error::OutOfRange { .. })),
                "{name}: {e:?}"
            );
        }
        let e = b.dequantize(pool, &sb, 6, &out);
        assert!(
            matches!(e, Err(kvq::Error::OutOfRange { .. })),
            "{name}: {e:?}"
        );
        let e = b.dequantize(pool, &sb, 5, &short(n - 1));
        assert!(
            matches!(e, Err(kvq::Error::OutOfRange { .. })),
            "{name}: {e:?}"
        );
        assert_eq!(
            b.download(&out, 0, n).unwrap(),
            marker,
            "{name}: out changed"
        );
        b.dequantize(pool, &sb, 5, &out).unwrap();
        assert_ne!(
            b.download(&out, 0, n).unwrap(),
            marker,
            "{name}: good call wrote nothing"
        );
    }
}
