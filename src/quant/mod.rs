//! Bit-exact reference quantizers of DESIGN §1, one (token, head) vector at a time.
//!
//! Every backend's kernels must produce exactly these codes and side data (GPU codes
//! may differ by one where `x / scale` lies within a few ulps of a rounding boundary).

mod bf16;
mod f16;
pub mod fp8;
mod int4;
mod int8;
mod rotation;

pub use self::bf16::{bf16_bits, bf16_value, dequantize_bf16, quantize_bf16};
pub use self::f16::{dequantize_f16, quantize_f16};
pub use fp8::{E4M3, E5M2, Fp8};
pub use int4::{dequantize_int4, quantize_int4};
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
/// checked (see [`check_finite`], [`KvDtype::check`]).
pub fn quantize(dtype: KvDtype, x: &[f32], data: &mut [u32], side: &mut [u32]) {
    match dtype {
        KvDtype::F16 => quantize_f16(x, data),
        KvDtype::Bf16 => quantize_bf16(x, data),
        KvDtype::Int8 => quantize_int8(x, data, &mut side[0]),
        KvDtype::Fp8E4M3 => E4M3.quantize(x, data, &mut side[0]),
        KvDtype::Fp8E5M2 => E5M2.quantize(x, data, &mut side[0]),
        KvDtype::Int4 { group } => quantize_int4(x, group as usize, data, side),
    }
}

/// Dequantizes one vector into `out` (length head_dim).
pub fn dequantize(dtype: KvDtype, data: &[u32], side: &[u32], out: &mut [f32]) {
    match dtype {
        KvDtype::F16 => dequantize_f16(data, out),
        KvDtype::Bf16 => dequantize_bf16(data, out),
        KvDtype::Int8 => dequantize_int8(data, side[0], out),
        KvDtype::Fp8E4M3 => E4M3.dequantize(data, side[0], out),
        KvDtype::Fp8E5M2 => E5M2.dequantize(data, side[0], out),
        KvDtype::Int4 { group } => dequantize_int4(data, side, group as usize, out),
    }
}

/// Quantizes then dequantizes one vector: what attention sees of `x`.
pub fn round_trip(dtype: KvDtype, x: &[f32]) -> Vec<f32> {
    let d = x.len();
    let mut data = vec![0; dtype.words_per_head(d)];
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
