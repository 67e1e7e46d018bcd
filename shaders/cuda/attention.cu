// Dequant-fused attention for CUDA, one split of the keys (flash-decoding): the
// same work items, lanes and slots as shaders/attention.wgsl (read its header),
// with warp shuffles for the sum over a key's lanes, and the same partials, which
// attn_reduce.cu combines. Compiled per (K_DTYPE, V_DTYPE, DL, ROWS, KB), given by
// -D; everything else is a parameter. CPU twin: src/cpu/attention.rs.

#ifndef K_CODE
#define K_CODE 0 // format within the packing: 0 F16 / Int8, 1 BF16 / FP8 E4M3, 2 FP8 E5M2
#define V_CODE 0
#endif
#ifndef K_DTYPE
#define K_DTYPE 1 // packing: 0 16-bit pairs, 1 bytes + scale, 2 Int4, 3 Int4 per channel (common.cuh)
#define V_DTYPE 1
#define DL 16     // dims per lane: 8, 16 or 32
#define ROWS 4    // query rows of a block: QH heads x QB positions, at most 8
#define KB 4      // keys per slot and step; KB * ROWS <= 16
#endif

#define WG 64
#define K_PACK (K_DTYPE > 2 ? 2 : K_DTYPE) // Int4 per channel packs codes as Int4
#define K_LW (DL / (2 << K_PACK)) // words of a lane's slice of a K row: 1, 2 or 4
#define V_LW (DL / (2 << V_DTYPE))
#define NEG (-3.0e38f)

struct AttnParams {
    u32 kv_heads;
    u32 block_size;
    u32 q_heads;
    u32 ratio;       // q heads per kv head
    u32 splits;      // key splits per row block
    u32 split_len;   // keys per split
    u32 window;      // 0: off
    u32 work_offset; // where work items start in `work`
    float scale;
    float softcap;   // 0: off
    u32 open_base;   // Int4 per channel: where the open blocks start in k_side, in words
    u32 pad1;
};

// What attention.wgsl takes as override constants and CUDA as parameters.
struct AttnShape {
    u32 head_dim;
    u32 k_group;  // Int4 groups (at least 8 otherwise)
    u32 v_group;
    u32 qh;       // q heads per block (QH * QB = ROWS)
    u32 kt;       // lanes per slot: a power of two >= head_dim / DL, at most 32
    u32 rotate_q; // the K pool is Walsh–Hadamard rotated
    u32 q_f16;    // q holds f16
    float norm;   // 1/sqrt(head_dim)
};

// What one block computes: the work item of attn_common.wgsl's work_of.
struct Work {
    u32 kvh, h0, nh, q0, nq, pos0, table_offset, split, begin, end;
    u32 open, sealed; // Int4 per channel: keys [sealed, kv_len) are F16 in open block `open`
};

__device__ Work work_of(const AttnParams& P, const AttnShape& S, const u32* work) {
    const u32 qb = ROWS / S.qh;
    u32 item = P.work_offset + 2 * blockIdx.z;
    u32 seq = work[item];
    u32 first_q = work[item + 1];
    u32 kv_len = work[5 * seq], table_offset = work[5 * seq + 1];
    u32 q_offset = work[5 * seq + 2], q_len = work[5 * seq + 3];
    Work w;
    w.open = work[5 * seq + 4];
    w.sealed = kv_len - kv_len % P.block_size;
    w.nq = min(qb, q_len - first_q);
    w.pos0 = kv_len - q_len + first_q;
    u32 blocks = (P.ratio + S.qh - 1) / S.qh;
    w.kvh = blockIdx.x / blocks;
    u32 first_h = (blockIdx.x % blocks) * S.qh;
    u32 lo = 0;
    if (P.window > 0 && w.pos0 + 1 > P.window) {
        lo = w.pos0 + 1 - P.window;
    }
    if (K_DTYPE == 3) {
        lo -= lo % 8; // as attn_common.wgsl (keys below the window are masked anyway)
    }
    w.begin = lo + blockIdx.y * P.split_len;
    w.end = min(w.begin + P.split_len, w.pos0 + w.nq);
    w.h0 = w.kvh * P.ratio + first_h;
    w.nh = min(S.qh, P.ratio - first_h);
    w.q0 = q_offset + first_q;
    w.table_offset = table_offset;
    w.split = blockIdx.y;
    return w;
}

__device__ __forceinline__ bool has_row(const Work& w, const AttnShape& S, u32 r) {
    return r / S.qh < w.nq && r % S.qh < w.nh;
}

