// Shared by the attention kernels (attention.wgsl, attention_lanes.wgsl) and
// prepended to both: their bindings and parameters, which the host writes in this
// order (src/wgpu/attention.rs), code unpacking, the staging of q and the decoding
// of a workgroup's work item. Each kernel declares q_sh and the overrides used here.

struct AttnParams {
    kv_heads: u32,
    block_size: u32,
    q_heads: u32,
    ratio: u32,      // q heads per kv head
    splits: u32,     // key splits per row block
    split_len: u32,  // keys per split (a multiple of the kernel's key step)
    window: u32,     // 0: off
    work_offset: u32, // where work items start in `work`
    scale: f32,
    softcap: f32,    // 0: off
    block0: u32,     // first pool block of the bound window (src/wgpu/windows.rs)
    blocks: u32,     // blocks in the window: keys of other blocks are skipped
    split0: u32,     // the window's first split in the partials
    partial_splits: u32, // splits per row in the partials: splits x windows
    work_base: u32,  // where the step's records start in `work`, in words
    tables_base: u32, // where its block tables start in `tables`, in words
}

@group(0) @binding(0) var<uniform> P: AttnParams;
@group(0) @binding(1) var<storage, read> q: array<u32>;          // [queries, q_heads, HEAD_DIM], f32 or f16
// `work` and `tables` are one buffer of a step's records, bound whole so that the
// bind group stays the same from step to step; the regions' offsets are parameters.
@group(0) @binding(2) var<storage, read> work: array<u32>;       // SeqInfo per seq, then work items
@group(0) @binding(3) var<storage, read> tables: array<u32>;
@group(0) @binding(4) var<storage, read> k_data: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> k_side: array<u32>;
@group(0) @binding(6) var<storage, read> v_data: array<vec4<u32>>;
@group(0) @binding(7) var<storage, read> v_side: array<u32>;
@group(0) @binding(8) var<storage, read_write> partial: array<f32>; // [queries, q_heads, splits, HEAD_DIM + 2]

override Q_F16: u32 = 0u; // 1: q holds f16, two per word, the lower element in the low half

// Per sequence, at the start of `work` (5 words each).
struct SeqInfo {
    kv_len: u32,
    table_offset: u32,
    q_offset: u32,
    q_len: u32,
    open: u32, // the open block of an Int4Channel K pool
}

// Four Int4 codes of a word, from bit `shift` (0: codes 0-3, 16: codes 4-7).
fn int4_codes(word: u32, shift: u32) -> vec4<f32> {
    return vec4<f32>((vec4<u32>(word) >> vec4<u32>(shift, shift + 4u, shift + 8u, shift + 12u)) & vec4<u32>(15u));
}

// Element i of q.
fn q_at(i: u32) -> f32 {
    if (Q_F16 == 1u) {
        return f16_value(q[i / 2u] >> (16u * (i % 2u)));
    }
    return bitcast<f32>(q[i]);
}

// Stages the workgroup's n_rows q rows in q_sh and makes them ready for q . k.
fn stage_q(w: Work, n_rows: u32, lid: u32, wg: u32) {
    for (var i = lid; i < n_rows * HEAD_DIM; i += wg) {
        q_sh[i] = q_at(q_start(w, i / HEAD_DIM) + i % HEAD_DIM);
    }
    prepare_q(n_rows, lid, wg);
}

// Makes the n_rows q rows staged in q_sh ready for q . k: rotated like the K pool
// (src/quant/rotation.rs) when it is rotated, then scaled. Every invocation of the
// workgroup (id lid of wg) calls it after writing its share of q_sh.
fn prepare_q(n_rows: u32, lid: u32, wg: u32) {
    workgroupBarrier();
    if (ROTATE_Q == 1u) {
        for (var h = 1u; h < HEAD_DIM; h *= 2u) {
            for (var i = lid; i < n_rows * HEAD_DIM / 2u; i += wg) {
                let j = (i / h) * 2u * h + i % h;
                let a = q_sh[j];
                let b = q_sh[j + h];
                q_sh[j] = a + b;
                q_sh[j + h] = a - b;
            }
            workgroupBarrier();
        }
    }
    for (var i = lid; i < n_rows * HEAD_DIM; i += wg) {
        var x = q_sh[i];
        if (ROTATE_Q == 1u) {
            x *= bitcast<f32>(NORM_BITS);
        }
        q_sh[i] = x * P.scale;
    }
    workgroupBarrier();
}

