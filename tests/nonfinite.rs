//! Non-finite values on the device path (DESIGN §6: NaN, ±Inf and values beyond
//! f16's range where f16 is stored never corrupt other tokens or sequences). The
//! host API refuses them at append (`Error::NonFinite`); the device path cannot
//! scan device memory, so a bad K or V element reaches the append kernel. On every
//! backend, one token of sequence A carries NaN, +Inf, -Inf, f32::MAX, 1e30 or
//! 70000 in some K and/or V elements of one head of one layer, in a batch with
//! sequences B and C; against the same steps without the bad values:
//!
//! * every other (token, head, layer) row of every pool holds the same words;
//! * B's and C's outputs, and A's in the other layer, are bit-identical, in that
//!   step and later ones;
//! * once A is truncated below the bad token, A's outputs are bit-identical again
//!   (the stale row past its end is never read), and so are those of a sequence D
//!   that reuses A's block after A is freed;
//! * A's queries before the bad token are bit-identical too (causality);
//!
//! with both wgpu attention kernels (head_dim 64: `attention_lanes.wgsl` on
//! llvmpipe, and `attention.wgsl`),
//! and it reports (stderr) what each backend stores for the bad elements and what
//! A's own outputs become. A backend that refuses the batch (the CPU reference's
//! immediate encoder can scan its memory) must refuse it with `Error::NonFinite`
//! before writing anything of that layer.

mod common;

use std::fmt::Write as _;
use std::sync::Arc;

use common::{Rng, backends, gpu};
use kvq::cache::PoolLayout;
use kvq::wgpu::WgpuBackend;
use kvq::{AttnParams, Backend, CacheConfig, DeviceBuffer, Error, KvCache, KvDtype, SeqId, Tensor};

const LAYERS: usize = 2;
const KV_HEADS: usize = 2;
const Q_HEADS: usize = 4;
const RATIO: usize = Q_HEADS / KV_HEADS;
const D: usize = 64;
const BLOCK: usize = 16;
/// Where the bad values go: this layer, this position of sequence A (the first of
/// the prefill batch, so also its token index in the batch), this KV head.
const BAD_LAYER: usize = 1;
const BAD_POS: usize = 10;
const BAD_HEAD: usize = 1;
/// Bad elements of the head vector: in K two Int4 groups of 16 (3 and 17); in V
/// one (5 and 9), so that the row's other group is clean.
const K_ELEMS: [usize; 2] = [3, 17];
const V_ELEMS: [usize; 2] = [5, 9];
/// Prompt lengths of A, B and C.
const PROMPTS: [usize; 3] = [20, 13, 7];
const SEED: u64 = 77;

fn name(b: &Arc<dyn Backend>) -> String {
    format!("{}:{}", b.info().kind, b.info().name)
}

/// (description, K dtype, V dtype, rotated)
const CONFIGS: [(&str, KvDtype, KvDtype, bool); 3] = [
    (
        "K int8, V int4:g16",
        KvDtype::Int8,
        KvDtype::Int4 { group: 16 },
        false,
    ),
    ("K f16, V f16", KvDtype::F16, KvDtype::F16, false),
    (
        "K int4:g16, V int8, rotated",
        KvDtype::Int4 { group: 16 },
        KvDtype::Int8,
        true,
    ),
];

