// Shared helpers, prepended to every kernel when it is loaded.

// f32 -> IEEE binary16 bits, round to nearest even, done in integers so that every
// device rounds exactly like the CPU reference (WGSL leaves the rounding of
// pack2x16float to the implementation).
fn f16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let a = b & 0x7fffffffu;
    if (a > 0x7f800000u) {
        return sign | 0x7e00u; // NaN
    }
    if (a >= 0x47800000u) {
        return sign | 0x7c00u; // overflow to infinity
    }
    if (a >= 0x38800000u) {
        // Normal f16: rebias the exponent by 112 and round off 13 mantissa bits.
        let m = a - 0x38000000u;
        return sign | ((m + 0x0fffu + ((m >> 13u) & 1u)) >> 13u);
    }
    // Subnormal f16 or zero: units of 2^-24; scaling by 2^24 is exact, round() ties to even.
    return sign | u32(round(bitcast<f32>(a) * 16777216.0));
}

// IEEE binary16 bits (low 16 bits of h) -> f32, exactly, subnormals included.
fn f16_value(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0u) {
        return bitcast<f32>(sign | bitcast<u32>(f32(m) * 5.9604645e-8));
    }
    if (e == 31u) {
        return bitcast<f32>(sign | 0x7f800000u | (m << 13u));
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

// Row of (pool slot, head) in a pool: ((block * kv_heads + head) * block_size + offset).
fn pool_row(slot: u32, head: u32, kv_heads: u32, block_size: u32) -> u32 {
    return ((slot / block_size) * kv_heads + head) * block_size + slot % block_size;
}

// Flat invocation index of a 1-D grid that may be folded into 2-D (x, y) when it
// exceeds the per-dimension workgroup limit.
fn flat_index(gid: vec3<u32>, nwg: vec3<u32>, wg_size: u32) -> u32 {
    return gid.y * nwg.x * wg_size + gid.x;
}

// In-place Walsh–Hadamard rotation of the first n (a power of two) entries of x,
// times norm = 1/sqrt(n): butterflies of stride 1, 2, 4, … as in
// src/quant/rotation.rs, so every backend rotates bit-identically.
fn hadamard(x: ptr<private, array<f32, 256>>, n: u32, norm: f32) {
    for (var h = 1u; h < n; h *= 2u) {
        for (var i = 0u; i < n; i += 2u * h) {
            for (var j = i; j < i + h; j++) {
                let a = (*x)[j];
                let b = (*x)[j + h];
                (*x)[j] = a + b;
                (*x)[j + h] = a - b;
            }
        }
    }
    for (var i = 0u; i < n; i++) {
        (*x)[i] *= norm;
    }
}
