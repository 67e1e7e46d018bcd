// Combines the per-split partials of the attention kernels: one workgroup per
// (query, q head) rescales each split's sum and accumulator to the global max,
// rotates the output back when the V pool is Walsh–Hadamard rotated, and writes
// it as f32 or f16.

struct ReduceParams {
    rows: u32,   // queries * q_heads
    splits: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> P: ReduceParams;
@group(0) @binding(1) var<storage, read> partial: array<f32>; // [rows, splits, HEAD_DIM + 2]
@group(0) @binding(2) var<storage, read_write> out: array<u32>; // [rows, HEAD_DIM], f32 or f16

override HEAD_DIM: u32 = 128u;
override ROTATE_OUT: u32 = 0u;
override NORM_BITS: u32 = 0x3f800000u; // f32 bits of 1/sqrt(HEAD_DIM)
override OUT_F16: u32 = 0u; // 1: f16 out, two per word, the lower element in the low half

var<workgroup> o_sh: array<f32, 256>;

const WG: u32 = 64u;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.y * nwg.x + wid.x;
    if (row >= P.rows) {
        return;
    }
    let stride = HEAD_DIM + 2u;
    let base = row * P.splits * stride;
    var m = -3.0e38;
    for (var s = 0u; s < P.splits; s++) {
        m = max(m, partial[base + s * stride]);
    }
    var l = 0.0;
    for (var s = 0u; s < P.splits; s++) {
        l += partial[base + s * stride + 1u] * exp(partial[base + s * stride] - m);
    }
    for (var d = lid; d < HEAD_DIM; d += WG) {
        var acc = 0.0;
        for (var s = 0u; s < P.splits; s++) {
            acc += partial[base + s * stride + 2u + d] * exp(partial[base + s * stride] - m);
        }
        o_sh[d] = acc / l;
    }
    if (ROTATE_OUT == 1u) {
        workgroupBarrier();
        for (var h = 1u; h < HEAD_DIM; h *= 2u) {
            for (var i = lid; i < HEAD_DIM / 2u; i += WG) {
                let j = (i / h) * 2u * h + i % h;
                let a = o_sh[j];
                let b = o_sh[j + h];
                o_sh[j] = a + b;
                o_sh[j + h] = a - b;
            }
            workgroupBarrier();
        }
        for (var d = lid; d < HEAD_DIM; d += WG) {
            o_sh[d] *= bitcast<f32>(NORM_BITS);
        }
    }
    workgroupBarrier();
    if (OUT_F16 == 1u) {
        for (var i = lid; i < HEAD_DIM / 2u; i += WG) {
            out[row * HEAD_DIM / 2u + i] = f16_bits(o_sh[2u * i]) | (f16_bits(o_sh[2u * i + 1u]) << 16u);
        }
    } else {
        for (var d = lid; d < HEAD_DIM; d += WG) {
            out[row * HEAD_DIM + d] = bitcast<u32>(o_sh[d]);
        }
    }
}
