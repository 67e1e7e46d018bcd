//! WGSL sources: each kernel in `shaders/` is loaded with `shaders/common.wgsl`
//! (and, for attention, `shaders/attn_common.wgsl` and a `lane_sum_*.wgsl`)
//! prepended. Every kernel, with every specialisation kvq dispatches, goes through
//! naga in the tests.

use crate::{Error, Result};

/// Shared helpers prepended to every kernel.
const COMMON: &str = include_str!("../../shaders/common.wgsl");
/// Parameters, code unpacking, q preparation and work decoding, prepended to both
/// attention kernels.
const ATTN_COMMON: &str = include_str!("../../shaders/attn_common.wgsl");
/// `attention.wgsl`'s sum over the lanes of a key, through workgroup memory.
const LANE_SUM_WORKGROUP: &str = include_str!("../../shaders/lane_sum_workgroup.wgsl");
/// The same with subgroup shuffles.
const LANE_SUM_SUBGROUP: &str = include_str!("../../shaders/lane_sum_subgroup.wgsl");

/// Files under `shaders/` that are prepended to kernels rather than kernels.
pub const PRELUDES: [&str; 4] = [
    "common.wgsl",
    "attn_common.wgsl",
    "lane_sum_workgroup.wgsl",
    "lane_sum_subgroup.wgsl",
];

/// A compute kernel: one WGSL file with one `main` entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `shaders/quantize_append.wgsl`.
    QuantizeAppend,
    /// `shaders/dequantize.wgsl`.
    Dequantize,
    /// `shaders/attention.wgsl`: split-K attention partials (decode and prefill),
    /// summing over a key's lanes through workgroup memory.
    Attention,
    /// `shaders/attention.wgsl` summing over a key's lanes with subgroup shuffles.
    AttentionSubgroup,
    /// `shaders/attention_lanes.wgsl`: attention partials (decode and prefill) for
    /// adapters whose subgroups are CPU SIMD lanes.
    AttentionLanes,
    /// `shaders/attn_reduce.wgsl`: combines the partials.
    AttnReduce,
    /// `shaders/stream.wgsl`: streaming-read roofline.
    Stream,
    /// `shaders/seal.wgsl`: quantizes the blocks an append fills in an
    /// Int4Channel K pool.
    Seal,
}

impl Kernel {
    /// Every kernel.
    pub const ALL: [Kernel; 8] = [
        Kernel::QuantizeAppend,
        Kernel::Dequantize,
        Kernel::Attention,
        Kernel::AttentionSubgroup,
        Kernel::AttentionLanes,
        Kernel::AttnReduce,
        Kernel::Stream,
        Kernel::Seal,
    ];

    /// File name under `shaders/`.
    pub fn file(self) -> &'static str {
        match self {
            Kernel::QuantizeAppend => "quantize_append.wgsl",
            Kernel::Dequantize => "dequantize.wgsl",
            Kernel::Attention | Kernel::AttentionSubgroup => "attention.wgsl",
            Kernel::AttentionLanes => "attention_lanes.wgsl",
            Kernel::AttnReduce => "attn_reduce.wgsl",
            Kernel::Stream => "stream.wgsl",
            Kernel::Seal => "seal.wgsl",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Kernel::QuantizeAppend => include_str!("../../shaders/quantize_append.wgsl"),
            Kernel::Dequantize => include_str!("../../shaders/dequantize.wgsl"),
            Kernel::Attention | Kernel::AttentionSubgroup => {
                include_str!("../../shaders/attention.wgsl")
            }
            Kernel::AttentionLanes => include_str!("../../shaders/attention_lanes.wgsl"),
            Kernel::AttnReduce => include_str!("../../shaders/attn_reduce.wgsl"),
            Kernel::Stream => include_str!("../../shaders/stream.wgsl"),
            Kernel::Seal => include_str!("../../shaders/seal.wgsl"),
        }
    }

    /// The full source: common helpers, `attn_common.wgsl` where the kernel is an
    /// attention kernel (and `attention.wgsl`'s lane sum), then the kernel. (Naga 30
    /// takes subgroup built-ins without `enable subgroups;`; it rejects the directive.)
    pub fn source(self) -> String {
        let attn = match self {
            Kernel::Attention => format!("{ATTN_COMMON}\n{LANE_SUM_WORKGROUP}"),
            Kernel::AttentionSubgroup => format!("{ATTN_COMMON}\n{LANE_SUM_SUBGROUP}"),
            Kernel::AttentionLanes => ATTN_COMMON.to_string(),
            _ => String::new(),
        };
        format!("{COMMON}\n{attn}\n{}", self.body())
    }

    /// What the kernel may use beyond core WGSL. unpack2x16float: granted by wgpu on
    /// every adapter with the SHADER_F16_IN_F32 downlevel flag (checked when
    /// probing). Subgroups: the lanes kernel and the subgroup attention kernel,
    /// dispatched only on devices with wgpu's SUBGROUP feature; every other kernel
    /// must run without them (DESIGN §4).
    pub fn capabilities(self) -> naga::valid::Capabilities {
        let caps = naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32;
        match self {
            Kernel::AttentionLanes | Kernel::AttentionSubgroup => {
                caps | naga::valid::Capabilities::SUBGROUP
            }
            _ => caps,
        }
    }
}

/// Parses and validates WGSL with naga against `capabilities`, returning the module
/// and its info.
pub fn validate(
    name: &str,
    source: &str,
    capabilities: naga::valid::Capabilities,
) -> Result<(naga::Module, naga::valid::ModuleInfo)> {
    let module = naga::front::wgsl::parse_str(source)
        .map_err(|e| Error::Device(format!("{name}: {}", e.emit_to_string(source))))?;
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), capabilities)
        .validate(&module)
        .map_err(|e| {
            let mut msg = format!("{name}: {}", e.emit_to_string(source));
            let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(e.as_inner());
            while let Some(c) = cause {
                msg.push_str(&format!(": {c}"));
                cause = c.source();
            }
            Error::Device(msg)
        })?;
    Ok((module, info))
}
