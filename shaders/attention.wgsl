// Dequant-fused attention, one split of the keys (flash-decoding). A workgroup
// takes ROWS = QH x QB query rows of one sequence that share one kv head (QH q
// heads of a GQA group at QB consecutive positions) and one range of keys, so each
// K/V byte it reads serves every row. K and V are dequantized in registers; the
// workgroup writes an unnormalised partial (max, sum, acc[HEAD_DIM]) per row that
// attn_reduce.wgsl combines. Decode is QB = 1; prefill uses QB > 1 with causal masks.
// With a rotated K pool, q is rotated here; attn_reduce.wgsl rotates the output back.
// CPU twin: src/cpu/attention.rs.

@group(0) @binding(0) var<uniform> P: AttnParams;
@group(0) @binding(1) var<storage, read> q: array<f32>;        // [queries, q_heads, HEAD_DIM]
@group(0) @binding(2) var<storage, read> work: array<u32>;     // SeqInfo per seq, then work items
@group(0) @binding(3) var<storage, read> tables: array<u32>;
@group(0) @binding(4) var<storage, read> k_data: array<u32>;
@group(0) @binding(5) var<storage, read> k_side: array<u32>;
@group(0) @binding(6) var<storage, read> v_data: array<u32>;
@group(0) @binding(7) var<storage, read> v_side: array<u32>;
@group(0) @binding(8) var<storage, read_write> partial: array<f32>; // [queries, q_heads, splits, HEAD_DIM + 2]

override K_DTYPE: u32 = 1u; // 0 F16, 1 Int8, 2 Int4
override V_DTYPE: u32 = 1u;
override HEAD_DIM: u32 = 128u;
override K_GROUP: u32 = 32u;
override V_GROUP: u32 = 32u;
override QH: u32 = 4u; // q heads per workgroup block (src/wgpu/attention.rs), at most 8
override QB: u32 = 1u; // query positions per workgroup
override BLOCK_SIZE: u32 = 16u;
override ROTATE_Q: u32 = 0u; // 1: the K pool is Walsh–Hadamard rotated
override NORM_BITS: u32 = 0x3f800000u; // f32 bits of 1/sqrt(HEAD_DIM)

const WG: u32 = 64u;
const TILE: u32 = 64u;       // keys per tile: one per invocation
const MAX_ROWS: u32 = 8u;
const MAX_D: u32 = 256u;
const MAX_OWN: u32 = 32u;    // MAX_ROWS * MAX_D / WG

var<workgroup> q_sh: array<f32, 2048>;          // MAX_ROWS * MAX_D, pre-scaled
var<workgroup> qsum_sh: array<f32, 256>;        // per row and Int4 key group: sum of q
var<workgroup> p_sh: array<f32, 512>;           // TILE * MAX_ROWS scores, then weights
var<workgroup> m_sh: array<f32, 8>;             // running max per row
var<workgroup> corr_sh: array<f32, 8>;          // rescale factor of this tile per row
var<workgroup> pos_sh: array<u32, 8>;           // position of each row's query
var<workgroup> row_sh: array<u32, 64>;          // pool row of each key of the tile

fn rows() -> u32 {
    return QH * QB;
}

fn kv_addr(table_offset: u32, kvh: u32, t: u32) -> u32 {
    let b = tables[table_offset + t / BLOCK_SIZE];
    return (b * P.kv_heads + kvh) * BLOCK_SIZE + t % BLOCK_SIZE;
}

