//! Storage formats of DESIGN §1: sizes, names, and the bit-exact quantizers.

mod common;

use common::Rng;
use half::f16;
use kvq::quant::{self, F16_MAX};
use kvq::{CacheConfig, Error, KvDtype};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

const I4G32: KvDtype = KvDtype::Int4 { group: 32 };
const I4G128: KvDtype = KvDtype::Int4 { group: 128 };

fn int4(group: u32) -> KvDtype {
    KvDtype::Int4 { group }
}

/// Quantizes `x` and returns (data, side) words.
fn encode(dtype: KvDtype, x: &[f32]) -> (Vec<u32>, Vec<u32>) {
    let d = x.len();
    let mut data = vec![0xDEAD_BEEF; dtype.words_per_head(d)];
    let mut side = vec![0xDEAD_BEEF; dtype.side_words_per_head(d)];
    quant::quantize(dtype, x, &mut data, &mut side);
    (data, side)
}

fn decode(dtype: KvDtype, data: &[u32], side: &[u32], d: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; d];
    quant::dequantize(dtype, data, side, &mut out);
    out
}

/// Signed Int8 code of element `e`.
fn int8_code(data: &[u32], e: usize) -> i8 {
    (data[e / 4] >> (8 * (e % 4))) as u8 as i8
}

/// Int4 code of element `e`.
fn int4_code(data: &[u32], e: usize) -> u32 {
    (data[e / 8] >> (4 * (e % 8))) & 0xF
}

/// (scale, min) of an Int4 side word.
fn int4_side(w: u32) -> (f32, f32) {
    (
        f16::from_bits(w as u16).to_f32(),
        f16::from_bits((w >> 16) as u16).to_f32(),
    )
}

fn f16_bits(x: f32) -> u32 {
    f16::from_f32(x).to_bits() as u32
}

// ---------------------------------------------------------------------------
// Sizes
// ---------------------------------------------------------------------------

#[test]
fn design_table_bytes_per_token_head_at_d128() {
    assert_eq!(KvDtype::F16.bytes_per_token_head(128), 256);
    assert_eq!(KvDtype::Int8.bytes_per_token_head(128), 132);
    assert_eq!(I4G32.bytes_per_token_head(128), 80);
    assert_eq!(I4G128.bytes_per_token_head(128), 68);
    // 64 + 4·D/group for the other groups.
    assert_eq!(int4(64).bytes_per_token_head(128), 72);
    assert_eq!(int4(16).bytes_per_token_head(128), 96);
    assert_eq!(int4(8).bytes_per_token_head(128), 128);
}

#[test]
fn words_per_head_for_several_head_dims() {
    // (head_dim, f16 words, int8 words, int4 words)
    for (d, f, i8w, i4w) in [
        (64, 32, 16, 8),
        (80, 40, 20, 10),
        (96, 48, 24, 12),
        (128, 64, 32, 16),
        (256, 128, 64, 32),
    ] {
        assert_eq!(KvDtype::F16.words_per_head(d), f, "f16 d={d}");
        assert_eq!(KvDtype::Int8.words_per_head(d), i8w, "int8 d={d}");
        assert_eq!(int4(8).words_per_head(d), i4w, "int4 d={d}");
        assert_eq!(KvDtype::int4_default(d).words_per_head(d), i4w);
        assert_eq!(KvDtype::F16.side_words_per_head(d), 0);
        assert_eq!(KvDtype::Int8.side_words_per_head(d), 1);
        assert_eq!(int4(8).side_words_per_head(d), d / 8);
        assert_eq!(int4(16).side_words_per_head(d), d / 16);
        assert_eq!(int4(d as u32).side_words_per_head(d), 1);
    }
    for (d, g, side) in [
        (64, 32, 2),
        (96, 32, 3),
        (128, 32, 4),
        (256, 32, 8),
        (80, 16, 5),
    ] {
        let dt = KvDtype::int4_default(d);
        assert_eq!(dt, int4(g));
        assert_eq!(dt.side_words_per_head(d), side, "d={d}");
        assert_eq!(dt.bytes_per_token_head(d), 4 * (d / 8 + side));
    }
    assert_eq!(KvDtype::F16.bytes_per_token_head(80), 160);
    assert_eq!(KvDtype::Int8.bytes_per_token_head(80), 84);
    assert_eq!(KvDtype::Int8.bytes_per_token_head(256), 260);
    assert_eq!(I4G32.bytes_per_token_head(256), 128 + 32);
}

