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

// ---- codes of the storage formats (DESIGN §1) -----------------------------------
// A kernel specialises on a pool's packing (its *_DTYPE: 0 two 16-bit values a
// word, 1 four bytes and an f32 scale, 2 Int4) and on the format within it (its
// *_CODE: 0 F16 / Int8; 1 BF16 / FP8 E4M3; 2 FP8 E5M2).

// f32 -> bfloat16 bits, round to nearest even (a NaN stays a quiet NaN).
fn bf16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (b >> 16u) | 0x40u;
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

// x as a 16-bit value of a code-`code` pool: f16 (0) or bf16 (1) bits.
fn half_bits(x: f32, code: u32) -> u32 {
    if (code == 1u) {
        return bf16_bits(x);
    }
    return f16_bits(x);
}

// The two 16-bit values of a word, low half first: f16 (code 0) or bf16 (code 1).
fn pair_values(word: u32, code: u32) -> vec2<f32> {
    if (code == 1u) {
        return vec2<f32>(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u));
    }
    return unpack2x16float(word);
}

// The four signed Int8 codes of a word, low byte first.
fn int8_codes(word: u32) -> vec4<f32> {
    let w = bitcast<i32>(word);
    return vec4<f32>(vec4<i32>(w << 24u, w << 16u, w << 8u, w) >> vec4<u32>(24u));
}

// FP8 (OCP): E4M3 (code 1: 3 mantissa bits, bias 7, largest code 0x7e = 448) or
// E5M2 (code 2: 2 bits, bias 15, largest 0x7b = 57344).
fn fp8_mantissa(code: u32) -> u32 {
    return select(3u, 2u, code == 2u);
}
fn fp8_bias(code: u32) -> u32 {
    return select(7u, 15u, code == 2u);
}
fn fp8_max(code: u32) -> f32 {
    return select(448.0, 57344.0, code == 2u);
}

// The value of FP8 byte c, by bit manipulation.
fn fp8_value(c: u32, code: u32) -> f32 {
    let mb = fp8_mantissa(code);
    let bias = fp8_bias(code);
    let e = (c >> mb) & ((1u << (7u - mb)) - 1u);
    let f = c & ((1u << mb) - 1u);
    var mag = f32(f) * bitcast<f32>((128u - bias - mb) << 23u); // subnormal
    if (e != 0u) {
        mag = bitcast<f32>(((e + 127u - bias) << 23u) | (f << (23u - mb)));
    }
    return select(mag, -mag, (c & 0x80u) != 0u);
}

// y as an FP8 byte: round to nearest even in integers (as src/quant/fp8.rs),
// saturated to the largest finite value (NaN too), never a NaN or Inf code.
fn fp8_bits(y: f32, code: u32) -> u32 {
    let mb = fp8_mantissa(code);
    let bias = fp8_bias(code);
    let max_code = select(0x7eu, 0x7bu, code == 2u);
    let b = bitcast<u32>(y);
    let sign = (b >> 24u) & 0x80u;
    let a = b & 0x7fffffffu;
    var r = max_code;
    if (a <= 0x7f800000u) {
        if (a >= (128u - bias) << 23u) {
            let t = a - ((127u - bias) << 23u);
            let shift = 23u - mb;
            r = (t + (1u << (shift - 1u)) - 1u + ((t >> shift) & 1u)) >> shift;
        } else {
            // Subnormal: units of 2^(1 - bias - mb); scaling is exact, round() ties to even.
            r = u32(round(bitcast<f32>(a) * bitcast<f32>((126u + bias + mb) << 23u)));
        }
    }
    return sign | min(r, max_code);
}

// The four byte codes of a word, low byte first: Int8 (code 0) or FP8 (1, 2); the
// pool's f32 scale multiplies them.
fn byte_values(word: u32, code: u32) -> vec4<f32> {
    if (code == 0u) {
        return int8_codes(word);
    }
    return vec4<f32>(fp8_value(word & 0xffu, code), fp8_value((word >> 8u) & 0xffu, code),
                     fp8_value((word >> 16u) & 0xffu, code), fp8_value(word >> 24u, code));
}

// Largest code magnitude of a byte format: what absmax maps to.
fn byte_max(code: u32) -> f32 {
    if (code == 0u) {
        return 127.0;
    }
    return fp8_max(code);
}
