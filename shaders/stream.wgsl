// Streaming-read roofline: reads every word of `src` once (grid-stride, four words
// per step) and writes one word per invocation so the reads cannot be optimised away.

struct StreamParams {
    words: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> P: StreamParams;
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> sink: array<u32>;

@compute @workgroup_size(64)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let n = P.words / 4u;
    let stride = nwg.x * 64u;
    var x = vec4<u32>(0u);
    for (var i = gid.x; i < n; i += stride) {
        x ^= src[i];
    }
    sink[gid.x] = x.x ^ x.y ^ x.z ^ x.w;
}