__device__ __forceinline__ u32 q_start(const Work& w, const AttnParams& P, const AttnShape& S, u32 r) {
    u32 qrow = w.q0 + min(r / S.qh, w.nq - 1);
    return (qrow * P.q_heads + w.h0 + min(r % S.qh, w.nh - 1)) * S.head_dim;
}

__device__ __forceinline__ u32 partial_start(const Work& w, const AttnParams& P, const AttnShape& S, u32 r) {
    return (((w.q0 + r / S.qh) * P.q_heads + w.h0 + r % S.qh) * P.splits + w.split) * (S.head_dim + 2);
}

// Words [i, i + n) of the uint4 v that holds them, from its first component on.
__device__ __forceinline__ uint4 slice(uint4 v, u32 i, u32 n) {
    if (n == 4) {
        return v;
    }
    if (n == 2) {
        return (i & 2) ? make_uint4(v.z, v.w, 0, 0) : v;
    }
    u32 c = i & 3;
    u32 x = c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w;
    return make_uint4(x, 0, 0, 0);
}

__device__ __forceinline__ u32 word(uint4 v, u32 i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// The codes of a word as f32, lowest first: 2 f16 or bf16, 4 Int8 or FP8, or 8
// Int4 values.
template <int DTYPE, int CODE>
__device__ __forceinline__ void codes(u32 wd, float* c) {
    if (DTYPE == 0) {
        float2 h = pair_value(wd, CODE);
        c[0] = h.x;
        c[1] = h.y;
    } else if (DTYPE == 1) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            c[e] = byte_value(wd, e, CODE);
        }
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) {
            c[e] = int4_code(wd, e);
        }
    }
}

// (scale, min) of a side word: (1, 0) for F16, (scale, 0) for Int8.
__device__ __forceinline__ float2 factors(u32 dtype, u32 w) {
    if (dtype == 1) {
        return make_float2(__uint_as_float(w), 0.0f);
    }
    if (dtype == 2) {
        return make_float2(f16_value(w), f16_value(w >> 16));
    }
    return make_float2(1.0f, 0.0f);
}

