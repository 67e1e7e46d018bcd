// y[r] = x[rows.first + r] / rms(x[rows.first + r]) * g, one workgroup per row.

override N: u32;
override EPS: f32;

const LANES: u32 = 64u;

struct Rows {
    count: u32,
    first: u32,
}

@group(0) @binding(0) var<uniform> rows: Rows;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

var<workgroup> part: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let r = wg.x;
    let src = (rows.first + r) * N;
    var s = 0.0;
    for (var k = lane; k < N; k += LANES) {
        let v = x[src + k];
        s += v * v;
    }
    part[lane] = s;
    workgroupBarrier();
    for (var h = LANES / 2u; h > 0u; h >>= 1u) {
        if lane < h {
            part[lane] += part[lane + h];
        }
        workgroupBarrier();
    }
    let scale = 1.0 / sqrt(part[0] / f32(N) + EPS);
    for (var k = lane; k < N; k += LANES) {
        y[r * N + k] = x[src + k] * scale * g[k];
    }
}
