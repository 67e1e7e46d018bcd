//! Pages out and in (`KvCache::export_pages` / `import_pages`): a sequence moved
//! between caches on any two backends keeps its pool words bit for bit and
//! decodes exactly as one that never moved; a corrupt, truncated or foreign blob
//! is an error that changes nothing.

mod common;

use std::sync::Arc;

use common::{Rng, backends};
use kvq::cpu::CpuBackend;
use kvq::{AttnParams, Backend, CacheConfig, Error, KvCache, KvDtype, SeqId};

const LAYERS: usize = 2;
const HEADS: usize = 2;
const D: usize = 64;
const BLOCK: usize = 32;

/// (K, V, rotated): a plain, a quantized and an Int4Channel (open block) format.
const FORMATS: [(KvDtype, KvDtype, bool); 4] = [
    (KvDtype::F16, KvDtype::F16, false),
    (KvDtype::Int8, KvDtype::Int4 { group: 32 }, true),
    (KvDtype::Fp8E4M3, KvDtype::Bf16, false),
    (KvDtype::Int4Channel, KvDtype::Int4 { group: 32 }, true),
];

/// Token counts: one token, just short of a block, whole blocks, and past them.
const LENGTHS: [usize; 4] = [1, BLOCK - 1, 2 * BLOCK, 2 * BLOCK + 7];

fn config((k, v, rotate): (KvDtype, KvDtype, bool)) -> CacheConfig {
    CacheConfig::new(LAYERS, HEADS, D, 8 * BLOCK)
        .with_block_size(BLOCK)
        .with_dtypes(k, v)
        .with_rotation(rotate)
}

/// K and V of `n` tokens, every one of `layers`, from `seed`.
fn kv_of(layers: usize, n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let len = layers * n * HEADS * D;
    (Rng::new(seed).normals(len), Rng::new(seed + 1).normals(len))
}

/// A cache on `b` with a 10-token filler sequence first (so that the blocks of
/// what follows differ from a fresh cache's), and a sequence of `n` tokens.
fn kv(n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    kv_of(LAYERS, n, seed)
}

fn cache_with(b: &Arc<dyn Backend>, cfg: &CacheConfig, n: usize, seed: u64) -> (KvCache, SeqId) {
    let mut cache = KvCache::new(b.clone(), *cfg).unwrap();
    let filler = cache.add_sequence();
    let (k, v) = kv_of(cfg.layers, 10, 99);
    cache.append(&[(filler, 10)], &k, &v).unwrap();
    let seq = cache.add_sequence();
    let (k, v) = kv_of(cfg.layers, n, seed);
    cache.append(&[(seq, n)], &k, &v).unwrap();
    (cache, seq)
}

fn decode_all(cache: &KvCache, seq: SeqId) -> Vec<Vec<f32>> {
    let q = Rng::new(7).normals(4 * D);
    (0..LAYERS)
        .map(|l| cache.decode(l, &[seq], &q, &AttnParams::new(4)).unwrap())
        .collect()
}

