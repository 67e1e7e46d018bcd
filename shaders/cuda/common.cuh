// Shared by kvq's CUDA kernels, prepended to each when NVRTC compiles it: integer
// types, exact f16 conversions by PTX (NVRTC ships no cuda_fp16.h), code unpacking
// and the pool layout of DESIGN §2. Mirrors shaders/common.wgsl.

typedef unsigned int u32;
typedef unsigned long long u64;

// f32 -> IEEE binary16 bits, round to nearest even (the CPU reference's rounding).
__device__ __forceinline__ u32 f16_bits(float x) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

// IEEE binary16 bits (low 16 bits of h) -> f32, exactly.
__device__ __forceinline__ float f16_value(u32 h) {
    float f;
    asm("{ .reg .b16 lo, hi; mov.b32 {lo, hi}, %1; cvt.f32.f16 %0, lo; }" : "=f"(f) : "r"(h));
    return f;
}

// The two f16 of a word, low half first.
__device__ __forceinline__ float2 f16x2_value(u32 w) {
    float2 f;
    asm("{ .reg .b16 lo, hi; mov.b32 {lo, hi}, %2; cvt.f32.f16 %0, lo; cvt.f32.f16 %1, hi; }"
        : "=f"(f.x), "=f"(f.y) : "r"(w));
    return f;
}

// Code c of an Int8 word (signed byte c, lowest first) as f32: the byte, offset by
// 128, in the mantissa of 2^23, less 2^23 + 128 — exact, and no int-to-float.
__device__ __forceinline__ float int8_code(u32 w, int c) {
    u32 u = ((w ^ 0x80808080u) >> (8 * c)) & 0xffu;
    return __uint_as_float(0x4B000000u | u) - 8388736.0f;
}

// Code c of an Int4 word (nibble c, lowest first) as f32, the same way.
__device__ __forceinline__ float int4_code(u32 w, int c) {
    return __uint_as_float(0x4B000000u | ((w >> (4 * c)) & 0xfu)) - 8388608.0f;
}

// BF16 and FP8 (DESIGN §1), as shaders/common.wgsl: a pool's code within its
// packing is 0 (F16 / Int8), 1 (BF16 / FP8 E4M3) or 2 (FP8 E5M2).

// f32 -> bfloat16 bits, round to nearest even (a NaN stays a quiet NaN).
__device__ __forceinline__ u32 bf16_bits(float x) {
    u32 b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (b >> 16) | 0x40u;
    }
    return (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
}

// x as a 16-bit value: f16 (code 0) or bf16 (code 1) bits.
__device__ __forceinline__ u32 half_bits(float x, u32 code) {
    return code == 1 ? bf16_bits(x) : f16_bits(x);
}

// The two 16-bit values of a word, low half first: f16 (code 0) or bf16 (code 1).
__device__ __forceinline__ float2 pair_value(u32 w, u32 code) {
    if (code == 1) {
        return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
    }
    return f16x2_value(w);
}

// FP8 byte c as f32: E4M3 (code 1: 3 mantissa bits, bias 7) or E5M2 (2: 2, 15).
__device__ __forceinline__ float fp8_value(u32 c, u32 code) {
    const u32 mb = code == 2 ? 2 : 3, bias = code == 2 ? 15 : 7;
    const u32 e = (c >> mb) & ((1u << (7 - mb)) - 1), f = c & ((1u << mb) - 1);
    float mag = e == 0 ? (float)f * __uint_as_float((128 - bias - mb) << 23)
                       : __uint_as_float(((e + 127 - bias) << 23) | (f << (23 - mb)));
    return (c & 0x80u) ? -mag : mag;
}

// y as an FP8 byte: round to nearest even in integers, saturated to the largest
// finite value (NaN too), never a NaN or Inf code.
__device__ __forceinline__ u32 fp8_bits(float y, u32 code) {
    const u32 mb = code == 2 ? 2 : 3, bias = code == 2 ? 15 : 7, max_code = code == 2 ? 0x7bu : 0x7eu;
    const u32 b = __float_as_uint(y), sign = (b >> 24) & 0x80u, a = b & 0x7fffffffu;
    u32 r = max_code;
    if (a <= 0x7f800000u) {
        if (a >= (128 - bias) << 23) {
            const u32 t = a - ((127 - bias) << 23), shift = 23 - mb;
            r = (t + (1u << (shift - 1)) - 1 + ((t >> shift) & 1u)) >> shift;
        } else {
            r = (u32)rintf(__uint_as_float(a) * __uint_as_float((126 + bias + mb) << 23));
        }
    }
    return sign | min(r, max_code);
}

// Byte e of a word as f32 (times the pool's scale later): Int8 (code 0) or FP8.
__device__ __forceinline__ float byte_value(u32 w, int e, u32 code) {
    return code == 0 ? int8_code(w, e) : fp8_value((w >> (8 * e)) & 0xffu, code);
}

// Largest code magnitude of a byte format: what absmax maps to.
__device__ __forceinline__ float byte_max(u32 code) {
    return code == 0 ? 127.0f : code == 1 ? 448.0f : 57344.0f;
}

// Row of (pool slot, head) in a pool: ((block * kv_heads + head) * block_size + offset).
__device__ __forceinline__ u32 pool_row(u32 slot, u32 head, u32 kv_heads, u32 block_size) {
    return ((slot / block_size) * kv_heads + head) * block_size + slot % block_size;
}

// In-place Walsh–Hadamard rotation of the first n (a power of two) entries of x,
// times norm: butterflies of stride 1, 2, 4, … as src/quant/rotation.rs.
__device__ void hadamard(float* x, u32 n, float norm) {
    for (u32 h = 1; h < n; h *= 2) {
        for (u32 i = 0; i < n; i += 2 * h) {
            for (u32 j = i; j < i + h; j++) {
                float a = x[j];
                float b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
    }
    for (u32 i = 0; i < n; i++) {
        x[i] *= norm;
    }
}

// Element i of a tensor of f32, or of f16 two per word.
__device__ __forceinline__ float elem_at(const u32* t, u32 i, u32 is_f16) {
    if (is_f16) {
        return f16_value(t[i / 2] >> (16 * (i % 2)));
    }
    return __uint_as_float(t[i]);
}
