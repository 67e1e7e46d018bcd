// Per-row kernels, one thread per (token, kv head): quantize-append (DESIGN §1,
// into its pool slot, DESIGN §2; rotated pools rotate first) and dequantize (for
// tests: the vector attention sees, rotated back), and for Int4Channel K pools the
// seal of the blocks an append fills. The dtype and shape are parameters; these
// kernels are not on attention's hot path. CUDA twins of
// shaders/quantize_append.wgsl, shaders/dequantize.wgsl and shaders/seal.wgsl; CPU
// twins in src/cpu/.

struct RowParams {
    u32 tokens;
    u32 kv_heads;
    u32 block_size;
    u32 capacity; // slots from slot0 on: slots past them are skipped
    u32 dtype;    // packing: 0 16-bit pairs, 1 bytes + scale, 2 Int4, 3 Int4 per channel
    u32 head_dim;
    u32 group;    // Int4
    u32 rotate;
    float norm;   // 1/sqrt(head_dim), correctly rounded
    u32 src_f16;  // append: the source holds f16
    u32 code;     // format within the packing: 0 F16 / Int8, 1 BF16 / FP8 E4M3, 2 FP8 E5M2
    u32 slot0;    // slots count from it (an Int4Channel pool's open blocks: from its capacity)
    u32 open_base; // Int4Channel: where the open blocks start in `side`, in words
    u32 pad;
};

// This thread's (token, kv head) r, in a grid folded into 2-D, and its pool row;
// false where it has none.
__device__ __forceinline__ bool row_of(const RowParams& P, const u32* slots, u32* rr, u32* row) {
    u32 r = blockIdx.y * gridDim.x * blockDim.x + blockIdx.x * blockDim.x + threadIdx.x;
    *rr = r;
    if (r >= P.tokens * P.kv_heads) {
        return false;
    }
    u32 slot = slots[r / P.kv_heads] - P.slot0; // below slot0: wraps past the capacity
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

// The vector of pool row `row`, as the CPU reference dequantizes it.
__device__ void dequantize_row(const RowParams& P, const u32* data, const u32* side, u32 row, float* x) {
    const u32 d = P.head_dim;
    for (u32 i = 0; i < d; i++) {
        if (P.dtype == 3) {
            u32 s = side[(row / P.block_size) * d + i];
            x[i] = __fadd_rn(f16_value(s >> 16), __fmul_rn(int4_code(data[row * (d / 8) + i / 8], i % 8), f16_value(s)));
        } else if (P.dtype == 0) {
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
}

extern "C" __global__ void dequantize(RowParams P, const u32* slots, const u32* data,
                                      const u32* side, float* dst) {
    u32 r, row;
    const u32 d = P.head_dim;
    float x[256];
    // An Int4Channel pool's slots past its capacity are in its open blocks (F16).
    u32 first = blockIdx.y * gridDim.x * blockDim.x + blockIdx.x * blockDim.x + threadIdx.x;
    if (P.dtype == 3 && first < P.tokens * P.kv_heads && slots[first / P.kv_heads] >= P.capacity) {
        r = first;
        u32 open = pool_row(slots[r / P.kv_heads] - P.capacity, r % P.kv_heads, P.kv_heads, P.block_size);
        for (u32 i = 0; i < d; i++) {
            float2 h = pair_value(side[P.open_base + open * (d / 2) + i / 2], 0);
            x[i] = i % 2 ? h.y : h.x;
        }
    } else {
        if (!row_of(P, slots, &r, &row)) {
            return;
        }
        dequantize_row(P, data, side, row, x);
    }
    if (P.rotate) {
        hadamard(x, d, P.norm);
    }
    for (u32 i = 0; i < d; i++) {
        dst[r * d + i] = x[i];
    }
}

// Seal (CUDA twin of shaders/seal.wgsl): one thread per (seal, kv head, 8 channels)
// quantizes those channels of a block the append fills, its first `from_open` keys
// from the sequence's open block (F16 in `side` from open_base), the rest staged
// F16 by quantize_append; writes their (f16 scale, f16 min) and one code word a token.
struct SealParams {
    u32 seals;
    u32 kv_heads;
    u32 block_size;
    u32 head_dim;
    u32 open_base;
    u32 pad0, pad1, pad2;
};

__device__ __forceinline__ void seal_values(const SealParams& P, const u32* stage, const u32* side,
                                            const u32* seal, u32 h, u32 s, u32 o, float* x) {
    u32 from_open = seal[2];
    const u32* src;
    if (s < from_open) {
        src = side + P.open_base + ((seal[1] * P.kv_heads + h) * P.block_size + s) * (P.head_dim / 2) + 4 * o;
    } else {
        src = stage + ((seal[3] + s - from_open) * P.kv_heads + h) * (P.head_dim / 2) + 4 * o;
    }
    for (u32 i = 0; i < 4; i++) {
        float2 v = pair_value(src[i], 0);
        x[2 * i] = v.x;
        x[2 * i + 1] = v.y;
    }
}

extern "C" __global__ void seal(SealParams P, const u32* stage, const u32* seals, u32* data, u32* side) {
    const u32 octets = P.head_dim / 8;
    u32 i = blockIdx.y * gridDim.x * blockDim.x + blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= P.seals * P.kv_heads * octets) {
        return;
    }
    const u32 o = i % octets, h = (i / octets) % P.kv_heads;
    const u32* seal = seals + 4 * (i / (octets * P.kv_heads));
    const u32 block = seal[0];
    float lo[8], hi[8], x[8];
    for (u32 c = 0; c < 8; c++) {
        lo[c] = 3.0e38f;
        hi[c] = -3.0e38f;
    }
    for (u32 s = 0; s < P.block_size; s++) {
        seal_values(P, stage, side, seal, h, s, o, x);
        for (u32 c = 0; c < 8; c++) {
            lo[c] = fminf(lo[c], x[c]);
            hi[c] = fmaxf(hi[c], x[c]);
        }
    }
    float scale[8], low[8];
    const u32 factors = (block * P.kv_heads + h) * P.head_dim + 8 * o;
    for (u32 c = 0; c < 8; c++) {
        u32 s16 = f16_bits((hi[c] - lo[c]) / 15.0f);
        u32 l16 = f16_bits(lo[c]);
        side[factors + c] = s16 | (l16 << 16);
        scale[c] = f16_value(s16);
        low[c] = f16_value(l16);
    }
    for (u32 s = 0; s < P.block_size; s++) {
        seal_values(P, stage, side, seal, h, s, o, x);
        u32 word = 0;
        for (u32 c = 0; c < 8; c++) {
            if (scale[c] != 0.0f) {
                float q = fminf(fmaxf(rintf((x[c] - low[c]) / scale[c]), 0.0f), 15.0f);
                word |= (u32)q << (4 * c);
            }
        }
        data[((block * P.kv_heads + h) * P.block_size + s) * (P.head_dim / 8) + o] = word;
    }
}
