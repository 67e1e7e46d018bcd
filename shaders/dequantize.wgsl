// Dequantize: one invocation per (token, kv head) writes the f32 vector that
// attention sees for that pool slot. For tests and debugging; attention kernels
// never write dequantized values. Rotated pools are rotated back, so the output
// is always in the model's basis (unless ROTATE is 0: a truncate reopening an
// Int4Channel block wants the pool's basis). An Int4Channel pool's slots past its
// capacity are in its open blocks, F16 in the side array from `open_base`. CPU
// twin: src/cpu/dequantize.rs.

struct DequantParams {
    tokens: u32,
    kv_heads: u32,
    block_size: u32,
    capacity: u32, // slots in the bound window of the pool: others are skipped
    slot0: u32,    // first slot of the window (src/wgpu/windows.rs)
    slots_base: u32, // where the slots start in `slots`, in words
    open_base: u32,  // Int4Channel: where the open blocks start in `side`, in words
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> P: DequantParams;
@group(0) @binding(1) var<storage, read> slots: array<u32>;
@group(0) @binding(2) var<storage, read> data: array<u32>;
@group(0) @binding(3) var<storage, read> side: array<u32>;
@group(0) @binding(4) var<storage, read_write> dst: array<f32>; // [tokens, kv_heads, HEAD_DIM]

override DTYPE: u32 = 1u; // packing and format as quantize_append.wgsl; 3 Int4 per channel
override CODE: u32 = 0u;
override HEAD_DIM: u32 = 128u;
override GROUP: u32 = 32u;
override ROTATE: u32 = 0u;
override NORM_BITS: u32 = 0x3f800000u; // f32 bits of 1/sqrt(HEAD_DIM)

var<private> x: array<f32, 256>;

const WG: u32 = 64u;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = flat_index(gid, nwg, WG);
    if (r >= P.tokens * P.kv_heads) {
        return;
    }
    let raw = slots[P.slots_base + r / P.kv_heads];
    if (DTYPE == 3u && raw >= P.capacity) {
        let open = pool_row(raw - P.capacity, r % P.kv_heads, P.kv_heads, P.block_size);
        for (var i = 0u; i < HEAD_DIM; i++) {
            x[i] = unpack2x16float(side[P.open_base + open * (HEAD_DIM / 2u) + i / 2u])[i % 2u];
        }
        finish(r);
        return;
    }
    let slot = raw - P.slot0; // below the window: wraps past it
    if (slot >= P.capacity) {
        return;
    }
    let row = pool_row(slot, r % P.kv_heads, P.kv_heads, P.block_size);
    for (var i = 0u; i < HEAD_DIM; i++) {
        if (DTYPE == 3u) {
            let s = side[(row / P.block_size) * HEAD_DIM + i];
            let q = (data[row * (HEAD_DIM / 8u) + i / 8u] >> (4u * (i % 8u))) & 0xfu;
            x[i] = f16_value(s >> 16u) + f32(q) * f16_value(s & 0xffffu);
        } else if (DTYPE == 0u) {
            x[i] = pair_values(data[row * (HEAD_DIM / 2u) + i / 2u], CODE)[i % 2u];
        } else if (DTYPE == 1u) {
            x[i] = byte_values(data[row * (HEAD_DIM / 4u) + i / 4u], CODE)[i % 4u] * bitcast<f32>(side[row]);
        } else {
            let s = side[row * (HEAD_DIM / GROUP) + i / GROUP];
            let q = (data[row * (HEAD_DIM / 8u) + i / 8u] >> (4u * (i % 8u))) & 0xfu;
            x[i] = f16_value(s >> 16u) + f32(q) * f16_value(s & 0xffffu);
        }
    }
    finish(r);
}

// Rotates x back (rotated pools) and writes it as row r of dst.
fn finish(r: u32) {
    if (ROTATE == 1u) {
        hadamard(&x, HEAD_DIM, bitcast<f32>(NORM_BITS));
    }
    for (var i = 0u; i < HEAD_DIM; i++) {
        dst[r * HEAD_DIM + i] = x[i];
    }
}
