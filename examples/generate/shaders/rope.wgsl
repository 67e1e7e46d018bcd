// RoPE in place on q `[rows, Q_HEADS, D]` and k `[rows, KV_HEADS, D]`: dims 2i and
// 2i+1 of each head turn by the angle whose cos and sin the host put in
// `table[r, i]` (computed in f64 there, so large positions lose nothing).

override Q_HEADS: u32;
override KV_HEADS: u32;
override D: u32;

struct Rows {
    count: u32,
    first: u32,
}

@group(0) @binding(0) var<uniform> rows: Rows;
@group(0) @binding(1) var<storage, read> table: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read_write> q: array<f32>;
@group(0) @binding(3) var<storage, read_write> k: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let half = D / 2u;
    let heads = Q_HEADS + KV_HEADS;
    let i = id.x;
    if i >= rows.count * heads * half {
        return;
    }
    let p = i % half;
    let h = (i / half) % heads;
    let r = i / (half * heads);
    let cs = table[r * half + p];
    if h < Q_HEADS {
        let j = (r * Q_HEADS + h) * D + 2u * p;
        let a = q[j];
        let b = q[j + 1u];
        q[j] = a * cs.x - b * cs.y;
        q[j + 1u] = a * cs.y + b * cs.x;
    } else {
        let j = (r * KV_HEADS + h - Q_HEADS) * D + 2u * p;
        let a = k[j];
        let b = k[j + 1u];
        k[j] = a * cs.x - b * cs.y;
        k[j + 1u] = a * cs.y + b * cs.x;
    }
}
