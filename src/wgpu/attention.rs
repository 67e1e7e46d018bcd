//! How attention runs on a wgpu device: split-K partials (`shaders/attention.wgsl`,
//! or `shaders/attention_lanes.wgsl` on CPU adapters) then the combine pass
//! (`shaders/attn_reduce.wgsl`). Decode and prefill differ only in how many q
//! heads and query positions a workgroup takes and how the keys are split; a step's
//! [`Partition`] fixes all of it once.

use super::WgpuBackend;
use super::pipelines::PipelineKey;
use crate::backend::{Backend, DeviceType, Step};
use crate::cache::PoolLayout;
use crate::{Error, Result};

/// Keys of a split are a multiple of this (and of the kernel's keys per step).
const TILE: usize = 64;
/// Query rows (q heads x positions) one workgroup takes.
const MAX_ROWS: u32 = 8;
/// Invocations of an `attention.wgsl` workgroup.
const WG: u32 = 64;
/// Registers an `attention.wgsl` lane spends on its dims of the q rows, and again on
/// its dims of the output rows, by default (see [`lane_shape`]).
pub const LANE_FLOATS: u32 = 64;
/// Workgroups a decode call aims for on a GPU: wgpu reports no count of compute
/// units, so enough for the largest (an H200 holds 132 SMs x 16 resident
/// workgroups of 64 invocations).
const GPU_WORKGROUPS: usize = 2048;
/// Workgroups per CPU thread on a CPU adapter.
const CPU_WORKGROUPS_PER_THREAD: usize = 8;
/// Fewest keys worth a split of their own: its setup (q staging, slot merge,
/// partial write and reduce) is amortised over at least this many.
const MIN_SPLIT: usize = 256;

/// How `attention.wgsl` lays a K or V row over the lanes of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LaneShape {
    /// Dims of a row per lane: 8, 16 or 32.
    pub dims: u32,
    /// Lanes per slot: a power of two, at least head_dim / dims.
    pub lanes: u32,
    /// Keys a slot takes per step.
    pub keys: u32,
}

impl LaneShape {
    /// Keys a workgroup takes per step.
    pub fn keys_per_step(&self) -> u32 {
        WG / self.lanes * self.keys
    }
}

/// The lane shape for pools `k` and `v` and `rows` query rows: as many dims per
/// lane as one 16-byte load holds of the wider of K and V, halved while the lane's
/// dims of every row exceed `lane_floats` registers (each for q and the output), and
/// dividing head_dim and every Int4 group; at least 2 lanes, so that the kernel's
/// per-slot arrays hold 32 slots; 4 keys per step, 2 past 4 rows, so that a step's
/// partial dots stay 16 per lane.
pub fn lane_shape(k: &PoolLayout, v: &PoolLayout, rows: u32, lane_floats: u32) -> LaneShape {
    let bits = |l: &PoolLayout| 16 >> l.dtype.tag();
    let d = k.head_dim as u32;
    let mut dims = 128 / bits(k).max(bits(v));
    while dims > 8
        && (dims * rows > lane_floats
            || d % dims != 0
            || k.dtype.group() % dims != 0
            || v.dtype.group() % dims != 0)
    {
        dims /= 2;
    }
    LaneShape {
        dims,
        lanes: (d / dims).next_power_of_two().max(2),
        keys: if rows <= 4 { 4 } else { 2 },
    }
}

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

/// q heads a decode workgroup takes: the whole GQA group when it has at most 8,
/// else the group cut into the fewest even blocks of at most 8 (the last may be
/// short), so that K/V is read once per group, or once per block.
pub fn decode_heads_per_group(ratio: u32) -> u32 {
    let blocks = ratio.div_ceil(MAX_ROWS).max(1);
    ratio.div_ceil(blocks).max(1)
}

