//! Which K and V dtypes (and rotation) to store for a memory budget, ranked by
//! accuracy measured on real activations, and the next more compact pair for a
//! policy that steps down under memory pressure.

use crate::{Error, KvDtype, Result};

/// NMSE of attention over a quantized cache against f64 attention over the
/// unquantized inputs, summed over decode and prefill of layers 0, 9, 19 and 29 of
/// SmolLM2-135M (`tests/data`): `(K, V, rotated, NMSE)`. Measured by
/// `tests/accuracy.rs`, which fails if this table differs from what it measures.
/// Int4Channel keys are sized at their default 32-token blocks, open blocks left out.
pub const MEASURED: [(&str, &str, bool, f64); 20] = [
    ("f16", "f16", false, 1.026e-6),
    ("f16", "f16", true, 8.621e-7),
    ("bf16", "bf16", false, 7.684e-5),
    ("bf16", "bf16", true, 5.866e-5),
    ("int8", "int8", false, 2.319e-3),
    ("int8", "int8", true, 6.224e-4),
    ("fp8-e4m3", "fp8-e4m3", false, 1.416e-2),
    ("fp8-e4m3", "fp8-e4m3", true, 1.508e-2),
    ("fp8-e5m2", "fp8-e5m2", false, 5.179e-2),
    ("fp8-e5m2", "fp8-e5m2", true, 5.504e-2),
    ("int4", "int4", false, 2.529e-1),
    ("int4", "int4", true, 1.582e-1),
    ("int4:g64", "int4:g64", false, 3.618e-1),
    ("int4:g64", "int4:g64", true, 2.045e-1),
    ("int8", "int4", false, 2.998e-2),
    ("int8", "int4", true, 1.951e-2),
    ("fp8-e4m3", "int4", false, 4.033e-2),
    ("fp8-e4m3", "int4", true, 3.265e-2),
    ("int4c", "int4", false, 5.159e-2),
    ("int4c", "int4", true, 4.802e-2),
];

/// The shape of a model's KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    /// Layers.
    pub layers: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

/// A way to store the cache, what it takes and its measured error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    /// Key dtype.
    pub k: KvDtype,
    /// Value dtype.
    pub v: KvDtype,
    /// Walsh–Hadamard rotation (`CacheConfig::with_rotation`).
    pub rotate: bool,
    /// Bytes of K and V for the requested tokens, every layer.
    pub bytes: u64,
    /// Measured NMSE ([`MEASURED`]); lower is more accurate.
    pub nmse: f64,
}

/// Every measured choice that `shape` can store (rotation needs a power-of-two
/// head_dim; an Int4 group must divide it), with its bytes for `tokens` tokens.
pub fn choices(shape: KvShape, tokens: usize) -> Vec<Choice> {
    MEASURED
        .iter()
        .filter_map(|&(k, v, rotate, nmse)| {
            let (k, v): (KvDtype, KvDtype) = (k.parse().ok()?, v.parse().ok()?);
            let d = shape.head_dim;
            let fits = k.check(d).is_ok() && v.check(d).is_ok();
            if !fits || (rotate && !d.is_power_of_two()) {
                return None;
            }
            let per_token = (k.bytes_per_token_head(d) + v.bytes_per_token_head(d)) as u64;
            let bytes = per_token * (shape.kv_heads * shape.layers) as u64 * tokens as u64;
            Some(Choice {
                k,
                v,
                rotate,
                bytes,
                nmse,
            })
        })
        .collect()
}

/// The most accurate choice whose K and V for `tokens` tokens (context x batch)
/// fit `budget` bytes; ties go to the smaller. If none fits, an
/// [`Error::OverBudget`] saying how many bytes the most compact one lacks.
pub fn advise(budget: u64, shape: KvShape, tokens: usize) -> Result<Choice> {
    let all = choices(shape, tokens);
    let best = all
        .iter()
        .filter(|c| c.bytes <= budget)
        .min_by(|a, b| a.nmse.total_cmp(&b.nmse).then(a.bytes.cmp(&b.bytes)));
    if let Some(c) = best {
        return Ok(*c);
    }
    let needed = all.iter().map(|c| c.bytes).min().ok_or_else(|| {
        Error::Unsupported(format!(
            "head_dim {}: no measured dtype stores it",
            shape.head_dim
        ))
    })?;
    Err(Error::OverBudget { needed, budget })
}

/// Under memory pressure, the next step down from storing K as `k` and V as `v`:
/// the most accurate measured choice (rotated or not) that takes fewer bytes per
/// token at `head_dim`; `None` when nothing is more compact.
pub fn next_more_compact(k: KvDtype, v: KvDtype, head_dim: usize) -> Option<Choice> {
    let shape = KvShape {
        layers: 1,
        kv_heads: 1,
        head_dim,
    };
    let now = (k.bytes_per_token_head(head_dim) + v.bytes_per_token_head(head_dim)) as u64;
    choices(shape, 1)
        .into_iter()
        .filter(|c| c.bytes < now)
        .min_by(|a, b| a.nmse.total_cmp(&b.nmse).then(b.bytes.cmp(&a.bytes)))
}
