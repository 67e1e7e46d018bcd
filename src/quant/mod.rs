//! Bit-exact reference quantizers of DESIGN §1, one (token, head) vector at a time.
//!
//! Every backend's kernels must produce exactly these codes and side data (GPU codes
//! may differ by one where `x / scale` lies within a few ulps of a rounding boundary).

mod bf16;
mod f16;
pub mod fp8;
mod int4;
mod int4c;
mod int8;
mod rotation;

pub use self::bf16::{bf16_bits, bf16_value, dequantize_bf16, quantize_bf16};
pub use self::f16::{dequantize_f16, quantize_f16};
pub use fp8::{E4M3, E5M2, Fp8};
pub use int4::{dequantize_int4, quantize_int4};
pub use int4c::{dequantize_int4c, quantize_int4c};
pub use int8::{dequantize_int8, quantize_int8};
pub use rotation::{hadamard, hadamard_norm};

use crate::{Error, KvDtype, Result};

/// Largest finite f16 value; inputs beyond it are bad input.
pub const F16_MAX: f32 = 65504.0;

/// Checks that every value is finite and within f16's range.
pub fn check_finite(what: &'static str, x: &[f32]) -> Result<()> {
    // Written so that NaN (which compares false) is rejected too.
    match x.iter().position(|v| {
        !matches!(
            v.abs().partial_cmp(&F16_MAX),
            Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
        )
    }) {
        Some(index) => Err(Error::NonFinite {
            what,
            index,
            value: x[index],
        }),
        None => Ok(()),
    }
}

/// Quantizes one vector `x` (length head_dim) into `data` and `side`, sized by
/// `dtype.words_per_head` and `dtype.side_words_per_head`. Inputs must already be
/// checked (see [`check_finite`], [`KvDtype::check`]). Int4Channel quantizes whole
/// blocks ([`quantize_int4c`]); a lone vector is what its open block holds, F16,
/// so `data` then takes head_dim / 2 words.
pub fn quantize(dtype: KvDtype, x: &[f32], data: &mut [u32], side: &mut [u32]) {
    match dtype {
        KvDtype::F16 | KvDtype::Int4Channel => quantize_f16(x, data),
        KvDtype::Bf16 => quantize_bf16(x, data),
        KvDtype::Int8 => quantize_int8(x, data, &mut side[0]),
        KvDtype::Fp8E4M3 => E4M3.quantize(x, data, &mut side[0]),
        KvDtype::Fp8E5M2 => E5M2.quantize(x, data, &mut side[0]),
        KvDtype::Int4 { group } => quantize_int4(x, group as usize, data, side),
    }
}

/// Dequantizes one vector into `out` (length head_dim); Int4Channel as [`quantize`].
pub fn dequantize(dtype: KvDtype, data: &[u32], side: &[u32], out: &mut [f32]) {
    match dtype {
        KvDtype::F16 | KvDtype::Int4Channel => dequantize_f16(data, out),
        KvDtype::Bf16 => dequantize_bf16(data, out),
        KvDtype::Int8 => dequantize_int8(data, side[0], out),
        KvDtype::Fp8E4M3 => E4M3.dequantize(data, side[0], out),
        KvDtype::Fp8E5M2 => E5M2.dequantize(data, side[0], out),
        KvDtype::Int4 { group } => dequantize_int4(data, side, group as usize, out),
    }
}

/// Quantizes then dequantizes one vector: what attention sees of `x` (for
/// Int4Channel, in an open block: [`stored_sequence`] has the quantized blocks).
pub fn round_trip(dtype: KvDtype, x: &[f32]) -> Vec<f32> {
    let d = x.len();
    let words = if dtype.per_channel() {
        d / 2
    } else {
        dtype.words_per_head(d)
    };
    let mut data = vec![0; words];
    let mut side = vec![0; dtype.side_words_per_head(d)];
    quantize(dtype, x, &mut data, &mut side);
    let mut out = vec![0.0; d];
    dequantize(dtype, &data, &side, &mut out);
    out
}

/// What attention sees of `x` in a pool of `dtype`, Walsh–Hadamard `rotated` or
/// not: the round trip, back in the model's basis.
pub fn stored(dtype: KvDtype, rotated: bool, x: &[f32]) -> Vec<f32> {
    if !rotated {
        return round_trip(dtype, x);
    }
    let mut r = x.to_vec();
    hadamard(&mut r);
    let mut out = round_trip(dtype, &r);
    hadamard(&mut out);
    out
}

/// What attention sees of a sequence's keys or values `x` (`[tokens, kv_heads,
/// head_dim]`, positions 0..tokens) stored as `dtype` in blocks of `block_size`:
/// [`stored`] per vector, except that Int4Channel quantizes each full block per
/// channel (from its F16 values) and keeps the open block's tokens F16. A shape
/// the dtype cannot store, or `x` not whole tokens, is an error.
pub fn stored_sequence(
    dtype: KvDtype,
    rotated: bool,
    x: &[f32],
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
) -> Result<Vec<f32>> {
    let d = head_dim;
    dtype.check(d)?;
    if rotated && !d.is_power_of_two() {
        return Err(Error::InvalidConfig(format!(
            "rotation needs a power-of-two head_dim, got {d}"
        )));
    }
    if kv_heads == 0 || block_size == 0 || x.len() % (kv_heads * d) != 0 {
        return Err(Error::ShapeMismatch {
            what: "x ([tokens, kv_heads, head_dim], kv_heads and block_size positive)",
            expected: x.len().next_multiple_of((kv_heads * d).max(1)),
            got: x.len(),
        });
    }
    if !dtype.per_channel() {
        return Ok(x
            .chunks_exact(d)
            .flat_map(|v| stored(dtype, rotated, v))
            .collect());
    }
    let tokens = x.len() / (kv_heads * d);
    // Each vector as the open block holds it: F16 of the (rotated) vector.
    let mut held: Vec<f32> = x
        .chunks_exact(d)
        .flat_map(|v| {
            let mut r = v.to_vec();
            if rotated {
                hadamard(&mut r);
            }
            round_trip(KvDtype::F16, &r)
        })
        .collect();
    let mut block = vec![0f32; block_size * d];
    let mut codes = vec![0u32; block_size * d / 8];
    let mut factors = vec![0u32; d];
    for b in 0..tokens / block_size {
        for h in 0..kv_heads {
            for s in 0..block_size {
                let at = ((b * block_size + s) * kv_heads + h) * d;
                block[s * d..][..d].copy_from_slice(&held[at..at + d]);
            }
            quantize_int4c(&block, d, &mut codes, &mut factors);
            for s in 0..block_size {
                let at = ((b * block_size + s) * kv_heads + h) * d;
                dequantize_int4c(
                    &codes[s * d / 8..][..d / 8],
                    &factors,
                    &mut held[at..at + d],
                );
            }
        }
    }
    if rotated {
        held.chunks_exact_mut(d).for_each(hadamard);
    }
    Ok(held)
}
