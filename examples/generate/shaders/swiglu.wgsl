// g = silu(g) * u elementwise over `[rows, N]`.

override N: u32;

struct Rows {
    count: u32,
    first: u32,
}

@group(0) @binding(0) var<uniform> rows: Rows;
@group(0) @binding(1) var<storage, read> u: array<f32>;
@group(0) @binding(2) var<storage, read_write> g: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if i >= rows.count * N {
        return;
    }
    let v = g[i];
    g[i] = v / (1.0 + exp(-v)) * u[i];
}
