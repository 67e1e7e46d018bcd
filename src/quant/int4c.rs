//! Int4Channel: a full block of one kv head quantized per channel across its tokens,
//! asymmetric, one u32 of (f16 scale low, f16 min high) per channel.

use half::f16;

/// Quantizes a block `x` (`[tokens, head_dim]`, the F16 values the open block held)
/// into `codes` (`[tokens, head_dim / 8]` words, element 8i of a token in the lowest
/// nibble) and `factors` (`[head_dim]`): channel c's codes are
/// `round_half_even((x - min_c) / scale_c)` clamped to 0..=15, with
/// `scale_c = f16((max_c - min_c) / 15)` and `min_c = f16(min over tokens)`.
pub fn quantize_int4c(x: &[f32], head_dim: usize, codes: &mut [u32], factors: &mut [u32]) {
    let words = head_dim / 8;
    codes.fill(0);
    for (c, f) in factors.iter_mut().enumerate().take(head_dim) {
        let column = x.chunks_exact(head_dim).map(|t| t[c]);
        let lo = column.clone().fold(f32::INFINITY, f32::min);
        let hi = column.clone().fold(f32::NEG_INFINITY, f32::max);
        let scale16 = f16::from_f32((hi - lo) / 15.0);
        let lo16 = f16::from_f32(lo);
        *f = scale16.to_bits() as u32 | ((lo16.to_bits() as u32) << 16);
        let (scale, lo) = (scale16.to_f32(), lo16.to_f32());
        if scale == 0.0 {
            continue;
        }
        for (t, v) in column.enumerate() {
            let q = ((v - lo) / scale).round_ties_even().clamp(0.0, 15.0) as u32;
            codes[t * words + c / 8] |= q << (4 * (c % 8));
        }
    }
}

/// Dequantizes token `t`'s codes (`head_dim / 8` words) with its block's `factors`:
/// `min_c + q * scale_c`.
pub fn dequantize_int4c(codes: &[u32], factors: &[u32], out: &mut [f32]) {
    for (c, o) in out.iter_mut().enumerate() {
        let f = factors[c];
        let scale = f16::from_bits(f as u16).to_f32();
        let lo = f16::from_bits((f >> 16) as u16).to_f32();
        let q = (codes[c / 8] >> (4 * (c % 8))) & 0xF;
        *o = lo + q as f32 * scale;
    }
}
