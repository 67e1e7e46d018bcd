//! The paged cache of DESIGN §2 and §6: configuration, layout, block bookkeeping,
//! and `KvCache` on the CPU reference backend.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use common::Rng;
use kvq::cache::{BlockManager, PoolLayout};
use kvq::cpu::CpuBackend;
use kvq::quant;
use kvq::{AttnParams, Backend, CacheConfig, Error, KvCache, KvDtype, SeqId};

const I4G32: KvDtype = KvDtype::Int4 { group: 32 };

fn int4(group: u32) -> KvDtype {
    KvDtype::Int4 { group }
}

fn cpu() -> Arc<dyn Backend> {
    Arc::new(CpuBackend::new())
}

fn config(
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    num_blocks: usize,
    k: KvDtype,
    v: KvDtype,
) -> CacheConfig {
    CacheConfig {
        layers,
        kv_heads,
        head_dim,
        block_size,
        num_blocks,
        k_dtype: k,
        v_dtype: v,
        rotate: false,
        open_blocks: kvq::cache::OPEN_BLOCKS,
    }
}

/// Pool slots of every token of `seq`, from its block table.
fn seq_slots(cache: &KvCache, seq: SeqId) -> Vec<u32> {
    let bs = cache.config().block_size;
    let table = cache.blocks().block_table(seq).unwrap();
    let len = cache.seq_len(seq).unwrap();
    assert_eq!(table.len(), len.div_ceil(bs), "block table length");
    (0..len)
        .map(|p| table[p / bs] * bs as u32 + (p % bs) as u32)
        .collect()
}

/// K and V of `seq` in `layer`, dequantized by the backend: `[len, kv_heads, head_dim]` each.
fn read_back(cache: &KvCache, layer: usize, seq: SeqId) -> (Vec<f32>, Vec<f32>) {
    let b = cache.backend();
    let slots = seq_slots(cache, seq);
    let c = cache.config();
    let n = slots.len() * c.kv_heads * c.head_dim;
    let slot_buf = b.alloc(slots.len().max(1)).unwrap();
    b.upload(&slot_buf, 0, &slots).unwrap();
    let (kp, vp) = cache.pools(layer).unwrap();
    let mut result = Vec::new();
    for pool in [kp, vp] {
        let out = b.alloc(n.max(1)).unwrap();
        b.dequantize(pool, &slot_buf, slots.len(), &out).unwrap();
        let words = b.download(&out, 0, n).unwrap();
        result.push(
            words
                .iter()
                .map(|&w| f32::from_bits(w))
                .collect::<Vec<f32>>(),
        );
    }
    let v = result.pop().unwrap();
    (result.pop().unwrap(), v)
}

/// Round trip of `[tokens, kv_heads, head_dim]` values, vector by vector.
fn expected(dtype: KvDtype, head_dim: usize, x: &[f32]) -> Vec<f32> {
    x.chunks(head_dim)
        .flat_map(|v| quant::round_trip(dtype, v))
        .collect()
}

/// Everything observable about a cache: bookkeeping and every pool word.
#[derive(Debug, PartialEq)]
struct Snapshot {
    blocks: BlockManager,
    words: Vec<Vec<u32>>,
}

fn snapshot(cache: &KvCache) -> Snapshot {
    let b = cache.backend();
    let mut words = Vec::new();
    for layer in 0..cache.config().layers {
        let (k, v) = cache.pools(layer).unwrap();
        for pool in [k, v] {
            for buf in [&pool.data, &pool.side] {
                words.push(b.download(buf, 0, buf.words()).unwrap());
            }
        }
    }
    Snapshot {
        blocks: cache.blocks().clone(),
        words,
    }
}

/// Host model of what each sequence holds: per layer, K and V rows.
#[derive(Default)]
struct Model {
    k: BTreeMap<(u64, usize), Vec<f32>>,
    v: BTreeMap<(u64, usize), Vec<f32>>,
}

impl Model {
    fn push(&mut self, seq: SeqId, layer: usize, k: &[f32], v: &[f32]) {
        self.k
            .entry((seq.0, layer))
            .or_default()
            .extend_from_slice(k);
        self.v
            .entry((seq.0, layer))
            .or_default()
            .extend_from_slice(v);
    }

    fn truncate(&mut self, seq: SeqId, layers: usize, len: usize) {
        for l in 0..layers {
            for m in [&mut self.k, &mut self.v] {
                if let Some(x) = m.get_mut(&(seq.0, l)) {
                    x.truncate(len);
                }
            }
        }
    }

    fn remove(&mut self, seq: SeqId, layers: usize) {
        for l in 0..layers {
            self.k.remove(&(seq.0, l));
            self.v.remove(&(seq.0, l));
        }
    }

    fn check(&self, cache: &KvCache, seq: SeqId) {
        let c = cache.config();
        for layer in 0..c.layers {
            let (k, v) = read_back(cache, layer, seq);
            let empty = Vec::new();
            let mk = self.k.get(&(seq.0, layer)).unwrap_or(&empty);
            let mv = self.v.get(&(seq.0, layer)).unwrap_or(&empty);
            assert_eq!(k.len(), mk.len(), "seq {seq:?} layer {layer}: K length");
            assert_eq!(
                k,
                expected(c.k_dtype, c.head_dim, mk),
                "seq {seq:?} layer {layer}: K"
            );
            assert_eq!(
                v,
                expected(c.v_dtype, c.head_dim, mv),
                "seq {seq:?} layer {layer}: V"
            );
        }
    }
}

/// Appends `batch` with random data, recording it in the model.
fn append_random(cache: &mut KvCache, model: &mut Model, rng: &mut Rng, batch: &[(SeqId, usize)]) {
    let c = *cache.config();
    let row = c.kv_heads * c.head_dim;
    let tokens: usize = batch.iter().map(|b| b.1).sum();
    let k: Vec<f32> = rng.normals(c.layers * tokens * row);
    let v: Vec<f32> = rng
        .normals(c.layers * tokens * row)
        .iter()
        .map(|x| x * 3.0)
        .collect();
    cache.append(batch, &k, &v).unwrap();
    for layer in 0..c.layers {
        let mut t = layer * tokens * row;
        for &(seq, n) in batch {
            let span = t..t + n * row;
            model.push(seq, layer, &k[span.clone()], &v[span]);
            t += n * row;
        }
    }
}

