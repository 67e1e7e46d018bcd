//! Compute pipelines, built once per specialisation and cached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::shaders::Kernel;

/// One specialisation of a kernel: its override constants.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    /// The kernel.
    pub kernel: Kernel,
    /// `(override name, value)` pairs, in a fixed order per kernel.
    pub constants: Vec<(&'static str, u32)>,
}

/// Shader modules and pipelines of one device.
#[derive(Debug, Default)]
pub struct Pipelines {
    modules: Mutex<HashMap<Kernel, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
}

impl Pipelines {
    /// The pipeline for `key`, building it on first use.
    pub fn get(&self, device: &wgpu::Device, key: &PipelineKey) -> Arc<wgpu::ComputePipeline> {
        let mut pipelines = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pipelines.get(key) {
            return p.clone();
        }
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            modules
                .entry(key.kernel)
                .or_insert_with(|| {
                    device.create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(key.kernel.file()),
                        source: wgpu::ShaderSource::Wgsl(key.kernel.source().into()),
                    })
                })
                .clone()
        };
        let constants: Vec<(&str, f64)> =
            key.constants.iter().map(|&(n, v)| (n, v as f64)).collect();
        let pipeline = Arc::new(
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(key.kernel.file()),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            }),
        );
        pipelines.insert(key.clone(), pipeline.clone());
        pipeline
    }
}