// Scaled q . k of one key (pool row `row`) for every query row of the workgroup,
// K dequantized in registers and each K word loaded once.
fn qk(row: u32, n_rows: u32) -> array<f32, 8> {
    var acc: array<f32, 8>;
    for (var r = 0u; r < 8u; r++) {
        acc[r] = 0.0;
    }
    if (K_DTYPE == 0u) {
        let base = row * (HEAD_DIM / 2u);
        for (var w = 0u; w < HEAD_DIM / 2u; w++) {
            let kv = unpack2x16float(k_data[base + w]);
            for (var r = 0u; r < n_rows; r++) {
                let e = r * HEAD_DIM + 2u * w;
                acc[r] += q_sh[e] * kv.x + q_sh[e + 1u] * kv.y;
            }
        }
    } else if (K_DTYPE == 1u) {
        let base = row * (HEAD_DIM / 4u);
        for (var w = 0u; w < HEAD_DIM / 4u; w++) {
            let c = int8_codes(k_data[base + w]);
            for (var r = 0u; r < n_rows; r++) {
                let e = r * HEAD_DIM + 4u * w;
                acc[r] += dot(vec4<f32>(q_sh[e], q_sh[e + 1u], q_sh[e + 2u], q_sh[e + 3u]), c);
            }
        }
        let scale = bitcast<f32>(k_side[row]);
        for (var r = 0u; r < n_rows; r++) {
            acc[r] *= scale;
        }
    } else {
        let groups = HEAD_DIM / K_GROUP;
        let base = row * (HEAD_DIM / 8u);
        for (var g = 0u; g < groups; g++) {
            let s = unpack2x16float(k_side[row * groups + g]); // (scale, min)
            var gacc: array<f32, 8>;
            for (var r = 0u; r < n_rows; r++) {
                gacc[r] = 0.0;
            }
            for (var w = 0u; w < K_GROUP / 8u; w++) {
                let word = k_data[base + g * (K_GROUP / 8u) + w];
                let lo = int4_codes(word, 0u);
                let hi = int4_codes(word, 16u);
                for (var r = 0u; r < n_rows; r++) {
                    let e = r * HEAD_DIM + g * K_GROUP + 8u * w;
                    gacc[r] += dot(vec4<f32>(q_sh[e], q_sh[e + 1u], q_sh[e + 2u], q_sh[e + 3u]), lo)
                             + dot(vec4<f32>(q_sh[e + 4u], q_sh[e + 5u], q_sh[e + 6u], q_sh[e + 7u]), hi);
                }
            }
            for (var r = 0u; r < n_rows; r++) {
                acc[r] += s.x * gacc[r] + s.y * qsum_sh[r * 32u + g];
            }
        }
    }
    return acc;
}

// Element d of the V vector in pool row `row`, and, for Int8/Int4, its factors:
// value = code * f.x + f.y. Returned as (code, f.x, f.y).
fn v_elem(row: u32, d: u32) -> vec3<f32> {
    if (V_DTYPE == 0u) {
        let pair = unpack2x16float(v_data[row * (HEAD_DIM / 2u) + d / 2u]);
        return vec3<f32>(select(pair.x, pair.y, (d & 1u) == 1u), 1.0, 0.0);
    } else if (V_DTYPE == 1u) {
        let word = bitcast<i32>(v_data[row * (HEAD_DIM / 4u) + d / 4u]);
        let c = (word << (24u - 8u * (d % 4u))) >> 24u;
        return vec3<f32>(f32(c), bitcast<f32>(v_side[row]), 0.0);
    } else {
        let word = v_data[row * (HEAD_DIM / 8u) + d / 8u];
        let c = (word >> (4u * (d % 8u))) & 15u;
        let s = unpack2x16float(v_side[row * (HEAD_DIM / V_GROUP) + d / V_GROUP]);
        return vec3<f32>(f32(c), s.x, s.y);
    }
}

