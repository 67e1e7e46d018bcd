// Dequant-fused attention, one split of the keys (flash-decoding), shaped for GPUs.
// A workgroup takes ROWS = QH x QB query rows of one sequence that share one kv head
// (QH q heads of a GQA group at QB consecutive positions) and one range of keys, so
// each K/V byte it reads serves every row. Decode is QB = 1; prefill uses QB > 1
// with causal masks. The workgroup writes an unnormalised partial (max, sum,
// acc[HEAD_DIM]) per row that attn_reduce.wgsl combines. With a rotated K pool, q
// is rotated here; attn_reduce.wgsl rotates the output back. CPU twin:
// src/cpu/attention.rs.
//
// Lanes and slots. KT consecutive invocations, the lanes of a slot, split a K or V
// row along head_dim, DL dims each, so that adjacent lanes read a row in one
// coalesced sweep of loads up to 16 bytes wide; the WG / KT slots take consecutive
// keys. A lane keeps its DL dims of every q row and of every output row in
// registers, so each K and V word is dequantized once for all ROWS rows. Per step a
// slot takes KB keys: its lanes' partial dots are summed over the slot
// (sum_over_lanes, prepended: subgroup shuffles where the adapter's subgroups hold
// KT lanes, workgroup memory otherwise), then every lane of the slot runs the same
// online softmax and adds its dims of V. Slots keep their own running max and sum
// and are merged once, at the end. src/wgpu/attention.rs chooses DL, KT and KB.
//
// Int4 per channel K (K_DTYPE 3): a lane keeps the (scale, min) of its dims for the
// block of the keys it reads, reloaded when the block changes, and dequantizes each
// code before the dot; keys of a sequence's open block are F16 in k_side.

override K_DTYPE: u32 = 1u; // packing: 0 16-bit pairs, 1 bytes + scale, 2 Int4, 3 Int4 per channel (common.wgsl)
override V_DTYPE: u32 = 1u;
override K_CODE: u32 = 0u;  // format within it: 0 F16 / Int8, 1 BF16 / FP8 E4M3, 2 FP8 E5M2
override V_CODE: u32 = 0u;
override HEAD_DIM: u32 = 128u;
override K_GROUP: u32 = 32u;
override V_GROUP: u32 = 32u;
override QH: u32 = 4u; // q heads per workgroup block, at most 8
override QB: u32 = 1u; // query positions per workgroup
override BLOCK_SIZE: u32 = 16u;
override ROTATE_Q: u32 = 0u; // 1: the K pool is Walsh–Hadamard rotated
override NORM_BITS: u32 = 0x3f800000u; // f32 bits of 1/sqrt(HEAD_DIM)
override DL: u32 = 16u; // dims per lane: 8, 16 or 32, dividing HEAD_DIM and Int4 groups
override KT: u32 = 8u;  // lanes per slot: a power of two >= HEAD_DIM / DL
override KB: u32 = 4u;  // keys per slot and step; KB * ROWS <= 16
override ROWS: u32 = QH * QB; // query rows (position b, head j) at b * QH + j; at most 8

const WG: u32 = 64u;
override NZ: u32 = WG / KT; // slots
override K_WORDS: u32 = HEAD_DIM / (2u << min(K_DTYPE, 2u)); // words per K row
override V_WORDS: u32 = HEAD_DIM / (2u << V_DTYPE);
override K_LW: u32 = DL / (2u << min(K_DTYPE, 2u)); // words of a lane's slice of a K row: 1, 2 or 4
override V_LW: u32 = DL / (2u << V_DTYPE);

// q rows while they are staged; then sum_over_lanes' scratch; then the merged
// accumulators of the slots.
var<workgroup> q_sh: array<f32, 2048>;
var<workgroup> ml_sh: array<f32, 512>; // per slot and row: running max and sum, [(z * 8 + r) * 2]

var<private> qr: array<f32, 64>;        // this lane's dims of each q row, [r * DL + e]
var<private> qsum: array<f32, 8>;       // sum of qr per row (times an Int4 K group's min)
var<private> acc: array<f32, 64>;       // this lane's dims of each output row, [r * DL + e]
var<private> accm: array<f32, 8>;       // Int4 V: sum of p * min of the lane's group, per row
var<private> m: array<f32, 8>;          // the slot's running max per row
var<private> l: array<f32, 8>;          // the slot's running sum per row
var<private> pos: array<u32, 8>;        // position of each row's query
var<private> sc: array<f32, 16>;        // the step's partial dots, scores, then weights: [j * ROWS + r]
var<private> kw: array<vec4<u32>, 4>;   // this lane's slice of each key's K row
var<private> vw: array<vec4<u32>, 4>;   // and of its V row
var<private> kf: array<vec2<f32>, 4>;   // each key's K factors for this lane: (scale, min)
var<private> vf: array<vec2<f32>, 4>;   // and its V factors
var<private> inside: array<bool, 4>;    // whether each key lies in the bound window
var<private> kblock: array<u32, 4>;     // Int4 per channel: each key's (block, kv head),
var<private> kopen: array<u32, 4>;      // or where it starts in k_side if it is in the open block (else 0)
var<private> cblock: u32 = 0xffffffffu; // the (block, kv head) whose factors are in cs, cm
var<private> cs: array<f32, 32>;        // their scales for this lane's dims
var<private> cm: array<f32, 32>;        // and mins

