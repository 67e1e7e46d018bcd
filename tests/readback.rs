//! Reading back (`KvCache::read_kv`): the dequantized K and V of given positions of
//! a sequence in a layer, on every backend, for every dtype, rotated or not; bad
//! positions, sequences and layers answered by an error that changes nothing.

mod common;

use std::sync::Arc;

use common::Rng;
use kvq::backend::BackendKind;
use kvq::{Backend, CacheConfig, Error, KvCache, KvDtype, SeqId};

/// What `read_kv` answers: K and V.
type Read = kvq::Result<(Vec<f32>, Vec<f32>)>;

/// Every dtype the tests read back, as the parser spells them; those that do not
/// parse (yet) are skipped.
const DTYPES: [&str; 7] = [
    "f16", "int8", "int4", "int4:g64", "bf16", "fp8-e4m3", "fp8-e5m2",
];

fn dtypes() -> Vec<KvDtype> {
    DTYPES.iter().filter_map(|s| s.parse().ok()).collect()
}

/// Largest difference one code off makes to a stored head vector, as a share of
/// its L2 norm (which bounds its largest component in either basis): the
/// quantization step of the dtype at that magnitude.
fn step_share(dtype: KvDtype) -> f32 {
    match dtype.to_string().as_str() {
        "f16" => 2f32.powi(-10),
        "bf16" => 2f32.powi(-7),
        "int8" => 1.0 / 127.0,
        "fp8-e4m3" => 2f32.powi(-3),
        "fp8-e5m2" => 2f32.powi(-2),
        // Int4: a group's range over 15 levels, the range at most twice the norm.
        _ => 2.0 / 15.0,
    }
}

fn norm(x: &[f32]) -> f32 {
    x.iter().map(|v| v * v).sum::<f32>().sqrt()
}

/// Rows `positions` of `x` (`[T, row]`).
fn gather(x: &[f32], row: usize, positions: &[usize]) -> Vec<f32> {
    positions
        .iter()
        .flat_map(|&p| &x[p * row..(p + 1) * row])
        .copied()
        .collect()
}

/// A random set of positions below `len`, with the first, the last, both sides of
/// every block boundary present, repeats, and no order.
fn positions(len: usize, block_size: usize, rng: &mut Rng) -> Vec<usize> {
    let mut p = vec![len - 1, 0, len - 1];
    for b in (block_size..len).step_by(block_size) {
        p.extend([b, b - 1]);
    }
    p.extend((0..len.min(12)).map(|_| rng.below(len)));
    // Unsorted: a Fisher–Yates shuffle (the first three stay first-last-repeat).
    for i in (4..p.len()).rev() {
        let j = 3 + rng.below(i - 2);
        p.swap(i, j);
    }
    p
}

/// Compares a read-back with the storage format's round trip of the written rows
/// (`input`), head vector by head vector: bit-exact on the CPU reference, else
/// within one quantization step (a code may be off by one where `x / scale` is
/// near a rounding boundary; GPU arithmetic rounds differently). Returns the head
/// vectors that differ at all.
fn check(
    kind: BackendKind,
    what: &str,
    dtype: KvDtype,
    d: usize,
    got: &[f32],
    want: &[f32],
    input: &[f32],
) -> usize {
    assert_eq!(got.len(), want.len(), "{kind} {what}: length");
    if kind == BackendKind::Cpu {
        let (g, w): (Vec<u32>, Vec<u32>) = (
            got.iter().map(|v| v.to_bits()).collect(),
            want.iter().map(|v| v.to_bits()).collect(),
        );
        if let Some(i) = g.iter().zip(&w).position(|(a, b)| a != b) {
            panic!("{kind} {what}: element {i}: {} vs {}", got[i], want[i]);
        }
        return 0;
    }
    let mut differ = 0;
    for (h, ((g, w), x)) in got
        .chunks(d)
        .zip(want.chunks(d))
        .zip(input.chunks(d))
        .enumerate()
    {
        let diff: Vec<f32> = g.iter().zip(w).map(|(a, b)| a - b).collect();
        let (off, scale) = (norm(&diff), norm(x));
        let tol = 1.01 * step_share(dtype) * scale + 1e-5 * scale;
        assert!(
            off <= tol && g.iter().all(|v| v.is_finite()),
            "{kind} {what}: head vector {h} off by {off} (tolerance {tol}):\n got {g:?}\nwant {w:?}"
        );
        differ += usize::from(off > 1e-5 * scale);
    }
    differ
}