#[test]
fn bits_per_element_and_memory_factors() {
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    let cases = [
        // (dtype, head_dim, bits, vs f16, vs f32)
        (KvDtype::F16, 128, 16.0, 1.0, 0.5),
        (KvDtype::Int8, 128, 8.25, 0.515625, 0.2578125),
        (I4G32, 128, 5.0, 0.3125, 0.15625),
        (I4G128, 128, 4.25, 0.265625, 0.1328125),
        (KvDtype::Int8, 64, 8.5, 0.53125, 0.265625),
        (KvDtype::Int8, 256, 8.125, 0.5078125, 0.25390625),
        (int4(16), 80, 6.0, 0.375, 0.1875),
        (KvDtype::F16, 80, 16.0, 1.0, 0.5),
    ];
    for (dt, d, bits, f16f, f32f) in cases {
        assert!(
            close(dt.bits_per_element(d), bits),
            "{dt} d={d}: {}",
            dt.bits_per_element(d)
        );
        assert!(close(dt.factor_vs_f16(d), f16f), "{dt} d={d}");
        assert!(close(dt.factor_vs_f32(d), f32f), "{dt} d={d}");
    }
    // Int8 at 128 is 132/256 of F16.
    assert!(close(KvDtype::Int8.factor_vs_f16(128), 132.0 / 256.0));
    assert!(close(I4G32.factor_vs_f16(128), 80.0 / 256.0));
}

// ---------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------

#[test]
fn display_names() {
    assert_eq!(KvDtype::F16.to_string(), "f16");
    assert_eq!(KvDtype::Int8.to_string(), "int8");
    assert_eq!(I4G32.to_string(), "int4");
    assert_eq!(int4(64).to_string(), "int4:g64");
    assert_eq!(I4G128.to_string(), "int4:g128");
    assert_eq!(int4(8).to_string(), "int4:g8");
    assert_eq!(int4(16).to_string(), "int4:g16");
}

#[test]
fn parse_names() {
    let ok = [
        ("f16", KvDtype::F16),
        ("int8", KvDtype::Int8),
        ("int4", I4G32),
        ("int4:g32", I4G32),
        ("int4:g8", int4(8)),
        ("int4:g16", int4(16)),
        ("int4:g64", int4(64)),
        ("int4:g128", I4G128),
        // Case and surrounding whitespace are ignored.
        ("F16", KvDtype::F16),
        ("INT8", KvDtype::Int8),
        ("Int4", I4G32),
        ("INT4:G64", int4(64)),
        ("  int8\n", KvDtype::Int8),
        ("\tint4:g128 ", I4G128),
    ];
    for (s, want) in ok {
        assert_eq!(s.parse::<KvDtype>(), Ok(want), "{s:?}");
    }
}

#[test]
fn display_parse_round_trip() {
    let all = [
        KvDtype::F16,
        KvDtype::Int8,
        int4(8),
        int4(16),
        int4(24),
        int4(32),
        int4(64),
        int4(128),
        int4(256),
    ];
    for dt in all {
        let s = dt.to_string();
        assert_eq!(s.parse::<KvDtype>(), Ok(dt), "{s}");
    }
}

#[test]
fn parse_rejects_unknown_names() {
    let bad = [
        "",
        " ",
        "int3",
        "int4:g0",
        "int4:g12",
        "int4:g4",
        "int4:gx",
        "int4:g",
        "int4:g-8",
        "int4:g 64",
        "int4:64",
        "int4g64",
        "int4:g64:g32",
        "int4:g99999999999",
        "fp32",
        "f32",
        "bf8",
        "fp8-e3m4",
        "fp8e4m3",
        "int16",
        "int 8",
        "q8_0",
    ];
    for s in bad {
        match s.parse::<KvDtype>() {
            Err(Error::UnknownDtype(name)) => {
                assert_eq!(name, s, "the error names the input as given");
                let msg = Error::UnknownDtype(name).to_string();
                assert!(msg.contains("int4:gN"), "{msg}");
            }
            other => panic!("{s:?} parsed as {other:?}"),
        }
    }
}

#[test]
fn check_accepts_valid_shapes() {
    for d in [8, 16, 24, 64, 80, 96, 128, 256] {
        KvDtype::F16.check(d).unwrap();
        KvDtype::Int8.check(d).unwrap();
        KvDtype::int4_default(d).check(d).unwrap();
        int4(8).check(d).unwrap();
        int4(d as u32).check(d).unwrap();
    }
    int4(64).check(128).unwrap();
    int4(128).check(128).unwrap();
    int4(40).check(80).unwrap();
}

#[test]
fn check_rejects_bad_shapes() {
    let bad: &[(KvDtype, usize)] = &[
        (KvDtype::F16, 0),
        (KvDtype::Int8, 0),
        (I4G32, 0),
        (KvDtype::F16, 4),
        (KvDtype::Int8, 12),
        (KvDtype::Int8, 100),
        (KvDtype::F16, 127),
        (int4(8), 36),
        (I4G32, 80),      // 32 does not divide 80
        (I4G32, 48),      // nor 48
        (int4(64), 96),   // nor 64 96
        (int4(256), 128), // group larger than head_dim
        (int4(0), 128),
        (int4(4), 128), // not a multiple of 8
        (int4(12), 96),
    ];
    for &(dt, d) in bad {
        match dt.check(d) {
            Err(Error::Unsupported(msg)) => {
                assert!(msg.contains(&d.to_string()), "{msg}");
            }
            other => panic!("{dt:?} head_dim {d}: {other:?}"),
        }
    }
}

