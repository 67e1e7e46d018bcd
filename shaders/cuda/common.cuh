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