// ---------------------------------------------------------------------------
// CacheConfig and PoolLayout
// ---------------------------------------------------------------------------

#[test]
fn config_defaults_and_builders() {
    let c = CacheConfig::new(2, 8, 128, 1000);
    assert_eq!(c.block_size, 16);
    assert_eq!(c.num_blocks, 63);
    assert_eq!((c.k_dtype, c.v_dtype), (KvDtype::Int8, KvDtype::Int8));
    assert_eq!(c.capacity_tokens(), 1008);
    c.validate().unwrap();
    let c = c.with_dtypes(KvDtype::F16, I4G32);
    assert_eq!((c.k_dtype, c.v_dtype), (KvDtype::F16, I4G32));
    let c = c.with_block_size(5);
    assert_eq!(c.block_size, 5);
    assert!(c.capacity_tokens() >= 1008);
    assert_eq!(c.num_blocks, 1008usize.div_ceil(5));
    c.validate().unwrap();
    assert_eq!(c.bytes_per_token(), 2 * 8 * (256 + 80));
}

#[test]
fn config_validate_rejects_zero_fields() {
    let good = config(2, 4, 64, 16, 8, KvDtype::Int8, I4G32);
    good.validate().unwrap();
    let zeroed: [(&str, CacheConfig); 5] = [
        ("layers", CacheConfig { layers: 0, ..good }),
        (
            "kv_heads",
            CacheConfig {
                kv_heads: 0,
                ..good
            },
        ),
        (
            "head_dim",
            CacheConfig {
                head_dim: 0,
                ..good
            },
        ),
        (
            "block_size",
            CacheConfig {
                block_size: 0,
                ..good
            },
        ),
        (
            "num_blocks",
            CacheConfig {
                num_blocks: 0,
                ..good
            },
        ),
    ];
    for (name, c) in zeroed {
        match c.validate() {
            Err(Error::InvalidConfig(msg)) => assert!(msg.contains(name), "{msg}"),
            other => panic!("{name} = 0: {other:?}"),
        }
        match KvCache::new(cpu(), c) {
            Err(Error::InvalidConfig(_)) => {}
            other => panic!("{name} = 0: KvCache::new gave {other:?}"),
        }
    }
    // Capacity 0 gives zero blocks.
    assert!(matches!(
        CacheConfig::new(1, 1, 64, 0).validate(),
        Err(Error::InvalidConfig(_))
    ));
}

#[test]
fn config_validate_rejects_bad_dtypes() {
    let good = config(1, 2, 64, 16, 4, KvDtype::Int8, KvDtype::Int8);
    let bad = [
        CacheConfig {
            head_dim: 60,
            ..good
        },
        CacheConfig {
            head_dim: 4,
            ..good
        },
        CacheConfig {
            head_dim: 80,
            k_dtype: I4G32,
            ..good
        },
        CacheConfig {
            v_dtype: I4G32,
            head_dim: 48,
            ..good
        },
        CacheConfig {
            v_dtype: int4(12),
            ..good
        },
        CacheConfig {
            k_dtype: int4(0),
            ..good
        },
        CacheConfig {
            k_dtype: int4(128),
            ..good
        },
    ];
    for c in bad {
        match c.validate() {
            Err(Error::Unsupported(_)) => {}
            other => panic!("{c:?}: {other:?}"),
        }
        assert!(matches!(KvCache::new(cpu(), c), Err(Error::Unsupported(_))));
    }
    CacheConfig {
        head_dim: 80,
        k_dtype: int4(16),
        ..good
    }
    .validate()
    .unwrap();
}

#[test]
fn config_validate_rejects_pools_beyond_32_bit_indexing() {
    // 2^22 blocks × 16 tokens × 8 heads × 64 words = 2^35 words.
    let c = config(1, 8, 128, 16, 1 << 22, KvDtype::F16, KvDtype::F16);
    assert!(matches!(c.validate(), Err(Error::InvalidConfig(_))));
    // Just below the limit is fine (not allocated here).
    let c = config(
        1,
        1,
        8,
        1,
        (u32::MAX / 4) as usize,
        KvDtype::F16,
        KvDtype::F16,
    );
    c.validate().unwrap();
}

#[test]
fn config_validate_does_not_overflow() {
    let c = config(1, 8, 128, 16, usize::MAX / 4, KvDtype::F16, KvDtype::F16);
    assert!(matches!(c.validate(), Err(Error::InvalidConfig(_))));
}

#[test]
fn pool_layout_rows_follow_design_formula() {
    for (kv_heads, head_dim, bs, nb, dt) in [
        (1, 8, 1, 3, KvDtype::F16),
        (2, 64, 16, 4, KvDtype::Int8),
        (3, 80, 5, 7, int4(16)),
        (4, 128, 8, 3, I4G32),
        (8, 128, 16, 2, int4(128)),
    ] {
        let c = config(1, kv_heads, head_dim, bs, nb, dt, dt);
        let l: PoolLayout = c.layout(dt);
        assert_eq!(l.dtype, dt);
        assert_eq!(l.words_per_head(), dt.words_per_head(head_dim));
        assert_eq!(l.side_per_head(), dt.side_words_per_head(head_dim));
        assert_eq!(
            l.data_words(),
            nb * kv_heads * bs * dt.words_per_head(head_dim)
        );
        assert_eq!(
            l.side_words(),
            nb * kv_heads * bs * dt.side_words_per_head(head_dim)
        );
        let mut seen = BTreeSet::new();
        for b in 0..nb {
            for s in 0..bs {
                for h in 0..kv_heads {
                    let row = l.row(b * bs + s, h);
                    assert_eq!(row, (b * kv_heads + h) * bs + s);
                    assert!(seen.insert(row), "row {row} twice");
                }
            }
        }
        // The rows tile the pool exactly: data word w of a row is row * words + w.
        assert_eq!(seen.len(), nb * kv_heads * bs);
        assert_eq!(*seen.iter().last().unwrap(), nb * kv_heads * bs - 1);
        assert_eq!(seen.len() * l.words_per_head(), l.data_words());
        // Head-major inside a block: one head's tokens are one contiguous run.
        if bs > 1 {
            assert_eq!(l.row(1, 0), l.row(0, 0) + 1);
        }
        if kv_heads > 1 {
            assert_eq!(l.row(0, 1), bs);
        }
    }
}

// ---------------------------------------------------------------------------
// BlockManager
// ---------------------------------------------------------------------------

