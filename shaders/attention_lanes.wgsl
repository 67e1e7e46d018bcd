// Attention for adapters whose subgroup is the lanes of a CPU SIMD register
// (llvmpipe): decode (QB = 1) and causal prefill (QB > 1). Same bindings
// (attn_common.wgsl), parameters, work items and partial layout as attention.wgsl;
// attn_reduce.wgsl combines the splits. CPU twin: src/cpu/attention.rs.
//
// On such an adapter a load whose address is not uniform is split into one scalar
// load per lane, and a loop counter is never uniform, so attention.wgsl's reads of
// q from workgroup memory inside its key loop cost the same per-lane work as its K
// reads, eight times over. Here a workgroup is one subgroup of LANES invocations
// and each step takes LANES keys:
// * q . k: lane i takes key i, with the ROWS q rows in registers (the same in
//   every lane), so the only per-lane loads are the key's own bytes;
// * p . V: lane i takes output dims [i * DL, (i + 1) * DL) and the keys' weights
//   and pool rows are broadcast to it one key at a time.
// Register arrays must be indexed by constants, or they live in per-lane memory:
// loops over them are unrolled by calls with literal arguments (every call is
// inlined, and calls past the head size fold away). Loops that index no register
// array stay loops: the unrolled code already outgrows the instruction cache, and
// unrolling the 8 keys of p . V as well measured slower (and compiled longer).
//
// Int4 per channel K (K_DTYPE 3): a step's 8 keys lie in one block, whose
// per-channel (scale, min) the lanes load once per block and share by broadcasts;
// each lane dequantizes its key with them. A step in a sequence's open block reads
// its F16 keys from k_side instead.

override K_DTYPE: u32 = 1u; // packing: 0 16-bit pairs, 1 bytes + scale, 2 Int4, 3 Int4 per channel (common.wgsl)
override V_DTYPE: u32 = 1u;
override K_CODE: u32 = 0u;  // format within it: 0 F16 / Int8, 1 BF16 / FP8 E4M3, 2 FP8 E5M2
override V_CODE: u32 = 0u;
override HEAD_DIM: u32 = 128u; // a multiple of 64, at most 256 (lanes_fit)
override K_GROUP: u32 = 32u;
override V_GROUP: u32 = 32u;
override QH: u32 = 4u; // q heads per workgroup
override QB: u32 = 1u; // query positions per workgroup (decode: 1)
override ROWS: u32 = QH * QB; // query rows (position b, head j) at b * QH + j; at most 8
override BLOCK_SIZE: u32 = 16u;
override ROTATE_Q: u32 = 0u; // 1: the K pool is Walsh–Hadamard rotated
override NORM_BITS: u32 = 0x3f800000u; // f32 bits of 1/sqrt(HEAD_DIM)

const LANES: u32 = 8u;
override DL: u32 = HEAD_DIM / LANES; // output dims per lane
override K_CHUNKS: u32 = HEAD_DIM / (8u << min(K_DTYPE, 2u)); // vec4 words per K row
override V_WORDS: u32 = DL / (2u << V_DTYPE); // words of V per lane and row

var<workgroup> q_sh: array<f32, 2048>;  // the ROWS q rows while they are staged

var<private> qv: array<f32, 2048>;     // q[r * HEAD_DIM + d], scaled (and rotated)
var<private> ks: array<f32, 256>;      // Int4 per channel: the current block's scale per channel
var<private> km: array<f32, 256>;      // and min
var<private> qsum: array<f32, 256>;    // Int4 K: q summed over key group g, [r * 32 + g]
var<private> s: array<f32, 8>;         // q . k of this lane's key, per row
var<private> gdot: array<f32, 8>;      // Int4 K: q . codes within the current group
var<private> acc: array<f32, 256>;     // sum p * V over this lane's dims, [r * DL + e]
var<private> accm: array<f32, 32>;     // Int4 V: sum p * min per row and group, [r * 4 + g]
var<private> pw: array<f32, 8>;        // weight of the broadcast key, per row

// ---- staging q into registers -------------------------------------------------

fn load_q8(c: u32) {
    if (c * 8u >= HEAD_DIM) {
        return;
    }
    for (var r = 0u; r < ROWS; r++) {
        for (var e = 0u; e < 8u; e++) {
            qv[r * HEAD_DIM + c * 8u + e] = q_sh[r * HEAD_DIM + c * 8u + e];
        }
    }
}

