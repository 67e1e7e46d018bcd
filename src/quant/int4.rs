//! Int4: asymmetric, group-wise; per group one u32 of (f16 scale low, f16 min high).

use half::f16;

/// Quantizes `x` into nibbles (element 8i in the lowest nibble) and one side word per group.
pub fn quantize_int4(x: &[f32], group: usize, data: &mut [u32], side: &mut [u32]) {
    data.fill(0);
    for (g, (xs, s)) in x.chunks_exact(group).zip(side.iter_mut()).enumerate() {
        let lo = xs.iter().fold(f32::INFINITY, |m, &v| m.min(v));
        let hi = xs.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let scale16 = f16::from_f32((hi - lo) / 15.0);
        let lo16 = f16::from_f32(lo);
        *s = scale16.to_bits() as u32 | ((lo16.to_bits() as u32) << 16);
        let (scale, lo) = (scale16.to_f32(), lo16.to_f32());
        if scale == 0.0 {
            continue;
        }
        for (i, &v) in xs.iter().enumerate() {
            let q = ((v - lo) / scale).round_ties_even().clamp(0.0, 15.0) as u32;
            let e = g * group + i;
            data[e / 8] |= q << (4 * (e % 8));
        }
    }
}

/// Dequantizes: `min + q * scale`, per group.
pub fn dequantize_int4(data: &[u32], side: &[u32], group: usize, out: &mut [f32]) {
    for (e, o) in out.iter_mut().enumerate() {
        let s = side[e / group];
        let scale = f16::from_bits(s as u16).to_f32();
        let lo = f16::from_bits((s >> 16) as u16).to_f32();
        let q = (data[e / 8] >> (4 * (e % 8))) & 0xF;
        *o = lo + q as f32 * scale;
    }
}