const VALUES: [(&str, f32); 6] = [
    ("NaN", f32::NAN),
    ("+Inf", f32::INFINITY),
    ("-Inf", f32::NEG_INFINITY),
    ("f32::MAX", f32::MAX),
    ("1e30", 1e30),
    ("70000 (> f16 max)", 70000.0),
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Place {
    K,
    V,
    KV,
}

impl Place {
    fn k(self) -> bool {
        self != Place::V
    }
    fn v(self) -> bool {
        self != Place::K
    }
}

#[derive(Debug, Clone, Copy)]
struct Bad {
    value: f32,
    place: Place,
}

fn config(k: KvDtype, v: KvDtype, rotate: bool) -> CacheConfig {
    CacheConfig::new(LAYERS, KV_HEADS, D, 512)
        .with_dtypes(k, v)
        .with_rotation(rotate)
        .with_block_size(BLOCK)
}

/// One step of the scenario.
enum Op {
    Prefill(Vec<(usize, usize)>),
    Decode(Vec<usize>),
    Truncate(usize, usize),
    Free(usize),
    Add,
}

/// Sequences by index: A, B, C, then D (added after A is freed).
const A: usize = 0;
const NAMES: [&str; 4] = ["A", "B", "C", "D"];

fn scenario() -> Vec<Op> {
    vec![
        Op::Prefill(vec![(0, PROMPTS[0]), (1, PROMPTS[1]), (2, PROMPTS[2])]),
        Op::Decode(vec![0, 1, 2]),
        // A's bad token is now past its end, in a block it still holds.
        Op::Truncate(A, 5),
        Op::Decode(vec![0, 1, 2]),
        // D takes A's first block, whose stale slots hold the bad token.
        Op::Free(A),
        Op::Add,
        Op::Prefill(vec![(3, 3), (1, 1), (2, 1)]),
        Op::Decode(vec![3, 1, 2]),
    ]
}

/// What one attention step gave: its batch (sequence index, queries) and each
/// layer's outputs `[queries, Q_HEADS, D]`.
struct StepOut {
    batch: Vec<(usize, usize)>,
    out: Vec<Vec<f32>>,
}

/// Every word of every pool: per layer K data, K side, V data, V side.
fn pool_words(cache: &KvCache) -> Vec<Vec<u32>> {
    let b = cache.backend();
    let mut words = Vec::new();
    for l in 0..LAYERS {
        let (k, v) = cache.pools(l).unwrap();
        for pool in [k, v] {
            for buf in [&pool.data, &pool.side] {
                words.push(b.download(buf, 0, buf.words()).unwrap());
            }
        }
    }
    words
}

enum Trace {
    /// The first step's record refused the bad values.
    Refused {
        err: Error,
        before: Vec<Vec<u32>>,
        after: Vec<Vec<u32>>,
    },
    Ran {
        /// Pool words after the first step.
        pools: Vec<Vec<u32>>,
        steps: Vec<StepOut>,
        /// The slot of A's bad token, and D's first block.
        bad_slot: usize,
        d_block: u32,
    },
}

/// A step's K and V of every layer (`[tokens, KV_HEADS, D]` each).
fn step_kv(rng: &mut Rng, tokens: usize) -> Vec<[Vec<f32>; 2]> {
    (0..LAYERS)
        .map(|_| {
            [
                rng.normals(tokens * KV_HEADS * D),
                rng.normals(tokens * KV_HEADS * D),
            ]
        })
        .collect()
}

/// The first step's K and V with `bad` in place.
fn inject(kv: &mut [[Vec<f32>; 2]], bad: Bad) {
    let row = (BAD_POS * KV_HEADS + BAD_HEAD) * D;
    let [k, v] = &mut kv[BAD_LAYER];
    if bad.place.k() {
        K_ELEMS.iter().for_each(|&e| k[row + e] = bad.value);
    }
    if bad.place.v() {
        V_ELEMS.iter().for_each(|&e| v[row + e] = bad.value);
    }
}

fn upload(b: &Arc<dyn Backend>, x: &[f32]) -> DeviceBuffer {
    let buf = b.alloc(x.len().max(1)).unwrap();
    b.upload(&buf, 0, bytemuck::cast_slice(x)).unwrap();
    buf
}

/// Runs the scenario on a cache of `cfg` on `b` through the device path, with
/// `bad` in the first step's K and/or V of A's token BAD_POS, head BAD_HEAD, in
/// layer BAD_LAYER. The data are the same with and without `bad`.
fn run(b: &Arc<dyn Backend>, cfg: CacheConfig, bad: Option<Bad>) -> Trace {
    let mut cache = KvCache::new(b.clone(), cfg).unwrap();
    let mut seqs: Vec<SeqId> = (0..3).map(|_| cache.add_sequence()).collect();
    let mut rng = Rng::new(SEED);
    let p = AttnParams::new(Q_HEADS);
    let mut steps = Vec::new();
    let mut pools = Vec::new();
    let mut bad_slot = usize::MAX;
    for (i, op) in scenario().into_iter().enumerate() {
        let batch = match op {
            Op::Truncate(s, len) => {
                cache.truncate(seqs[s], len).unwrap();
                continue;
            }
            Op::Free(s) => {
                cache.free_sequence(seqs[s]).unwrap();
                continue;
            }
            Op::Add => {
                seqs.push(cache.add_sequence());
                continue;
            }
            Op::Prefill(batch) => batch,
            Op::Decode(list) => list.into_iter().map(|s| (s, 1)).collect(),
        };
        let ids: Vec<(SeqId, usize)> = batch.iter().map(|&(s, n)| (seqs[s], n)).collect();
        let plan = if batch.iter().all(|b| b.1 == 1) {
            let list: Vec<SeqId> = ids.iter().map(|b| b.0).collect();
            cache.plan_decode(&list, &p).unwrap()
        } else {
            cache.plan_prefill(&ids, &p).unwrap()
        };
        let tokens = plan.tokens();
        let mut kv = step_kv(&mut rng, tokens);
        let qs: Vec<Vec<f32>> = (0..LAYERS)
            .map(|_| rng.normals(tokens * Q_HEADS * D))
            .collect();
        if i == 0 {
            let table = cache.blocks().block_table(seqs[A]).unwrap();
            bad_slot = table[BAD_POS / BLOCK] as usize * BLOCK + BAD_POS % BLOCK;
            if let Some(bad) = bad {
                inject(&mut kv, bad);
            }
        }
        let before = if i == 0 {
            pool_words(&cache)
        } else {
            Vec::new()
        };
        let bufs: Vec<[DeviceBuffer; 4]> = (0..LAYERS)
            .map(|l| {
                [
                    upload(b, &kv[l][0]),
                    upload(b, &kv[l][1]),
                    upload(b, &qs[l]),
                    // A sentinel that no attention output is.
                    upload(b, &vec![-7777.0; tokens * Q_HEADS * D]),
                ]
            })
            .collect();
        let ran = b.run(&mut |enc| {
            for (l, [k, v, q, out]) in bufs.iter().enumerate() {
                cache.record_append(enc, &plan, l, &Tensor::f32(k), &Tensor::f32(v))?;
                cache.record_attention(enc, &plan, l, &Tensor::f32(q), &Tensor::f32(out))?;
            }
            Ok(())
        });
        if let Err(err) = ran {
            assert!(
                i == 0 && bad.is_some(),
                "{}: step {i} failed without bad values: {err}",
                name(b)
            );
            return Trace::Refused {
                err,
                before,
                after: pool_words(&cache),
            };
        }
        if i == 0 {
            pools = pool_words(&cache);
        }
        let out = bufs
            .iter()
            .map(|[.., o]| bytemuck::cast_slice(&b.download(o, 0, o.words()).unwrap()).to_vec())
            .collect();
        steps.push(StepOut { batch, out });
    }
    let d_block = cache.blocks().block_table(seqs[3]).unwrap()[0];
    Trace::Ran {
        pools,
        steps,
        bad_slot,
        d_block,
    }
}

/// The first query of sequence `s` in a step's batch, and its count.
fn queries_of(batch: &[(usize, usize)], s: usize) -> Option<(usize, usize)> {
    let mut first = 0;
    for &(seq, n) in batch {
        if seq == s {
            return Some((first, n));
        }
        first += n;
    }
    None
}

/// Output rows of queries `[q0, q0 + n)`, q heads `heads`, as bits.
fn rows(out: &[f32], q0: usize, n: usize, heads: std::ops::Range<usize>) -> Vec<u32> {
    let mut v = Vec::new();
    for q in q0..q0 + n {
        for h in heads.clone() {
            let r = (q * Q_HEADS + h) * D;
            v.extend(out[r..r + D].iter().map(|x| x.to_bits()));
        }
    }
    v
}

fn all_finite(bits: &[u32]) -> bool {
    bits.iter().all(|&b| f32::from_bits(b).is_finite())
}

/// The (data, side) word ranges of the row of (`slot`, `head`) in a pool of `l`.
fn row_words(
    l: &PoolLayout,
    slot: usize,
    head: usize,
) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    let row = l.row(slot, head);
    let (w, s) = (l.words_per_head(), l.side_per_head());
    (row * w..(row + 1) * w, row * s..(row + 1) * s)
}