// Words [i, i + n) of the vec4 v that holds them (n = 1, 2 or 4, i a multiple of
// n), from its first component on: a slice narrower than 16 bytes is one load that
// the lanes sharing the vec4 make together.
fn slice(v: vec4<u32>, i: u32, n: u32) -> vec4<u32> {
    if (n == 4u) {
        return v;
    }
    if (n == 2u) {
        return select(v, v.zwxy, (i & 2u) != 0u);
    }
    return vec4<u32>(v[i & 3u]);
}

fn q4(o: u32) -> vec4<f32> {
    return vec4<f32>(qr[o], qr[o + 1u], qr[o + 2u], qr[o + 3u]);
}

// Loads the step's keys t0 + j * NZ + z (the last key of the split past its end):
// lane x's slices of their K and V rows and the factors of those slices, all
// before any is used.
fn load_step(w: Work, t0: u32, z: u32, x: u32) {
    for (var j = 0u; j < KB; j++) {
        let t = min(t0 + j * NZ + z, w.end - 1u);
        inside[j] = window_block(w.table_offset, t) < P.blocks;
        let row = kv_addr(w.table_offset, w.kvh, t);
        kblock[j] = row / BLOCK_SIZE;
        kopen[j] = select(0u, open_key(w, t), K_DTYPE == 3u && t >= w.sealed);
        let ki = row * K_WORDS + x * K_LW;
        kw[j] = slice(k_data[ki / 4u], ki, K_LW);
        let vi = row * V_WORDS + x * V_LW;
        vw[j] = slice(v_data[vi / 4u], vi, V_LW);
        kf[j] = factors(K_DTYPE, k_side[row * side_words(K_DTYPE, K_GROUP) + select(0u, x * DL / K_GROUP, K_DTYPE == 2u)]);
        vf[j] = factors(V_DTYPE, v_side[row * side_words(V_DTYPE, V_GROUP) + select(0u, x * DL / V_GROUP, V_DTYPE == 2u)]);
    }
}

// Side words per row: none for F16 (its side array is a single unused word) and
// Int4 per channel (its factors are per block), one scale for Int8, one (scale,
// min) per group for Int4.
fn side_words(dtype: u32, group: u32) -> u32 {
    if (dtype == 0u || dtype == 3u) {
        return 0u;
    }
    return select(1u, HEAD_DIM / group, dtype == 2u);
}

// (scale, min) of a side word: (1, 0) for F16, (scale, 0) for Int8.
fn factors(dtype: u32, word: u32) -> vec2<f32> {
    if (dtype == 1u) {
        return vec2<f32>(bitcast<f32>(word), 0.0);
    }
    if (dtype == 2u) {
        return unpack2x16float(word);
    }
    return vec2<f32>(1.0, 0.0);
}

// Int4 per channel: the (scale, min) of this lane's dims in key j's block, loaded
// when the block changes (keys come in position order: once per block or so).
fn channel_factors(j: u32, x: u32) {
    if (kblock[j] == cblock) {
        return;
    }
    cblock = kblock[j];
    for (var e = 0u; e < DL; e++) {
        let f = unpack2x16float(k_side[cblock * HEAD_DIM + x * DL + e]);
        cs[e] = f.x;
        cm[e] = f.y;
    }
}

