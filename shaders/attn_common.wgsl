// Shared by the attention kernels (attention.wgsl, attention_lanes.wgsl) and
// prepended to both: their parameters, which the host writes in this order
// (src/wgpu/attention.rs), and the preparation of q. Each kernel declares P,
// q_sh and the overrides used here.

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
    _pad0: u32,
    _pad1: u32,
}

// Per sequence, at the start of `work`.
struct SeqInfo {
    kv_len: u32,
    table_offset: u32,
    q_offset: u32,
    q_len: u32,
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