fn check_slots(m: &BlockManager, bs: usize, seq: SeqId, from: usize, slots: &[u32]) {
    let table = m.block_table(seq).unwrap();
    for (i, &s) in slots.iter().enumerate() {
        let p = from + i;
        assert_eq!(
            s,
            table[p / bs] * bs as u32 + (p % bs) as u32,
            "position {p}"
        );
    }
}

/// Blocks of all sequences are distinct and, with the free ones, make up the pool.
fn check_invariants(m: &BlockManager, num_blocks: usize, bs: usize) {
    let mut owned = BTreeSet::new();
    for seq in m.sequences() {
        let table = m.block_table(seq).unwrap();
        assert_eq!(table.len(), m.len(seq).unwrap().div_ceil(bs));
        for &b in table {
            assert!((b as usize) < num_blocks);
            assert!(owned.insert(b), "block {b} owned twice");
        }
    }
    assert_eq!(owned.len(), m.used_blocks());
    assert_eq!(m.used_blocks() + m.free_blocks(), num_blocks);
}

#[test]
fn block_manager_extend_computes_slots() {
    let (nb, bs) = (6, 4);
    let mut m = BlockManager::new(nb, bs);
    assert_eq!((m.free_blocks(), m.used_blocks(), m.tokens()), (6, 0, 0));
    let a = m.add();
    let b = m.add();
    assert_ne!(a, b);
    assert_eq!(m.sequences().collect::<Vec<_>>(), [a, b]);
    assert_eq!(m.len(a), Ok(0));
    assert_eq!(m.block_table(a).unwrap(), &[] as &[u32]);

    let s = m.extend(&[(a, 5), (b, 1)]).unwrap().slots;
    assert_eq!(s.len(), 6);
    check_slots(&m, bs, a, 0, &s[..5]);
    check_slots(&m, bs, b, 0, &s[5..]);
    assert_eq!(m.block_table(a).unwrap().len(), 2);
    assert_eq!(m.block_table(b).unwrap().len(), 1);
    assert_eq!((m.free_blocks(), m.used_blocks(), m.tokens()), (3, 3, 6));
    // Slots are distinct.
    assert_eq!(s.iter().collect::<BTreeSet<_>>().len(), 6);

    // Growing within the last block takes no new block.
    let s = m.extend(&[(a, 3)]).unwrap().slots;
    check_slots(&m, bs, a, 5, &s);
    assert_eq!(m.free_blocks(), 3);
    assert_eq!(m.len(a), Ok(8));
    // A zero-token extend is a no-op.
    let before = m.clone();
    assert_eq!(
        m.extend(&[(a, 0), (b, 0)]).unwrap().slots,
        Vec::<u32>::new()
    );
    assert_eq!(m, before);
    assert_eq!(m.extend(&[]).unwrap().slots, Vec::<u32>::new());
    // Crossing into a new block takes exactly one.
    let s = m.extend(&[(a, 1)]).unwrap().slots;
    check_slots(&m, bs, a, 8, &s);
    assert_eq!(m.free_blocks(), 2);
    check_invariants(&m, nb, bs);
}

#[test]
fn block_manager_free_and_reuse() {
    let (nb, bs) = (4, 2);
    let mut m = BlockManager::new(nb, bs);
    let a = m.add();
    let b = m.add();
    m.extend(&[(a, 3)]).unwrap();
    m.extend(&[(b, 1)]).unwrap();
    let a_blocks: BTreeSet<u32> = m.block_table(a).unwrap().iter().copied().collect();
    assert_eq!(m.free_blocks(), 1);
    m.remove(a).unwrap();
    assert_eq!(m.free_blocks(), 3);
    assert_eq!(m.tokens(), 1);
    assert_eq!(m.sequences().collect::<Vec<_>>(), [b]);
    assert_eq!(m.len(a), Err(Error::UnknownSequence(a.0)));
    assert_eq!(m.remove(a), Err(Error::UnknownSequence(a.0)));
    // b grows into a's old blocks: all 4 blocks in use, b's table is scattered.
    let s = m.extend(&[(b, 7)]).unwrap().slots;
    check_slots(&m, bs, b, 1, &s);
    assert_eq!(m.free_blocks(), 0);
    let table = m.block_table(b).unwrap();
    assert_eq!(table.len(), 4);
    assert!(a_blocks.iter().all(|x| table.contains(x)));
    check_invariants(&m, nb, bs);
    // New sequences get fresh ids, never a freed one.
    let c = m.add();
    assert!(c.0 > b.0 && c != a);
}

#[test]
fn block_manager_truncate() {
    let (nb, bs) = (5, 3);
    let mut m = BlockManager::new(nb, bs);
    let a = m.add();
    m.extend(&[(a, 10)]).unwrap();
    assert_eq!(m.free_blocks(), 1);
    let table = m.block_table(a).unwrap().to_vec();

    m.truncate(a, 10).unwrap(); // no-op
    assert_eq!(m.block_table(a).unwrap(), &table[..]);
    m.truncate(a, 7).unwrap();
    assert_eq!(m.len(a), Ok(7));
    assert_eq!(m.block_table(a).unwrap(), &table[..3]);
    assert_eq!(m.free_blocks(), 2);
    m.truncate(a, 6).unwrap();
    assert_eq!(m.block_table(a).unwrap(), &table[..2]);
    assert_eq!(m.free_blocks(), 3);
    // Regrow: slots continue from the new length.
    let s = m.extend(&[(a, 2)]).unwrap().slots;
    check_slots(&m, bs, a, 6, &s);
    assert_eq!(m.len(a), Ok(8));
    check_invariants(&m, nb, bs);

    // Truncate beyond the length: an error naming the length, nothing changed.
    let before = m.clone();
    assert_eq!(
        m.truncate(a, 9),
        Err(Error::OutOfRange {
            what: "truncate length",
            value: 9,
            limit: 9
        })
    );
    assert_eq!(m, before);
    assert!(matches!(
        m.truncate(SeqId(99), 0),
        Err(Error::UnknownSequence(99))
    ));
    assert_eq!(m, before);

    m.truncate(a, 0).unwrap();
    assert_eq!(m.block_table(a).unwrap(), &[] as &[u32]);
    assert_eq!(m.free_blocks(), nb);
    assert_eq!(m.len(a), Ok(0));
}