#[test]
fn int4_default_group() {
    for (d, g) in [
        (8, 8),
        (16, 16),
        (24, 8),
        (32, 32),
        (40, 8),
        (48, 16),
        (64, 32),
        (80, 16),
        (96, 32),
        (112, 16),
        (128, 32),
        (160, 32),
        (256, 32),
    ] {
        assert_eq!(KvDtype::int4_default(d), int4(g), "head_dim {d}");
        KvDtype::int4_default(d).check(d).unwrap();
    }
}

// ---------------------------------------------------------------------------
// Bit-exact encodings
// ---------------------------------------------------------------------------

#[test]
fn int8_codes_round_half_to_even_and_pack_little_endian() {
    // absmax 127 → scale exactly 1, so codes are round_ties_even(x).
    let x = [
        127.0, -63.5, 0.5, 1.5, // word 0
        2.5, -0.5, -1.5, -2.5, // word 1
        3.5, -127.0, 0.0, -0.0, // word 2
        126.5, -126.5, 0.49, -3.51, // word 3
    ];
    let (data, side) = encode(KvDtype::Int8, &x);
    assert_eq!(side, [1.0f32.to_bits()]);
    let want: [i8; 16] = [
        127, -64, 0, 2, 2, 0, -2, -2, 4, -127, 0, 0, 126, -126, 0, -4,
    ];
    for (e, &q) in want.iter().enumerate() {
        assert_eq!(int8_code(&data, e), q, "element {e} = {}", x[e]);
    }
    // Element 4i in the lowest byte, two's complement.
    assert_eq!(data[0], 0x0200_C07F);
    assert_eq!(data[1], 0xFEFE_0002);
    assert_eq!(data[2], 0x0000_8104);
    assert_eq!(data[3], 0xFC00_827E);
    let back = decode(KvDtype::Int8, &data, &side, x.len());
    let want_f: Vec<f32> = want.iter().map(|&q| q as f32).collect();
    assert_eq!(back, want_f);
}