// What one workgroup computes (grid x: block of QH q heads, y: key split, z: work
// item): up to QB query positions x QH q heads of one sequence, against the keys
// of its split that they may see. A GQA group of more than QH heads is cut into
// blocks (the last may be short), adjacent in x so that they share K/V in cache.
struct Work {
    kvh: u32,          // kv head
    h0: u32,           // first q head
    nh: u32,           // q heads, at most QH
    q0: u32,           // first query row in q and in the partials
    nq: u32,           // query positions, at most QB
    pos0: u32,         // position of the first query in its sequence
    table_offset: u32, // the sequence's block table in `tables`
    split: u32,
    begin: u32,        // keys [begin, end)
    end: u32,
    open: u32,         // Int4 per channel: the sequence's open block, holding keys
    sealed: u32,       // [sealed, kv_len) as F16
}

fn work_of(wid: vec3<u32>) -> Work {
    let item = P.work_base + P.work_offset + 2u * wid.z;
    let seq = work[item];
    let first_q = work[item + 1u]; // index of the first query within the sequence
    let s = P.work_base + 5u * seq;
    let info = SeqInfo(work[s], work[s + 1u], work[s + 2u], work[s + 3u], work[s + 4u]);
    let nq = min(QB, info.q_len - first_q);
    let pos0 = info.kv_len - info.q_len + first_q;
    let blocks = (P.ratio + QH - 1u) / QH;
    let kvh = wid.x / blocks;
    let first_h = (wid.x % blocks) * QH; // within the group
    // Keys the queries may need: [lo, last position], cut into splits.
    var lo = 0u;
    if (P.window > 0u && pos0 + 1u > P.window) {
        lo = pos0 + 1u - P.window;
    }
    if (K_DTYPE == 3u) {
        // Steps of 8 keys within one block (blocks are multiples of 8), so that a
        // step is all quantized or all open: keys below the window are masked anyway.
        lo -= lo % 8u;
    }
    let begin = lo + wid.y * P.split_len;
    let end = min(begin + P.split_len, pos0 + nq);
    return Work(kvh, kvh * P.ratio + first_h, min(QH, P.ratio - first_h), info.q_offset + first_q,
                nq, pos0, P.tables_base + info.table_offset, wid.y, begin, end, info.open,
                info.kv_len - info.kv_len % BLOCK_SIZE);
}

// Row r of the workgroup is query position r / QH and q head r % QH of its block.
fn has_row(w: Work, r: u32) -> bool {
    return r / QH < w.nq && r % QH < w.nh;
}

// Where row r's q vector starts in q; a row past the work's end repeats its last.
fn q_start(w: Work, r: u32) -> u32 {
    let qrow = w.q0 + min(r / QH, w.nq - 1u);
    return (qrow * P.q_heads + w.h0 + min(r % QH, w.nh - 1u)) * HEAD_DIM;
}

// Where row r's partial (max, sum, acc[HEAD_DIM]) for the work's split starts.
fn partial_start(w: Work, r: u32) -> u32 {
    let split = P.split0 + w.split;
    return (((w.q0 + r / QH) * P.q_heads + w.h0 + r % QH) * P.partial_splits + split) * (HEAD_DIM + 2u);
}

// Block of key t within the bound window of the pools; P.blocks or more when the
// key lies outside it (below the window the subtraction wraps).
fn window_block(table_offset: u32, t: u32) -> u32 {
    return tables[table_offset + t / BLOCK_SIZE] - P.block0;
}

// Int4 per channel: where the F16 key t of the work's open block starts in k_side.
// The open blocks follow the factors of the pool's blocks (one window: P.blocks),
// at a multiple of 64 words (src/cache/config.rs, PoolLayout::open_base).
fn open_key(w: Work, t: u32) -> u32 {
    let base = (P.blocks * P.kv_heads * HEAD_DIM + 63u) / 64u * 64u;
    return base + ((w.open * P.kv_heads + w.kvh) * BLOCK_SIZE + t % BLOCK_SIZE) * (HEAD_DIM / 2u);
}

// Pool row of key t for kv head kvh within the window; a key outside the window
// reads the window's first row instead (and must be masked by the caller).
fn kv_addr(table_offset: u32, kvh: u32, t: u32) -> u32 {
    var b = window_block(table_offset, t);
    if (b >= P.blocks) {
        b = 0u;
    }
    return (b * P.kv_heads + kvh) * BLOCK_SIZE + t % BLOCK_SIZE;
}
