// x[r] = the embedding row of token tokens[r]; the table is `[vocab, N]` f16, two
// per u32. The host checked every token against the vocabulary.

override N: u32;

struct Rows {
    count: u32,
    first: u32,
}

@group(0) @binding(0) var<uniform> rows: Rows;
@group(0) @binding(1) var<storage, read> table: array<u32>;
@group(0) @binding(2) var<storage, read> tokens: array<u32>;
@group(0) @binding(3) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let pairs = N / 2u;
    let i = id.x;
    if i >= rows.count * pairs {
        return;
    }
    let r = i / pairs;
    let j = i % pairs;
    let v = unpack2x16float(table[tokens[r] * pairs + j]);
    x[r * N + 2u * j] = v.x;
    x[r * N + 2u * j + 1u] = v.y;
}