// acc[e] += p * V[row][d0 + e] for the owned run; whole words at a time when the
// run is word aligned (the usual case), element by element otherwise.
fn accumulate_v(acc: ptr<function, array<f32, MAX_OWN>>, row: u32, d0: u32, own: u32, p: f32) {
    if (d0 >= HEAD_DIM) {
        return;
    }
    if (V_DTYPE == 0u && own % 2u == 0u) {
        let base = row * (HEAD_DIM / 2u) + d0 / 2u;
        for (var w = 0u; w < own / 2u; w++) {
            let pair = unpack2x16float(v_data[base + w]);
            (*acc)[2u * w] += p * pair.x;
            (*acc)[2u * w + 1u] += p * pair.y;
        }
    } else if (V_DTYPE == 1u && own % 4u == 0u) {
        let base = row * (HEAD_DIM / 4u) + d0 / 4u;
        let ps = p * bitcast<f32>(v_side[row]);
        for (var w = 0u; w < own / 4u; w++) {
            let c = int8_codes(v_data[base + w]) * ps;
            (*acc)[4u * w] += c.x;
            (*acc)[4u * w + 1u] += c.y;
            (*acc)[4u * w + 2u] += c.z;
            (*acc)[4u * w + 3u] += c.w;
        }
    } else if (V_DTYPE == 2u && own % 8u == 0u && V_GROUP % own == 0u) {
        let s = unpack2x16float(v_side[row * (HEAD_DIM / V_GROUP) + d0 / V_GROUP]);
        let ps = p * s.x;
        let pm = p * s.y;
        let base = row * (HEAD_DIM / 8u) + d0 / 8u;
        for (var w = 0u; w < own / 8u; w++) {
            let word = v_data[base + w];
            for (var j = 0u; j < 8u; j++) {
                (*acc)[8u * w + j] += ps * f32((word >> (4u * j)) & 15u) + pm;
            }
        }
    } else {
        for (var e = 0u; e < own; e++) {
            let d = d0 + e;
            if (d < HEAD_DIM) {
                let f = v_elem(row, d);
                (*acc)[e] += p * (f.x * f.y + f.z);
            }
        }
    }
}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = work_of(wid);

    // Stage pre-scaled q rows (row r = position b * QH + head j) and Int4 group sums.
    let n_rows = rows();
    for (var i = lid; i < n_rows * HEAD_DIM; i += WG) {
        q_sh[i] = q[q_start(w, i / HEAD_DIM) + i % HEAD_DIM];
    }
    if (lid < n_rows) {
        m_sh[lid] = -3.0e38;
        pos_sh[lid] = w.pos0 + min(lid / QH, w.nq - 1u);
    }
    prepare_q(n_rows, lid, WG);
    if (K_DTYPE == 2u) {
        let groups = HEAD_DIM / K_GROUP;
        for (var i = lid; i < n_rows * groups; i += WG) {
            let r = i / groups;
            let g = i % groups;
            var s = 0.0;
            for (var e = 0u; e < K_GROUP; e++) {
                s += q_sh[r * HEAD_DIM + g * K_GROUP + e];
            }
            qsum_sh[r * 32u + g] = s;
        }
        workgroupBarrier();
    }

    // Each invocation owns `own` consecutive output elements of one row, a power
    // of two of them per row so that runs stay word aligned (spare ones idle).
    let per_row = 1u << firstLeadingBit(WG / n_rows);
    let my_row = lid / per_row;
    let own = (HEAD_DIM + per_row - 1u) / per_row;
    let d0 = (lid % per_row) * own;
    var acc: array<f32, MAX_OWN>;
    var l = 0.0;
    for (var e = 0u; e < MAX_OWN; e++) {
        acc[e] = 0.0;
    }

    for (var t0 = w.begin; t0 < w.end; t0 += TILE) {
        // Scores: one key per invocation, every row.
        let t = t0 + lid;
        if (t < w.end) {
            let row = kv_addr(w.table_offset, w.kvh, t);
            row_sh[lid] = row;
            let dots = qk(row, n_rows);
            for (var r = 0u; r < n_rows; r++) {
                var s = dots[r];
                if (P.softcap > 0.0) {
                    s = P.softcap * tanh(s / P.softcap);
                }
                let pos = pos_sh[r];
                let visible = t <= pos && (P.window == 0u || t + P.window > pos);
                p_sh[lid * MAX_ROWS + r] = select(-3.0e38, s, visible);
            }
        } else {
            for (var r = 0u; r < n_rows; r++) {
                p_sh[lid * MAX_ROWS + r] = -3.0e38;
            }
        }
        workgroupBarrier();
        if (lid < n_rows) {
            var m = m_sh[lid];
            for (var i = 0u; i < TILE; i++) {
                m = max(m, p_sh[i * MAX_ROWS + lid]);
            }
            corr_sh[lid] = exp(m_sh[lid] - m);
            m_sh[lid] = m;
        }
        workgroupBarrier();
        for (var r = 0u; r < n_rows; r++) {
            let s = p_sh[lid * MAX_ROWS + r];
            p_sh[lid * MAX_ROWS + r] = select(0.0, exp(s - m_sh[r]), s > -1.0e38);
        }
        workgroupBarrier();

        // Weighted V sum for the owned elements.
        let corr = corr_sh[my_row];
        l *= corr;
        for (var e = 0u; e < own; e++) {
            acc[e] *= corr;
        }
        let n_t = min(TILE, w.end - t0);
        for (var i = 0u; i < n_t; i++) {
            let p = p_sh[i * MAX_ROWS + my_row];
            l += p;
            accumulate_v(&acc, row_sh[i], d0, own, p);
        }
        workgroupBarrier();
    }

    // Partial for this row and split: (max, sum, acc).
    if (my_row < n_rows && has_row(w, my_row) && d0 < HEAD_DIM) {
        let base = partial_start(w, my_row);
        for (var e = 0u; e < own; e++) {
            let d = d0 + e;
            if (d < HEAD_DIM) {
                partial[base + 2u + d] = acc[e];
            }
        }
        if (d0 == 0u) {
            partial[base] = m_sh[my_row];
            partial[base + 1u] = l;
        }
    }
}
