//! How attention work is cut up for the GPU kernels (wgpu's `attention.wgsl` and
//! CUDA's `attention.cu` share the shape): query rows per workgroup, work items, a
//! key's lanes and the split of the keys. Backend-neutral; each backend picks the
//! number of workgroups it wants in flight.

use super::Resolved;
use crate::backend::{SeqInfo, Step};
use crate::cache::PoolLayout;

/// Keys of a split are a multiple of this (and of the kernel's keys per step).
pub const TILE: usize = 64;
/// Query rows (q heads x positions) one workgroup takes.
pub const MAX_ROWS: u32 = 8;
/// Invocations of a GPU attention workgroup.
pub const WG: u32 = 64;
/// Registers a lane spends on its dims of the q rows, and again on its dims of the
/// output rows, by default and at most (the kernels' register arrays; see
/// [`lane_shape`]).
pub const LANE_FLOATS: u32 = 64;
/// Fewest keys worth a split of their own on a wgpu adapter: its setup (q staging,
/// slot merge, partial write and reduce) is amortised over at least this many.
pub const MIN_SPLIT: usize = 256;

/// How a GPU attention kernel lays a K or V row over the lanes of a slot.
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
/// dividing head_dim and every Int4 group; at least 2 lanes, so that the kernels'
/// per-slot arrays hold 32 slots; 4 keys per step, 2 past 4 rows, so that a step's
/// partial dots stay 16 per lane.
pub fn lane_shape(k: &PoolLayout, v: &PoolLayout, rows: u32, lane_floats: u32) -> LaneShape {
    let bits = |l: &PoolLayout| l.dtype.code_bits();
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

/// A step's attention cut into workgroups: grid x the head blocks of every kv head
/// (those of one kv head adjacent, so that they share its K/V in cache), y the key
/// splits, z the work items.
#[derive(Debug, Clone)]
pub struct Work {
    /// The attention parameters.
    pub params: Resolved,
    /// q heads per workgroup.
    pub qh: u32,
    /// Query positions per workgroup.
    pub qb: u32,
    /// `SeqInfo` per sequence, then (sequence, first query) per work item.
    pub words: Vec<u32>,
    /// Where the work items start in `words`.
    pub items_offset: u32,
    /// Work items.
    pub items: u32,
    /// Head blocks over all kv heads.
    pub head_blocks: u32,
    /// Output rows: queries x q heads.
    pub rows: usize,
    /// Longest kv_len.
    pub max_kv_len: usize,
    /// Decode: keys are split.
    pub decode: bool,
}

impl Work {
    /// The work of `step` with `params`: decode takes a GQA group (or an even
    /// block of it) per workgroup; prefill [`prefill_heads_per_group`] heads at
    /// 8 / that many positions.
    pub fn new(step: &Step<'_>, params: Resolved) -> Work {
        let (qh, qb) = if step.decode {
            (decode_heads_per_group(params.group_ratio), 1)
        } else {
            let qh = prefill_heads_per_group(params.group_ratio);
            (qh, MAX_ROWS / qh)
        };
        let mut words: Vec<u32> = step
            .seqs
            .iter()
            .flat_map(|s| bytemuck::cast::<_, [u32; SeqInfo::WORDS]>(*s))
            .collect();
        let items_offset = words.len() as u32;
        for (i, s) in step.seqs.iter().enumerate() {
            for first in (0..s.q_len).step_by(qb as usize) {
                words.extend([i as u32, first]);
            }
        }
        Work {
            params,
            qh,
            qb,
            items: (words.len() as u32 - items_offset) / 2,
            items_offset,
            words,
            head_blocks: step.k.kv_heads as u32 * params.group_ratio.div_ceil(qh),
            rows: step.queries() * params.q_heads as usize,
            max_kv_len: step.max_kv_len(),
            decode: step.decode,
        }
    }

    /// Splits of the longest sequence's keys, (splits, keys per split): for decode,
    /// enough for `target` workgroups, each split a whole number of `tile`s and at
    /// least `min_split` keys, at most `max_splits`; prefill does not split.
    pub fn split(
        &self,
        target: usize,
        tile: usize,
        min_split: usize,
        max_splits: usize,
    ) -> (usize, usize) {
        let tiles = self.max_kv_len.div_ceil(tile).max(1);
        if !self.decode {
            return (1, tiles * tile);
        }
        let groups = (self.items as usize * self.head_blocks as usize).max(1);
        let min_tiles = min_split.div_ceil(tile).max(1);
        let splits = target
            .div_ceil(groups)
            .clamp(1, tiles.div_ceil(min_tiles).clamp(1, max_splits.max(1)));
        let split_tiles = tiles.div_ceil(splits);
        (tiles.div_ceil(split_tiles), split_tiles * tile)
    }

    /// The kernels' parameters (`AttnParams` of `shaders/attn_common.wgsl` and
    /// `shaders/cuda/attention.cu`) for `splits` splits of `split_len` keys.
    pub fn params_words(&self, k: &PoolLayout, splits: usize, split_len: usize) -> [u32; 12] {
        let p = self.params;
        [
            k.kv_heads as u32,
            k.block_size as u32,
            p.q_heads,
            p.group_ratio,
            splits as u32,
            split_len as u32,
            p.window,
            self.items_offset,
            p.scale.to_bits(),
            p.softcap.to_bits(),
            0,
            0,
        ]
    }

    /// Words of split-K partials: (max, sum, `acc[head_dim]`) per row and split.
    pub fn partial_words(&self, head_dim: usize, splits: usize) -> usize {
        self.rows * splits * (head_dim + 2)
    }
}

#[cfg(test)]
mod tests {
    use super::{
        LANE_FLOATS, LaneShape, decode_heads_per_group, lane_shape, prefill_heads_per_group,
    };
    use crate::{CacheConfig, KvDtype};

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
        let cfg = CacheConfig::new(1, 8, 128, 64);
        let narrow = lane_shape(&cfg.layout(int8), &cfg.layout(int8), 4, 32);
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
}
