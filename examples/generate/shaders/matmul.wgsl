// y[r, o] = sum_k W[o, k] * x[rows.first + r, k] for r < rows.count (plus y's old
// value with ACCUMULATE: the residual adds). W is `[OUT, IN]` f16, two per u32.
// An invocation takes one output and up to ROWS rows, so each weight it reads
// serves them all; no workgroup memory and no barriers (on CPU adapters such as
// llvmpipe a barrier turns every invocation into a coroutine).

override IN: u32;
override OUT: u32;
override ACCUMULATE: bool = false;

const ROWS: u32 = 8u;

struct Rows {
    count: u32,
    first: u32,
}

@group(0) @binding(0) var<uniform> rows: Rows;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let o = id.x;
    let r0 = id.y * ROWS;
    if o >= OUT || r0 >= rows.count {
        return;
    }
    let n = min(ROWS, rows.count - r0);
    let pairs = IN / 2u;
    let x0 = (rows.first + r0) * IN;
    var acc = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    for (var k = 0u; k < pairs; k++) {
        let wk = unpack2x16float(w[o * pairs + k]);
        for (var r = 0u; r < n; r++) {
            let xi = x0 + r * IN + 2u * k;
            acc[r] += wk.x * x[xi] + wk.y * x[xi + 1u];
        }
    }
    for (var r = 0u; r < n; r++) {
        let i = (r0 + r) * OUT + o;
        if ACCUMULATE {
            y[i] += acc[r];
        } else {
            y[i] = acc[r];
        }
    }
}
