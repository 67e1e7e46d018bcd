//! BF16: the upper 16 bits of an f32, rounded to nearest even; two per u32.

/// f32 -> bfloat16 bits, round to nearest even (a NaN stays a quiet NaN).
pub fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if x.is_nan() {
        return (b >> 16) | 0x40;
    }
    (b + 0x7fff + ((b >> 16) & 1)) >> 16
}

/// bfloat16 bits (low 16 bits of `h`) -> f32, exactly.
pub fn bf16_value(h: u32) -> f32 {
    f32::from_bits(h << 16)
}

/// Stores `x` as bfloat16 pairs, element 2i in the low half of word i.
pub fn quantize_bf16(x: &[f32], data: &mut [u32]) {
    for (w, pair) in data.iter_mut().zip(x.chunks_exact(2)) {
        *w = bf16_bits(pair[0]) | (bf16_bits(pair[1]) << 16);
    }
}

/// Reads bfloat16 pairs back.
pub fn dequantize_bf16(data: &[u32], out: &mut [f32]) {
    for (pair, &w) in out.chunks_exact_mut(2).zip(data) {
        pair[0] = bf16_value(w & 0xffff);
        pair[1] = bf16_value(w >> 16);
    }
}
