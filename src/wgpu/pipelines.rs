//! Compute pipelines, built once per specialisation and cached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::bindings::Created;
use super::shaders::{self, Kernel};
use crate::attn::work::LaneShape;
use crate::cache::PoolLayout;
use crate::quant::hadamard_norm;
use crate::{Error, Result};

/// One specialisation of a kernel: its override constants.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    /// The kernel.
    pub kernel: Kernel,
    /// `(override name, value)` pairs, in a fixed order per kernel.
    pub constants: Vec<(&'static str, u32)>,
}

impl PipelineKey {
    /// Per-row kernels (quantize-append, dequantize) for one pool.
    pub fn rows(kernel: Kernel, l: &PoolLayout) -> Self {
        PipelineKey {
            kernel,
            constants: vec![
                ("DTYPE", l.dtype.packing()),
                ("CODE", l.dtype.code()),
                ("HEAD_DIM", l.head_dim as u32),
                ("GROUP", l.dtype.group().max(8)),
                ("ROTATE", l.rotated as u32),
                ("NORM_BITS", norm_bits(l.head_dim)),
            ],
        }
    }

    /// `attention.wgsl` over pools `k` and `v` for `qh` q heads and `qb` positions
    /// per workgroup, its rows laid over lanes as `lanes` says, summing over a key's
    /// lanes with subgroup shuffles or through workgroup memory.
    pub fn attention(
        k: &PoolLayout,
        v: &PoolLayout,
        qh: u32,
        qb: u32,
        lanes: LaneShape,
        subgroup: bool,
    ) -> Self {
        let mut constants = attention_constants(k, v, qh, qb);
        constants.extend([("DL", lanes.dims), ("KT", lanes.lanes), ("KB", lanes.keys)]);
        PipelineKey {
            kernel: if subgroup {
                Kernel::AttentionSubgroup
            } else {
                Kernel::Attention
            },
            constants,
        }
    }

    /// `attention_lanes.wgsl` over pools `k` and `v` for `qh` q heads and `qb`
    /// positions per workgroup.
    pub fn attention_lanes(k: &PoolLayout, v: &PoolLayout, qh: u32, qb: u32) -> Self {
        PipelineKey {
            kernel: Kernel::AttentionLanes,
            constants: attention_constants(k, v, qh, qb),
        }
    }

    /// `seal.wgsl` for an Int4Channel K pool laid out as `k`.
    pub fn seal(k: &PoolLayout) -> Self {
        PipelineKey {
            kernel: Kernel::Seal,
            constants: vec![("HEAD_DIM", k.head_dim as u32)],
        }
    }

    /// The combine pass of attention over the V pool `v`.
    pub fn reduce(v: &PoolLayout) -> Self {
        PipelineKey {
            kernel: Kernel::AttnReduce,
            constants: vec![
                ("HEAD_DIM", v.head_dim as u32),
                ("ROTATE_OUT", v.rotated as u32),
                ("NORM_BITS", norm_bits(v.head_dim)),
            ],
        }
    }

    /// This key with one more constant (an element type, say).
    pub fn with(mut self, name: &'static str, value: u32) -> Self {
        self.constants.push((name, value));
        self
    }

    /// This specialisation as naga sees it after wgpu applies its overrides: the
    /// validated module with the constants in place, ready for naga's writers.
    pub fn module(&self) -> Result<(naga::Module, naga::valid::ModuleInfo)> {
        let name = self.name();
        let (module, info) =
            shaders::validate(&name, &self.kernel.source(), self.kernel.capabilities())?;
        let mut constants = naga::back::PipelineConstants::default();
        for &(n, v) in &self.constants {
            constants.insert(n.to_string(), v as f64);
        }
        let (module, info) = naga::back::pipeline_constants::process_overrides(
            &module,
            &info,
            Some((naga::ShaderStage::Compute, "main")),
            &constants,
        )
        .map_err(|e| Error::Device(format!("{name}: {e}")))?;
        Ok((module.into_owned(), info.into_owned()))
    }

