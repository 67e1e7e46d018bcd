//! The level vocabularies inference engines use, and how they map to [`KvDtype`].
//!
//! * [`CacheLevel`]: KV-cache levels `fp16 < q8 < fp8 < q4`, each with a nominal
//!   memory factor against FP16, ordered by compactness for a policy that steps
//!   down a level under memory pressure ([`CacheLevel::next_more_compact`]).
//! * [`WeightLevel`]: weight-style levels `none / float16 / bfloat16 / int8 /
//!   int4`, with bits per element, the reduction against FP32 and conversion from
//!   a bit width.
//!
//! Conversions exist where they are unambiguous; where they are not (8 bits could
//! be int8 or fp8, 16 bits f16 or bf16) they are an [`Error::InvalidConfig`]
//! naming the candidates. Every name prints and parses in lower case; with the
//! `serde` feature the enums (and [`KvDtype`]) serialize as those names.

use std::fmt;
use std::str::FromStr;

use crate::{Error, KvDtype, Result};

/// `Display` and `FromStr` of a level by its `name()`: parsing takes any of
/// `ALL`'s names (any case, surrounding space ignored), else an
/// [`Error::InvalidConfig`] listing them.
macro_rules! named_levels {
    ($ty:ty, $what:literal, $names:literal) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $ty {
            type Err = Error;

            /// Parses one of the level's names (any case).
            fn from_str(s: &str) -> Result<Self> {
                let t = s.trim();
                Self::ALL
                    .into_iter()
                    .find(|l| t.eq_ignore_ascii_case(l.name()))
                    .ok_or_else(|| {
                        Error::InvalidConfig(format!(
                            concat!("unknown ", $what, " {:?}: expected ", $names),
                            s
                        ))
                    })
            }
        }
    };
}

/// A KV-cache level, in order of compactness: `Fp16 < Q8 < Fp8 < Q4`.
///
/// Q8 and FP8 take the same memory; FP8 counts as the more compact step, as the
/// engines' policies order them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CacheLevel {
    /// 16-bit floats: [`KvDtype::F16`].
    Fp16,
    /// 8-bit integers with a scale: [`KvDtype::Int8`].
    Q8,
    /// 8-bit floats with a scale: [`KvDtype::Fp8E4M3`].
    Fp8,
    /// 4-bit integers with a scale and min per group: [`KvDtype::Int4`], group 32.
    Q4,
}

impl CacheLevel {
    /// Every level, least compact first.
    pub const ALL: [CacheLevel; 4] = [
        CacheLevel::Fp16,
        CacheLevel::Q8,
        CacheLevel::Fp8,
        CacheLevel::Q4,
    ];

    /// The lower-case name: `fp16`, `q8`, `fp8` or `q4`.
    pub fn name(self) -> &'static str {
        match self {
            CacheLevel::Fp16 => "fp16",
            CacheLevel::Q8 => "q8",
            CacheLevel::Fp8 => "fp8",
            CacheLevel::Q4 => "q4",
        }
    }

    /// Nominal memory against FP16, side data left out: 1.0, 0.5, 0.5, 0.25.
    /// [`KvDtype::factor_vs_f16`] of [`dtype`](Self::dtype) is the exact factor
    /// for a head_dim.
    pub fn memory_factor(self) -> f64 {
        match self {
            CacheLevel::Fp16 => 1.0,
            CacheLevel::Q8 | CacheLevel::Fp8 => 0.5,
            CacheLevel::Q4 => 0.25,
        }
    }

    /// Ordinal of compactness: 0 (fp16), 1 (q8), 2 (fp8), 3 (q4).
    pub fn compactness(self) -> u8 {
        self as u8
    }

    /// The next more compact level, `None` after Q4: what a policy steps down to
    /// under memory pressure.
    pub fn next_more_compact(self) -> Option<CacheLevel> {
        Self::ALL.get(self.compactness() as usize + 1).copied()
    }

    /// The next less compact level, `None` before FP16.
    pub fn next_less_compact(self) -> Option<CacheLevel> {
        (self.compactness() as usize)
            .checked_sub(1)
            .map(|i| Self::ALL[i])
    }

    /// The dtype kvq stores this level in: F16, Int8, FP8 E4M3 or Int4 group 32.
    pub fn dtype(self) -> KvDtype {
        match self {
            CacheLevel::Fp16 => KvDtype::F16,
            CacheLevel::Q8 => KvDtype::Int8,
            CacheLevel::Fp8 => KvDtype::Fp8E4M3,
            CacheLevel::Q4 => KvDtype::Int4 { group: 32 },
        }
    }

    /// The level of `bits` bits per element where only one has it: 16 is fp16 and
    /// 4 is q4; 8 could be q8 or fp8, an [`Error::InvalidConfig`] saying so.
    pub fn from_bits(bits: u32) -> Result<Self> {
        match bits {
            16 => Ok(CacheLevel::Fp16),
            4 => Ok(CacheLevel::Q4),
            8 => Err(Error::InvalidConfig(
                "8 bits per element could be cache level q8 or fp8: name the level".into(),
            )),
            _ => Err(Error::InvalidConfig(format!(
                "no cache level has {bits} bits per element: expected 16 (fp16), 8 (q8, fp8) or 4 (q4)"
            ))),
        }
    }
}