// This lane's part of q . k for key j of the step, per row, into sc. Each K word is
// dequantized once for every row; Int8 and Int4 factors apply to the lane's sum,
// Int4 per channel factors to each dim.
fn qk(j: u32, x: u32) {
    let f = kf[j];
    if (K_DTYPE == 3u && kopen[j] != 0u) {
        qk_open(j, x);
        return;
    }
    if (K_DTYPE == 3u) {
        channel_factors(j, x);
    }
    var s: array<f32, 8>;
    for (var r = 0u; r < ROWS; r++) {
        s[r] = 0.0;
    }
    for (var w = 0u; w < K_LW; w++) {
        let word = kw[j][w];
        if (K_DTYPE == 0u) {
            let c = pair_values(word, K_CODE);
            for (var r = 0u; r < ROWS; r++) {
                let o = r * DL + 2u * w;
                s[r] += qr[o] * c.x + qr[o + 1u] * c.y;
            }
        } else if (K_DTYPE == 1u) {
            let c = byte_values(word, K_CODE);
            for (var r = 0u; r < ROWS; r++) {
                s[r] += dot(q4(r * DL + 4u * w), c);
            }
        } else if (K_DTYPE == 2u) {
            let lo = int4_codes(word, 0u);
            let hi = int4_codes(word, 16u);
            for (var r = 0u; r < ROWS; r++) {
                let o = r * DL + 8u * w;
                s[r] += dot(q4(o), lo) + dot(q4(o + 4u), hi);
            }
        } else {
            let e = 8u * w;
            let lo = int4_codes(word, 0u) * vec4<f32>(cs[e], cs[e + 1u], cs[e + 2u], cs[e + 3u])
                   + vec4<f32>(cm[e], cm[e + 1u], cm[e + 2u], cm[e + 3u]);
            let hi = int4_codes(word, 16u) * vec4<f32>(cs[e + 4u], cs[e + 5u], cs[e + 6u], cs[e + 7u])
                   + vec4<f32>(cm[e + 4u], cm[e + 5u], cm[e + 6u], cm[e + 7u]);
            for (var r = 0u; r < ROWS; r++) {
                let o = r * DL + e;
                s[r] += dot(q4(o), lo) + dot(q4(o + 4u), hi);
            }
        }
    }
    for (var r = 0u; r < ROWS; r++) {
        sc[j * ROWS + r] = f.x * s[r] + f.y * qsum[r];
    }
}

// Int4 per channel: qk for key j of the step held F16 in its open block (a few keys
// per sequence: read from k_side word by word).
fn qk_open(j: u32, x: u32) {
    var s: array<f32, 8>;
    for (var r = 0u; r < ROWS; r++) {
        s[r] = 0.0;
    }
    for (var w = 0u; w < DL / 2u; w++) {
        let c = unpack2x16float(k_side[kopen[j] + x * (DL / 2u) + w]);
        for (var r = 0u; r < ROWS; r++) {
            let o = r * DL + 2u * w;
            s[r] += qr[o] * c.x + qr[o + 1u] * c.y;
        }
    }
    for (var r = 0u; r < ROWS; r++) {
        sc[j * ROWS + r] = s[r];
    }
}

// The step's scores (softcapped, masked) into weights against each row's new
// running max, rescaling what the slot has summed so far.
fn softmax_step(w: Work, t0: u32, z: u32) {
    for (var r = 0u; r < ROWS; r++) {
        var mx = m[r];
        for (var j = 0u; j < KB; j++) {
            let t = t0 + j * NZ + z;
            var s = sc[j * ROWS + r];
            if (P.softcap > 0.0) {
                s = P.softcap * tanh(s / P.softcap);
            }
            let seen = t < w.end && inside[j] && t <= pos[r] && (P.window == 0u || pos[r] - t < P.window);
            s = select(-3.0e38, s, seen);
            sc[j * ROWS + r] = s;
            mx = max(mx, s);
        }
        let c = exp(m[r] - mx);
        m[r] = mx;
        l[r] *= c;
        accm[r] *= c;
        for (var e = 0u; e < DL; e++) {
            acc[r * DL + e] *= c;
        }
        for (var j = 0u; j < KB; j++) {
            let s = sc[j * ROWS + r];
            let p = select(0.0, exp(s - mx), s > -1.0e38);
            sc[j * ROWS + r] = p;
            l[r] += p;
        }
    }
}

// Adds key j's weighted V to this lane's dims of every row; each V word is
// dequantized once for every row. An Int4 group's min goes to accm, once per key.
fn pv(j: u32) {
    // A row that may not see the key (weight 0) skips it: 0 x Inf is NaN, and a
    // non-finite V (stored from device input, or another block's row read for a key
    // outside the window) must not reach it.
    let f = vf[j];
    var p: array<f32, 8>;
    var seen: array<bool, 8>;
    for (var r = 0u; r < ROWS; r++) {
        seen[r] = sc[j * ROWS + r] != 0.0;
        p[r] = sc[j * ROWS + r] * f.x;
        if (V_DTYPE == 2u && seen[r]) {
            accm[r] += sc[j * ROWS + r] * f.y;
        }
    }
    for (var w = 0u; w < V_LW; w++) {
        let word = vw[j][w];
        if (V_DTYPE == 0u) {
            let c = pair_values(word, V_CODE);
            for (var r = 0u; r < ROWS; r++) {
                if (seen[r]) {
                    let o = r * DL + 2u * w;
                    acc[o] += p[r] * c.x;
                    acc[o + 1u] += p[r] * c.y;
                }
            }
        } else if (V_DTYPE == 1u) {
            let c = byte_values(word, V_CODE);
            for (var r = 0u; r < ROWS; r++) {
                if (seen[r]) {
                    axpy4(r * DL + 4u * w, p[r], c);
                }
            }
        } else {
            let lo = int4_codes(word, 0u);
            let hi = int4_codes(word, 16u);
            for (var r = 0u; r < ROWS; r++) {
                if (seen[r]) {
                    axpy4(r * DL + 8u * w, p[r], lo);
                    axpy4(r * DL + 8u * w + 4u, p[r], hi);
                }
            }
        }
    }
}

