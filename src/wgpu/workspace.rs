//! Device memory of a prepared step on wgpu: its records and uniforms, and
//! attention's split-K partials, leased ([`crate::backend::lease`]).

use super::bindings::Created;
use crate::Result;
use crate::backend::lease::{FreeList, Lease, grow};

/// Smallest workspace buffer: room for the records of a few hundred sequences
/// before the first growth.
const MIN_BYTES: u64 = 64 << 10;

/// Bytes of each uniform block (the largest `min_uniform_buffer_offset_alignment`
/// WebGPU allows): the reduce pass's parameters, then attention's and append's for
/// each window of the pools (`step.rs`).
pub const UNIFORM_BLOCK: u64 = 256;

/// Buffers one prepared step uses (handles: cloning shares them).
#[derive(Debug, Clone)]
pub struct Workspace {
    /// Append slots, sequence records and work items, block tables (read-only).
    pub meta: wgpu::Buffer,
    /// Split-K partials (read-write).
    pub partial: wgpu::Buffer,
    /// Uniform blocks.
    pub uniform: wgpu::Buffer,
    /// Int4Channel keys: the new keys staged as F16 for the seals (read-write).
    pub stage: wgpu::Buffer,
}

/// Free workspaces of one device.
pub type Workspaces = FreeList<Workspace>;

/// A workspace with at least `meta`, `partial` and `uniform` bytes, from `free`: one
/// that fits, else a free one (or a new one) with its short buffers grown.
pub fn lease(
    free: &Workspaces,
    device: &wgpu::Device,
    [meta, partial, uniform, stage]: [u64; 4],
    created: &Created,
) -> Result<Lease<Workspace>> {
    let fits = |w: &Workspace| {
        w.meta.size() >= meta
            && w.partial.size() >= partial
            && w.uniform.size() >= uniform
            && w.stage.size() >= stage
    };
    let buffer = |have: Option<&wgpu::Buffer>, need: u64, label, usage| {
        grow(have, wgpu::Buffer::size, need, MIN_BYTES, |size| {
            created.count();
            Ok(device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            }))
        })
    };
    let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
    free.lease(fits, |old| {
        Ok(Workspace {
            meta: buffer(
                old.as_ref().map(|w| &w.meta),
                meta,
                "kvq step records",
                storage,
            )?,
            partial: buffer(
                old.as_ref().map(|w| &w.partial),
                partial,
                "kvq split-K partials",
                storage,
            )?,
            uniform: buffer(
                old.as_ref().map(|w| &w.uniform),
                uniform,
                "kvq step uniforms",
                wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            )?,
            stage: buffer(
                old.as_ref().map(|w| &w.stage),
                stage,
                "kvq staged keys",
                wgpu::BufferUsages::STORAGE,
            )?,
        })
    })
}
