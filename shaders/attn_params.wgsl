// Parameters of the attention kernels (attention.wgsl, attention_lanes.wgsl),
// prepended to both; the host writes them in this order (src/wgpu/attention.rs).

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