fn load_q(c0: u32) {
    load_q8(c0); load_q8(c0 + 1u); load_q8(c0 + 2u); load_q8(c0 + 3u);
    load_q8(c0 + 4u); load_q8(c0 + 5u); load_q8(c0 + 6u); load_q8(c0 + 7u);
}

// Sums of q over each Int4 key group (the group's min multiplies them).
fn sum_q8(c: u32) {
    if (c * 8u >= HEAD_DIM) {
        return;
    }
    let g = c * 8u / K_GROUP;
    for (var r = 0u; r < ROWS; r++) {
        var x = 0.0;
        for (var e = 0u; e < 8u; e++) {
            x += qv[r * HEAD_DIM + c * 8u + e];
        }
        if ((c * 8u) % K_GROUP == 0u) {
            qsum[r * 32u + g] = x;
        } else {
            qsum[r * 32u + g] += x;
        }
    }
}

fn sum_q(c0: u32) {
    sum_q8(c0); sum_q8(c0 + 1u); sum_q8(c0 + 2u); sum_q8(c0 + 3u);
    sum_q8(c0 + 4u); sum_q8(c0 + 5u); sum_q8(c0 + 6u); sum_q8(c0 + 7u);
}

// Int4 per channel: the (scale, min) of channels 8c..8c+8 of the step's block, whose
// factors start at k_side[f], into ks and km: lane i loads channel 8c + i, then
// every lane takes all eight by broadcasts (a load at an address the adapter cannot
// prove uniform costs one per lane). Each lane then dequantizes its own key, which
// costs less than scaling q per block (HEAD_DIM per key, not per q row).
fn factors8(f: u32, lane: u32, c: u32) {
    if (c * 8u >= HEAD_DIM) {
        return;
    }
    let x = unpack2x16float(k_side[f + c * 8u + lane]);
    let d = c * 8u;
    ks[d] = subgroupBroadcast(x.x, 0u); km[d] = subgroupBroadcast(x.y, 0u);
    ks[d + 1u] = subgroupBroadcast(x.x, 1u); km[d + 1u] = subgroupBroadcast(x.y, 1u);
    ks[d + 2u] = subgroupBroadcast(x.x, 2u); km[d + 2u] = subgroupBroadcast(x.y, 2u);
    ks[d + 3u] = subgroupBroadcast(x.x, 3u); km[d + 3u] = subgroupBroadcast(x.y, 3u);
    ks[d + 4u] = subgroupBroadcast(x.x, 4u); km[d + 4u] = subgroupBroadcast(x.y, 4u);
    ks[d + 5u] = subgroupBroadcast(x.x, 5u); km[d + 5u] = subgroupBroadcast(x.y, 5u);
    ks[d + 6u] = subgroupBroadcast(x.x, 6u); km[d + 6u] = subgroupBroadcast(x.y, 6u);
    ks[d + 7u] = subgroupBroadcast(x.x, 7u); km[d + 7u] = subgroupBroadcast(x.y, 7u);
}

fn factors(f: u32, lane: u32, c0: u32) {
    factors8(f, lane, c0); factors8(f, lane, c0 + 1u); factors8(f, lane, c0 + 2u);
    factors8(f, lane, c0 + 3u); factors8(f, lane, c0 + 4u); factors8(f, lane, c0 + 5u);
    factors8(f, lane, c0 + 6u); factors8(f, lane, c0 + 7u);
}

// Loads the factors of keys of (block, kv head) `bh`.
fn channel_factors(bh: u32, lane: u32) {
    let f = bh * HEAD_DIM;
    factors(f, lane, 0u); factors(f, lane, 8u); factors(f, lane, 16u); factors(f, lane, 24u);
}

// Dims d..d+4 of a key of the current block from their codes.
fn dequant4(d: u32, codes: vec4<f32>) -> vec4<f32> {
    return fma(codes, vec4<f32>(ks[d], ks[d + 1u], ks[d + 2u], ks[d + 3u]),
               vec4<f32>(km[d], km[d + 1u], km[d + 2u], km[d + 3u]));
}