#[test]
fn block_manager_capacity_exceeded_changes_nothing() {
    let (nb, bs) = (3, 4);
    let mut m = BlockManager::new(nb, bs);
    let a = m.add();
    let b = m.add();
    m.extend(&[(a, 5)]).unwrap();
    let before = m.clone();
    // a has 3 free slots in its block, b needs 2 blocks for 5 tokens: 2 > 1 free.
    assert_eq!(
        m.extend(&[(a, 3), (b, 5)]),
        Err(Error::CapacityExceeded { needed: 2, free: 1 })
    );
    assert_eq!(m, before);
    assert_eq!(
        m.extend(&[(a, 8)]),
        Err(Error::CapacityExceeded { needed: 2, free: 1 })
    );
    assert_eq!(m, before);
    // Overflowing lengths are a capacity error, not a panic.
    assert!(matches!(
        m.extend(&[(a, usize::MAX)]),
        Err(Error::CapacityExceeded { .. })
    ));
    assert!(matches!(
        m.extend(&[(b, usize::MAX - 1)]),
        Err(Error::CapacityExceeded { .. })
    ));
    assert_eq!(m, before);
    // Exactly the capacity fits.
    let s = m.extend(&[(a, 3), (b, 4)]).unwrap().slots;
    assert_eq!(s.len(), 7);
    assert_eq!(m.free_blocks(), 0);
    let full = m.clone();
    assert!(matches!(
        m.extend(&[(b, 1)]),
        Err(Error::CapacityExceeded { needed: 1, free: 0 })
    ));
    assert_eq!(m, full);
}

#[test]
fn block_manager_huge_batch_does_not_overflow() {
    let mut m = BlockManager::new(4, 1);
    let a = m.add();
    let b = m.add();
    let half = usize::MAX / 2 + 1;
    assert!(matches!(
        m.extend(&[(a, half), (b, half)]),
        Err(Error::CapacityExceeded { .. })
    ));
}

#[test]
fn block_manager_unknown_and_duplicate_sequences() {
    let mut m = BlockManager::new(4, 2);
    let a = m.add();
    m.extend(&[(a, 1)]).unwrap();
    let before = m.clone();
    assert_eq!(m.extend(&[(SeqId(7), 1)]), Err(Error::UnknownSequence(7)));
    assert_eq!(
        m.extend(&[(a, 1), (SeqId(7), 1)]),
        Err(Error::UnknownSequence(7))
    );
    assert_eq!(
        m.extend(&[(a, 1), (a, 1)]),
        Err(Error::DuplicateSequence(a.0))
    );
    assert_eq!(m.check_batch([a, a]), Err(Error::DuplicateSequence(a.0)));
    assert_eq!(m.check_batch([SeqId(3)]), Err(Error::UnknownSequence(3)));
    assert_eq!(m.check_batch([a]), Ok(()));
    assert_eq!(m.remove(SeqId(7)), Err(Error::UnknownSequence(7)));
    assert_eq!(m.block_table(SeqId(7)), Err(Error::UnknownSequence(7)));
    assert_eq!(m, before);
}

