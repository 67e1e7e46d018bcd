//! `KvDtype`: the storage formats of DESIGN §1 and their sizes.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// How one (token, kv head) vector of `head_dim` values is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvDtype {
    /// IEEE binary16, two per u32 (element 2i in the low half).
    F16,
    /// bfloat16 (the upper half of an f32, rounded to nearest even), two per u32
    /// (element 2i in the low half).
    Bf16,
    /// Symmetric signed 8-bit codes, four per u32, plus one f32 scale.
    Int8,
    /// OCP FP8 E4M3 (bias 7, no infinities, largest 448), four per u32 (element 4i
    /// in the lowest byte), of `x / scale` with one f32 `scale = absmax / 448`.
    Fp8E4M3,
    /// OCP FP8 E5M2 (bias 15, largest finite 57344), four per u32, of `x / scale`
    /// with one f32 `scale = absmax / 57344`.
    Fp8E5M2,
    /// Asymmetric unsigned 4-bit codes, eight per u32, plus one (f16 scale, f16 min)
    /// u32 per `group` elements.
    Int4 {
        /// Elements per scale/min pair; divides head_dim, multiple of 8.
        group: u32,
    },
    /// Keys only: asymmetric unsigned 4-bit codes, eight per u32 as [`Int4`](Self::Int4),
    /// with one (f16 scale, f16 min) u32 per (block, kv head, channel): each channel
    /// of a full block on its own scale, across the block's tokens (KIVI). The
    /// block still being filled, one per sequence, is kept in F16 until it fills,
    /// then quantized at once (DESIGN §1). Needs blocks of at least
    /// [`INT4C_BLOCK`] tokens.
    Int4Channel,
}

/// Smallest (and default) block size of an [`KvDtype::Int4Channel`] pool: the
/// (scale, min) per channel then costs at most one bit per element.
pub const INT4C_BLOCK: usize = 32;

impl KvDtype {
    /// Int4 with the default group for `head_dim`: the largest of 32, 16, 8 dividing it.
    pub fn int4_default(head_dim: usize) -> Self {
        let group = [32u32, 16, 8]
            .into_iter()
            .find(|&g| head_dim % g as usize == 0)
            .unwrap_or(32);
        KvDtype::Int4 { group }
    }

    /// Checks that this dtype can store vectors of `head_dim` values.
    pub fn check(&self, head_dim: usize) -> Result<()> {
        if head_dim == 0 || head_dim % 8 != 0 {
            return Err(Error::Unsupported(format!(
                "head_dim {head_dim}: must be a positive multiple of 8"
            )));
        }
        if let KvDtype::Int4 { group } = *self {
            let g = group as usize;
            if g == 0 || g % 8 != 0 || head_dim % g != 0 {
                return Err(Error::Unsupported(format!(
                    "int4 group {group} for head_dim {head_dim}: the group must be a multiple of 8 dividing head_dim"
                )));
            }
        }
        Ok(())
    }

    /// u32 words of codes per (token, head).
    pub fn words_per_head(&self, head_dim: usize) -> usize {
        head_dim / self.per_word() as usize
    }

    /// u32 words of side data (scales, mins) per (token, head); for
    /// [`Int4Channel`](Self::Int4Channel) the per-channel words of a block of
    /// [`INT4C_BLOCK`] tokens shared out over its tokens (a pool's exact size, its
    /// F16 open blocks included, is [`PoolLayout`](crate::cache::PoolLayout)'s).
    pub fn side_words_per_head(&self, head_dim: usize) -> usize {
        match *self {
            KvDtype::F16 | KvDtype::Bf16 => 0,
            KvDtype::Int8 | KvDtype::Fp8E4M3 | KvDtype::Fp8E5M2 => 1,
            KvDtype::Int4 { group } => head_dim / group.max(1) as usize,
            KvDtype::Int4Channel => head_dim.div_ceil(INT4C_BLOCK),
        }
    }

    /// Bytes of one (token, head) vector, codes and side data.
    pub fn bytes_per_token_head(&self, head_dim: usize) -> usize {
        4 * (self.words_per_head(head_dim) + self.side_words_per_head(head_dim))
    }

