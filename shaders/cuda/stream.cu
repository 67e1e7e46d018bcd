// Streaming-read roofline: reads every 16 bytes of src once (grid-stride, four
// independent loads in flight per thread) and writes one word per thread so the
// reads cannot be optimised away. CUDA twin of shaders/stream.wgsl.

extern "C" __global__ void stream(u64 vectors, const uint4* src, u32* sink) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u64 stride = (u64)gridDim.x * blockDim.x;
    uint4 x = make_uint4(0, 0, 0, 0);
    for (; i + 3 * stride < vectors; i += 4 * stride) {
        uint4 a = src[i], b = src[i + stride], c = src[i + 2 * stride], d = src[i + 3 * stride];
        x.x ^= a.x ^ b.x ^ c.x ^ d.x;
        x.y ^= a.y ^ b.y ^ c.y ^ d.y;
        x.z ^= a.z ^ b.z ^ c.z ^ d.z;
        x.w ^= a.w ^ b.w ^ c.w ^ d.w;
    }
    for (; i < vectors; i += stride) {
        uint4 v = src[i];
        x.x ^= v.x;
        x.y ^= v.y;
        x.z ^= v.z;
        x.w ^= v.w;
    }
    sink[(u64)blockIdx.x * blockDim.x + threadIdx.x] = x.x ^ x.y ^ x.z ^ x.w;
}
