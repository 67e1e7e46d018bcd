// Seal: quantizes each block an append fills in an Int4Channel K pool (DESIGN §1,
// §2). One invocation per (seal, kv head, 8 channels): its channels' keys come
// from the sequence's open block (the first `from_open` tokens, F16 in the side
// array from `open_base`) and from the step's new keys staged as F16 (rotated with
// the pool) by quantize_append.wgsl; it writes their (f16 scale, f16 min) and one
// code word per token. CPU twin: src/cpu/append.rs (seal_block).

struct SealParams {
    seals: u32,
    kv_heads: u32,
    block_size: u32,
    seals_base: u32, // where the seals start in `records`, in words (4 each)
    open_base: u32,  // where the open blocks start in `side`, in words
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> P: SealParams;
@group(0) @binding(1) var<storage, read> stage: array<u32>; // [tokens, kv_heads, HEAD_DIM / 2] f16 pairs
@group(0) @binding(2) var<storage, read> records: array<u32>;
@group(0) @binding(3) var<storage, read_write> data: array<u32>;
@group(0) @binding(4) var<storage, read_write> side: array<u32>;

override HEAD_DIM: u32 = 128u;

const WG: u32 = 64u;

// Channels 8o..8o+8 of token s of the block, for kv head h, as four f16 pairs.
fn pairs(open: u32, from_open: u32, first: u32, h: u32, s: u32, o: u32) -> vec4<u32> {
    var at: u32;
    if (s < from_open) {
        at = P.open_base + ((open * P.kv_heads + h) * P.block_size + s) * (HEAD_DIM / 2u) + 4u * o;
        return vec4<u32>(side[at], side[at + 1u], side[at + 2u], side[at + 3u]);
    }
    at = ((first + s - from_open) * P.kv_heads + h) * (HEAD_DIM / 2u) + 4u * o;
    return vec4<u32>(stage[at], stage[at + 1u], stage[at + 2u], stage[at + 3u]);
}

fn values(p: vec4<u32>) -> array<f32, 8> {
    let a = unpack2x16float(p.x);
    let b = unpack2x16float(p.y);
    let c = unpack2x16float(p.z);
    let d = unpack2x16float(p.w);
    return array<f32, 8>(a.x, a.y, b.x, b.y, c.x, c.y, d.x, d.y);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let octets = HEAD_DIM / 8u;
    let i = flat_index(gid, nwg, WG);
    if (i >= P.seals * P.kv_heads * octets) {
        return;
    }
    let o = i % octets;
    let h = (i / octets) % P.kv_heads;
    let m = P.seals_base + 4u * (i / (octets * P.kv_heads));
    let block = records[m];
    let open = records[m + 1u];
    let from_open = records[m + 2u];
    let first = records[m + 3u];

    var lo = array<f32, 8>(3.0e38, 3.0e38, 3.0e38, 3.0e38, 3.0e38, 3.0e38, 3.0e38, 3.0e38);
    var hi = array<f32, 8>(-3.0e38, -3.0e38, -3.0e38, -3.0e38, -3.0e38, -3.0e38, -3.0e38, -3.0e38);
    for (var s = 0u; s < P.block_size; s++) {
        let x = values(pairs(open, from_open, first, h, s, o));
        for (var c = 0u; c < 8u; c++) {
            lo[c] = min(lo[c], x[c]);
            hi[c] = max(hi[c], x[c]);
        }
    }
    var scale: array<f32, 8>;
    var low: array<f32, 8>;
    let factors = (block * P.kv_heads + h) * HEAD_DIM + 8u * o;
    for (var c = 0u; c < 8u; c++) {
        let s16 = f16_bits((hi[c] - lo[c]) / 15.0);
        let l16 = f16_bits(lo[c]);
        side[factors + c] = s16 | (l16 << 16u);
        scale[c] = f16_value(s16);
        low[c] = f16_value(l16);
    }
    for (var s = 0u; s < P.block_size; s++) {
        let x = values(pairs(open, from_open, first, h, s, o));
        var word = 0u;
        for (var c = 0u; c < 8u; c++) {
            if (scale[c] != 0.0) {
                let q = clamp(round((x[c] - low[c]) / scale[c]), 0.0, 15.0);
                word |= u32(q) << (4u * c);
            }
        }
        let row = (block * P.kv_heads + h) * P.block_size + s;
        data[row * (HEAD_DIM / 8u) + o] = word;
    }
}
