// y[r, o] = sum_k W[o, k] * x[rows.first + r, k] for r < rows.count (plus y's old
// value with ACCUMULATE: the residual adds).
//
// W is stored transposed, `[IN][OUT]` f16, so word `k * OUT/2 + j` holds
// W[2j, k] and W[2j+1, k]. An invocation takes outputs 2j and 2j+1 for ROWS rows:
// neighbouring invocations read neighbouring words, which CPU adapters such as
// llvmpipe (one invocation per SIMD lane) load as one vector, and each weight
// serves ROWS rows from registers. No workgroup memory and no barriers (on
// llvmpipe a barrier turns every invocation into a coroutine). The rows are
// written out one by one so that they stay in registers; ROWS is 1, 4 or 8
// (the host decodes with 1 and prefills with 8), and the unused rows fold away
// at pipeline creation. IN is a multiple of 4 and OUT of 2 (the host checks).

override IN: u32;
override OUT: u32;
override ACCUMULATE: bool = false;
override ROWS: u32 = 8u;

struct Rows {
    count: u32,
    first: u32,
}

@group(0) @binding(0) var<uniform> rows: Rows;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<vec2<f32>>;

fn dot4(w0: vec2<f32>, w1: vec2<f32>, w2: vec2<f32>, w3: vec2<f32>, v: vec4<f32>) -> vec2<f32> {
    return w0 * v.x + w1 * v.y + w2 * v.z + w3 * v.w;
}

// The quad row of row r0 + r, clamped to the last row (its result is dropped).
fn row(r0: u32, r: u32) -> u32 {
    return (rows.first + min(r0 + r, rows.count - 1u)) * (IN / 4u);
}

fn store(r: u32, j: u32, v: vec2<f32>) {
    if r >= rows.count {
        return;
    }
    let i = r * (OUT / 2u) + j;
    if ACCUMULATE {
        y[i] += v;
    } else {
        y[i] = v;
    }
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let half = OUT / 2u;
    let j = id.x;
    let r0 = id.y * ROWS;
    if j >= half || r0 >= rows.count {
        return;
    }
    let x0 = row(r0, 0u);
    let x1 = row(r0, 1u);
    let x2 = row(r0, 2u);
    let x3 = row(r0, 3u);
    let x4 = row(r0, 4u);
    let x5 = row(r0, 5u);
    let x6 = row(r0, 6u);
    let x7 = row(r0, 7u);
    var a0 = vec2<f32>();
    var a1 = vec2<f32>();
    var a2 = vec2<f32>();
    var a3 = vec2<f32>();
    var a4 = vec2<f32>();
    var a5 = vec2<f32>();
    var a6 = vec2<f32>();
    var a7 = vec2<f32>();
    for (var q = 0u; q < IN / 4u; q++) {
        let k = 4u * q * half + j;
        let w0 = unpack2x16float(w[k]);
        let w1 = unpack2x16float(w[k + half]);
        let w2 = unpack2x16float(w[k + 2u * half]);
        let w3 = unpack2x16float(w[k + 3u * half]);
        a0 += dot4(w0, w1, w2, w3, x[x0 + q]);
        if ROWS > 1u {
            a1 += dot4(w0, w1, w2, w3, x[x1 + q]);
            a2 += dot4(w0, w1, w2, w3, x[x2 + q]);
            a3 += dot4(w0, w1, w2, w3, x[x3 + q]);
        }
        if ROWS > 4u {
            a4 += dot4(w0, w1, w2, w3, x[x4 + q]);
            a5 += dot4(w0, w1, w2, w3, x[x5 + q]);
            a6 += dot4(w0, w1, w2, w3, x[x6 + q]);
            a7 += dot4(w0, w1, w2, w3, x[x7 + q]);
        }
    }
    store(r0, j, a0);
    if ROWS > 1u {
        store(r0 + 1u, j, a1);
        store(r0 + 2u, j, a2);
        store(r0 + 3u, j, a3);
    }
    if ROWS > 4u {
        store(r0 + 4u, j, a4);
        store(r0 + 5u, j, a5);
        store(r0 + 6u, j, a6);
        store(r0 + 7u, j, a7);
    }
}