    /// Validates this specialisation with naga (overrides applied), returning the
    /// number of bindings of group 0.
    pub fn validate(&self) -> Result<usize> {
        let (module, _) = self.module()?;
        Ok(module
            .global_variables
            .iter()
            .filter(|(_, g)| g.binding.as_ref().is_some_and(|b| b.group == 0))
            .count())
    }

    /// The kernel's file and constants, for messages.
    pub fn name(&self) -> String {
        format!("{} {:?}", self.kernel.file(), self.constants)
    }
}

/// A built pipeline and the layout of its bind group 0.
#[derive(Debug)]
pub struct Pipeline {
    /// The pipeline.
    pub pipeline: wgpu::ComputePipeline,
    /// Its (implicit) bind group layout.
    pub layout: wgpu::BindGroupLayout,
}

/// Shader modules and pipelines of one device.
#[derive(Debug, Default)]
pub struct Pipelines {
    modules: Mutex<HashMap<Kernel, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<Pipeline>>>,
}

impl Pipelines {
    /// The pipeline for `key`, building it (and its module) on first use.
    pub fn get(
        &self,
        device: &wgpu::Device,
        key: &PipelineKey,
        created: &Created,
    ) -> Arc<Pipeline> {
        let mut pipelines = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pipelines.get(key) {
            return p.clone();
        }
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            modules
                .entry(key.kernel)
                .or_insert_with(|| {
                    let desc = wgpu::ShaderModuleDescriptor {
                        label: Some(key.kernel.file()),
                        source: wgpu::ShaderSource::Wgsl(key.kernel.source().into()),
                    };
                    created.count();
                    // SAFETY: `runtime_checks` drops only naga's forced loop bounding
                    // and integer-division guards; bounds checks on every buffer and
                    // array access stay on. Neither dropped guard is needed: every
                    // loop in kvq's kernels (shaders/*.wgsl, all of them from
                    // `key.kernel.source()`, none from the application) runs to a
                    // constant, an override or a count the host checked, and every
                    // integer divisor is a non-zero constant or override, a
                    // parameter the host checked non-zero (kv_heads, block_size,
                    // the GQA ratio) or a value at least 1 made from those (the
                    // butterfly stride, the head blocks of a GQA group).
                    unsafe { device.create_shader_module_trusted(desc, runtime_checks()) }
                })
                .clone()
        };
        let constants: Vec<(&str, f64)> =
            key.constants.iter().map(|&(n, v)| (n, v as f64)).collect();
        created.count();
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(key.kernel.file()),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        let built = Arc::new(Pipeline {
            layout: pipeline.get_bind_group_layout(0),
            pipeline,
        });
        pipelines.insert(key.clone(), built.clone());
        built
    }
}

/// The override constants both attention kernels share.
fn attention_constants(
    k: &PoolLayout,
    v: &PoolLayout,
    qh: u32,
    qb: u32,
) -> Vec<(&'static str, u32)> {
    vec![
        ("K_DTYPE", k.dtype.packing()),
        ("V_DTYPE", v.dtype.packing()),
        ("K_CODE", k.dtype.code()),
        ("V_CODE", v.dtype.code()),
        ("HEAD_DIM", k.head_dim as u32),
        ("K_GROUP", k.dtype.group().max(8)),
        ("V_GROUP", v.dtype.group().max(8)),
        ("QH", qh),
        ("QB", qb),
        ("BLOCK_SIZE", k.block_size as u32),
        ("ROTATE_Q", k.rotated as u32),
        ("NORM_BITS", norm_bits(k.head_dim)),
    ]
}

/// f32 bits of the rotation's normalisation, passed exactly (WGSL's `inverseSqrt`
/// is not correctly rounded).
fn norm_bits(head_dim: usize) -> u32 {
    hadamard_norm(head_dim).to_bits()
}

/// Runtime checks naga adds to kvq's kernels: buffer bounds checks only. Loop
/// bounding and division guards cost every iteration on software adapters.
fn runtime_checks() -> wgpu::ShaderRuntimeChecks {
    let mut checks = wgpu::ShaderRuntimeChecks::checked();
    checks.force_loop_bounding = false;
    checks.int_div_checks = false;
    checks
}
