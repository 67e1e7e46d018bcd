//! The CUDA kernels (`shaders/cuda/*.cu`, each with `common.cuh` prepended), their
//! specialisations, and NVRTC compiling them at run time (no toolkit at build time;
//! NVRTC 12 or 13 found by cudarc's loader).

use crate::attn::work::{LANE_FLOATS, MAX_ROWS};
use crate::{Error, KvDtype, Result};

const COMMON: &str = include_str!("../../shaders/cuda/common.cuh");

/// A CUDA source file of kvq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CudaKernel {
    /// `shaders/cuda/rows.cu`: `quantize_append` and `dequantize`.
    Rows,
    /// `shaders/cuda/attention.cu`: split-K attention partials.
    Attention,
    /// `shaders/cuda/attn_reduce.cu`: combines the partials.
    Reduce,
    /// `shaders/cuda/stream.cu`: streaming-read roofline.
    Stream,
}

impl CudaKernel {
    /// File name under `shaders/cuda/`.
    pub fn file(self) -> &'static str {
        match self {
            CudaKernel::Rows => "rows.cu",
            CudaKernel::Attention => "attention.cu",
            CudaKernel::Reduce => "attn_reduce.cu",
            CudaKernel::Stream => "stream.cu",
        }
    }

    fn body(self) -> &'static str {
        match self {
            CudaKernel::Rows => include_str!("../../shaders/cuda/rows.cu"),
            CudaKernel::Attention => include_str!("../../shaders/cuda/attention.cu"),
            CudaKernel::Reduce => include_str!("../../shaders/cuda/attn_reduce.cu"),
            CudaKernel::Stream => include_str!("../../shaders/cuda/stream.cu"),
        }
    }

    /// The full source: `common.cuh`, then the file.
    pub fn source(self) -> String {
        format!("{COMMON}\n{}", self.body())
    }
}

/// One specialisation of a kernel file: its `-D` defines.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KernelKey {
    /// The file.
    pub kernel: CudaKernel,
    /// `(macro, value)` pairs.
    pub defines: Vec<(&'static str, u32)>,
}

impl KernelKey {
    /// A file with no defines.
    pub fn plain(kernel: CudaKernel) -> Self {
        KernelKey {
            kernel,
            defines: Vec::new(),
        }
    }

    /// `attention.cu` for K and V stored as `k` and `v` (their packing and code),
    /// `dims` per lane, `rows` query rows and `keys` per slot and step.
    pub fn attention(k: KvDtype, v: KvDtype, dims: u32, rows: u32, keys: u32) -> Self {
        KernelKey {
            kernel: CudaKernel::Attention,
            defines: vec![
                ("K_DTYPE", k.packing()),
                ("V_DTYPE", v.packing()),
                ("K_CODE", k.code()),
                ("V_CODE", v.code()),
                ("DL", dims),
                ("ROWS", rows),
                ("KB", keys),
            ],
        }
    }

    /// The specialisations CI compiles: the per-row, reduce and stream kernels, and
    /// attention for every row count and lane width
    /// [`crate::attn::work::lane_shape`] can choose, for every pair of packings and
    /// for each other code with itself and with BF16 (any other pair mixes the same
    /// decoding paths).
    pub fn all() -> Vec<KernelKey> {
        let mut keys = vec![
            KernelKey::plain(CudaKernel::Rows),
            KernelKey::plain(CudaKernel::Reduce),
            KernelKey::plain(CudaKernel::Stream),
        ];
        // Every pair of packings (F16, Int8, Int4), and the other codes of a packing
        // (BF16, FP8 E4M3 and E5M2) paired with themselves and with BF16: they differ
        // from the first only in how a word's codes are decoded.
        let int4 = KvDtype::Int4 { group: 32 };
        let (f16, bf16, int8) = (KvDtype::F16, KvDtype::Bf16, KvDtype::Int8);
        let (e4m3, e5m2) = (KvDtype::Fp8E4M3, KvDtype::Fp8E5M2);
        let mut pairs: Vec<(KvDtype, KvDtype)> = [f16, int8, int4]
            .into_iter()
            .flat_map(|k| [f16, int8, int4].map(|v| (k, v)))
            .collect();
        let int4c = KvDtype::Int4Channel;
        pairs.extend([
            (int4c, int4),
            (int4c, f16),
            (bf16, bf16),
            (e4m3, e4m3),
            (e5m2, e5m2),
            (bf16, e4m3),
            (e5m2, bf16),
        ]);
        for (k, v) in pairs {
            let widest = 128 / k.code_bits().max(v.code_bits());
            for rows in 1..=MAX_ROWS {
                for dims in [8, 16, 32] {
                    if dims <= widest && (dims == 8 || dims * rows <= LANE_FLOATS) {
                        let keys_per_step = if rows <= 4 { 4 } else { 2 };
                        keys.push(KernelKey::attention(k, v, dims, rows, keys_per_step));
                    }
                }
            }
        }
        keys
    }

    /// A name for messages.
    pub fn name(&self) -> String {
        format!("{} {:?}", self.kernel.file(), self.defines)
    }
}

/// Whether NVRTC can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: `is_culib_present` only tries to load libnvrtc (dlopen) and reports
    // whether it loaded; it calls no function of NVRTC.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles `key` for `arch` (e.g. `sm_90`) with NVRTC, returning the PTX. IEEE
/// division and square roots and no flushing of subnormals, so that quantizing
/// matches the CPU reference bit for bit.
pub fn compile(key: &KernelKey, arch: &'static str) -> Result<cudarc::nvrtc::Ptx> {
    if !nvrtc_present() {
        return Err(Error::Unsupported(nvrtc_missing()));
    }
    let mut options: Vec<String> = key
        .defines
        .iter()
        .map(|(n, v)| format!("-D{n}={v}"))
        .collect();
    options.push("--std=c++17".into());
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        ftz: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        options,
        name: Some(key.kernel.file().into()),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(key.kernel.source(), opts)
        .map_err(|e| Error::Device(format!("NVRTC, {}: {e}", key.name())))
}

/// Why NVRTC is not there, and how to get it.
pub fn nvrtc_missing() -> String {
    "NVRTC not found (libnvrtc.so.13 or libnvrtc.so.12): pip install nvidia-cuda-nvrtc \
     and put the folder of its libnvrtc (nvidia/cu13/lib) on LD_LIBRARY_PATH"
        .into()
}