#[test]
fn int8_scale_is_absmax_over_127() {
    let x = [0.25f32, -2.54, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    let (data, side) = encode(KvDtype::Int8, &x);
    let scale = 2.54f32 / 127.0;
    assert_eq!(side[0], scale.to_bits());
    for (e, &v) in x.iter().enumerate() {
        let q = (v / scale).round_ties_even().clamp(-127.0, 127.0) as i8;
        assert_eq!(int8_code(&data, e), q, "element {e}");
    }
    assert_eq!(int8_code(&data, 1), -127);
}

#[test]
fn int4_codes_and_nibble_order() {
    // Group 8, values 0..15 in two groups: lo 0, hi 15 → scale 1; codes = values.
    let x: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let (data, side) = encode(int4(8), &x);
    // Group 0 = 0..7: lo 0, hi 7, scale 7/15 rounded to f16; group 1 = 8..15: lo 8.
    let s = f16::from_f32(7.0 / 15.0);
    assert_eq!(side[0], s.to_bits() as u32);
    assert_eq!(side[1], s.to_bits() as u32 | (f16_bits(8.0) << 16));
    for e in 0..16 {
        let q = ((e % 8) as f32 / s.to_f32()).round_ties_even().min(15.0) as u32;
        assert_eq!(int4_code(&data, e), q, "element {e}");
    }
    assert_eq!(int4_code(&data, 7), 15);
    assert_eq!(int4_code(&data, 15), 15);

    // One group of 16 with scale exactly 1.
    let (data, side) = encode(int4(16), &x);
    assert_eq!(side, [f16_bits(1.0)]);
    // Element 8i in the lowest nibble.
    assert_eq!(data, [0x7654_3210, 0xFEDC_BA98]);

    // Negative minimum: [-8, -7, ..., 7] → lo16 = -8 (0xC800) high half, scale 1.
    let y: Vec<f32> = (0..16).map(|i| i as f32 - 8.0).collect();
    let (data, side) = encode(int4(16), &y);
    assert_eq!(side, [0xC800_3C00]);
    assert_eq!(data, [0x7654_3210, 0xFEDC_BA98]);
    assert_eq!(decode(int4(16), &data, &side, 16), y);

    // Reversed order reverses the nibbles.
    let z: Vec<f32> = (0..16).rev().map(|i| i as f32).collect();
    let (data, _) = encode(int4(16), &z);
    assert_eq!(data, [0x89AB_CDEF, 0x0123_4567]);
}

#[test]
fn int4_rounds_half_to_even() {
    // lo 0, hi 15 → scale 1; half-way values round to even.
    let x = [0.0f32, 15.0, 0.5, 1.5, 2.5, 3.5, 14.5, 13.5];
    let (data, side) = encode(int4(8), &x);
    assert_eq!(side, [f16_bits(1.0)]);
    let want = [0u32, 15, 0, 2, 2, 4, 14, 14];
    for (e, &q) in want.iter().enumerate() {
        assert_eq!(int4_code(&data, e), q, "element {e} = {}", x[e]);
    }
    assert_eq!(data[0], 0xEE42_20F0);
}

#[test]
fn int4_uses_f16_rounded_min_and_scale() {
    // lo = 0.1 is not an f16: the codes are computed from lo16 and scale16.
    let x = [0.1f32, 1.0, 2.0, 3.0, 0.7, 0.1, 0.1, 0.1];
    let (data, side) = encode(int4(8), &x);
    let lo16 = f16::from_f32(0.1);
    let s16 = f16::from_f32((3.0f32 - 0.1) / 15.0);
    assert_eq!(
        side[0],
        s16.to_bits() as u32 | ((lo16.to_bits() as u32) << 16)
    );
    let (scale, lo) = int4_side(side[0]);
    assert_eq!((scale, lo), (s16.to_f32(), lo16.to_f32()));
    for (e, &v) in x.iter().enumerate() {
        let q = ((v - lo) / scale).round_ties_even().clamp(0.0, 15.0) as u32;
        assert_eq!(int4_code(&data, e), q, "element {e}");
    }
    let back = decode(int4(8), &data, &side, 8);
    for (e, &b) in back.iter().enumerate() {
        assert_eq!(b, lo + int4_code(&data, e) as f32 * scale);
    }
}

#[test]
fn int4_groups_are_independent() {
    // Four groups of 8 with very different ranges.
    let mut x = vec![0.0f32; 32];
    for i in 0..8 {
        x[i] = i as f32 * 1000.0; // 0..7000
        x[8 + i] = -(i as f32) * 0.001;
        x[16 + i] = 5.0; // constant
        x[24 + i] = if i % 2 == 0 { -1.0 } else { 1.0 };
    }
    let (data, side) = encode(int4(8), &x);
    assert_eq!(side.len(), 4);
    let (s2, lo2) = int4_side(side[2]);
    assert_eq!((s2, lo2), (0.0, 5.0));
    for e in 16..24 {
        assert_eq!(int4_code(&data, e), 0);
    }
    let (s3, lo3) = int4_side(side[3]);
    assert_eq!(lo3, -1.0);
    assert_eq!(s3, f16::from_f32(2.0 / 15.0).to_f32());
    for e in 24..32 {
        let want = if e % 2 == 0 {
            0
        } else {
            ((2.0 / s3).round_ties_even() as u32).min(15)
        };
        assert_eq!(int4_code(&data, e), want, "element {e}");
    }
    let back = decode(int4(8), &data, &side, 32);
    for e in 0..32 {
        let (s, lo) = int4_side(side[e / 8]);
        assert_eq!(back[e], lo + int4_code(&data, e) as f32 * s);
    }
}

#[test]
fn f16_packs_element_2i_in_low_half() {
    let x = [1.0f32, -2.0, 0.5, 65504.0, -0.0, 0.0, 1e-8, 3.0e-5];
    let (data, side) = encode(KvDtype::F16, &x);
    assert!(side.is_empty());
    assert_eq!(data[0], 0xC000_3C00);
    assert_eq!(data[1], 0x7BFF_3800);
    assert_eq!(data[2], 0x0000_8000);
    assert_eq!(data[3], f16_bits(1e-8) | (f16_bits(3.0e-5) << 16));
    for (i, &w) in data.iter().enumerate() {
        assert_eq!(w & 0xFFFF, f16_bits(x[2 * i]));
        assert_eq!(w >> 16, f16_bits(x[2 * i + 1]));
    }
    // Round to nearest even: 2049 is halfway between the f16 values 2048 and 2050.
    let (data, _) = encode(KvDtype::F16, &[2049.0, 2051.0]);
    assert_eq!(decode(KvDtype::F16, &data, &[], 2), [2048.0, 2052.0]);
}

// ---------------------------------------------------------------------------
// Special vectors
// ---------------------------------------------------------------------------

#[test]
fn zeros() {
    for d in [8, 64, 128] {
        let x = vec![0.0f32; d];
        let (data, side) = encode(KvDtype::Int8, &x);
        assert_eq!(side, [0], "int8 scale 0");
        assert!(data.iter().all(|&w| w == 0));
        assert_eq!(quant::round_trip(KvDtype::Int8, &x), x);

        let dt = KvDtype::int4_default(d);
        let (data, side) = encode(dt, &x);
        assert!(data.iter().all(|&w| w == 0));
        assert!(side.iter().all(|&w| w == 0));
        assert_eq!(quant::round_trip(dt, &x), x);

        let (data, _) = encode(KvDtype::F16, &x);
        assert!(data.iter().all(|&w| w == 0));
        assert_eq!(quant::round_trip(KvDtype::F16, &x), x);
    }
    // Negative zeros are zeros too.
    let x = vec![-0.0f32; 8];
    let (data, side) = encode(KvDtype::Int8, &x);
    assert_eq!((data, side), (vec![0, 0], vec![0]));
}

#[test]
fn constant_vectors() {
    for c in [1.0f32, -3.25, 0.1, 1000.7, -65504.0, 65504.0, 1e-6] {
        let x = vec![c; 64];
        // Int4: scale16 = 0 → all codes 0, dequantizes to lo16.
        for g in [8u32, 32, 64] {
            let (data, side) = encode(int4(g), &x);
            assert!(data.iter().all(|&w| w == 0), "c={c} g={g}");
            for &s in &side {
                assert_eq!(s, f16_bits(c) << 16, "c={c} g={g}");
            }
            let lo16 = f16::from_f32(c).to_f32();
            assert!(quant::round_trip(int4(g), &x).iter().all(|&v| v == lo16));
        }
        // Int8: every code is ±127.
        let (data, side) = encode(KvDtype::Int8, &x);
        assert_eq!(side[0], (c.abs() / 127.0).to_bits());
        let q = if c > 0.0 { 127i8 } else { -127 };
        for e in 0..64 {
            assert_eq!(int8_code(&data, e), q, "c={c}");
        }
    }
}

#[test]
fn extremes() {
    let mut x = vec![0.0f32; 16];
    x[0] = F16_MAX;
    x[1] = -F16_MAX;
    x[2] = F16_MAX / 2.0;
    x[3] = 1.0;
    let (data, side) = encode(KvDtype::Int8, &x);
    assert_eq!(f32::from_bits(side[0]), F16_MAX / 127.0);
    assert_eq!(int8_code(&data, 0), 127);
    assert_eq!(int8_code(&data, 1), -127);
    assert_eq!(int8_code(&data, 2), 64); // 63.5 → 64 (even)
    assert_eq!(int8_code(&data, 3), 0);
    let back = decode(KvDtype::Int8, &data, &side, 16);
    assert_eq!(back[0], F16_MAX);
    assert_eq!(back[1], -F16_MAX);

    // Int4 over the whole f16 range: every value finite, ends exact-ish.
    let (data, side) = encode(int4(16), &x);
    let (s, lo) = int4_side(side[0]);
    assert!(s.is_finite() && s > 0.0);
    assert_eq!(lo, -F16_MAX);
    assert_eq!(int4_code(&data, 1), 0);
    assert_eq!(int4_code(&data, 0), 15);
    let back = decode(int4(16), &data, &side, 16);
    assert!(back.iter().all(|v| v.is_finite()));
    assert_eq!(back[1], -F16_MAX);
    assert!((back[0] - F16_MAX).abs() <= s / 2.0 + 1.0, "{}", back[0]);

    // F16 keeps ±65504 exactly.
    assert_eq!(quant::round_trip(KvDtype::F16, &x), x);
}

#[test]
fn tiny_values() {
    // Int8: tiny but normal f32 values quantize relative to their own absmax.
    let x: Vec<f32> = (0..16).map(|i| (i as f32 - 8.0) * 1e-20).collect();
    let back = quant::round_trip(KvDtype::Int8, &x);
    let scale = 8e-20f32 / 127.0;
    for (a, b) in x.iter().zip(&back) {
        assert!((a - b).abs() <= scale / 2.0 * 1.0001, "{a} vs {b}");
    }
    // Below f16's resolution Int4 collapses to lo16 (here 0) without NaN.
    let (data, side) = encode(int4(16), &x);
    assert!(data.iter().all(|&w| w == 0));
    // scale16 = +0 in the low half, lo16 = f16(-8e-20) = -0 in the high half.
    assert_eq!(side, [0x8000_0000]);
    assert!(quant::round_trip(int4(16), &x).iter().all(|&v| v == 0.0));
    // F16 flushes to ±0.
    for v in quant::round_trip(KvDtype::F16, &x) {
        assert_eq!(v, 0.0);
    }
    // Subnormal f32 input never produces NaN or Inf.
    let x: Vec<f32> = (0..8).map(|i| i as f32 * 1e-42).collect();
    for dt in [KvDtype::F16, KvDtype::Int8, int4(8)] {
        let back = quant::round_trip(dt, &x);
        for (a, b) in x.iter().zip(&back) {
            assert!(b.is_finite() && (a - b).abs() <= 1e-40, "{dt}: {a} vs {b}");
        }
    }
    // f16 subnormals survive F16 and Int4 scales.
    let x: Vec<f32> = (0..8).map(|i| i as f32 * 6.0e-8).collect();
    let back = quant::round_trip(KvDtype::F16, &x);
    for (a, b) in x.iter().zip(&back) {
        assert_eq!(*b, f16::from_f32(*a).to_f32());
    }
}

// ---------------------------------------------------------------------------
// check_finite
// ---------------------------------------------------------------------------

#[test]
fn check_finite_rejects_bad_values() {
    let cases = [
        (f32::NAN, 3),
        (f32::INFINITY, 0),
        (f32::NEG_INFINITY, 7),
        (65505.0, 5),
        (-70000.0, 1),
        (65504.01, 2),
        (f32::MAX, 6),
        (1e6, 4),
    ];
    for (bad, index) in cases {
        let mut x = vec![1.0f32; 8];
        x[index] = bad;
        // A later bad value is not the one reported.
        if index < 7 {
            x[7] = f32::NAN;
        }
        match quant::check_finite("k", &x) {
            Err(Error::NonFinite {
                what,
                index: i,
                value,
            }) => {
                assert_eq!(what, "k");
                assert_eq!(i, index, "{bad}");
                assert_eq!(value.to_bits(), bad.to_bits());
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
}

#[test]
fn check_finite_accepts_f16_range() {
    let x = [
        F16_MAX,
        -F16_MAX,
        0.0,
        -0.0,
        1e-45,
        -1e-30,
        65503.99,
        f16::MAX.to_f32(),
    ];
    quant::check_finite("v", &x).unwrap();
    quant::check_finite("v", &[]).unwrap();
    assert_eq!(F16_MAX, f16::MAX.to_f32());
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

/// Reference encoder written from DESIGN §1's text, to compare bit for bit.
fn reference_encode(dtype: KvDtype, x: &[f32]) -> (Vec<u32>, Vec<u32>) {
    let d = x.len();
    match dtype {
        KvDtype::F16 => {
            let data = (0..d / 2)
                .map(|i| f16_bits(x[2 * i]) | (f16_bits(x[2 * i + 1]) << 16))
                .collect();
            (data, vec![])
        }
        KvDtype::Int8 => {
            let absmax = x.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            let scale = if absmax == 0.0 { 0.0 } else { absmax / 127.0 };
            let mut data = vec![0u32; d / 4];
            for (e, &v) in x.iter().enumerate() {
                let q: i32 = if scale == 0.0 {
                    0
                } else {
                    (v / scale).round_ties_even().clamp(-127.0, 127.0) as i32
                };
                data[e / 4] |= ((q as i8 as u8) as u32) << (8 * (e % 4));
            }
            (data, vec![scale.to_bits()])
        }
        KvDtype::Int4 { group } => {
            let g = group as usize;
            let mut data = vec![0u32; d / 8];
            let mut side = vec![];
            for (gi, xs) in x.chunks(g).enumerate() {
                let lo = xs.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let s16 = f16::from_f32((hi - lo) / 15.0);
                let lo16 = f16::from_f32(lo);
                side.push(s16.to_bits() as u32 | ((lo16.to_bits() as u32) << 16));
                for (i, &v) in xs.iter().enumerate() {
                    let q = if s16.to_f32() == 0.0 {
                        0
                    } else {
                        ((v - lo16.to_f32()) / s16.to_f32())
                            .round_ties_even()
                            .clamp(0.0, 15.0) as u32
                    };
                    let e = gi * g + i;
                    data[e / 8] |= q << (4 * (e % 8));
                }
            }
            (data, side)
        }
        // Checked against the `half` crate and by exhaustive search (`mod bf16_fp8`).
        // Checked per block in tests/int4c.rs.
        KvDtype::Bf16 | KvDtype::Fp8E4M3 | KvDtype::Fp8E5M2 | KvDtype::Int4Channel => {
            unreachable!()
        }
    }
}

/// Largest error a correct quantizer may make on element `e` of `x`.
fn error_bound(dtype: KvDtype, x: &[f32], side: &[u32], e: usize) -> f32 {
    let v = x[e];
    let ulps = |m: f32| 4.0 * f32::EPSILON * m;
    match dtype {
        KvDtype::F16
        | KvDtype::Bf16
        | KvDtype::Fp8E4M3
        | KvDtype::Fp8E5M2
        | KvDtype::Int4Channel => unreachable!(),
        KvDtype::Int8 => {
            let scale = f32::from_bits(side[0]);
            // Subnormal scales lose relative precision: allow a tiny absolute slack.
            scale / 2.0 * (1.0 + 1e-6) + ulps(v.abs()) + 1e-38
        }
        KvDtype::Int4 { group } => {
            let (s16, lo16) = int4_side(side[e / group as usize]);
            let top = lo16 + 15.0 * s16;
            let outside = if v < lo16 {
                lo16 - v
            } else if v > top {
                v - top
            } else {
                0.0
            };
            (s16 / 2.0).max(outside) * (1.0 + 1e-6) + ulps(v.abs() + lo16.abs() + 15.0 * s16)
        }
    }
}

fn vectors() -> impl Strategy<Value = Vec<f32>> {
    let dims = prop::sample::select(vec![8usize, 16, 64, 80, 128]);
    let ranges = prop::sample::select(vec![
        (-F16_MAX, F16_MAX),
        (-1.0, 1.0),
        (-1e-3, 1e-3),
        (-1e-6, 1e-6),
        (0.0, 1.0),
        (999.0, 1001.0),
        (-60000.0, -59990.0),
        (-4.0, 100.0),
        (65000.0, F16_MAX),
    ]);
    (dims, ranges).prop_flat_map(|(d, (lo, hi))| prop::collection::vec(lo..=hi, d))
}

fn groups_for(d: usize) -> Vec<u32> {
    [8u32, 16, 32, 64, 128]
        .into_iter()
        .filter(|&g| d % g as usize == 0)
        .collect()
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn int8_round_trip_within_half_a_step(x in vectors()) {
        let d = x.len();
        let (data, side) = encode(KvDtype::Int8, &x);
        let back = decode(KvDtype::Int8, &data, &side, d);
        prop_assert_eq!(&back, &quant::round_trip(KvDtype::Int8, &x));
        let absmax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        prop_assert_eq!(side[0], (absmax / 127.0).to_bits());
        for e in 0..d {
            let err = (x[e] - back[e]).abs();
            let bound = error_bound(KvDtype::Int8, &x, &side, e);
            prop_assert!(err <= bound, "e={} x={} back={} err={} bound={}", e, x[e], back[e], err, bound);
            prop_assert!(int8_code(&data, e) != i8::MIN, "code -128 at {}", e);
        }
    }

    #[test]
    fn int4_round_trip_within_half_a_step(x in vectors()) {
        let d = x.len();
        for g in groups_for(d) {
            let dt = int4(g);
            let (data, side) = encode(dt, &x);
            let back = decode(dt, &data, &side, d);
            prop_assert_eq!(&back, &quant::round_trip(dt, &x));
            for e in 0..d {
                let err = (x[e] - back[e]).abs();
                let bound = error_bound(dt, &x, &side, e);
                prop_assert!(
                    err <= bound,
                    "g={} e={} x={} back={} err={} bound={} side={:#x}",
                    g, e, x[e], back[e], err, bound, side[e / g as usize]
                );
                prop_assert!(back[e].is_finite());
            }
        }
    }

    #[test]
    fn f16_round_trip_is_f16_rounding(x in vectors()) {
        let back = quant::round_trip(KvDtype::F16, &x);
        for (a, b) in x.iter().zip(&back) {
            prop_assert_eq!(b.to_bits(), f16::from_f32(*a).to_f32().to_bits());
        }
    }

    #[test]
    fn encodings_match_design_text_bit_for_bit(x in vectors()) {
        let d = x.len();
        let mut dtypes = vec![KvDtype::F16, KvDtype::Int8];
        dtypes.extend(groups_for(d).into_iter().map(int4));
        for dt in dtypes {
            let got = encode(dt, &x);
            let want = reference_encode(dt, &x);
            prop_assert_eq!(&got, &want, "{}", dt);
            // Decoding follows the same formulas.
            let back = decode(dt, &got.0, &got.1, d);
            for (e, b) in back.iter().enumerate() {
                let expect = match dt {
                    KvDtype::F16 => f16::from_f32(x[e]).to_f32().to_bits(),
                    KvDtype::Int8 => {
                        (int8_code(&got.0, e) as f32 * f32::from_bits(got.1[0])).to_bits()
                    }
                    KvDtype::Int4 { group } => {
                        let (s, lo) = int4_side(got.1[e / group as usize]);
                        (lo + int4_code(&got.0, e) as f32 * s).to_bits()
                    }
                    KvDtype::Bf16
                    | KvDtype::Fp8E4M3
                    | KvDtype::Fp8E5M2
                    | KvDtype::Int4Channel => unreachable!(),
                };
                prop_assert_eq!(b.to_bits(), expect, "{} element {}", dt, e);
            }
        }
    }

    #[test]
    fn check_finite_finds_first_bad_value(
        x in vectors(),
        pos in any::<prop::sample::Index>(),
        bad in prop::sample::select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 65505.0, -70000.0, 1e6]),
    ) {
        prop_assert!(quant::check_finite("x", &x).is_ok());
        let mut y = x.clone();
        let i = pos.index(y.len());
        y[i] = bad;
        match quant::check_finite("x", &y) {
            Err(Error::NonFinite { what, index, value }) => {
                prop_assert_eq!(what, "x");
                prop_assert_eq!(index, i);
                prop_assert_eq!(value.to_bits(), bad.to_bits());
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }
}

#[test]
fn deterministic_random_vectors_round_trip() {
    // Seeded normal data at several scales, as attention sees it.
    let mut rng = common::Rng::new(7);
    for d in [64usize, 80, 96, 128, 256] {
        for scale in [1e-3f32, 1.0, 30.0, 2000.0] {
            let x: Vec<f32> = rng.normals(d).iter().map(|v| v * scale).collect();
            for dt in [KvDtype::Int8, KvDtype::int4_default(d), int4(8)] {
                let (data, side) = encode(dt, &x);
                assert_eq!((data.clone(), side.clone()), reference_encode(dt, &x));
                let back = decode(dt, &data, &side, d);
                for e in 0..d {
                    let err = (x[e] - back[e]).abs();
                    assert!(err <= error_bound(dt, &x, &side, e), "{dt} d={d} e={e}");
                }
            }
        }
    }
}

#[test]
fn hadamard_is_orthogonal_and_its_own_inverse() {
    let mut rng = Rng::new(9);
    for n in [8usize, 64, 128, 256] {
        let x = rng.normals(n);
        let mut y = x.clone();
        quant::hadamard(&mut y);
        let norm = |v: &[f32]| v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
        assert!(
            (norm(&y) / norm(&x) - 1.0).abs() < 1e-5,
            "n {n}: norm changed"
        );
        quant::hadamard(&mut y);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5, "n {n}: H H x != x ({a} vs {b})");
        }
        // One outlier channel becomes a flat vector: what makes quantization easier.
        let mut e = vec![0.0f32; n];
        e[3] = 1.0;
        quant::hadamard(&mut e);
        let want = quant::hadamard_norm(n);
        assert!(
            e.iter().all(|v| (v.abs() - want).abs() < 1e-7),
            "n {n}: {e:?}"
        );
    }
}

#[test]
fn rotation_needs_a_power_of_two_head_dim() {
    let cfg = CacheConfig::new(1, 2, 96, 64).with_rotation(true);
    assert!(matches!(cfg.validate(), Err(Error::InvalidConfig(_))));
    assert!(
        CacheConfig::new(1, 2, 128, 64)
            .with_rotation(true)
            .validate()
            .is_ok()
    );
}

/// BF16 and FP8 (DESIGN §1): BF16 against the `half` crate's conversion; FP8
/// codes are the nearest (ties to even) to `x / scale`, saturating, never NaN or
/// infinite, with `scale = absmax / largest`.
mod bf16_fp8 {
    use super::*;
    use half::bf16;
    use kvq::quant::{E4M3, E5M2, Fp8};

    fn fp8(dtype: KvDtype) -> Fp8 {
        if dtype == KvDtype::Fp8E4M3 {
            E4M3
        } else {
            E5M2
        }
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn bf16_is_round_to_nearest_even(x in vectors()) {
            let d = x.len();
            let (data, side) = encode(KvDtype::Bf16, &x);
            prop_assert!(side.is_empty());
            for e in 0..d {
                let bits = (data[e / 2] >> (16 * (e % 2))) & 0xffff;
                prop_assert_eq!(bits as u16, bf16::from_f32(x[e]).to_bits());
            }
            let back = decode(KvDtype::Bf16, &data, &side, d);
            for e in 0..d {
                prop_assert_eq!(back[e], bf16::from_f32(x[e]).to_f32());
            }
        }

        #[test]
        fn fp8_codes_are_nearest_and_finite(x in vectors(), e5m2 in any::<bool>()) {
            let dtype = if e5m2 { KvDtype::Fp8E5M2 } else { KvDtype::Fp8E4M3 };
            let f = fp8(dtype);
            let d = x.len();
            let (data, side) = encode(dtype, &x);
            let absmax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = absmax / f.max;
            prop_assert_eq!(side[0], scale.to_bits());
            let back = decode(dtype, &data, &side, d);
            for e in 0..d {
                let c = (data[e / 4] >> (8 * (e % 4))) & 0xff;
                prop_assert!(c & 0x7f <= f.max_code, "NaN or Inf code {:#x}", c);
                if scale == 0.0 {
                    prop_assert_eq!(c, 0);
                    continue;
                }
                // The nearest code to x / scale, by search over every finite code.
                let y = x[e] / scale;
                let best = (0..=0xffu32)
                    .filter(|c| c & 0x7f <= f.max_code)
                    .map(|c| (f.decode(c) - y).abs())
                    .fold(f32::INFINITY, f32::min);
                prop_assert_eq!((f.decode(c) - y).abs(), best, "x {} y {}", x[e], y);
                prop_assert_eq!(back[e], f.decode(c) * scale);
            }
        }
    }

    #[test]
    fn names_and_sizes() {
        for (name, dtype, bits) in [
            ("bf16", KvDtype::Bf16, 16.0),
            ("fp8-e4m3", KvDtype::Fp8E4M3, 8.25),
            ("fp8-e5m2", KvDtype::Fp8E5M2, 8.25),
        ] {
            assert_eq!(name.parse::<KvDtype>().unwrap(), dtype);
            assert_eq!(dtype.to_string(), name);
            assert_eq!(dtype.bits_per_element(128), bits);
        }
        assert_eq!("fp8".parse::<KvDtype>().unwrap(), KvDtype::Fp8E4M3);
        assert_eq!("fp16".parse::<KvDtype>().unwrap(), KvDtype::F16);
        assert_eq!(KvDtype::Fp8E4M3.bytes_per_token_head(128), 132);
        assert_eq!(KvDtype::Bf16.bytes_per_token_head(128), 256);
    }
}