/// What a pool row holds for the bad elements: dequantized values, and whether its
/// words are those the host quantizer (the CPU reference's formats) gives.
fn describe_row(l: &PoolLayout, data: &[u32], side: &[u32], x: &[f32], elems: &[usize]) -> String {
    let mut out = vec![0f32; D];
    kvq::quant::dequantize(l.dtype, data, side, &mut out);
    let mut s = String::new();
    if l.rotated {
        let finite = out.iter().filter(|v| v.is_finite()).count();
        let _ = write!(s, "rotated row: {finite}/{D} dequantized values finite");
    } else {
        let vals: Vec<String> = elems.iter().map(|&e| format!("{}", out[e])).collect();
        let others = (0..D)
            .filter(|e| !elems.contains(e))
            .filter(|&e| !out[e].is_finite())
            .count();
        let _ = write!(
            s,
            "bad elems dequantize to [{}], {others} other elems non-finite",
            vals.join(", ")
        );
    }
    match l.dtype {
        KvDtype::Int8 | KvDtype::Fp8E4M3 | KvDtype::Fp8E5M2 => {
            let _ = write!(s, ", scale {:e}", f32::from_bits(side[0]));
        }
        KvDtype::Int4 { .. } => {
            let f: Vec<String> = side
                .iter()
                .map(|&w| {
                    let h = |b: u32| half::f16::from_bits(b as u16).to_f32();
                    format!("(scale {}, min {})", h(w & 0xffff), h(w >> 16))
                })
                .collect();
            let _ = write!(s, ", groups {}", f.join(" "));
        }
        KvDtype::F16 | KvDtype::Bf16 | KvDtype::Int4Channel => {}
    }
    // The host quantizer on the same vector.
    let mut v = x.to_vec();
    if l.rotated {
        kvq::quant::hadamard(&mut v);
    }
    let (mut hd, mut hs) = (vec![0u32; data.len()], vec![0u32; side.len()]);
    kvq::quant::quantize(l.dtype, &v, &mut hd, &mut hs);
    let same = hd == data && hs == side;
    let _ = write!(
        s,
        "; host quantizer's words: {}",
        if same { "same" } else { "differ" }
    );
    s
}