// Eight dims d..d+8 of a key of the current block from one code word, into s.
fn channel_word(d: u32, word: u32) {
    dot8(d, dequant4(d, int4_codes(word, 0u)), dequant4(d + 4u, int4_codes(word, 16u)));
}

// ---- q . k for this lane's key --------------------------------------------------

// s[r] += q[r][d..d+8] . x
fn dot8(d: u32, x0: vec4<f32>, x1: vec4<f32>) {
    for (var r = 0u; r < ROWS; r++) {
        let o = r * HEAD_DIM + d;
        s[r] += dot(vec4<f32>(qv[o], qv[o + 1u], qv[o + 2u], qv[o + 3u]), x0)
              + dot(vec4<f32>(qv[o + 4u], qv[o + 5u], qv[o + 6u], qv[o + 7u]), x1);
    }
}

// One Int4 K word (8 dims starting at d) into the group dot products; closes the
// group into s when the word is its last.
fn int4_word(d: u32, word: u32, side: u32) {
    if (d % K_GROUP == 0u) {
        for (var r = 0u; r < ROWS; r++) {
            gdot[r] = 0.0;
        }
    }
    let x0 = int4_codes(word, 0u);
    let x1 = int4_codes(word, 16u);
    for (var r = 0u; r < ROWS; r++) {
        let o = r * HEAD_DIM + d;
        gdot[r] += dot(vec4<f32>(qv[o], qv[o + 1u], qv[o + 2u], qv[o + 3u]), x0)
                 + dot(vec4<f32>(qv[o + 4u], qv[o + 5u], qv[o + 6u], qv[o + 7u]), x1);
    }
    if ((d + 8u) % K_GROUP == 0u) {
        let g = d / K_GROUP;
        let f = unpack2x16float(k_side[side + g]); // (scale, min)
        for (var r = 0u; r < ROWS; r++) {
            s[r] += f.x * gdot[r] + f.y * qsum[r * 32u + g];
        }
    }
}

// Chunk c (one vec4 of the K row at `base`) into s.
fn qk_chunk(base: u32, side: u32, c: u32) {
    if (c >= K_CHUNKS) {
        return;
    }
    let w = k_data[base + c];
    if (K_DTYPE == 0u) {
        dot8(c * 8u, vec4<f32>(pair_values(w.x, K_CODE), pair_values(w.y, K_CODE)),
             vec4<f32>(pair_values(w.z, K_CODE), pair_values(w.w, K_CODE)));
    } else if (K_DTYPE == 1u) {
        dot8(c * 16u, byte_values(w.x, K_CODE), byte_values(w.y, K_CODE));
        dot8(c * 16u + 8u, byte_values(w.z, K_CODE), byte_values(w.w, K_CODE));
    } else if (K_DTYPE == 2u) {
        int4_word(c * 32u, w.x, side);
        int4_word(c * 32u + 8u, w.y, side);
        int4_word(c * 32u + 16u, w.z, side);
        int4_word(c * 32u + 24u, w.w, side);
    } else {
        channel_word(c * 32u, w.x);
        channel_word(c * 32u + 8u, w.y);
        channel_word(c * 32u + 16u, w.z);
        channel_word(c * 32u + 24u, w.w);
    }
}

fn qk_chunks(base: u32, side: u32, c0: u32) {
    qk_chunk(base, side, c0); qk_chunk(base, side, c0 + 1u);
    qk_chunk(base, side, c0 + 2u); qk_chunk(base, side, c0 + 3u);
    qk_chunk(base, side, c0 + 4u); qk_chunk(base, side, c0 + 5u);
    qk_chunk(base, side, c0 + 6u); qk_chunk(base, side, c0 + 7u);
}

// Scaled q . k of the key in pool row `row`, per query row, into s.
fn qk(row: u32) {
    for (var r = 0u; r < 8u; r++) {
        s[r] = 0.0;
    }
    let base = row * K_CHUNKS;
    let side = row * (HEAD_DIM / K_GROUP);
    qk_chunks(base, side, 0u);
    qk_chunks(base, side, 8u);
    qk_chunks(base, side, 16u);
    qk_chunks(base, side, 24u);
    if (K_DTYPE == 1u) {
        let scale = bitcast<f32>(k_side[row]);
        for (var r = 0u; r < ROWS; r++) {
            s[r] *= scale;
        }
    }
}