#[test]
fn pages_move_between_backends_bit_for_bit() {
    let cpu: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    for format in FORMATS {
        let cfg = config(format);
        for (i, &n) in LENGTHS.iter().enumerate() {
            let seed = 10 * i as u64;
            // Prefilled on the CPU reference, exported.
            let (source, s) = cache_with(&cpu, &cfg, n, seed);
            let blob = source.export_pages(s).unwrap();
            eprintln!("{format:?}, {n} tokens: {} bytes", blob.len());
            for b in backends() {
                let what = format!("{format:?}, {n} tokens, into {}", b.info().name);
                // The same tokens appended here, never moved, beside the import.
                let (direct, d) = cache_with(&b, &cfg, n, seed);
                let mut moved = KvCache::new(b.clone(), cfg).unwrap();
                let first = moved.add_sequence();
                let (k, v) = kv(3, 5);
                moved.append(&[(first, 3)], &k, &v).unwrap();
                let t = std::time::Instant::now();
                let m = moved.import_pages(&blob).unwrap();
                let imported = t.elapsed();
                let t = std::time::Instant::now();
                assert_eq!(moved.seq_len(m).unwrap(), n, "{what}");
                let pages = moved.export_pages(m).unwrap();
                eprintln!("  {what}: import {imported:?}, export {:?}", t.elapsed());
                assert!(pages == blob, "{what}: the imported pages differ");
                assert!(
                    direct.export_pages(d).unwrap() == blob,
                    "{what}: appending here made other pages"
                );
                assert_eq!(decode_all(&moved, m), decode_all(&direct, d), "{what}");
                // And back to the CPU reference.
                let mut back = KvCache::new(cpu.clone(), cfg).unwrap();
                let r = back.import_pages(&pages).unwrap();
                assert!(back.export_pages(r).unwrap() == blob, "{what}: back");
                // The moved sequence grows like any other.
                let (k, v) = kv(BLOCK, 77);
                moved.append(&[(m, BLOCK)], &k, &v).unwrap();
                let mut grown = direct;
                grown.append(&[(d, BLOCK)], &k, &v).unwrap();
                assert_eq!(
                    decode_all(&moved, m),
                    decode_all(&grown, d),
                    "{what}: grown"
                );
            }
        }
    }
}

#[test]
fn a_corrupt_truncated_or_foreign_blob_is_an_error_and_changes_nothing() {
    let cpu: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let cfg = config(FORMATS[3]);
    let (source, s) = cache_with(&cpu, &cfg, 2 * BLOCK + 7, 1);
    let blob = source.export_pages(s).unwrap();
    for b in backends() {
        let (mut cache, seq) = cache_with(&b, &cfg, 40, 2);
        let before = (
            cache.export_pages(seq).unwrap(),
            cache.blocks().clone(),
            cache.blocks().free_open_blocks(),
        );
        let mut flipped = blob.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let foreign = |cfg: CacheConfig| {
            let (c, s) = cache_with(&cpu, &cfg, 5, 3);
            c.export_pages(s).unwrap()
        };
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", Vec::new(), "shorter than its header"),
            ("truncated", blob[..blob.len() - 4].to_vec(), "length"),
            ("odd bytes", blob[..blob.len() - 1].to_vec(), "whole words"),
            ("a flipped bit", flipped, "hash"),
            ("garbage", vec![7; 200], "magic"),
            (
                "another V dtype",
                foreign(cfg.with_dtypes(KvDtype::Int4Channel, KvDtype::Int8)),
                "V dtype",
            ),
            ("unrotated", foreign(cfg.with_rotation(false)), "rotation"),
            (
                "another block size",
                foreign(
                    CacheConfig::new(LAYERS, HEADS, D, 8 * BLOCK)
                        .with_block_size(64)
                        .with_dtypes(KvDtype::Int4Channel, KvDtype::Int4 { group: 32 })
                        .with_rotation(true),
                ),
                "block_size",
            ),
            (
                "more layers",
                foreign(CacheConfig { layers: 3, ..cfg }),
                "layers",
            ),
        ];
        for (what, bad, says) in cases {
            match cache.import_pages(&bad) {
                Err(e @ (Error::InvalidConfig(_) | Error::UnknownDtype(_))) => {
                    assert!(e.to_string().contains(says), "{what}: {e}")
                }
                other => panic!("{what}: {other:?}"),
            }
            let after = (
                cache.export_pages(seq).unwrap(),
                cache.blocks().clone(),
                cache.blocks().free_open_blocks(),
            );
            assert!(after == before, "{what} changed the cache");
        }
        // A cache without room for the pages refuses them whole.
        let small = CacheConfig::new(LAYERS, HEADS, D, 2 * BLOCK)
            .with_block_size(BLOCK)
            .with_dtypes(KvDtype::Int4Channel, KvDtype::Int4 { group: 32 })
            .with_rotation(true);
        let mut full = KvCache::new(b.clone(), small).unwrap();
        let free = full.blocks().free_blocks();
        assert!(matches!(
            full.import_pages(&blob),
            Err(Error::CapacityExceeded { .. })
        ));
        assert_eq!(full.blocks().free_blocks(), free);
        assert_eq!(full.blocks().sequences().count(), 0);
    }
}