// acc[o .. o + 4] += p * c
fn axpy4(o: u32, p: f32, c: vec4<f32>) {
    acc[o] += p * c.x;
    acc[o + 1u] += p * c.y;
    acc[o + 2u] += p * c.z;
    acc[o + 3u] += p * c.w;
}

// Merges the slots' partials (max, sum, acc) of every row into the workgroup's,
// one slot at a time through workgroup memory, and writes it.
fn merge_slots(w: Work, lid: u32, z: u32, x: u32) {
    if (x == 0u) {
        for (var r = 0u; r < ROWS; r++) {
            ml_sh[(z * 8u + r) * 2u] = m[r];
            ml_sh[(z * 8u + r) * 2u + 1u] = l[r];
        }
    }
    workgroupBarrier();
    // Each slot's accumulator, with its Int4 min term, against the workgroup's max.
    for (var r = 0u; r < ROWS; r++) {
        var mx = -3.0e38;
        for (var s = 0u; s < NZ; s++) {
            mx = max(mx, ml_sh[(s * 8u + r) * 2u]);
        }
        let c = exp(m[r] - mx);
        for (var e = 0u; e < DL; e++) {
            acc[r * DL + e] = (acc[r * DL + e] + accm[r]) * c;
        }
    }
    let on = x * DL < HEAD_DIM;
    for (var s = 0u; s < NZ; s++) {
        if (z == s && on) {
            for (var r = 0u; r < ROWS; r++) {
                for (var e = 0u; e < DL; e++) {
                    let i = r * HEAD_DIM + x * DL + e;
                    q_sh[i] = select(q_sh[i] + acc[r * DL + e], acc[r * DL + e], s == 0u);
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = lid; i < ROWS * HEAD_DIM; i += WG) {
        let r = i / HEAD_DIM;
        if (has_row(w, r)) {
            partial[partial_start(w, r) + 2u + i % HEAD_DIM] = q_sh[i];
        }
    }
    if (lid < ROWS && has_row(w, lid)) {
        var mx = -3.0e38;
        for (var s = 0u; s < NZ; s++) {
            mx = max(mx, ml_sh[(s * 8u + lid) * 2u]);
        }
        var sum = 0.0;
        for (var s = 0u; s < NZ; s++) {
            sum += ml_sh[(s * 8u + lid) * 2u + 1u] * exp(ml_sh[(s * 8u + lid) * 2u] - mx);
        }
        let b = partial_start(w, lid);
        partial[b] = mx;
        partial[b + 1u] = sum;
    }
}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = work_of(wid);

    // Stage the q rows (rotated like the K pool, then scaled), then take this lane's
    // dims of each into registers; a lane past head_dim holds zeros.
    stage_q(w, ROWS, lid, WG);
    let z = lid / KT;
    let x = lid % KT;
    let on = x * DL < HEAD_DIM;
    let xs = min(x, HEAD_DIM / DL - 1u); // the slice a lane past head_dim loads anyway
    for (var r = 0u; r < ROWS; r++) {
        var sum = 0.0;
        for (var e = 0u; e < DL; e++) {
            let v = select(0.0, q_sh[r * HEAD_DIM + xs * DL + e], on);
            qr[r * DL + e] = v;
            sum += v;
        }
        qsum[r] = sum;
        m[r] = -3.0e38;
        l[r] = 0.0;
        accm[r] = 0.0;
        pos[r] = w.pos0 + min(r / QH, w.nq - 1u);
    }
    for (var e = 0u; e < 64u; e++) {
        acc[e] = 0.0;
    }
    workgroupBarrier(); // q_sh is scratch from here on

    // Every invocation runs every step, so that sum_over_lanes may synchronise.
    for (var t0 = w.begin; t0 < w.end; t0 += NZ * KB) {
        load_step(w, t0, z, xs);
        for (var j = 0u; j < KB; j++) {
            qk(j, xs);
        }
        sum_over_lanes(lid);
        softmax_step(w, t0, z);
        for (var j = 0u; j < KB; j++) {
            pv(j);
        }
    }
    merge_slots(w, lid, z, x);
}
