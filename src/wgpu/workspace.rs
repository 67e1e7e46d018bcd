//! Device memory of prepared steps: each step leases a workspace (its records and
//! uniforms, and attention's split-K partials) and returns it when dropped, so that
//! warm steps reuse workspaces instead of creating buffers; one that is too small
//! grows geometrically.

use std::sync::{Arc, Mutex};

use super::bindings::Created;

/// Smallest workspace buffer: room for the records of a few hundred sequences
/// before the first growth.
const MIN_BYTES: u64 = 64 << 10;

/// Bytes of each uniform block (the largest `min_uniform_buffer_offset_alignment`
/// WebGPU allows): attention's parameters, then the reduce pass's, then append's.
pub const UNIFORM_BLOCK: u64 = 256;

/// Buffers one prepared step uses (handles: cloning shares them).
#[derive(Debug, Clone)]
pub struct Workspace {
    /// Append slots, sequence records and work items, block tables (read-only).
    pub meta: wgpu::Buffer,
    /// Split-K partials (read-write).
    pub partial: wgpu::Buffer,
    /// Three uniform blocks.
    pub uniform: wgpu::Buffer,
}

/// Free workspaces of one device.
#[derive(Debug, Default)]
pub struct Workspaces {
    free: Arc<Mutex<Vec<Workspace>>>,
}

/// A workspace lent to a step; back to the free list when dropped.
#[derive(Debug)]
pub struct Lease {
    workspace: Workspace,
    home: Arc<Mutex<Vec<Workspace>>>,
}

impl Lease {
    /// The workspace.
    pub fn get(&self) -> &Workspace {
        &self.workspace
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut free = self.home.lock().unwrap_or_else(|e| e.into_inner());
        free.push(self.workspace.clone());
    }
}

impl Workspaces {
    /// A workspace with at least `meta` and `partial` bytes: a free one that fits,
    /// else a free one (or a new one) with its short buffers replaced by ones of the
    /// next power of two, at least twice as large.
    pub fn lease(
        &self,
        device: &wgpu::Device,
        meta: u64,
        partial: u64,
        created: &Created,
    ) -> Lease {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let fits = |w: &Workspace| w.meta.size() >= meta && w.partial.size() >= partial;
        let found = free.iter().position(fits).map(|i| free.swap_remove(i));
        let workspace = match found {
            Some(w) => w,
            None => {
                let old = free.pop();
                let grow = |have: Option<&wgpu::Buffer>, need: u64, label, usage| match have {
                    Some(b) if b.size() >= need => b.clone(),
                    _ => {
                        let size = need
                            .next_power_of_two()
                            .max(have.map_or(0, |b| 2 * b.size()))
                            .max(MIN_BYTES);
                        created.count();
                        device.create_buffer(&wgpu::BufferDescriptor {
                            label: Some(label),
                            size,
                            usage,
                            mapped_at_creation: false,
                        })
                    }
                };
                let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
                Workspace {
                    meta: grow(
                        old.as_ref().map(|w| &w.meta),
                        meta,
                        "kvq step records",
                        storage,
                    ),
                    partial: grow(
                        old.as_ref().map(|w| &w.partial),
                        partial,
                        "kvq split-K partials",
                        storage,
                    ),
                    uniform: grow(
                        old.as_ref().map(|w| &w.uniform),
                        3 * UNIFORM_BLOCK,
                        "kvq step uniforms",
                        wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                    ),
                }
            }
        };
        Lease {
            workspace,
            home: self.free.clone(),
        }
    }
}
