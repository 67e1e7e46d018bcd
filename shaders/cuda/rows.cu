// Per-row kernels, one thread per (token, kv head): quantize-append (DESIGN §1,
// into its pool slot, DESIGN §2; rotated pools rotate first) and dequantize (for
// tests: the vector attention sees, rotated back). The dtype and shape are
// parameters; these kernels are not on attention's hot path. CUDA twins of
// shaders/quantize_append.wgsl and shaders/dequantize.wgsl; CPU twins in src/cpu/.

struct RowParams {
    u32 tokens;
    u32 kv_heads;
    u32 block_size;
    u32 capacity; // num_blocks * block_size: slots at or past it are skipped
    u32 dtype;    // packing: 0 16-bit pairs, 1 bytes + scale, 2 Int4
    u32 head_dim;
    u32 group;    // Int4
    u32 rotate;
    float norm;   // 1/sqrt(head_dim), correctly rounded
    u32 src_f16;  // append: the source holds f16
    u32 code;     // format within the packing: 0 F16 / Int8, 1 BF16 / FP8 E4M3, 2 FP8 E5M2
    u32 pad1;
};

// This thread's (token, kv head) r, in a grid folded into 2-D, and its pool row;
// false where it has none.
__device__ __forceinline__ bool row_of(const RowParams& P, const u32* slots, u32* rr, u32* row) {
    u32 r = blockIdx.y * gridDim.x * blockDim.x + blockIdx.x * blockDim.x + threadIdx.x;
    *rr = r;
    if (r >= P.tokens * P.kv_heads) {
        return false;
    }
    u32 slot = slots[r / P.kv_heads];
    if (slot >= P.capacity) {
        return false;
    }
    *row = pool_row(slot, r % P.kv_heads, P.kv_heads, P.block_size);
    return true;
}

extern "C" __global__ void quantize_append(RowParams P, const u32* src, const u32* slots,
                                           u32* data, u32* side) {
    u32 r, row;
    if (!row_of(P, slots, &r, &row)) {
        return;
    }
    const u32 d = P.head_dim;
    float x[256];
    for (u32 i = 0; i < d; i++) {
        x[i] = elem_at(src, r * d + i, P.src_f16);
    }
    if (P.rotate) {
        hadamard(x, d, P.norm);
    }
    if (P.dtype == 0) {
        for (u32 w = 0; w < d / 2; w++) {
            data[row * (d / 2) + w] = half_bits(x[2 * w], P.code) | (half_bits(x[2 * w + 1], P.code) << 16);
        }
    } else if (P.dtype == 1) {
        float absmax = 0.0f;
        for (u32 i = 0; i < d; i++) {
            absmax = fmaxf(absmax, fabsf(x[i]));
        }
        float scale = absmax / byte_max(P.code);
        side[row] = __float_as_uint(scale);
        for (u32 w = 0; w < d / 4; w++) {
            u32 word = 0;
            if (scale != 0.0f) {
                for (u32 j = 0; j < 4; j++) {
                    float y = x[4 * w + j] / scale;
                    u32 c;
                    if (P.code == 0) {
                        c = (u32)(int)fminf(fmaxf(rintf(y), -127.0f), 127.0f) & 0xffu;
                    } else {
                        c = fp8_bits(y, P.code);
                    }
                    word |= c << (8 * j);
                }
            }
            data[row * (d / 4) + w] = word;
        }
    } else {
        const u32 g = P.group;
        for (u32 k = 0; k < d / g; k++) {
            float lo = x[k * g];
            float hi = lo;
            for (u32 i = 1; i < g; i++) {
                lo = fminf(lo, x[k * g + i]);
                hi = fmaxf(hi, x[k * g + i]);
            }
            u32 s16 = f16_bits((hi - lo) / 15.0f);
            u32 l16 = f16_bits(lo);
            side[row * (d / g) + k] = s16 | (l16 << 16);
            float scale = f16_value(s16);
            float lo_r = f16_value(l16);
            for (u32 w = 0; w < g / 8; w++) {
                u32 word = 0;
                if (scale != 0.0f) {
                    for (u32 j = 0; j < 8; j++) {
                        float q = fminf(fmaxf(rintf((x[k * g + 8 * w + j] - lo_r) / scale), 0.0f), 15.0f);
                        word |= (u32)q << (4 * j);
                    }
                }
                data[row * (d / 8) + k * (g / 8) + w] = word;
            }
        }
    }
}

extern "C" __global__ void dequantize(RowParams P, const u32* slots, const u32* data,
                                      const u32* side, float* dst) {
    u32 r, row;
    if (!row_of(P, slots, &r, &row)) {
        return;
    }
    const u32 d = P.head_dim;
    float x[256];
    for (u32 i = 0; i < d; i++) {
        if (P.dtype == 0) {
            float2 h = pair_value(data[row * (d / 2) + i / 2], P.code);
            x[i] = i % 2 ? h.y : h.x;
        } else if (P.dtype == 1) {
            x[i] = __fmul_rn(byte_value(data[row * (d / 4) + i / 4], i % 4, P.code), __uint_as_float(side[row]));
        } else {
            u32 s = side[row * (d / P.group) + i / P.group];
            // min + code * scale, rounded twice as the CPU reference does (no FMA).
            x[i] = __fadd_rn(f16_value(s >> 16), __fmul_rn(int4_code(data[row * (d / 8) + i / 8], i % 8), f16_value(s)));
        }
    }
    if (P.rotate) {
        hadamard(x, d, P.norm);
    }
    for (u32 i = 0; i < d; i++) {
        dst[r * d + i] = x[i];
    }
}
