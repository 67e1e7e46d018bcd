//! How attention runs on a wgpu device: split-K partials (`shaders/attention.wgsl`,
//! or `shaders/attention_lanes.wgsl` on CPU adapters) then the combine pass
//! (`shaders/attn_reduce.wgsl`). The work is cut as [`crate::attn::work`] says; a
//! step's [`Partition`] fixes kernels, grids and split once.

use super::WgpuBackend;
use super::pipelines::PipelineKey;
use crate::attn::work::{MIN_SPLIT, TILE, Work, lane_shape};
use crate::backend::{Backend, DeviceType, Step};
use crate::cache::PoolLayout;
use crate::{Error, Result};

/// Workgroups a decode call aims for on a GPU: wgpu reports no count of compute
/// units, so enough for the largest (an H200 has 132 SMs, a few resident
/// workgroups each: 2048 is several waves).
const GPU_WORKGROUPS: usize = 2048;
/// Workgroups per CPU thread on a CPU adapter.
const CPU_WORKGROUPS_PER_THREAD: usize = 8;

/// Whether attention on this adapter uses `attention_lanes.wgsl`: a CPU adapter
/// (its subgroup is the lanes of a SIMD register) with subgroups of at least
/// the kernel's eight lanes, so that a workgroup is one subgroup.
pub fn suits_lanes(adapter: &wgpu::AdapterInfo, features: wgpu::Features) -> bool {
    adapter.device_type == wgpu::DeviceType::Cpu
        && features.contains(wgpu::Features::SUBGROUP)
        && adapter.subgroup_min_size >= LANES
}

/// Invocations of `attention_lanes.wgsl`'s workgroup, one subgroup; its keys per step.
const LANES: u32 = 8;

/// Pools `attention_lanes.wgsl` takes: each lane's share of a V row is one or two
/// words or whole vec4s, and an Int4 V group neither straddles lanes nor splits a
/// lane unevenly.
pub fn lanes_fit(k: &PoolLayout, v: &PoolLayout) -> bool {
    let per_lane = k.head_dim / LANES as usize;
    let lane_words = v.words_per_head() / LANES as usize;
    let v_group = v.dtype.group() as usize;
    k.head_dim % 64 == 0
        && (lane_words <= 2 || lane_words % 4 == 0)
        && (v_group == 0 || v_group % per_lane == 0 || per_lane % v_group == 0)
}

/// How one step's attention runs: kernels, grids, the split of the keys, and the
/// records and parameters the kernels read.
#[derive(Debug, Clone)]
pub struct Partition {
    /// The attention kernel (its q element type still to be set).
    pub attention: PipelineKey,
    /// Its grid: (head blocks, key splits, work items).
    pub grid: [u32; 3],
    /// The combine pass (its output element type still to be set).
    pub reduce: PipelineKey,
    /// Its grid.
    pub reduce_grid: [u32; 3],
    /// `SeqInfo` per sequence, then (sequence, first query) per work item.
    pub work: Vec<u32>,
    /// `AttnParams` of `attn_common.wgsl`.
    pub uniform: [u32; 12],
    /// `ReduceParams` of `attn_reduce.wgsl`.
    pub reduce_uniform: [u32; 4],
    /// Words of split-K partials.
    pub partial_words: usize,
}

/// The partition of `step`'s attention on `b`.
pub fn partition(b: &WgpuBackend, step: &Step<'_>) -> Result<Partition> {
    let (kl, vl) = (step.k, step.v);
    let d = kl.head_dim;
    if d > 256 {
        return Err(Error::Unsupported(format!(
            "head_dim {d} on wgpu: at most 256"
        )));
    }
    let Some(params) = step.params else {
        return Err(Error::InvalidConfig(
            "attention needs attention parameters".into(),
        ));
    };
    let work = Work::new(step, params);
    let (qh, qb) = (work.qh, work.qb);
    let (attention, step_keys) = if b.lanes && lanes_fit(kl, vl) {
        (PipelineKey::attention_lanes(kl, vl, qh, qb), LANES)
    } else {
        let shape = lane_shape(kl, vl, qh * qb, b.lane_floats);
        let subgroup = b.subgroup_size.is_some_and(|s| shape.lanes <= s);
        (
            PipelineKey::attention(kl, vl, qh, qb, shape, subgroup),
            shape.keys_per_step(),
        )
    };
    let max = b.info().limits.max_workgroups_per_dimension;
    let target = match b.info().device_type {
        DeviceType::Cpu => {
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
            threads * CPU_WORKGROUPS_PER_THREAD
        }
        _ => GPU_WORKGROUPS,
    };
    let (splits, split_len) = work.split(
        target,
        TILE.max(step_keys as usize),
        MIN_SPLIT,
        max as usize,
    );
    let grid = [work.head_blocks, splits as u32, work.items];
    if let Some(&g) = grid.iter().find(|&&g| g > max) {
        return Err(Error::DeviceLimit {
            limit: "max_compute_workgroups_per_dimension",
            requested: g as u64,
            max: max as u64,
        });
    }
    let rows = work.rows as u32;
    let x = rows.clamp(1, max);
    Ok(Partition {
        attention,
        grid,
        reduce: PipelineKey::reduce(vl),
        reduce_grid: [x, rows.div_ceil(x), 1],
        uniform: work.params_words(kl, splits, split_len),
        reduce_uniform: [rows, splits as u32, 0, 0],
        partial_words: work.partial_words(d, splits),
        work: work.words,
    })
}
