// Quantize-and-append: one invocation per (new token, kv head) quantizes that
// head vector (DESIGN §1) and writes codes and side data into its pool slot
// (DESIGN §2); rotated pools rotate the vector first. CPU twin: src/cpu/append.rs.

struct AppendParams {
    tokens: u32,
    kv_heads: u32,
    block_size: u32,
    capacity: u32, // slots in the bound window of the pool: others are skipped
    slot0: u32,    // first slot of the window (src/wgpu/windows.rs)
    slots_base: u32, // where the slots start in `slots`, in words
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> P: AppendParams;
@group(0) @binding(1) var<storage, read> src: array<u32>;    // [tokens, kv_heads, HEAD_DIM], f32 or f16
@group(0) @binding(2) var<storage, read> slots: array<u32>;  // [tokens]
@group(0) @binding(3) var<storage, read_write> data: array<u32>;
@group(0) @binding(4) var<storage, read_write> side: array<u32>;

override DTYPE: u32 = 1u; // packing: 0 16-bit pairs, 1 bytes + scale, 2 Int4 (common.wgsl)
override CODE: u32 = 0u;  // format within it: 0 F16 / Int8, 1 BF16 / FP8 E4M3, 2 FP8 E5M2
override HEAD_DIM: u32 = 128u;
override GROUP: u32 = 32u; // Int4 only
override ROTATE: u32 = 0u; // 1: Walsh–Hadamard rotate before quantizing
override NORM_BITS: u32 = 0x3f800000u; // f32 bits of 1/sqrt(HEAD_DIM)
override SRC_F16: u32 = 0u; // 1: src holds f16, two per word, the lower element in the low half

var<private> rotated: array<f32, 256>;

// Element i of src.
fn src_at(i: u32) -> f32 {
    if (SRC_F16 == 1u) {
        return f16_value(src[i / 2u] >> (16u * (i % 2u)));
    }
    return bitcast<f32>(src[i]);
}

// Element i of the vector being quantized (which starts at src element x0).
fn x_at(x0: u32, i: u32) -> f32 {
    if (ROTATE == 1u) {
        return rotated[i];
    }
    return src_at(x0 + i);
}

const WG: u32 = 64u;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = flat_index(gid, nwg, WG);
    if (r >= P.tokens * P.kv_heads) {
        return;
    }
    let slot = slots[P.slots_base + r / P.kv_heads] - P.slot0; // below the window: wraps past it
    if (slot >= P.capacity) {
        return;
    }
    let row = pool_row(slot, r % P.kv_heads, P.kv_heads, P.block_size);
    let x0 = r * HEAD_DIM;
    if (ROTATE == 1u) {
        for (var i = 0u; i < HEAD_DIM; i++) {
            rotated[i] = src_at(x0 + i);
        }
        hadamard(&rotated, HEAD_DIM, bitcast<f32>(NORM_BITS));
    }
    if (DTYPE == 0u) {
        append_f16(row, x0);
    } else if (DTYPE == 1u) {
        append_int8(row, x0);
    } else {
        append_int4(row, x0);
    }
}

fn append_f16(row: u32, x0: u32) {
    let words = HEAD_DIM / 2u;
    for (var w = 0u; w < words; w++) {
        data[row * words + w] = half_bits(x_at(x0, 2u * w), CODE) | (half_bits(x_at(x0, 2u * w + 1u), CODE) << 16u);
    }
}

fn append_int8(row: u32, x0: u32) {
    var absmax = 0.0;
    for (var i = 0u; i < HEAD_DIM; i++) {
        absmax = max(absmax, abs(x_at(x0, i)));
    }
    let scale = absmax / byte_max(CODE);
    side[row] = bitcast<u32>(scale);
    let words = HEAD_DIM / 4u;
    for (var w = 0u; w < words; w++) {
        var word = 0u;
        if (scale != 0.0) {
            for (var j = 0u; j < 4u; j++) {
                let y = x_at(x0, 4u * w + j) / scale;
                var c: u32;
                if (CODE == 0u) {
                    c = u32(i32(clamp(round(y), -127.0, 127.0))) & 0xffu;
                } else {
                    c = fp8_bits(y, CODE);
                }
                word |= c << (8u * j);
            }
        }
        data[row * words + w] = word;
    }
}

fn append_int4(row: u32, x0: u32) {
    let groups = HEAD_DIM / GROUP;
    let words = HEAD_DIM / 8u;
    for (var g = 0u; g < groups; g++) {
        var lo = x_at(x0, g * GROUP);
        var hi = lo;
        for (var i = 1u; i < GROUP; i++) {
            lo = min(lo, x_at(x0, g * GROUP + i));
            hi = max(hi, x_at(x0, g * GROUP + i));
        }
        let s16 = f16_bits((hi - lo) / 15.0);
        let l16 = f16_bits(lo);
        side[row * groups + g] = s16 | (l16 << 16u);
        let scale = f16_value(s16);
        let lo_r = f16_value(l16);
        for (var w = 0u; w < GROUP / 8u; w++) {
            var word = 0u;
            if (scale != 0.0) {
                for (var j = 0u; j < 8u; j++) {
                    let q = clamp(round((x_at(x0, g * GROUP + 8u * w + j) - lo_r) / scale), 0.0, 15.0);
                    word |= u32(q) << (4u * j);
                }
            }
            data[row * words + g * (GROUP / 8u) + w] = word;
        }
    }
}
