//! The dtype advisor: the most accurate measured choice that fits a budget, an
//! error that says how many bytes are missing, and the step down under pressure.

use kvq::advisor::{KvShape, MEASURED, advise, choices, next_more_compact};
use kvq::{Error, KvDtype};

/// A 7B-class model: 32 layers, 8 kv heads, head_dim 128.
const SEVEN_B: KvShape = KvShape {
    layers: 32,
    kv_heads: 8,
    head_dim: 128,
};
/// 32k context x 8 sequences.
const TOKENS: usize = 32 * 1024 * 8;
const GIB: u64 = 1 << 30;

#[test]
fn every_measured_choice_parses_and_is_sized() {
    let all = choices(SEVEN_B, TOKENS);
    assert_eq!(all.len(), MEASURED.len());
    for c in &all {
        let per_token = (c.k.bytes_per_token_head(128) + c.v.bytes_per_token_head(128)) as u64;
        assert_eq!(c.bytes, per_token * 32 * 8 * TOKENS as u64);
        assert!(c.nmse > 0.0);
    }
    // head_dim 96 cannot be rotated nor hold Int4 groups of 64.
    let odd = KvShape {
        head_dim: 96,
        ..SEVEN_B
    };
    assert!(choices(odd, 1).iter().all(|c| !c.rotate));
    assert!(
        choices(odd, 1)
            .iter()
            .all(|c| c.k != KvDtype::Int4 { group: 64 })
    );
}

#[test]
fn the_most_accurate_choice_that_fits() {
    // Everything fits: the most accurate of all.
    let c = advise(1 << 40, SEVEN_B, TOKENS).unwrap();
    assert_eq!((c.k, c.v, c.rotate), (KvDtype::F16, KvDtype::F16, true));
    // 24 GiB: F16 and BF16 (32 GiB) do not fit; rotated INT8 (16.5 GiB) is the most
    // accurate that does, ahead of FP8.
    let c = advise(24 * GIB, SEVEN_B, TOKENS).unwrap();
    assert_eq!((c.k, c.v, c.rotate), (KvDtype::Int8, KvDtype::Int8, true));
    assert_eq!(c.bytes, 264 * 32 * 8 * TOKENS as u64);
    // 12 GiB: only the 4-bit pairs fit; keys per channel (int4c, as many bytes as
    // int4 group 32) rotated are the most accurate.
    let c = advise(12 * GIB, SEVEN_B, TOKENS).unwrap();
    let g32 = KvDtype::Int4 { group: 32 };
    assert_eq!((c.k, c.v, c.rotate), (KvDtype::Int4Channel, g32, true));
    assert_eq!(c.bytes, 2 * 80 * 32 * 8 * TOKENS as u64);
    for c in choices(SEVEN_B, TOKENS) {
        let best = advise(c.bytes, SEVEN_B, TOKENS).unwrap();
        assert!(best.bytes <= c.bytes && best.nmse <= c.nmse);
    }
}

#[test]
fn over_budget_says_how_many_bytes_are_missing() {
    let needed = 144 * 32 * 8 * TOKENS as u64; // int4:g64, the most compact
    match advise(4 * GIB, SEVEN_B, TOKENS) {
        Err(e @ Error::OverBudget { .. }) => {
            assert_eq!(
                e,
                Error::OverBudget {
                    needed,
                    budget: 4 * GIB
                }
            );
            let msg = e.to_string();
            assert!(msg.contains(&(needed - 4 * GIB).to_string()), "{msg}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn pressure_steps_down_to_fewer_bytes() {
    let d = 128;
    let f16 = KvDtype::F16;
    let next = next_more_compact(f16, f16, d).unwrap();
    assert_eq!(
        (next.k, next.v, next.rotate),
        (KvDtype::Int8, KvDtype::Int8, true)
    );
    let next = next_more_compact(KvDtype::Int8, KvDtype::Int8, d).unwrap();
    let g32 = KvDtype::Int4 { group: 32 };
    assert_eq!((next.k, next.v, next.rotate), (KvDtype::Int8, g32, true));
    // Every step takes fewer bytes, and the chain ends.
    let (mut k, mut v, mut steps) = (f16, f16, 0);
    while let Some(n) = next_more_compact(k, v, d) {
        let bytes = |a: KvDtype, b: KvDtype| a.bytes_per_token_head(d) + b.bytes_per_token_head(d);
        assert!(bytes(n.k, n.v) < bytes(k, v));
        (k, v, steps) = (n.k, n.v, steps + 1);
    }
    assert_eq!(k, KvDtype::Int4 { group: 64 });
    assert!(steps >= 3);
}
