// Combines the per-split partials of attention.cu: one block per (query, q head)
// rescales each split's sum and accumulator to the global max, rotates the output
// back when the V pool is Walsh–Hadamard rotated, and writes it as f32 or f16.
// CUDA twin of shaders/attn_reduce.wgsl.

struct ReduceParams {
    u32 rows;  // queries * q_heads
    u32 splits;
    u32 head_dim;
    u32 rotate_out;
    float norm; // 1/sqrt(head_dim)
    u32 out_f16;
    u32 pad0;
    u32 pad1;
};

extern "C" __global__ void __launch_bounds__(64)
attn_reduce(ReduceParams P, const float* partial, u32* out) {
    __shared__ float o_sh[256];
    const u32 lid = threadIdx.x;
    const u32 row = blockIdx.y * gridDim.x + blockIdx.x;
    if (row >= P.rows) {
        return;
    }
    const u32 d = P.head_dim;
    const u32 stride = d + 2;
    const u64 base = (u64)row * P.splits * stride;
    float m = -3.0e38f;
    for (u32 s = 0; s < P.splits; s++) {
        m = fmaxf(m, partial[base + s * stride]);
    }
    float l = 0.0f;
    for (u32 s = 0; s < P.splits; s++) {
        l += partial[base + s * stride + 1] * __expf(partial[base + s * stride] - m);
    }
    for (u32 i = lid; i < d; i += 64) {
        float acc = 0.0f;
        for (u32 s = 0; s < P.splits; s++) {
            acc += partial[base + s * stride + 2 + i] * __expf(partial[base + s * stride] - m);
        }
        o_sh[i] = acc / l;
    }
    __syncthreads();
    if (P.rotate_out) {
        for (u32 h = 1; h < d; h *= 2) {
            for (u32 i = lid; i < d / 2; i += 64) {
                u32 j = (i / h) * 2 * h + i % h;
                float a = o_sh[j], b = o_sh[j + h];
                o_sh[j] = a + b;
                o_sh[j + h] = a - b;
            }
            __syncthreads();
        }
        for (u32 i = lid; i < d; i += 64) {
            o_sh[i] *= P.norm;
        }
        __syncthreads();
    }
    if (P.out_f16) {
        for (u32 i = lid; i < d / 2; i += 64) {
            out[(u64)row * d / 2 + i] = f16_bits(o_sh[2 * i]) | (f16_bits(o_sh[2 * i + 1]) << 16);
        }
    } else {
        for (u32 i = lid; i < d; i += 64) {
            out[(u64)row * d + i] = __float_as_uint(o_sh[i]);
        }
    }
}