// Int4 per channel: dims 8c..8c+8 of the F16 key at k_side[base], into s.
fn open_chunk(base: u32, c: u32) {
    if (c * 8u >= HEAD_DIM) {
        return;
    }
    let b = base + 4u * c;
    dot8(c * 8u, vec4<f32>(unpack2x16float(k_side[b]), unpack2x16float(k_side[b + 1u])),
         vec4<f32>(unpack2x16float(k_side[b + 2u]), unpack2x16float(k_side[b + 3u])));
}

fn open_chunks(base: u32, c0: u32) {
    open_chunk(base, c0); open_chunk(base, c0 + 1u); open_chunk(base, c0 + 2u);
    open_chunk(base, c0 + 3u); open_chunk(base, c0 + 4u); open_chunk(base, c0 + 5u);
    open_chunk(base, c0 + 6u); open_chunk(base, c0 + 7u);
}

// Scaled q . k of the F16 key held at k_side[base] (an open block), into s.
fn qk_open(base: u32) {
    for (var r = 0u; r < 8u; r++) {
        s[r] = 0.0;
    }
    open_chunks(base, 0u);
    open_chunks(base, 8u);
    open_chunks(base, 16u);
    open_chunks(base, 24u);
}

// ---- p . V over this lane's dims --------------------------------------------------

// acc[r][e..e+n] += pw[r] * x
// A row that may not see the key (weight 0) skips it: 0 x Inf is NaN, and a
// non-finite V (stored from device input, or another block's row read for a key
// outside the window) must not reach it.
fn axpy2(e: u32, x: vec2<f32>) {
    for (var r = 0u; r < ROWS; r++) {
        if (pw[r] == 0.0) {
            continue;
        }
        acc[r * DL + e] += pw[r] * x.x;
        acc[r * DL + e + 1u] += pw[r] * x.y;
    }
}

fn axpy4(e: u32, x: vec4<f32>, f: f32) {
    for (var r = 0u; r < ROWS; r++) {
        if (pw[r] == 0.0) {
            continue;
        }
        let p = pw[r] * f;
        acc[r * DL + e] += p * x.x;
        acc[r * DL + e + 1u] += p * x.y;
        acc[r * DL + e + 2u] += p * x.z;
        acc[r * DL + e + 3u] += p * x.w;
    }
}

// Word w of this lane's V slice, holding dims w * (32 / bits) onwards.
fn pv_word(w: u32, word: u32, f: vec2<f32>) {
    if (V_DTYPE == 0u) {
        axpy2(2u * w, pair_values(word, V_CODE));
    } else if (V_DTYPE == 1u) {
        axpy4(4u * w, byte_values(word, V_CODE), f.x);
    } else {
        axpy4(8u * w, int4_codes(word, 0u), f.x);
        axpy4(8u * w + 4u, int4_codes(word, 16u), f.x);
    }
}

// V factors of word w of this lane's slice: (scale, min) for Int4, whose min part
// goes to accm once per group; (1, 0) otherwise (an Int8 scale is in the weights).
fn v_factors(row: u32, lane: u32, w: u32) -> vec2<f32> {
    if (V_DTYPE != 2u) {
        return vec2<f32>(1.0, 0.0);
    }
    let d = lane * DL + 8u * w;
    let f = unpack2x16float(v_side[row * (HEAD_DIM / V_GROUP) + d / V_GROUP]);
    let g = (8u * w) / V_GROUP; // group within the lane's slice (V_GROUP >= DL: 0)
    for (var r = 0u; r < ROWS; r++) {
        if (pw[r] != 0.0) {
            accm[r * 4u + g] += pw[r] * f.y;
        }
    }
    return f;
}

// Word w (of the vec4 x, from component o) with its group's factors, fetched
// when the word starts a group; returns the factors in force.
fn pv_group_word(row: u32, lane: u32, w: u32, x: vec4<u32>, o: u32, f: vec2<f32>) -> vec2<f32> {
    if (w >= V_WORDS) {
        return f;
    }
    var g = f;
    if (w == 0u || (V_DTYPE == 2u && (8u * w) % V_GROUP == 0u)) {
        g = v_factors(row, lane, w);
    }
    pv_word(w, x[min(o + w % 4u, 3u)], g);
    return g;
}