impl From<CacheLevel> for KvDtype {
    fn from(level: CacheLevel) -> Self {
        level.dtype()
    }
}

impl TryFrom<KvDtype> for CacheLevel {
    type Error = Error;

    /// The level of a dtype stored in the level's own format: F16, Int8, FP8 E4M3
    /// and Int4 of any group or per channel (the level does not name a group). BF16
    /// and FP8 E5M2 have no level.
    fn try_from(d: KvDtype) -> Result<Self> {
        match d {
            KvDtype::F16 => Ok(CacheLevel::Fp16),
            KvDtype::Int8 => Ok(CacheLevel::Q8),
            KvDtype::Fp8E4M3 => Ok(CacheLevel::Fp8),
            KvDtype::Int4 { .. } | KvDtype::Int4Channel => Ok(CacheLevel::Q4),
            KvDtype::Bf16 | KvDtype::Fp8E5M2 => Err(Error::InvalidConfig(format!(
                "KV dtype {d} has no cache level: the levels are fp16 (f16), q8 (int8), fp8 (fp8-e4m3) and q4 (int4)"
            ))),
        }
    }
}

named_levels!(CacheLevel, "cache level", "fp16, q8, fp8 or q4");

/// A weight-style precision level: `none` (unquantized FP32), `float16`,
/// `bfloat16`, `int8`, `int4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightLevel {
    /// Not quantized: 32-bit floats.
    None,
    /// IEEE binary16.
    Float16,
    /// bfloat16.
    Bfloat16,
    /// 8-bit integers.
    Int8,
    /// 4-bit integers.
    Int4,
}

impl WeightLevel {
    /// Every level, least compact first (Float16 and Bfloat16 tie).
    pub const ALL: [WeightLevel; 5] = [
        WeightLevel::None,
        WeightLevel::Float16,
        WeightLevel::Bfloat16,
        WeightLevel::Int8,
        WeightLevel::Int4,
    ];