/// Every word of every pool (codes and side data, K and V, all layers).
fn snapshot(cache: &KvCache) -> Vec<Vec<u32>> {
    let b = cache.backend();
    let mut words = Vec::new();
    for layer in 0..cache.config().layers {
        let (k, v) = cache.pools(layer).unwrap();
        for pool in [k, v] {
            words.push(b.download(&pool.data, 0, pool.data.words()).unwrap());
            words.push(b.download(&pool.side, 0, pool.side.words()).unwrap());
        }
    }
    words
}

#[test]
fn read_kv_returns_the_stored_rows_on_every_backend_and_dtype() {
    let (kv_heads, d, bs) = (2, 64, 16);
    let lens = [40, 70, 23];
    let mut report = Vec::new();
    for b in common::backends() {
        let kind = b.info().kind;
        for dtype in dtypes() {
            for rotate in [false, true] {
                let cfg = CacheConfig::new(1, kv_heads, d, 256)
                    .with_dtypes(dtype, dtype)
                    .with_block_size(bs)
                    .with_rotation(rotate);
                let (cache, seqs, ks, vs) = common::filled(b.clone(), cfg, &lens, 11);
                let before = (snapshot(&cache), cache.blocks().clone());
                let mut rng = Rng::new(5);
                let row = kv_heads * d;
                let mut differ = 0;
                for (i, &s) in seqs.iter().enumerate() {
                    let len = cache.seq_len(s).unwrap();
                    let table = cache.blocks().block_table(s).unwrap();
                    assert!(
                        table.windows(2).any(|w| w[1] != w[0] + 1),
                        "seq {i}: block table {table:?} not scattered"
                    );
                    let all: Vec<usize> = (0..len).collect();
                    for p in [positions(len, bs, &mut rng), all, vec![len / 2]] {
                        let what = format!("{dtype} rotate {rotate} seq {i} positions {p:?}");
                        let (k, v) = cache.read_kv(0, s, &p).unwrap();
                        for (name, got, x) in [("k", &k, &ks[i]), ("v", &v, &vs[i])] {
                            let input = gather(x, row, &p);
                            let want = common::stored(dtype, rotate, &input, d);
                            let what = format!("{what} {name}");
                            differ += check(kind, &what, dtype, d, got, &want, &input);
                        }
                    }
                }
                assert!(
                    (snapshot(&cache), cache.blocks().clone()) == before,
                    "{kind} {dtype} rotate {rotate}: reading changed the cache"
                );
                report.push(format!(
                    "{kind} {dtype} rotate {rotate}: {differ} head vectors differ"
                ));
            }
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// Each layer answers its own K and V, K and V of different dtypes, an unrotated
/// head_dim that is no power of two.
#[test]
fn read_kv_reads_the_named_layer() {
    let (layers, kv_heads, bs) = (3, 2, 8);
    let int4: KvDtype = "int4".parse().unwrap();
    for b in common::backends() {
        let kind = b.info().kind;
        for (k_dt, v_dt, d, rotate) in [
            (KvDtype::Int8, int4, 64, true),
            (KvDtype::F16, KvDtype::Int8, 96, false),
        ] {
            let cfg = CacheConfig::new(layers, kv_heads, d, 128)
                .with_dtypes(k_dt, v_dt)
                .with_block_size(bs)
                .with_rotation(rotate);
            let mut cache = KvCache::new(b.clone(), cfg).unwrap();
            let seqs = [cache.add_sequence(), cache.add_sequence()];
            let row = kv_heads * d;
            let mut rng = Rng::new(d as u64);
            // Per sequence and layer, K and V rows in position order.
            let mut ks = vec![vec![Vec::new(); layers]; 2];
            let mut vs = ks.clone();
            for n in [5usize, 9, 3, 12] {
                for (i, &s) in seqs.iter().enumerate() {
                    let k = rng.normals(layers * n * row);
                    let v = rng.normals(layers * n * row);
                    cache.append(&[(s, n)], &k, &v).unwrap();
                    for l in 0..layers {
                        let span = l * n * row..(l + 1) * n * row;
                        ks[i][l].extend_from_slice(&k[span.clone()]);
                        vs[i][l].extend_from_slice(&v[span]);
                    }
                }
            }
            for (i, &s) in seqs.iter().enumerate() {
                let p = positions(cache.seq_len(s).unwrap(), bs, &mut rng);
                for l in (0..layers).rev() {
                    let (k, v) = cache.read_kv(l, s, &p).unwrap();
                    for (name, dt, got, x) in
                        [("k", k_dt, &k, &ks[i][l]), ("v", v_dt, &v, &vs[i][l])]
                    {
                        let input = gather(x, row, &p);
                        let want = common::stored(dt, rotate, &input, d);
                        let what = format!("{name} {dt} D {d} seq {i} layer {l}");
                        check(kind, &what, dt, d, got, &want, &input);
                    }
                }
            }
        }
    }
}

/// Bad positions, sequences and layers are errors that change nothing and do no
/// device work; no positions is no rows and no device work either.
#[test]
fn bad_read_kv_is_an_error_and_changes_nothing() {
    for b in common::own_backends() {
        let kind = b.info().kind;
        let int4: KvDtype = "int4".parse().unwrap();
        let cfg = CacheConfig::new(1, 2, 64, 256)
            .with_dtypes(KvDtype::Int8, int4)
            .with_block_size(16)
            .with_rotation(true);
        let (mut cache, seqs, _, _) = common::filled(b.clone(), cfg, &[21, 40, 9], 3);
        cache.free_sequence(seqs[2]).unwrap();
        let empty = cache.add_sequence();
        let (s, len) = (seqs[0], 21);
        assert_eq!(cache.seq_len(s).unwrap(), len);
        let before = (snapshot(&cache), cache.blocks().clone());
        let created = b.creations();
        let oor = |what, value, limit| Err(Error::OutOfRange { what, value, limit });
        let none = || Ok((Vec::new(), Vec::new()));
        let case = |what: &str, layer: usize, seq: SeqId, p: &[usize], want: Read| {
            assert_eq!(cache.read_kv(layer, seq, p), want, "{kind} {what}");
            assert_eq!(b.creations(), created, "{kind} {what}: device work");
        };
        let unknown = |s: SeqId| Err(Error::UnknownSequence(s.0));
        case("position == len", 0, s, &[len], oor("position", len, len));
        let p = [0, len + 5, 1];
        case("position past len", 0, s, &p, oor("position", len + 5, len));
        let p = [usize::MAX];
        case("huge position", 0, s, &p, oor("position", usize::MAX, len));
        case("another sequence's", 0, s, &[39], oor("position", 39, len));
        let p: Vec<usize> = (0..len).chain([len]).collect();
        case("many good, last bad", 0, s, &p, oor("position", len, len));
        case("empty sequence", 0, empty, &[0], oor("position", 0, 0));
        case("unknown sequence", 0, SeqId(999), &[0], unknown(SeqId(999)));
        case("freed sequence", 0, seqs[2], &[0], unknown(seqs[2]));
        case("freed, no positions", 0, seqs[2], &[], unknown(seqs[2]));
        case("bad layer", 1, s, &[0], oor("layer", 1, 1));
        case(
            "huge layer",
            usize::MAX,
            s,
            &[],
            oor("layer", usize::MAX, 1),
        );
        case(
            "bad layer, unknown",
            7,
            SeqId(999),
            &[0],
            oor("layer", 7, 1),
        );
        case("no positions", 0, s, &[], none());
        case("no positions of an empty sequence", 0, empty, &[], none());
        assert!(
            (snapshot(&cache), cache.blocks().clone()) == before,
            "{kind}: a bad read changed the cache"
        );
        // The cache still answers.
        let (k, v) = cache.read_kv(0, s, &[len - 1, 0]).unwrap();
        assert_eq!((k.len(), v.len()), (2 * 128, 2 * 128), "{kind}");
        assert_eq!(cache.read_kv(0, seqs[1], &[39]).unwrap().0.len(), 128);
    }
}

/// The GPUs' read-back is the CPU reference's, within one quantization step, at
/// head_dim 128 with four KV heads.
#[test]
fn read_kv_matches_the_cpu_reference_read_back() {
    let cpu: Arc<dyn Backend> = Arc::new(kvq::cpu::CpuBackend::new());
    let dtype = KvDtype::Int8;
    let cfg = CacheConfig::new(1, 4, 128, 256)
        .with_dtypes(dtype, dtype)
        .with_rotation(true);
    let (reference, seqs, ks, _) = common::filled(cpu, cfg, &[50, 33], 21);
    for b in common::gpus() {
        let kind = b.info().kind;
        let (cache, ..) = common::filled(b, cfg, &[50, 33], 21);
        for (i, &s) in seqs.iter().enumerate() {
            let p: Vec<usize> = (0..cache.seq_len(s).unwrap()).rev().collect();
            let (want, _) = reference.read_kv(0, s, &p).unwrap();
            let (got, _) = cache.read_kv(0, s, &p).unwrap();
            let input = gather(&ks[i], 4 * 128, &p);
            check(kind, &format!("seq {i}"), dtype, 128, &got, &want, &input);
        }
    }
}