    /// Bits per element, side data included.
    pub fn bits_per_element(&self, head_dim: usize) -> f64 {
        8.0 * self.bytes_per_token_head(head_dim) as f64 / head_dim as f64
    }

    /// Size relative to F16 (e.g. 0.516 for Int8 at head_dim 128).
    pub fn factor_vs_f16(&self, head_dim: usize) -> f64 {
        self.bits_per_element(head_dim) / 16.0
    }

    /// Size relative to F32.
    pub fn factor_vs_f32(&self, head_dim: usize) -> f64 {
        self.bits_per_element(head_dim) / 32.0
    }

    /// Codes per u32 word: 2, 4 or 8.
    pub fn per_word(&self) -> u32 {
        2 << self.packing().min(2)
    }

    /// Bits of one code: 16, 8 or 4.
    pub fn code_bits(&self) -> u32 {
        32 / self.per_word()
    }

    /// How kernels unpack a word (their `*_DTYPE`): 0, two 16-bit values (F16,
    /// BF16); 1, four bytes times one f32 scale (Int8, FP8); 2, eight Int4 codes
    /// with a (scale, min) per group; 3, eight Int4 codes with a (scale, min) per
    /// (block, channel).
    pub(crate) fn packing(&self) -> u32 {
        match self {
            KvDtype::F16 | KvDtype::Bf16 => 0,
            KvDtype::Int8 | KvDtype::Fp8E4M3 | KvDtype::Fp8E5M2 => 1,
            KvDtype::Int4 { .. } => 2,
            KvDtype::Int4Channel => 3,
        }
    }

    /// Which format of its packing a code is (kernels' `*_CODE`): F16, Int8 and
    /// Int4 0; BF16 and FP8 E4M3 1; FP8 E5M2 2.
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    pub(crate) fn code(&self) -> u32 {
        match self {
            KvDtype::F16 | KvDtype::Int8 | KvDtype::Int4 { .. } | KvDtype::Int4Channel => 0,
            KvDtype::Bf16 | KvDtype::Fp8E4M3 => 1,
            KvDtype::Fp8E5M2 => 2,
        }
    }

    /// Whether stored values (or side data) are f16, so that inputs past f16's range
    /// cannot be stored: F16 itself, Int4's f16 scale and min, and Int4Channel's
    /// F16 open block.
    pub fn f16_bounded(&self) -> bool {
        matches!(
            self,
            KvDtype::F16 | KvDtype::Int4 { .. } | KvDtype::Int4Channel
        )
    }

    /// Whether this is [`Int4Channel`](Self::Int4Channel): quantized per block, with
    /// an F16 open block per sequence.
    pub fn per_channel(&self) -> bool {
        matches!(self, KvDtype::Int4Channel)
    }

    /// Int4 group size; 0 for other dtypes.
    pub(crate) fn group(&self) -> u32 {
        match self {
            KvDtype::Int4 { group } => *group,
            _ => 0,
        }
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvDtype::F16 => f.write_str("f16"),
            KvDtype::Bf16 => f.write_str("bf16"),
            KvDtype::Int8 => f.write_str("int8"),
            KvDtype::Fp8E4M3 => f.write_str("fp8-e4m3"),
            KvDtype::Fp8E5M2 => f.write_str("fp8-e5m2"),
            KvDtype::Int4 { group: 32 } => f.write_str("int4"),
            KvDtype::Int4 { group } => write!(f, "int4:g{group}"),
            KvDtype::Int4Channel => f.write_str("int4c"),
        }
    }
}

impl FromStr for KvDtype {
    type Err = Error;