// Words 4j..4j+3 of this lane's slice of V row `row`, from one vec4 load (four
// words cost one per-lane address where four u32 loads cost four). A slice of one
// or two words takes them out of the vec4 it shares with other lanes.
fn pv_quad(row: u32, lane: u32, j: u32, f: vec2<f32>) -> vec2<f32> {
    if (4u * j >= V_WORDS) {
        return f;
    }
    let first = lane * V_WORDS + 4u * j;
    let x = v_data[row * (HEAD_DIM / (8u << V_DTYPE)) + first / 4u];
    let o = select(first % 4u, 0u, V_WORDS % 4u == 0u);
    var g = pv_group_word(row, lane, 4u * j, x, o, f);
    g = pv_group_word(row, lane, 4u * j + 1u, x, o, g);
    g = pv_group_word(row, lane, 4u * j + 2u, x, o, g);
    return pv_group_word(row, lane, 4u * j + 3u, x, o, g);
}

// Adds the key broadcast from one lane: its pool row and weights (pa: rows 0-3,
// pb: rows 4-7).
fn pv(row: u32, lane: u32, pa: vec4<f32>, pb: vec4<f32>) {
    pw = array<f32, 8>(pa.x, pa.y, pa.z, pa.w, pb.x, pb.y, pb.z, pb.w);
    var f = pv_quad(row, lane, 0u, vec2<f32>(1.0, 0.0));
    f = pv_quad(row, lane, 1u, f);
    f = pv_quad(row, lane, 2u, f);
    f = pv_quad(row, lane, 3u, f);
}

// ---- running softmax ------------------------------------------------------------

fn rescale_row(r: u32, c: f32) {
    if (r >= ROWS) {
        return;
    }
    for (var e = 0u; e < DL; e++) {
        acc[r * DL + e] *= c;
    }
    for (var g = 0u; g < 4u; g++) {
        accm[r * 4u + g] *= c;
    }
}

// Writes row r's partial, if the workgroup has that row.
fn write_row(r: u32, w: Work, lane: u32, m: f32, l: f32) {
    if (r >= ROWS || !has_row(w, r)) {
        return;
    }
    let b = partial_start(w, r);
    for (var e = 0u; e < DL; e++) {
        var x = acc[r * DL + e];
        if (V_DTYPE == 2u) {
            x += accm[r * 4u + e / V_GROUP];
        }
        partial[b + 2u + lane * DL + e] = x;
    }
    if (lane == 0u) {
        partial[b] = m;
        partial[b + 1u] = l;
    }
}

// Which of four rows (query positions pos) see key t of a split ending at end:
// causal, and within the sliding window (pos - t, not t + window, which wraps for
// windows near 2^32; where t > pos it wraps too, but causality already says no).
fn visible(t: u32, end: u32, pos: vec4<u32>) -> vec4<bool> {
    let causal = vec4<u32>(t) <= pos;
    let in_window = vec4<bool>(P.window == 0u) | (pos - vec4<u32>(t) < vec4<u32>(P.window));
    return causal & in_window & vec4<bool>(t < end);
}

