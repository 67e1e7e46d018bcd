//! Bind groups of recorded dispatches, cached by what they bind, and the count of
//! device objects created: a warm step creates none (DESIGN §7).

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bind groups kept before the cache starts over (each holds its buffers alive).
const MAX_CACHED: usize = 4096;

/// A range of a buffer, bound to one binding of a kernel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Range {
    /// The buffer.
    pub buffer: wgpu::Buffer,
    /// First byte.
    pub offset: u64,
    /// Bytes (at least 4).
    pub size: u64,
}

impl Range {
    /// The whole buffer.
    pub fn whole(buffer: &wgpu::Buffer) -> Self {
        Range::new(buffer, 0, buffer.size())
    }

    /// `size` bytes of `buffer` from `offset`.
    pub fn new(buffer: &wgpu::Buffer, offset: u64, size: u64) -> Self {
        Range {
            buffer: buffer.clone(),
            offset,
            size: size.max(4),
        }
    }
}

/// Device objects created, by counting every creation kvq makes.
#[derive(Debug, Default)]
pub struct Created(AtomicU64);

impl Created {
    /// One more object.
    pub fn count(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Objects so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Bind groups by (layout, ranges in binding order).
#[derive(Debug, Default)]
pub struct BindGroups {
    map: Mutex<HashMap<(wgpu::BindGroupLayout, Vec<Range>), wgpu::BindGroup>>,
}

impl BindGroups {
    /// The bind group of `ranges` (bindings 0, 1, …) under `layout`, made on first use.
    pub fn get(
        &self,
        device: &wgpu::Device,
        layout: &wgpu::BindGroupLayout,
        ranges: &[Range],
        created: &Created,
    ) -> wgpu::BindGroup {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let key = (layout.clone(), ranges.to_vec());
        if let Some(group) = map.get(&key) {
            return group.clone();
        }
        if map.len() >= MAX_CACHED {
            map.clear();
        }
        let group = create(device, layout, ranges, created);
        map.insert(key, group.clone());
        group
    }
}

/// A new bind group of `ranges` under `layout`.
pub fn create(
    device: &wgpu::Device,
    layout: &wgpu::BindGroupLayout,
    ranges: &[Range],
    created: &Created,
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry<'_>> = ranges
        .iter()
        .enumerate()
        .map(|(i, r)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &r.buffer,
                offset: r.offset,
                size: NonZeroU64::new(r.size),
            }),
        })
        .collect();
    created.count();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("kvq"),
        layout,
        entries: &entries,
    })
}
