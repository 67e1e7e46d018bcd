//! Walsh–Hadamard rotation of head vectors (DESIGN §1, optional): spreads a few
//! outlier channels over all channels before quantization, so per-token scales
//! stop being set by the outliers. Orthogonal and its own inverse, so attention
//! rotates q the same way and rotates its output back.
//!
//! The exact operation order below is the contract every kernel follows, so that
//! rotated vectors are bit-identical on every backend.

/// Rotates `x` in place by `H / sqrt(n)` (`H` the Sylvester Hadamard matrix,
/// `n = x.len()` a power of two): butterflies of stride 1, 2, 4, … then one
/// multiplication by [`hadamard_norm`].
pub fn hadamard(x: &mut [f32]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two(), "Hadamard length {n}");
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (x[j], x[j + h]);
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
    let norm = hadamard_norm(n);
    for v in x {
        *v *= norm;
    }
}

/// `1 / sqrt(n)` rounded to f32, the factor that makes the rotation orthogonal.
pub fn hadamard_norm(n: usize) -> f32 {
    (1.0 / (n as f64).sqrt()) as f32
}