/// q heads a prefill workgroup takes, with 8 / that many positions: the largest
/// power of two dividing the GQA ratio, at most 8. Every workgroup then has all 8
/// rows, so a chunk of n queries reads K/V ratio * n / 8 times; whole groups of
/// 5-7 heads at one position each would read it n times.
pub fn prefill_heads_per_group(ratio: u32) -> u32 {
    let mut qh = 1;
    while qh < MAX_ROWS && ratio % (qh * 2) == 0 {
        qh *= 2;
    }
    qh
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

/// The partition of `step`'s attention on `b`: decode takes a GQA group (or a block
/// of it) per workgroup and splits the keys to fill the device; prefill takes
/// [`prefill_heads_per_group`] heads at 8 / that many positions and does not split.
pub fn partition(b: &WgpuBackend, step: &Step<'_>) -> Result<Partition> {
    let (kl, vl) = (step.k, step.v);
    let d = kl.head_dim;
    if d > 256 {
        return Err(Error::Unsupported(format!(
            "head_dim {d} on wgpu: at most 256"
        )));
    }
    let Some(p) = step.params else {
        return Err(Error::InvalidConfig(
            "attention needs attention parameters".into(),
        ));
    };
    let (qh, qb) = if step.decode {
        (decode_heads_per_group(p.group_ratio), 1)
    } else {
        let qh = prefill_heads_per_group(p.group_ratio);
        (qh, MAX_ROWS / qh)
    };
    // Work items: (sequence, first query) blocks of `qb` positions.
    let mut work: Vec<u32> = step
        .seqs
        .iter()
        .flat_map(|s| bytemuck::cast::<_, [u32; 4]>(*s))
        .collect();
    let work_offset = work.len() as u32;
    for (i, s) in step.seqs.iter().enumerate() {
        for first in (0..s.q_len).step_by(qb as usize) {
            work.extend([i as u32, first]);
        }
    }
    let items = (work.len() as u32 - work_offset) / 2;
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
    // Grid x: head blocks, those of one kv head adjacent so that they share its
    // K/V in cache when the group takes more than one.
    let head_blocks = kl.kv_heads as u32 * p.group_ratio.div_ceil(qh);
    let tile = TILE.max(step_keys as usize);
    let (splits, split_len) = if step.decode {
        split_keys(
            b,
            step.max_kv_len(),
            items as usize * head_blocks as usize,
            tile,
        )
    } else {
        (1, step.max_kv_len().div_ceil(tile) * tile)
    };
    let grid = [head_blocks, splits as u32, items];
    let max = b.info().limits.max_workgroups_per_dimension;
    if let Some(&g) = grid.iter().find(|&&g| g > max) {
        return Err(Error::DeviceLimit {
            limit: "max_compute_workgroups_per_dimension",
            requested: g as u64,
            max: max as u64,
        });
    }
    let rows = step.queries() * p.q_heads as usize;
    let x = (rows as u32).clamp(1, max);
    Ok(Partition {
        attention,
        grid,
        reduce: PipelineKey::reduce(vl),
        reduce_grid: [x, (rows as u32).div_ceil(x), 1],
        work,
        uniform: [
            kl.kv_heads as u32,
            kl.block_size as u32,
            p.q_heads,
            p.group_ratio,
            splits as u32,
            split_len as u32,
            p.window,
            work_offset,
            p.scale.to_bits(),
            p.softcap.to_bits(),
            0,
            0,
        ],
        reduce_uniform: [rows as u32, splits as u32, 0, 0],
        partial_words: rows * splits * (d + 2),
    })
}

/// Splits of the longest sequence's keys: enough workgroups to fill the device,
/// each split a whole number of tiles and at least [`MIN_SPLIT`] keys.
fn split_keys(b: &WgpuBackend, max_kv_len: usize, groups: usize, tile: usize) -> (usize, usize) {
    let target = match b.info().device_type {
        DeviceType::Cpu => {
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
            threads * CPU_WORKGROUPS_PER_THREAD
        }
        _ => GPU_WORKGROUPS,
    };
    let tiles = max_kv_len.div_ceil(tile).max(1);
    let min_tiles = MIN_SPLIT.div_ceil(tile);
    let max_splits = b.info().limits.max_workgroups_per_dimension as usize;
    let splits = target
        .div_ceil(groups.max(1))
        .clamp(1, tiles.div_ceil(min_tiles).clamp(1, max_splits));
    let split_tiles = tiles.div_ceil(splits);
    (tiles.div_ceil(split_tiles), split_tiles * tile)
}

#[cfg(test)]
mod tests {
    use super::{
        LANE_FLOATS, LaneShape, decode_heads_per_group, lane_shape, prefill_heads_per_group,
    };
    use crate::{CacheConfig, KvDtype};

    #[test]
    fn lanes_take_16_bytes_within_the_register_budget() {
        let (f16, int8, int4) = (KvDtype::F16, KvDtype::Int8, KvDtype::Int4 { group: 32 });
        let shape = |k: KvDtype, v: KvDtype, d: usize, rows: u32| {
            let cfg = CacheConfig::new(1, 8, d, 64);
            let s = lane_shape(&cfg.layout(k), &cfg.layout(v), rows, LANE_FLOATS);
            (s.dims, s.lanes, s.keys)
        };
        // 16 bytes of the wider dtype per lane: 8 f16, 16 Int8, 32 Int4 dims...
        assert_eq!(shape(f16, int8, 128, 4), (8, 16, 4));
        assert_eq!(shape(int8, int8, 128, 4), (16, 8, 4));
        assert_eq!(shape(int4, int4, 128, 2), (32, 4, 4));
        // ...within 64 registers for the rows' dims, and 2 keys a step past 4 rows...
        assert_eq!(shape(int4, int4, 128, 4), (16, 8, 4));
        assert_eq!(shape(int8, int4, 128, 8), (8, 16, 2));
        // ...dividing Int4 groups and head_dim, lanes a power of two, at least 2.
        let g8 = KvDtype::Int4 { group: 8 };
        assert_eq!(shape(g8, int4, 128, 1), (8, 16, 4));
        assert_eq!(shape(f16, f16, 80, 4), (8, 16, 4));
        assert_eq!(shape(int8, int8, 80, 1), (16, 8, 4));
        assert_eq!(shape(f16, f16, 8, 1), (8, 2, 4));
        let narrow = lane_shape(
            &CacheConfig::new(1, 8, 128, 64).layout(int8),
            &CacheConfig::new(1, 8, 128, 64).layout(int8),
            4,
            32,
        );
        assert_eq!(
            narrow,
            LaneShape {
                dims: 8,
                lanes: 16,
                keys: 4
            }
        );
        assert_eq!(narrow.keys_per_step(), 16);
    }

    const RATIOS: [u32; 10] = [1, 3, 4, 7, 8, 9, 12, 16, 32, 71];

    #[test]
    fn decode_head_blocks_are_even_and_at_most_eight() {
        let got = RATIOS.map(decode_heads_per_group);
        assert_eq!(got, [1, 3, 4, 7, 8, 5, 6, 8, 8, 8]);
    }

    #[test]
    fn prefill_head_blocks_divide_the_group() {
        let got = RATIOS.map(prefill_heads_per_group);
        assert_eq!(got, [1, 1, 4, 1, 8, 1, 4, 8, 8, 1]);
    }
}