@compute @workgroup_size(8)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let w = work_of(wid);

    // Stage q (rotated like the K pool, then scaled) and move it into registers.
    stage_q(w, ROWS, lane, LANES);
    // Position of each row's query: a key t is visible to row r if t <= pos[r].
    let pos_a = w.pos0 + min(vec4<u32>(0u, 1u, 2u, 3u) / QH, vec4<u32>(w.nq - 1u));
    let pos_b = w.pos0 + min(vec4<u32>(4u, 5u, 6u, 7u) / QH, vec4<u32>(w.nq - 1u));
    load_q(0u); load_q(8u); load_q(16u); load_q(24u);
    if (K_DTYPE == 2u) {
        sum_q(0u); sum_q(8u); sum_q(16u); sum_q(24u);
    }

    var block = 0xffffffffu; // Int4 per channel: the (block, kv head) of ks and km
    var ma = vec4<f32>(-3.0e38);
    var mb = vec4<f32>(-3.0e38);
    var la = vec4<f32>(0.0);
    var lb = vec4<f32>(0.0);
    for (var t0 = w.begin; t0 < w.end; t0 += LANES) {
        let t = t0 + lane;
        // A pool past one binding is bound in windows, one dispatch each: steps
        // with no key in this one are skipped (the workgroup is one subgroup).
        let inside = window_block(w.table_offset, min(t, w.end - 1u)) < P.blocks;
        if (!subgroupAny(inside)) {
            continue;
        }
        let row = kv_addr(w.table_offset, w.kvh, min(t, w.end - 1u));
        let va = visible(t, w.end, pos_a) & vec4<bool>(inside);
        let vb = visible(t, w.end, pos_b) & vec4<bool>(inside);
        if (K_DTYPE == 3u && t0 >= w.sealed) {
            // The step's 8 keys lie in one block (work_of aligns them): the open one.
            qk_open(open_key(w, min(t, w.end - 1u)));
        } else {
            if (K_DTYPE == 3u) {
                let bh = subgroupBroadcastFirst(kv_addr(w.table_offset, w.kvh, t0) / BLOCK_SIZE);
                if (bh != block) {
                    block = bh;
                    channel_factors(bh, lane);
                }
            }
            qk(row);
        }
        var sa = vec4<f32>(s[0], s[1], s[2], s[3]);
        var sb = vec4<f32>(s[4], s[5], s[6], s[7]);
        if (P.softcap > 0.0) {
            sa = P.softcap * tanh(sa / P.softcap);
            sb = P.softcap * tanh(sb / P.softcap);
        }
        sa = select(vec4<f32>(-3.0e38), sa, va);
        sb = select(vec4<f32>(-3.0e38), sb, vb);
        let na = max(ma, subgroupMax(sa));
        var nb = mb;
        if (ROWS > 4u) {
            nb = max(mb, subgroupMax(sb));
        }
        let pa = select(vec4<f32>(0.0), exp(sa - na), va);
        var pb = vec4<f32>(0.0);
        if (ROWS > 4u) {
            pb = select(vec4<f32>(0.0), exp(sb - nb), vb);
        }
        // Unconditional: skipping it when no max moved measured no faster.
        let ca = exp(ma - na);
        var cb = vec4<f32>(1.0);
        if (ROWS > 4u) {
            cb = exp(mb - nb);
        }
        la *= ca;
        lb *= cb;
        rescale_row(0u, ca.x); rescale_row(1u, ca.y); rescale_row(2u, ca.z); rescale_row(3u, ca.w);
        rescale_row(4u, cb.x); rescale_row(5u, cb.y); rescale_row(6u, cb.z); rescale_row(7u, cb.w);
        ma = na;
        mb = nb;
        la += pa;
        lb += pb;
        // An Int8 V row's scale rides with the key's weights: loaded once, by the
        // key's own lane, not once per lane.
        var wa = pa;
        var wb = pb;
        if (V_DTYPE == 1u) {
            let scale = bitcast<f32>(v_side[row]);
            // A zero weight stays zero (0 x Inf is NaN): see axpy2.
            wa = select(vec4<f32>(0.0), wa * scale, wa != vec4<f32>(0.0));
            wb = select(vec4<f32>(0.0), wb * scale, wb != vec4<f32>(0.0));
        }
        for (var j = 0u; j < LANES; j++) {
            // Key j of the step: lane j's pool row and weights, in every lane (rows
            // that may not see it, weight 0, skip it: see axpy2).
            pv(subgroupShuffle(row, j), lane, subgroupShuffle(wa, j), subgroupShuffle(wb, j));
        }
    }

    // Partial (max, sum, acc) of each row for this split.
    let la_sum = subgroupAdd(la);
    let lb_sum = subgroupAdd(lb);
    write_row(0u, w, lane, ma.x, la_sum.x);
    write_row(1u, w, lane, ma.y, la_sum.y);
    write_row(2u, w, lane, ma.z, la_sum.z);
    write_row(3u, w, lane, ma.w, la_sum.w);
    write_row(4u, w, lane, mb.x, lb_sum.x);
    write_row(5u, w, lane, mb.y, lb_sum.y);
    write_row(6u, w, lane, mb.z, lb_sum.z);
    write_row(7u, w, lane, mb.w, lb_sum.w);
}
