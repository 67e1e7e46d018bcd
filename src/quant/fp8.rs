//! FP8 (OCP E4M3 and E5M2): `x / scale` per (token, head) as 8-bit floats, four per
//! u32 (element 4i in the lowest byte), with one f32 `scale = absmax / largest`, so
//! that the largest magnitude maps to the format's largest finite value. Encoding
//! rounds to nearest even in integer arithmetic (as `shaders/common.wgsl` does)
//! and saturates, so no code is ever NaN or infinite.

/// An FP8 format: mantissa bits and exponent bias.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fp8 {
    /// Mantissa bits (3 for E4M3, 2 for E5M2).
    pub mantissa: u32,
    /// Exponent bias (7, 15).
    pub bias: u32,
    /// Largest finite magnitude's code (0x7e: 448; 0x7b: 57344).
    pub max_code: u32,
    /// Largest finite magnitude.
    pub max: f32,
}

/// OCP E4M3 ("FN": no infinities; 0x7f is NaN, never produced).
pub const E4M3: Fp8 = Fp8 {
    mantissa: 3,
    bias: 7,
    max_code: 0x7e,
    max: 448.0,
};

/// OCP E5M2 (IEEE-like; 0x7c is infinity, never produced).
pub const E5M2: Fp8 = Fp8 {
    mantissa: 2,
    bias: 15,
    max_code: 0x7b,
    max: 57344.0,
};

impl Fp8 {
    /// `y` as a code: round to nearest even, saturated to the largest finite value
    /// (NaN too, keeping its sign), sign in bit 7.
    pub fn encode(self, y: f32) -> u32 {
        let b = y.to_bits();
        let sign = (b >> 24) & 0x80;
        let a = b & 0x7fff_ffff;
        let min_normal = (127 - self.bias + 1) << 23;
        let r = if a > 0x7f80_0000 {
            self.max_code // NaN
        } else if a >= min_normal {
            // Rebias the exponent and round off the low mantissa bits.
            let t = a - ((127 - self.bias) << 23);
            let shift = 23 - self.mantissa;
            (t + (1 << (shift - 1)) - 1 + ((t >> shift) & 1)) >> shift
        } else {
            // Subnormal: units of 2^(1 - bias - mantissa); the scaling is exact.
            let unit = f32::from_bits((127 + self.bias - 1 + self.mantissa) << 23);
            (f32::from_bits(a) * unit).round_ties_even() as u32
        };
        sign | r.min(self.max_code)
    }

    /// A code's value.
    pub fn decode(self, c: u32) -> f32 {
        let e = (c >> self.mantissa) & ((1 << (7 - self.mantissa)) - 1);
        let f = c & ((1 << self.mantissa) - 1);
        let mag = if e == 0 {
            f as f32 * f32::from_bits((127 + 1 - self.bias - self.mantissa) << 23)
        } else {
            f32::from_bits(((e + 127 - self.bias) << 23) | (f << (23 - self.mantissa)))
        };
        if c & 0x80 != 0 { -mag } else { mag }
    }

    /// Quantizes `x` into codes and an f32 scale.
    pub fn quantize(self, x: &[f32], data: &mut [u32], scale_bits: &mut u32) {
        let absmax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = absmax / self.max;
        *scale_bits = scale.to_bits();
        for (w, quad) in data.iter_mut().zip(x.chunks_exact(4)) {
            *w = 0;
            if scale == 0.0 {
                continue;
            }
            for (i, &v) in quad.iter().enumerate() {
                *w |= self.encode(v / scale) << (8 * i);
            }
        }
    }

    /// Dequantizes: `value(code) * scale`.
    pub fn dequantize(self, data: &[u32], scale_bits: u32, out: &mut [f32]) {
        let scale = f32::from_bits(scale_bits);
        for (quad, &w) in out.chunks_exact_mut(4).zip(data) {
            for (i, o) in quad.iter_mut().enumerate() {
                *o = self.decode((w >> (8 * i)) & 0xff) * scale;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code decodes to a value that encodes back to it (the canonical code of
    /// zero aside), and the formats' known points hold.
    #[test]
    fn codes_round_trip_and_known_values() {
        for f in [E4M3, E5M2] {
            for c in 0..=255u32 {
                if c & 0x7f > f.max_code {
                    continue; // NaN / infinity codes, never produced
                }
                let v = f.decode(c);
                let back = f.encode(v);
                assert!(back == c || (v == 0.0 && back & 0x7f == 0), "{f:?} {c:#x}");
            }
            assert_eq!(f.decode(f.max_code), f.max);
            assert_eq!(f.encode(f.max * 2.0), f.max_code);
            assert_eq!(f.encode(-f32::INFINITY), 0x80 | f.max_code);
            assert_eq!(f.encode(f32::NAN), f.max_code);
        }
        assert_eq!(E4M3.decode(0x01), 2f32.powi(-9)); // smallest subnormal
        assert_eq!(E4M3.decode(0x08), 2f32.powi(-6)); // smallest normal
        assert_eq!(E5M2.decode(0x01), 2f32.powi(-16));
        assert_eq!(E4M3.encode(1.0), 0x38);
        assert_eq!(E5M2.encode(1.0), 0x3c);
        // Ties to even: 1 + 1/16 lies halfway between 1 and 1.125 in E4M3.
        assert_eq!(E4M3.encode(1.0625), 0x38);
        assert_eq!(E4M3.encode(1.1875), 0x3a);
    }

    /// Encoding is the nearest code, ties to even, on a sweep of values.
    #[test]
    fn encode_is_nearest_even() {
        for f in [E4M3, E5M2] {
            let values: Vec<f32> = (0..=f.max_code).map(|c| f.decode(c)).collect();
            let mut x = 1e-7f32;
            while x < f.max {
                let c = f.encode(x);
                let got = f.decode(c);
                let best = values
                    .iter()
                    .map(|v| (v - x).abs())
                    .fold(f32::INFINITY, f32::min);
                assert_eq!((got - x).abs(), best, "{f:?} x={x}");
                x *= 1.0137;
            }
        }
    }
}