    /// Parses `f16` (or `fp16`), `bf16`, `int8`, `fp8` (= `fp8-e4m3`), `fp8-e5m2`,
    /// `int4` (group 32), `int4:gN` (N a positive multiple of 8) or `int4c` (keys
    /// per channel, also `int4-channel`).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::UnknownDtype(s.to_string());
        match s.trim().to_ascii_lowercase().as_str() {
            "f16" | "fp16" => Ok(KvDtype::F16),
            "bf16" => Ok(KvDtype::Bf16),
            "int8" => Ok(KvDtype::Int8),
            "fp8" | "fp8-e4m3" => Ok(KvDtype::Fp8E4M3),
            "fp8-e5m2" => Ok(KvDtype::Fp8E5M2),
            "int4" => Ok(KvDtype::Int4 { group: 32 }),
            "int4c" | "int4-channel" => Ok(KvDtype::Int4Channel),
            other => {
                let n = other.strip_prefix("int4:g").ok_or_else(bad)?;
                if n.starts_with(['+', '0']) {
                    return Err(bad());
                }
                let group: u32 = n.parse().map_err(|_| bad())?;
                if group == 0 || group % 8 != 0 {
                    return Err(bad());
                }
                Ok(KvDtype::Int4 { group })
            }
        }
    }
}

/// Names, nominal sizes and the bit-width vocabulary.
impl KvDtype {
    /// Every format, least compact first; Int4 with its default group of 32.
    /// Int4Channel, a key-only format, is not among them.
    pub const ALL: [KvDtype; 6] = [
        KvDtype::F16,
        KvDtype::Bf16,
        KvDtype::Int8,
        KvDtype::Fp8E4M3,
        KvDtype::Fp8E5M2,
        KvDtype::Int4 { group: 32 },
    ];

    /// The names [`FromStr`] accepts, for help texts.
    pub const NAMES: &'static str = "f16 (or fp16), bf16, int8, fp8 (= fp8-e4m3), fp8-e5m2, \
                                     int4 (group 32), int4:gN (N a multiple of 8), \
                                     int4c (keys only: per channel over each block)";

    /// Bits of one element's code, side data (scales, mins) left out: 16, 8 or 4.
    /// [`bits_per_element`](Self::bits_per_element) counts the side data too.
    pub fn nominal_bits(&self) -> u32 {
        32 / self.per_word()
    }

    /// [`nominal_bits`](Self::nominal_bits) over 16: 1.0, 0.5 or 0.25, the factor
    /// engines quote; [`factor_vs_f16`](Self::factor_vs_f16) is the exact one.
    pub fn nominal_factor_vs_f16(&self) -> f64 {
        self.nominal_bits() as f64 / 16.0
    }

    /// Ordinal of compactness, 0 the largest: F16 and BF16 0, Int8 and both FP8s 1,
    /// Int4 (any group) and Int4Channel 2. Formats of one width tie: which of them keeps more of a
    /// tensor depends on its values, not on its size.
    pub fn compactness(&self) -> u8 {
        self.packing().min(2) as u8
    }

    /// The dtype stored in `bits` bits per element, where only one is: 4 gives
    /// Int4 (group 32). 16 bits could be f16 or bf16, and 8 bits int8, fp8-e4m3 or
    /// fp8-e5m2: those are an [`Error::InvalidConfig`] naming the candidates, as is
    /// any other width.
    pub fn from_bits(bits: u32) -> Result<Self> {
        match bits {
            4 => Ok(KvDtype::Int4 { group: 32 }),
            16 => Err(Error::InvalidConfig(
                "16 bits per element could be f16 or bf16: name the KV dtype".into(),
            )),
            8 => Err(Error::InvalidConfig(
                "8 bits per element could be int8 or fp8 (fp8-e4m3 or fp8-e5m2): name the KV dtype"
                    .into(),
            )),
            _ => Err(Error::InvalidConfig(format!(
                "no KV dtype stores {bits} bits per element: expected 16 (f16, bf16), 8 (int8, fp8) or 4 (int4)"
            ))),
        }
    }

    /// A `K` or `K/V` dtype spec, as the examples' `--dtypes` take it: `int8` is
    /// (Int8, Int8), `int8/int4` (Int8, Int4 group 32).
    pub fn parse_pair(s: &str) -> Result<(KvDtype, KvDtype)> {
        match s.split_once('/') {
            Some((k, v)) => Ok((k.parse()?, v.parse()?)),
            None => {
                let d = s.parse()?;
                Ok((d, d))
            }
        }
    }
}

#[cfg(feature = "serde")]
crate::levels::serde_via_str!(
    KvDtype,
    "a KV dtype name (f16, bf16, int8, fp8, fp8-e5m2, int4, int4:gN, int4c)"
);
