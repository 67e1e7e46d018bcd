//! F16 storage: IEEE binary16, two per u32, element 2i in the low half.

use half::f16;

/// Packs `x` as f16 (round to nearest even), two per word.
pub fn quantize_f16(x: &[f32], data: &mut [u32]) {
    for (w, pair) in data.iter_mut().zip(x.chunks_exact(2)) {
        let lo = f16::from_f32(pair[0]).to_bits() as u32;
        let hi = f16::from_f32(pair[1]).to_bits() as u32;
        *w = lo | (hi << 16);
    }
}

/// Unpacks f16 pairs into `out`.
pub fn dequantize_f16(data: &[u32], out: &mut [f32]) {
    for (pair, &w) in out.chunks_exact_mut(2).zip(data) {
        pair[0] = f16::from_bits(w as u16).to_f32();
        pair[1] = f16::from_bits((w >> 16) as u16).to_f32();
    }
}