/// Checks one bad case against the clean run; returns its report line, and adds a
/// line to `failures` for every way a bad value got out of its token or sequence.
fn check_case(
    what: &str,
    cfg: &CacheConfig,
    bad: Bad,
    clean: &Trace,
    trace: &Trace,
    kv_bad: &[[Vec<f32>; 2]],
    failures: &mut Vec<String>,
) -> String {
    let Trace::Ran {
        pools: want_pools,
        steps: want_steps,
        ..
    } = clean
    else {
        unreachable!("the clean run ran")
    };
    let (pools, steps, bad_slot, d_block) = match trace {
        Trace::Refused { err, before, after } => {
            if !matches!(err, Error::NonFinite { .. }) {
                failures.push(format!(
                    "{what}: refused with {err:?}, not Error::NonFinite"
                ));
            }
            // Nothing of the bad layer written (the other layer's append ran).
            for (i, (b, a)) in before.iter().zip(after).enumerate() {
                if i / 4 == BAD_LAYER && b != a {
                    failures.push(format!(
                        "{what}: refused, but pool buffer {i} of layer {BAD_LAYER} changed"
                    ));
                }
            }
            // The plan's tokens (A's, B's and C's) stay reserved and unwritten in
            // that layer, as after any plan not yet recorded.
            return format!(
                "{what}: REFUSED by record_append ({err}); layer {BAD_LAYER}'s pools unchanged, \
                 the step's tokens stay reserved there until recorded again"
            );
        }
        Trace::Ran {
            pools,
            steps,
            bad_slot,
            d_block,
        } => (pools, steps, *bad_slot, *d_block),
    };
    let mut report = format!("{what}:");
    // (1) Pool words: only the bad (token, head, layer) rows of the pools that got
    // bad values may differ.
    let layouts = [cfg.layout(cfg.k_dtype), cfg.layout(cfg.v_dtype)];
    let mut leaked = Vec::new();
    for (i, (got, want)) in pools.iter().zip(want_pools).enumerate() {
        let (layer, pool, is_side) = (i / 4, (i / 2) % 2, i % 2 == 1);
        let bad_pool = if pool == 0 {
            bad.place.k()
        } else {
            bad.place.v()
        };
        let (data_rows, side_rows) = row_words(&layouts[pool], bad_slot, BAD_HEAD);
        let own = if is_side { side_rows } else { data_rows };
        for (w, (g, x)) in got.iter().zip(want).enumerate() {
            if g != x && !(layer == BAD_LAYER && bad_pool && own.contains(&w)) {
                leaked.push(format!(
                    "layer {layer} {} {} word {w}: {x:#010x} -> {g:#010x}",
                    ["K", "V"][pool],
                    ["data", "side"][is_side as usize]
                ));
            }
        }
    }
    if leaked.is_empty() {
        report += " other rows' words unchanged;";
    } else {
        report += &format!(" {} OTHER WORDS CHANGED;", leaked.len());
        failures.push(format!(
            "{what}: the bad values spread into other tokens' pool words: {}",
            leaked[..leaked.len().min(8)].join("; ")
        ));
    }
    // What the bad rows hold.
    let x_row = (BAD_POS * KV_HEADS + BAD_HEAD) * D;
    for (pool, elems) in [(0, &K_ELEMS[..]), (1, &V_ELEMS[..])] {
        if (pool == 0 && !bad.place.k()) || (pool == 1 && !bad.place.v()) {
            continue;
        }
        let l = &layouts[pool];
        let (dr, sr) = row_words(l, bad_slot, BAD_HEAD);
        let base = BAD_LAYER * 4 + pool * 2;
        let x = &kv_bad[BAD_LAYER][pool][x_row..x_row + D];
        report += &format!(
            " stored {}: {};",
            ["K", "V"][pool],
            describe_row(l, &pools[base][dr], &pools[base + 1][sr], x, elems)
        );
    }
    // (2) Outputs: every sequence but A, and A in the other layer and after its bad
    // token is truncated away, bit for bit.
    for (i, (got, want)) in steps.iter().zip(want_steps).enumerate() {
        for &(s, _) in &got.batch {
            let (q0, n) = queries_of(&got.batch, s).unwrap();
            for l in 0..LAYERS {
                let must_match = s != A || l != BAD_LAYER || i >= 2;
                let (g, w) = (
                    rows(&got.out[l], q0, n, 0..Q_HEADS),
                    rows(&want.out[l], q0, n, 0..Q_HEADS),
                );
                if must_match && g != w {
                    let why = if s == A && l != BAD_LAYER {
                        "A's outputs in the other layer"
                    } else if s == A {
                        "A's outputs after truncating the bad token away (stale row read)"
                    } else if s == 3 {
                        "D's outputs (D reuses A's block holding the stale bad row)"
                    } else {
                        "another sequence's outputs"
                    };
                    failures.push(format!(
                        "{what}: step {i} layer {l}: {why} ({}) differ from the clean run",
                        NAMES[s]
                    ));
                }
            }
        }
    }
    // (3) What A's outputs in the bad layer become.
    let a_heads = BAD_HEAD * RATIO..(BAD_HEAD + 1) * RATIO;
    let other_heads = if BAD_HEAD == 0 {
        RATIO..Q_HEADS
    } else {
        0..RATIO
    };
    let (q0, _) = queries_of(&steps[0].batch, A).unwrap();
    let o = &steps[0].out[BAD_LAYER];
    let w = &want_steps[0].out[BAD_LAYER];
    let count = |range: std::ops::Range<usize>| {
        range
            .filter(|&p| !all_finite(&rows(o, q0 + p, 1, a_heads.clone())))
            .count()
    };
    let (early, late) = (count(0..BAD_POS), count(BAD_POS..PROMPTS[0]));
    let early_same = rows(o, q0, BAD_POS, 0..Q_HEADS) == rows(w, q0, BAD_POS, 0..Q_HEADS);
    // Causality: queries before the bad token do not see it, whatever it holds.
    if !early_same {
        failures.push(format!(
            "{what}: A's queries before the bad position differ from the clean run"
        ));
    }
    let heads_same =
        rows(o, q0, PROMPTS[0], other_heads.clone()) == rows(w, q0, PROMPTS[0], other_heads);
    report += &format!(
        " A prefill (kv head {BAD_HEAD}'s q heads): {early}/{BAD_POS} queries before the bad \
         position non-finite (bit-identical to clean: {early_same}), {late}/{} at or after it \
         non-finite; A's other kv head's q heads identical: {heads_same};",
        PROMPTS[0] - BAD_POS
    );
    let (q0, _) = queries_of(&steps[1].batch, A).unwrap();
    let d = rows(&steps[1].out[BAD_LAYER], q0, 1, a_heads);
    report += &format!(
        " A decode: {};",
        if all_finite(&d) {
            "finite"
        } else {
            "non-finite"
        }
    );
    let stale = d_block as usize == bad_slot / BLOCK;
    report += &format!(" D reuses the bad row's block: {stale}");
    report
}