extern "C" __global__ void __launch_bounds__(WG)
attention(AttnParams P, AttnShape S, const u32* q, const u32* work, const u32* tables,
          const uint4* k_data, const u32* k_side, const uint4* v_data, const u32* v_side,
          float* partial) {
    __shared__ float q_sh[2048]; // the q rows while staged, then the merged accumulators
    __shared__ float ml_sh[512]; // per slot and row: running max and sum

    const u32 lid = threadIdx.x;
    const u32 d = S.head_dim;
    const Work w = work_of(P, S, work);

    // Stage the q rows, rotate them like the K pool, scale them.
    for (u32 i = lid; i < ROWS * d; i += WG) {
        q_sh[i] = elem_at(q, q_start(w, P, S, i / d) + i % d, S.q_f16);
    }
    __syncthreads();
    if (S.rotate_q) {
        for (u32 h = 1; h < d; h *= 2) {
            for (u32 i = lid; i < ROWS * d / 2; i += WG) {
                u32 j = (i / h) * 2 * h + i % h;
                float a = q_sh[j], b = q_sh[j + h];
                q_sh[j] = a + b;
                q_sh[j + h] = a - b;
            }
            __syncthreads();
        }
    }
    for (u32 i = lid; i < ROWS * d; i += WG) {
        float x = q_sh[i];
        if (S.rotate_q) {
            x *= S.norm;
        }
        q_sh[i] = x * P.scale;
    }
    __syncthreads();

    const u32 kt = S.kt;
    const u32 nz = WG / kt;
    const u32 z = lid / kt;
    const u32 x = lid % kt;
    const bool on = x * DL < d;
    const u32 xs = min(x, d / DL - 1); // the slice a lane past head_dim loads anyway
    const u32 k_words = d / (2 << K_PACK), v_words = d / (2 << V_DTYPE);
    const u32 k_groups = K_DTYPE == 2 ? d / S.k_group : 1;
    const u32 v_groups = V_DTYPE == 2 ? d / S.v_group : 1;
    const u32 k_side_at = K_DTYPE == 2 ? xs * DL / S.k_group : 0;
    const u32 v_side_at = V_DTYPE == 2 ? xs * DL / S.v_group : 0;

    float qr[ROWS * DL], acc[ROWS * DL];
    // Int4 per channel: the (block, kv head) whose factors for this lane's dims are
    // in cs (scales) and cm (mins).
    u32 cblock = 0xffffffffu;
    float cs[DL], cm[DL];
    float qsum[ROWS], accm[ROWS], m[ROWS], l[ROWS];
    u32 pos[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
        float s = 0.0f;
#pragma unroll
        for (int e = 0; e < DL; e++) {
            float v = on ? q_sh[r * d + xs * DL + e] : 0.0f;
            qr[r * DL + e] = v;
            acc[r * DL + e] = 0.0f;
            s += v;
        }
        qsum[r] = s;
        accm[r] = 0.0f;
        m[r] = NEG;
        l[r] = 0.0f;
        pos[r] = w.pos0 + min((u32)r / S.qh, w.nq - 1);
    }

    for (u32 t0 = w.begin; t0 < w.end; t0 += nz * KB) {
        // Load the step's keys t0 + j * nz + z: slices of their rows and factors.
        uint4 kw[KB], vw[KB];
        float2 kf[KB], vf[KB];
        u32 krow[KB], kopen[KB];
#pragma unroll
        for (int j = 0; j < KB; j++) {
            u32 t = min(t0 + j * nz + z, w.end - 1);
            u32 b = tables[w.table_offset + t / P.block_size];
            u32 row = (b * P.kv_heads + w.kvh) * P.block_size + t % P.block_size;
            krow[j] = row;
            kopen[j] = K_DTYPE == 3 && t >= w.sealed
                ? P.open_base + ((w.open * P.kv_heads + w.kvh) * P.block_size + t % P.block_size) * (d / 2)
                : 0;
            u32 ki = row * k_words + xs * K_LW;
            kw[j] = slice(k_data[ki / 4], ki, K_LW);
            u32 vi = row * v_words + xs * V_LW;
            vw[j] = slice(v_data[vi / 4], vi, V_LW);
            kf[j] = factors(K_DTYPE, K_DTYPE == 0 || K_DTYPE == 3 ? 0 : k_side[row * k_groups + k_side_at]);
            vf[j] = factors(V_DTYPE, V_DTYPE == 0 ? 0 : v_side[row * v_groups + v_side_at]);
        }
        // This lane's part of q . k, per key and row; each K word dequantized once.
        float sc[KB * ROWS];
#pragma unroll
        for (int j = 0; j < KB; j++) {
            float s[ROWS];
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
                s[r] = 0.0f;
            }
            if (K_DTYPE == 3 && kopen[j] != 0) {
                // A key of the open block: F16, read word by word (a few per sequence).
#pragma unroll
                for (int wi = 0; wi < DL / 2; wi++) {
                    float2 c = pair_value(k_side[kopen[j] + xs * (DL / 2) + wi], 0);
#pragma unroll
                    for (int r = 0; r < ROWS; r++) {
                        s[r] = fmaf(qr[r * DL + 2 * wi], c.x, s[r]);
                        s[r] = fmaf(qr[r * DL + 2 * wi + 1], c.y, s[r]);
                    }
                }
            } else {
                if (K_DTYPE == 3 && krow[j] / P.block_size != cblock) {
                    // The lane's (scale, min) per channel of the key's block.
                    cblock = krow[j] / P.block_size;
#pragma unroll
                    for (int e = 0; e < DL; e++) {
                        u32 f = k_side[cblock * d + xs * DL + e];
                        cs[e] = f16_value(f);
                        cm[e] = f16_value(f >> 16);
                    }
                }
#pragma unroll
                for (int wi = 0; wi < K_LW; wi++) {
                    constexpr int per = 2 << K_PACK; // codes per word
                    float c[per];
                    codes<K_PACK, K_CODE>(word(kw[j], wi), c);
                    if (K_DTYPE == 3) {
#pragma unroll
                        for (int e = 0; e < per; e++) {
                            c[e] = fmaf(c[e], cs[wi * per + e], cm[wi * per + e]);
                        }
                    }
#pragma unroll
                    for (int r = 0; r < ROWS; r++) {
#pragma unroll
                        for (int e = 0; e < per; e++) {
                            s[r] = fmaf(qr[r * DL + wi * per + e], c[e], s[r]);
                        }
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
                sc[j * ROWS + r] = kf[j].x * s[r] + kf[j].y * qsum[r];
            }
        }
        // Sum over the slot's lanes (kt consecutive lanes of one warp).
#pragma unroll
        for (int i = 0; i < KB * ROWS; i++) {
            float v = sc[i];
            for (u32 mask = kt / 2; mask > 0; mask >>= 1) {
                v += __shfl_xor_sync(0xffffffffu, v, mask);
            }
            sc[i] = v;
        }
        // Online softmax over the step's keys, per row.
#pragma unroll
        for (int r = 0; r < ROWS; r++) {
            float mx = m[r];
#pragma unroll
            for (int j = 0; j < KB; j++) {
                u32 t = t0 + j * nz + z;
                float s = sc[j * ROWS + r];
                if (P.softcap > 0.0f) {
                    s = P.softcap * tanhf(s / P.softcap);
                }
                bool seen = t < w.end && t <= pos[r] && (P.window == 0 || pos[r] - t < P.window);
                s = seen ? s : NEG;
                sc[j * ROWS + r] = s;
                mx = fmaxf(mx, s);
            }
            float c = __expf(m[r] - mx);
            m[r] = mx;
            l[r] *= c;
            accm[r] *= c;
#pragma unroll
            for (int e = 0; e < DL; e++) {
                acc[r * DL + e] *= c;
            }
#pragma unroll
            for (int j = 0; j < KB; j++) {
                float s = sc[j * ROWS + r];
                float p = s > -1.0e38f ? __expf(s - mx) : 0.0f;
                sc[j * ROWS + r] = p;
                l[r] += p;
            }
        }
        // Weighted V into this lane's dims; each V word dequantized once. A row
        // that may not see the key (weight 0) skips it: 0 x Inf is NaN, and a
        // non-finite V stored from device input must not reach earlier queries.
#pragma unroll
        for (int j = 0; j < KB; j++) {
            float p[ROWS];
            bool seen[ROWS];
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
                seen[r] = sc[j * ROWS + r] != 0.f;
                p[r] = sc[j * ROWS + r] * vf[j].x;
                if (V_DTYPE == 2 && seen[r]) {
                    accm[r] += sc[j * ROWS + r] * vf[j].y;
                }
            }
#pragma unroll
            for (int wi = 0; wi < V_LW; wi++) {
                constexpr int per = 2 << V_DTYPE;
                float c[per];
                codes<V_DTYPE, V_CODE>(word(vw[j], wi), c);
#pragma unroll
                for (int r = 0; r < ROWS; r++) {
                    if (!seen[r]) {
                        continue;
                    }
#pragma unroll
                    for (int e = 0; e < per; e++) {
                        acc[r * DL + wi * per + e] = fmaf(p[r], c[e], acc[r * DL + wi * per + e]);
                    }
                }
            }
        }
    }

    // Merge the slots: each slot's accumulator against the block's max per row,
    // summed one slot at a time in q_sh.
    if (x == 0) {
#pragma unroll
        for (int r = 0; r < ROWS; r++) {
            ml_sh[(z * 8 + r) * 2] = m[r];
            ml_sh[(z * 8 + r) * 2 + 1] = l[r];
        }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
        float mx = NEG;
        for (u32 s = 0; s < nz; s++) {
            mx = fmaxf(mx, ml_sh[(s * 8 + r) * 2]);
        }
        float c = __expf(m[r] - mx);
#pragma unroll
        for (int e = 0; e < DL; e++) {
            acc[r * DL + e] = (acc[r * DL + e] + accm[r]) * c;
        }
    }
    for (u32 s = 0; s < nz; s++) {
        if (z == s && on) {
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
#pragma unroll
                for (int e = 0; e < DL; e++) {
                    u32 i = r * d + x * DL + e;
                    q_sh[i] = s == 0 ? acc[r * DL + e] : q_sh[i] + acc[r * DL + e];
                }
            }
        }
        __syncthreads();
    }
    for (u32 i = lid; i < ROWS * d; i += WG) {
        u32 r = i / d;
        if (has_row(w, S, r)) {
            partial[partial_start(w, P, S, r) + 2 + i % d] = q_sh[i];
        }
    }
    if (lid < ROWS && has_row(w, S, lid)) {
        float mx = NEG;
        for (u32 s = 0; s < nz; s++) {
            mx = fmaxf(mx, ml_sh[(s * 8 + lid) * 2]);
        }
        float sum = 0.0f;
        for (u32 s = 0; s < nz; s++) {
            sum += ml_sh[(s * 8 + lid) * 2 + 1] * __expf(ml_sh[(s * 8 + lid) * 2] - mx);
        }
        u32 b = partial_start(w, P, S, lid);
        partial[b] = mx;
        partial[b + 1] = sum;
    }
}