#[test]
fn block_manager_random_operations_keep_invariants() {
    let mut rng = Rng::new(11);
    let (nb, bs) = (20, 3);
    let mut m = BlockManager::new(nb, bs);
    let mut lens: BTreeMap<u64, usize> = BTreeMap::new();
    for _ in 0..2000 {
        match rng.below(10) {
            0 => {
                let id = m.add();
                lens.insert(id.0, 0);
            }
            1 if !lens.is_empty() => {
                let id = *lens.keys().nth(rng.below(lens.len())).unwrap();
                m.remove(SeqId(id)).unwrap();
                lens.remove(&id);
            }
            2 if !lens.is_empty() => {
                let id = *lens.keys().nth(rng.below(lens.len())).unwrap();
                let len = rng.below(lens[&id] + 1);
                m.truncate(SeqId(id), len).unwrap();
                lens.insert(id, len);
            }
            _ if !lens.is_empty() => {
                let ids: Vec<u64> = lens.keys().copied().filter(|_| rng.below(2) == 0).collect();
                let batch: Vec<(SeqId, usize)> =
                    ids.iter().map(|&id| (SeqId(id), rng.below(8))).collect();
                let before = m.clone();
                match m.extend(&batch).map(|ext| ext.slots) {
                    Ok(slots) => {
                        let mut at = 0;
                        for &(id, n) in &batch {
                            check_slots(&m, bs, id, lens[&id.0], &slots[at..at + n]);
                            at += n;
                            *lens.get_mut(&id.0).unwrap() += n;
                        }
                    }
                    Err(Error::CapacityExceeded { needed, free }) => {
                        assert!(needed > free);
                        assert_eq!(m, before);
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            _ => {}
        }
        check_invariants(&m, nb, bs);
        for (&id, &len) in &lens {
            assert_eq!(m.len(SeqId(id)), Ok(len));
        }
        assert_eq!(m.tokens(), lens.values().sum::<usize>());
    }
}

// ---------------------------------------------------------------------------
// KvCache on the CPU backend
// ---------------------------------------------------------------------------

#[test]
fn kv_cache_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<KvCache>();
    assert_send_sync::<BlockManager>();
}

#[test]
fn append_then_dequantize_equals_round_trip_for_every_dtype_pair() {
    let dtypes = [KvDtype::F16, KvDtype::Int8, I4G32, int4(8), int4(64)];
    let mut rng = Rng::new(1);
    for k_dt in dtypes {
        for v_dt in dtypes {
            let c = config(2, 2, 64, 4, 6, k_dt, v_dt);
            let mut cache = KvCache::new(cpu(), c).unwrap();
            let mut model = Model::default();
            let a = cache.add_sequence();
            let b = cache.add_sequence();
            append_random(&mut cache, &mut model, &mut rng, &[(a, 5), (b, 2)]);
            append_random(&mut cache, &mut model, &mut rng, &[(b, 3)]);
            append_random(&mut cache, &mut model, &mut rng, &[(b, 1), (a, 1)]);
            assert_eq!(cache.seq_len(a), Ok(6));
            assert_eq!(cache.seq_len(b), Ok(6));
            model.check(&cache, a);
            model.check(&cache, b);
        }
    }
}

#[test]
fn mixed_int8_keys_int4_values_at_head_dim_128() {
    let mut rng = Rng::new(2);
    let c = CacheConfig::new(1, 4, 128, 64).with_dtypes(KvDtype::Int8, I4G32);
    let mut cache = KvCache::new(cpu(), c).unwrap();
    let mut model = Model::default();
    let s = cache.add_sequence();
    append_random(&mut cache, &mut model, &mut rng, &[(s, 17)]);
    model.check(&cache, s);
    // Bit-level check of one token against the quantizers.
    let (kp, vp) = cache.pools(0).unwrap();
    let slot = seq_slots(&cache, s)[16] as usize;
    let b = cache.backend();
    let k = &model.k[&(s.0, 0)];
    let v = &model.v[&(s.0, 0)];
    for h in 0..4 {
        let x = &k[(16 * 4 + h) * 128..][..128];
        let y = &v[(16 * 4 + h) * 128..][..128];
        let row = kp.layout.row(slot, h);
        let mut data = vec![0; 32];
        let mut side = vec![0; 1];
        quant::quantize(KvDtype::Int8, x, &mut data, &mut side);
        assert_eq!(b.download(&kp.data, row * 32, 32).unwrap(), data);
        assert_eq!(b.download(&kp.side, row, 1).unwrap(), side);
        let mut data = vec![0; 16];
        let mut side = vec![0; 4];
        quant::quantize(I4G32, y, &mut data, &mut side);
        assert_eq!(vp.layout.row(slot, h), row);
        assert_eq!(b.download(&vp.data, row * 16, 16).unwrap(), data);
        assert_eq!(b.download(&vp.side, row * 4, 4).unwrap(), side);
    }
}

#[test]
fn extend_then_write_per_layer_equals_append() {
    let mut rng = Rng::new(3);
    let c = config(3, 2, 32, 4, 8, KvDtype::Int8, int4(16));
    let row = 2 * 32;
    let mut one = KvCache::new(cpu(), c).unwrap();
    let mut two = KvCache::new(cpu(), c).unwrap();
    let (a1, b1) = (one.add_sequence(), one.add_sequence());
    let (a2, b2) = (two.add_sequence(), two.add_sequence());
    let k = rng.normals(3 * 7 * row);
    let v = rng.normals(3 * 7 * row);
    one.append(&[(a1, 4), (b1, 3)], &k, &v).unwrap();
    let r = two.extend(&[(a2, 4), (b2, 3)]).unwrap();
    assert_eq!(r.tokens(), 7);
    assert_eq!(r.slots().len(), 7);
    for layer in 0..3 {
        let span = layer * 7 * row..(layer + 1) * 7 * row;
        two.write(layer, &r, &k[span.clone()], &v[span]).unwrap();
    }
    assert_eq!(snapshot(&one), snapshot(&two));
    // The reservation's slots are where the tokens went.
    assert_eq!(&r.slots()[..4], &seq_slots(&two, a2)[..]);
    assert_eq!(&r.slots()[4..], &seq_slots(&two, b2)[..]);
}

#[test]
fn paged_layout_with_scattered_block_tables() {
    for (k_dt, v_dt) in [
        (KvDtype::Int8, I4G32),
        (KvDtype::F16, KvDtype::F16),
        (int4(8), KvDtype::Int8),
    ] {
        let mut rng = Rng::new(4);
        let c = config(2, 3, 32, 4, 24, k_dt, v_dt);
        let mut cache = KvCache::new(cpu(), c).unwrap();
        let mut model = Model::default();
        let a = cache.add_sequence();
        let b = cache.add_sequence();
        let s3 = cache.add_sequence();
        // Interleaved appends, in varying batch orders, so the blocks alternate.
        for round in 0..6 {
            let mut batch = vec![
                (a, 1 + rng.below(4)),
                (b, 1 + rng.below(5)),
                (s3, 1 + rng.below(3)),
            ];
            batch.rotate_left(round % 3);
            append_random(&mut cache, &mut model, &mut rng, &batch);
        }
        for s in [a, b, s3] {
            model.check(&cache, s);
        }
        // Free the middle sequence; its blocks are reused, out of order.
        let freed: BTreeSet<u32> = cache
            .blocks()
            .block_table(b)
            .unwrap()
            .iter()
            .copied()
            .collect();
        cache.free_sequence(b).unwrap();
        model.remove(b, c.layers);
        assert_eq!(cache.seq_len(b), Err(Error::UnknownSequence(b.0)));
        let d = cache.add_sequence();
        append_random(&mut cache, &mut model, &mut rng, &[(d, 9), (a, 6)]);
        append_random(&mut cache, &mut model, &mut rng, &[(s3, 5), (d, 2)]);
        // Roll a back and regrow it over a freed block.
        let len_a = cache.seq_len(a).unwrap();
        cache.truncate(a, len_a - 5).unwrap();
        model.truncate(a, c.layers, (len_a - 5) * c.kv_heads * c.head_dim);
        append_random(&mut cache, &mut model, &mut rng, &[(a, 7), (s3, 1)]);

        let used: BTreeSet<u32> = [a, s3, d]
            .iter()
            .flat_map(|&s| cache.blocks().block_table(s).unwrap().to_vec())
            .collect();
        assert!(!freed.is_disjoint(&used), "freed blocks were reused");
        let scattered = [a, s3, d].iter().any(|&s| {
            let t = cache.blocks().block_table(s).unwrap();
            t.windows(2).any(|w| w[1] != w[0] + 1)
        });
        assert!(scattered, "block tables are not contiguous");
        check_invariants(cache.blocks(), c.num_blocks, c.block_size);
        for s in [a, s3, d] {
            model.check(&cache, s);
        }
    }
}

#[test]
fn decode_of_a_single_token_returns_its_values() {
    // Softmax over one key is 1: the output is the dequantized V of that token.
    let mut rng = Rng::new(5);
    let c = config(1, 2, 16, 4, 4, KvDtype::Int8, int4(16));
    let mut cache = KvCache::new(cpu(), c).unwrap();
    let mut model = Model::default();
    let s = cache.add_sequence();
    append_random(&mut cache, &mut model, &mut rng, &[(s, 1)]);
    let q = rng.normals(4 * 16);
    let out = cache.decode(0, &[s], &q, &AttnParams::new(4)).unwrap();
    let v = expected(c.v_dtype, 16, &model.v[&(s.0, 0)]);
    for h in 0..4 {
        let want = &v[(h / 2) * 16..][..16];
        for (o, w) in out[h * 16..][..16].iter().zip(want) {
            assert!(
                (o - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "head {h}: {o} vs {w}"
            );
        }
    }
}

#[test]
fn memory_report() {
    let c = CacheConfig::new(2, 4, 128, 256);
    let mut cache = KvCache::new(cpu(), c).unwrap();
    let m = cache.memory();
    assert_eq!(m.bytes_per_token, 2 * 4 * (132 + 132));
    assert_eq!(m.f16_bytes_per_token, 2 * 4 * 2 * 128 * 2);
    assert_eq!(m.f32_bytes_per_token, 2 * 4 * 2 * 128 * 4);
    assert!((m.saving_vs_f16() - (1.0 - 132.0 / 256.0)).abs() < 1e-12);
    assert!((m.saving_vs_f32() - (1.0 - 132.0 / 512.0)).abs() < 1e-12);
    assert_eq!(m.bytes_reserved, m.bytes_per_token * 256);
    assert_eq!((m.bytes_used, m.tokens), (0, 0));
    // What is reserved is what the pools hold.
    let mut words = 0;
    for layer in 0..2 {
        let (k, v) = cache.pools(layer).unwrap();
        words += k.data.words() + k.side.words() + v.data.words() + v.side.words();
    }
    assert_eq!(words * 4, m.bytes_reserved);

    let s = cache.add_sequence();
    let row = 4 * 128;
    cache
        .append(
            &[(s, 20)],
            &vec![0.5; 2 * 20 * row],
            &vec![-0.5; 2 * 20 * row],
        )
        .unwrap();
    let m = cache.memory();
    assert_eq!(m.tokens, 20);
    assert_eq!(m.bytes_used, 2 * 16 * m.bytes_per_token, "two blocks of 16");

    // Mixed K int8 / V int4 g32 and all-F16.
    let mixed = KvCache::new(cpu(), c.with_dtypes(KvDtype::Int8, I4G32)).unwrap();
    let m = mixed.memory();
    assert_eq!(m.bytes_per_token, 2 * 4 * (132 + 80));
    assert!((m.saving_vs_f16() - (1.0 - 212.0 / 512.0)).abs() < 1e-12);
    let f16 = KvCache::new(cpu(), c.with_dtypes(KvDtype::F16, KvDtype::F16)).unwrap();
    let m = f16.memory();
    assert_eq!(m.bytes_per_token, m.f16_bytes_per_token);
    assert_eq!(m.saving_vs_f16(), 0.0);
    assert!((m.saving_vs_f32() - 0.5).abs() < 1e-12);
    let i4 = KvCache::new(cpu(), c.with_dtypes(int4(128), int4(128))).unwrap();
    assert!((i4.memory().saving_vs_f16() - (1.0 - 68.0 / 256.0)).abs() < 1e-12);
}

// ---------------------------------------------------------------------------
// Bad input leaves the cache unchanged
// ---------------------------------------------------------------------------

/// Decides whether an error is the expected one.
type ErrorCheck<'a> = Box<dyn Fn(&Error) -> bool + 'a>;

/// A cache with two sequences holding data, and its host model.
fn populated(k_dt: KvDtype, v_dt: KvDtype) -> (KvCache, Model, SeqId, SeqId) {
    let mut rng = Rng::new(6);
    let c = config(2, 2, 16, 4, 5, k_dt, v_dt);
    let mut cache = KvCache::new(cpu(), c).unwrap();
    let mut model = Model::default();
    let a = cache.add_sequence();
    let b = cache.add_sequence();
    append_random(&mut cache, &mut model, &mut rng, &[(a, 6), (b, 3)]);
    (cache, model, a, b)
}

#[test]
fn bad_append_is_an_error_and_changes_nothing() {
    for (k_dt, v_dt) in [(KvDtype::Int8, int4(8)), (KvDtype::F16, KvDtype::Int8)] {
        let (mut cache, model, a, b) = populated(k_dt, v_dt);
        let row = 2 * 16;
        let per_tok = 2 * row; // two layers
        let good = vec![0.25f32; 2 * per_tok];
        let before = snapshot(&cache);
        let check = |cache: &mut KvCache,
                     batch: &[(SeqId, usize)],
                     k: &[f32],
                     v: &[f32],
                     want: &dyn Fn(&Error) -> bool| {
            match cache.append(batch, k, v) {
                Err(e) => assert!(want(&e), "{batch:?}: unexpected {e:?}"),
                Ok(()) => panic!("{batch:?}: append succeeded"),
            }
            assert_eq!(snapshot(cache), before, "{batch:?}: cache changed");
        };
        // Wrong lengths.
        check(&mut cache, &[(a, 2)], &good[1..], &good, &|e| {
            *e == Error::ShapeMismatch {
                what: "k",
                expected: 2 * per_tok,
                got: 2 * per_tok - 1,
            }
        });
        check(&mut cache, &[(a, 2)], &good, &good[..per_tok], &|e| {
            matches!(e, Error::ShapeMismatch { what: "v", .. })
        });
        check(
            &mut cache,
            &[(a, 1)],
            &good,
            &good,
            &|e| matches!(e, Error::ShapeMismatch { what: "k", expected, got } if *expected == per_tok && *got == 2 * per_tok),
        );
        // Non-finite and out-of-f16-range values, wherever they are.
        for (i, bad) in [
            (0, f32::NAN),
            (5, f32::INFINITY),
            (per_tok + 3, 1e6),
            (2 * per_tok - 1, f32::NEG_INFINITY),
        ] {
            let mut k = good.clone();
            k[i] = bad;
            check(
                &mut cache,
                &[(a, 2)],
                &k,
                &good,
                &|e| matches!(e, Error::NonFinite { what: "k", index, .. } if *index == i),
            );
            check(
                &mut cache,
                &[(b, 1), (a, 1)],
                &good,
                &k,
                &|e| matches!(e, Error::NonFinite { what: "v", index, value } if *index == i && value.to_bits() == bad.to_bits()),
            );
        }
        // Unknown and duplicate sequences.
        check(&mut cache, &[(SeqId(42), 2)], &good, &good, &|e| {
            *e == Error::UnknownSequence(42)
        });
        check(&mut cache, &[(a, 1), (SeqId(42), 1)], &good, &good, &|e| {
            *e == Error::UnknownSequence(42)
        });
        check(&mut cache, &[(a, 1), (a, 1)], &good, &good, &|e| {
            *e == Error::DuplicateSequence(a.0)
        });
        // Too many tokens: 5 blocks of 4, a holds 2 blocks, b 1; 2 free (+2 slots in a, +1 in b).
        let n = 12;
        let big = vec![0.5f32; n * per_tok];
        check(&mut cache, &[(a, n)], &big, &big, &|e| {
            *e == Error::CapacityExceeded { needed: 3, free: 2 }
        });
        let (k, v) = (vec![0.5f32; 11 * per_tok], vec![0.5f32; 11 * per_tok]);
        check(&mut cache, &[(a, 7), (b, 4)], &k, &v, &|e| {
            matches!(e, Error::CapacityExceeded { .. })
        });
        // A freed sequence is unknown.
        cache.free_sequence(b).unwrap();
        let before_b = snapshot(&cache);
        assert_eq!(
            cache.append(&[(b, 1)], &good[..per_tok], &good[..per_tok]),
            Err(Error::UnknownSequence(b.0))
        );
        assert_eq!(snapshot(&cache), before_b);
        // The data of a is intact after all of it.
        model.check(&cache, a);
    }
}

#[test]
fn huge_append_counts_do_not_overflow() {
    let (mut cache, _, a, b) = populated(KvDtype::Int8, KvDtype::Int8);
    let before = snapshot(&cache);
    let e = cache.append(
        &[(a, usize::MAX / 2 + 1), (b, usize::MAX / 2 + 1)],
        &[],
        &[],
    );
    assert!(e.is_err());
    let e = cache.append(&[(a, usize::MAX / 16)], &[], &[]);
    assert!(e.is_err());
    assert_eq!(snapshot(&cache), before);
}

#[test]
fn bad_write_is_an_error_and_changes_nothing() {
    let (mut cache, _, a, b) = populated(int4(16), KvDtype::Int8);
    let row = 2 * 16;
    let r = cache.extend(&[(a, 2), (b, 1)]).unwrap();
    let good = vec![1.5f32; 3 * row];
    let before = snapshot(&cache);
    let cases: Vec<(usize, Vec<f32>, Vec<f32>, ErrorCheck)> = vec![
        (
            0,
            good[1..].to_vec(),
            good.clone(),
            Box::new(|e| {
                matches!(
                    e,
                    Error::ShapeMismatch {
                        what: "k",
                        expected: 96,
                        got: 95
                    }
                )
            }),
        ),
        (
            1,
            good.clone(),
            vec![0.0; 4 * row],
            Box::new(|e| {
                matches!(
                    e,
                    Error::ShapeMismatch {
                        what: "v",
                        expected: 96,
                        got: 128
                    }
                )
            }),
        ),
        (
            0,
            {
                let mut k = good.clone();
                k[40] = f32::NAN;
                k
            },
            good.clone(),
            Box::new(|e| {
                matches!(
                    e,
                    Error::NonFinite {
                        what: "k",
                        index: 40,
                        ..
                    }
                )
            }),
        ),
        (
            1,
            good.clone(),
            {
                let mut v = good.clone();
                v[95] = -65505.0;
                v
            },
            Box::new(|e| {
                matches!(
                    e,
                    Error::NonFinite {
                        what: "v",
                        index: 95,
                        ..
                    }
                )
            }),
        ),
        (
            2,
            good.clone(),
            good.clone(),
            Box::new(|e| {
                *e == Error::OutOfRange {
                    what: "layer",
                    value: 2,
                    limit: 2,
                }
            }),
        ),
        (
            usize::MAX,
            good.clone(),
            good.clone(),
            Box::new(|e| matches!(e, Error::OutOfRange { what: "layer", .. })),
        ),
    ];
    for (i, (layer, k, v, want)) in cases.into_iter().enumerate() {
        match cache.write(layer, &r, &k, &v) {
            Err(e) => assert!(want(&e), "case {i}: unexpected {e:?}"),
            Ok(()) => panic!("case {i}: write succeeded"),
        }
        assert_eq!(snapshot(&cache), before, "case {i}: cache changed");
    }
    // The good write still works with the same reservation.
    cache.write(0, &r, &good, &good).unwrap();
    cache.write(1, &r, &good, &good).unwrap();
    assert_eq!(cache.seq_len(a), Ok(8));
}

#[test]
fn stale_reservation_is_rejected() {
    let (mut cache, mut model, a, b) = populated(KvDtype::Int8, int4(16));
    let row = 2 * 16;
    let x = vec![0.75f32; row];
    let is_stale = |e: Result<(), Error>| matches!(e, Err(Error::StaleReservation));

    // Another extend makes the first reservation stale.
    let r1 = cache.extend(&[(a, 1)]).unwrap();
    let r2 = cache.extend(&[(b, 1)]).unwrap();
    let before = snapshot(&cache);
    assert!(is_stale(cache.write(0, &r1, &x, &x)));
    assert_eq!(snapshot(&cache), before);
    cache.write(0, &r2, &x, &x).unwrap();

    // So do append, truncate and free.
    let r3 = cache.extend(&[(a, 1)]).unwrap();
    let k = vec![0.1f32; 2 * row];
    cache.append(&[(b, 1)], &k, &k).unwrap();
    let before = snapshot(&cache);
    assert!(is_stale(cache.write(1, &r3, &x, &x)));
    assert_eq!(snapshot(&cache), before);

    let r4 = cache.extend(&[(a, 1)]).unwrap();
    cache.truncate(a, 6).unwrap();
    assert!(is_stale(cache.write(0, &r4, &x, &x)));

    let c = cache.add_sequence();
    let r5 = cache.extend(&[(c, 1)]).unwrap();
    cache.free_sequence(b).unwrap();
    let before = snapshot(&cache);
    assert!(is_stale(cache.write(0, &r5, &x, &x)));
    assert_eq!(snapshot(&cache), before);

    // A failed extend does not invalidate the current reservation.
    let r6 = cache.extend(&[(a, 1)]).unwrap();
    assert!(matches!(
        cache.extend(&[(a, 1000)]),
        Err(Error::CapacityExceeded { .. })
    ));
    assert!(matches!(
        cache.extend(&[(SeqId(77), 1)]),
        Err(Error::UnknownSequence(77))
    ));
    let y: Vec<f32> = (0..row).map(|i| i as f32 * 0.01).collect();
    cache.write(0, &r6, &y, &y).unwrap();
    cache.write(1, &r6, &y, &y).unwrap();
    // a was truncated to 6, then grew by r6: position 6 holds y.
    model.truncate(a, 2, 6 * row);
    for l in 0..2 {
        model.push(a, l, &y, &y);
    }
    model.check(&cache, a);
}

#[test]
fn bad_decode_and_prefill_are_errors_and_change_nothing() {
    let (cache, _, a, b) = populated(KvDtype::Int8, int4(8));
    let before = snapshot(&cache);
    let p = AttnParams::new(4);
    let q1 = vec![0.1f32; 4 * 16];
    let q2 = vec![0.1f32; 2 * 4 * 16];
    // Good calls work.
    assert_eq!(cache.decode(1, &[a, b], &q2, &p).unwrap().len(), q2.len());
    assert_eq!(
        cache.prefill(0, &[(a, 2)], &q2, &p).unwrap().len(),
        q2.len()
    );
    assert_eq!(cache.decode(0, &[], &[], &p), Ok(vec![]));

    let mut nan = q2.clone();
    nan[70] = f32::NAN;
    let mut big = q1.clone();
    big[3] = 1e6;
    let checks: Vec<(Result<Vec<f32>, Error>, ErrorCheck)> = vec![
        (
            cache.decode(0, &[a, b], &q1, &p),
            Box::new(|e| {
                *e == Error::ShapeMismatch {
                    what: "q",
                    expected: 128,
                    got: 64,
                }
            }),
        ),
        (
            cache.decode(0, &[a], &q2, &p),
            Box::new(|e| matches!(e, Error::ShapeMismatch { what: "q", .. })),
        ),
        (
            cache.prefill(0, &[(a, 3)], &q2, &p),
            Box::new(|e| {
                matches!(
                    e,
                    Error::ShapeMismatch {
                        what: "q",
                        expected: 192,
                        got: 128
                    }
                )
            }),
        ),
        (
            cache.decode(0, &[a, b], &nan, &p),
            Box::new(|e| {
                matches!(
                    e,
                    Error::NonFinite {
                        what: "q",
                        index: 70,
                        ..
                    }
                )
            }),
        ),
        (
            cache.prefill(1, &[(b, 1)], &big, &p),
            Box::new(|e| {
                matches!(
                    e,
                    Error::NonFinite {
                        what: "q",
                        index: 3,
                        ..
                    }
                )
            }),
        ),
        (
            cache.decode(0, &[SeqId(9)], &q1, &p),
            Box::new(|e| *e == Error::UnknownSequence(9)),
        ),
        (
            cache.prefill(0, &[(a, 1), (SeqId(9), 1)], &q2, &p),
            Box::new(|e| *e == Error::UnknownSequence(9)),
        ),
        (
            cache.decode(0, &[a, a], &q2, &p),
            Box::new(move |e| *e == Error::DuplicateSequence(a.0)),
        ),
        (
            cache.decode(2, &[a], &q1, &p),
            Box::new(|e| {
                *e == Error::OutOfRange {
                    what: "layer",
                    value: 2,
                    limit: 2,
                }
            }),
        ),
        (
            cache.prefill(7, &[(a, 1)], &q1, &p),
            Box::new(|e| {
                matches!(
                    e,
                    Error::OutOfRange {
                        what: "layer",
                        value: 7,
                        ..
                    }
                )
            }),
        ),
        // More queries than cached tokens, or none.
        (
            cache.prefill(0, &[(b, 4)], &vec![0.0; 4 * 64], &p),
            Box::new(|e| {
                matches!(
                    e,
                    Error::OutOfRange {
                        value: 4,
                        limit: 4,
                        ..
                    }
                )
            }),
        ),
        (
            cache.prefill(0, &[(b, 0)], &[], &p),
            Box::new(|e| matches!(e, Error::OutOfRange { value: 0, .. })),
        ),
        // q_heads not a multiple of kv_heads.
        (
            cache.decode(0, &[a], &[0.0; 3 * 16], &AttnParams::new(3)),
            Box::new(|e| matches!(e, Error::InvalidConfig(_))),
        ),
    ];
    for (i, (got, want)) in checks.into_iter().enumerate() {
        match got {
            Err(e) => assert!(want(&e), "case {i}: unexpected {e:?}"),
            Ok(_) => panic!("case {i}: succeeded"),
        }
    }
    // An empty sequence has nothing to attend to.
    assert_eq!(snapshot(&cache), before);
    let mut cache = cache;
    let e = cache.add_sequence();
    let before = snapshot(&cache);
    assert!(matches!(
        cache.decode(0, &[e], &q1, &p),
        Err(Error::OutOfRange {
            value: 1,
            limit: 1,
            ..
        })
    ));
    assert_eq!(snapshot(&cache), before);
}

#[test]
fn truncate_and_free_errors() {
    let (mut cache, model, a, b) = populated(KvDtype::F16, KvDtype::Int8);
    let before = snapshot(&cache);
    assert_eq!(
        cache.truncate(a, 7),
        Err(Error::OutOfRange {
            what: "truncate length",
            value: 7,
            limit: 7
        })
    );
    assert_eq!(cache.truncate(SeqId(5), 0), Err(Error::UnknownSequence(5)));
    assert_eq!(
        cache.free_sequence(SeqId(5)),
        Err(Error::UnknownSequence(5))
    );
    assert!(matches!(
        cache.pools(2),
        Err(Error::OutOfRange { what: "layer", .. })
    ));
    assert_eq!(snapshot(&cache), before);
    model.check(&cache, a);
    model.check(&cache, b);
}

/// A reservation made by one cache is refused by another, even at the same epoch.
#[test]
fn reservation_from_another_cache_is_rejected() {
    let cfg = CacheConfig::new(1, 1, 8, 32);
    let cpu = || -> Arc<dyn kvq::Backend> { Arc::new(CpuBackend::new()) };
    let (mut a, mut b) = (
        KvCache::new(cpu(), cfg).unwrap(),
        KvCache::new(cpu(), cfg).unwrap(),
    );
    let (sa, sb) = (a.add_sequence(), b.add_sequence());
    let ra = a.extend(&[(sa, 1)]).unwrap();
    let _rb = b.extend(&[(sb, 1)]).unwrap();
    let x = vec![1.0f32; 8];
    assert_eq!(b.write(0, &ra, &x, &x), Err(Error::StaleReservation));
}