#[test]
fn non_finite_kv_on_the_device_path_stays_in_its_token_and_sequence() {
    let start = std::time::Instant::now();
    let mut failures = Vec::new();
    // Both wgpu attention kernels: the one chosen, and the GPU-shaped one.
    let generic = gpu().map(|g| -> Arc<dyn Backend> {
        Arc::new(
            WgpuBackend::open_named(&g.info().name)
                .unwrap()
                .without_lanes(),
        )
    });
    for b in backends().into_iter().chain(generic) {
        for (desc, k, v, rotate) in CONFIGS {
            let cfg = config(k, v, rotate);
            let clean = run(&b, cfg, None);
            assert!(
                matches!(clean, Trace::Ran { .. }),
                "{}: the clean run failed",
                name(&b)
            );
            for (vname, value) in VALUES {
                for place in [Place::KV, Place::K, Place::V] {
                    let bad = Bad { value, place };
                    let trace = run(&b, cfg, Some(bad));
                    // The first step's K and V as the bad run had them.
                    let mut kv_bad = step_kv(&mut Rng::new(SEED), PROMPTS.iter().sum());
                    inject(&mut kv_bad, bad);
                    let what = format!("{} | {desc} | {vname} in {place:?}", name(&b));
                    let line = check_case(&what, &cfg, bad, &clean, &trace, &kv_bad, &mut failures);
                    eprintln!("{line}");
                }
            }
        }
    }
    eprintln!("non-finite cases: {:.2} s", start.elapsed().as_secs_f64());
    assert!(
        failures.is_empty(),
        "non-finite K/V got out of its token or sequence:\n{}",
        failures.join("\n")
    );
}