    /// The lower-case name: `none`, `float16`, `bfloat16`, `int8` or `int4`.
    pub fn name(self) -> &'static str {
        match self {
            WeightLevel::None => "none",
            WeightLevel::Float16 => "float16",
            WeightLevel::Bfloat16 => "bfloat16",
            WeightLevel::Int8 => "int8",
            WeightLevel::Int4 => "int4",
        }
    }

    /// Bits per element, scales left out: 32, 16, 16, 8, 4.
    pub fn bits_per_element(self) -> u32 {
        match self {
            WeightLevel::None => 32,
            WeightLevel::Float16 | WeightLevel::Bfloat16 => 16,
            WeightLevel::Int8 => 8,
            WeightLevel::Int4 => 4,
        }
    }

    /// How many times smaller than FP32: 1, 2, 2, 4, 8.
    pub fn reduction_vs_f32(self) -> f64 {
        32.0 / self.bits_per_element() as f64
    }

    /// Memory against FP32: 1.0, 0.5, 0.5, 0.25, 0.125.
    pub fn factor_vs_f32(self) -> f64 {
        self.bits_per_element() as f64 / 32.0
    }

    /// Ordinal of compactness: 0 (none), 1 (float16 and bfloat16 tie), 2 (int8),
    /// 3 (int4).
    pub fn compactness(self) -> u8 {
        match self {
            WeightLevel::None => 0,
            WeightLevel::Float16 | WeightLevel::Bfloat16 => 1,
            WeightLevel::Int8 => 2,
            WeightLevel::Int4 => 3,
        }
    }

    /// The level of `bits` bits per element: 32 none, 8 int8, 4 int4. 16 could be
    /// float16 or bfloat16, an [`Error::InvalidConfig`] saying so.
    pub fn from_bits(bits: u32) -> Result<Self> {
        match bits {
            32 => Ok(WeightLevel::None),
            8 => Ok(WeightLevel::Int8),
            4 => Ok(WeightLevel::Int4),
            16 => Err(Error::InvalidConfig(
                "16 bits per element could be weight level float16 or bfloat16: name the level"
                    .into(),
            )),
            _ => Err(Error::InvalidConfig(format!(
                "no weight level has {bits} bits per element: expected 32 (none), 16 (float16, bfloat16), 8 (int8) or 4 (int4)"
            ))),
        }
    }
}

impl TryFrom<WeightLevel> for KvDtype {
    type Error = Error;

    /// Float16 is F16, Bfloat16 BF16, Int8 Int8 and Int4 Int4 group 32; `none`
    /// (FP32) has no KV dtype.
    fn try_from(w: WeightLevel) -> Result<Self> {
        match w {
            WeightLevel::Float16 => Ok(KvDtype::F16),
            WeightLevel::Bfloat16 => Ok(KvDtype::Bf16),
            WeightLevel::Int8 => Ok(KvDtype::Int8),
            WeightLevel::Int4 => Ok(KvDtype::Int4 { group: 32 }),
            WeightLevel::None => Err(Error::InvalidConfig(
                "weight level none (fp32) has no KV dtype: kvq stores at most 16 bits per element"
                    .into(),
            )),
        }
    }
}

impl TryFrom<KvDtype> for WeightLevel {
    type Error = Error;

    /// F16 is float16, BF16 bfloat16, Int8 int8 and Int4 (any group) int4; the
    /// FP8s and Int4Channel (keys per channel) have no weight level.
    fn try_from(d: KvDtype) -> Result<Self> {
        match d {
            KvDtype::F16 => Ok(WeightLevel::Float16),
            KvDtype::Bf16 => Ok(WeightLevel::Bfloat16),
            KvDtype::Int8 => Ok(WeightLevel::Int8),
            KvDtype::Int4 { .. } => Ok(WeightLevel::Int4),
            KvDtype::Fp8E4M3 | KvDtype::Fp8E5M2 | KvDtype::Int4Channel => {
                Err(Error::InvalidConfig(format!(
                    "KV dtype {d} has no weight level: the levels are float16, bfloat16, int8 and int4"
                )))
            }
        }
    }
}

named_levels!(
    WeightLevel,
    "weight level",
    "none, float16, bfloat16, int8 or int4"
);

/// Serialize as the `Display` name, deserialize through `FromStr`.
#[cfg(feature = "serde")]
macro_rules! serde_via_str {
    ($ty:ty, $expecting:literal) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(
                &self,
                s: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(
                d: D,
            ) -> std::result::Result<Self, D::Error> {
                struct Name;
                impl serde::de::Visitor<'_> for Name {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: serde::de::Error>(
                        self,
                        v: &str,
                    ) -> std::result::Result<$ty, E> {
                        v.parse().map_err(E::custom)
                    }
                }
                d.deserialize_str(Name)
            }
        }
    };
}
#[cfg(feature = "serde")]
pub(crate) use serde_via_str;

#[cfg(feature = "serde")]
serde_via_str!(CacheLevel, "a cache level name (fp16, q8, fp8, q4)");
#[cfg(feature = "serde")]
serde_via_str!(
    WeightLevel,
    "a weight level name (none, float16, bfloat16, int8, int4)"
);
