//! Int8: symmetric per (token, head); `scale = absmax / 127`, four codes per u32.

/// Quantizes `x` into signed bytes (element 4i in the lowest byte) and an f32 scale.
pub fn quantize_int8(x: &[f32], data: &mut [u32], scale_bits: &mut u32) {
    let absmax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = absmax / 127.0;
    *scale_bits = scale.to_bits();
    for (w, quad) in data.iter_mut().zip(x.chunks_exact(4)) {
        *w = 0;
        if scale == 0.0 {
            continue;
        }
        for (i, &v) in quad.iter().enumerate() {
            let q = (v / scale).round_ties_even().clamp(-127.0, 127.0) as i8;
            *w |= (q as u8 as u32) << (8 * i);
        }
    }
}

/// Dequantizes: `q * scale`.
pub fn dequantize_int8(data: &[u32], scale_bits: u32, out: &mut [f32]) {
    let scale = f32::from_bits(scale_bits);
    for (quad, &w) in out.chunks_exact_mut(4).zip(data) {
        for (i, o) in quad.iter_mut().enumerate() {
            *o = ((w >> (8 * i)) as u8 as i8) as f32 * scale;
        }
    }
}
