//! Attention dispatches: split-K partials (`shaders/attention.wgsl`, or
//! `shaders/attention_lanes.wgsl` on CPU adapters) then the combine pass
//! (`shaders/attn_reduce.wgsl`). Decode and prefill differ only in how many q
//! heads and query positions a workgroup takes and how the keys are split.

use super::WgpuBackend;
use super::pipelines::PipelineKey;
use crate::backend::{AttnArgs, Backend, DeviceType};
use crate::cache::PoolLayout;
use crate::{Error, Result};

/// Keys per tile in the kernel (one per invocation).
const TILE: usize = 64;
/// Query rows (q heads x positions) one workgroup takes.
const MAX_ROWS: u32 = 8;

/// One query per sequence; keys split so that the device stays busy.
pub fn decode(b: &WgpuBackend, args: &AttnArgs<'_>) -> Result<()> {
    if args.seqs.iter().any(|s| s.q_len != 1) {
        return Err(Error::InvalidConfig(
            "decode takes one query per sequence".into(),
        ));
    }
    run(b, args, decode_heads_per_group(args.params.group_ratio), 1)
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

/// Causal prefill: several query positions per workgroup, keys not split.
pub fn prefill(b: &WgpuBackend, args: &AttnArgs<'_>) -> Result<()> {
    let qh = prefill_heads_per_group(args.params.group_ratio);
    run(b, args, qh, MAX_ROWS / qh)
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

/// Attention with workgroups of `qh` q heads x `qb` query positions.
fn run(b: &WgpuBackend, args: &AttnArgs<'_>, qh: u32, qb: u32) -> Result<()> {
    args.check()?;
    let kl = &args.k.layout;
    let d = kl.head_dim;
    if d > 256 {
        return Err(Error::Unsupported(format!(
            "head_dim {d} on wgpu: at most 256"
        )));
    }
    let p = args.params;
    // Work items: (sequence, first query) blocks of `qb` positions.
    let mut meta: Vec<u32> = args
        .seqs
        .iter()
        .flat_map(|s| bytemuck::cast::<_, [u32; 4]>(*s))
        .collect();
    let work_offset = meta.len() as u32;
    for (i, s) in args.seqs.iter().enumerate() {
        for first in (0..s.q_len).step_by(qb as usize) {
            meta.extend([i as u32, first]);
        }
    }
    let items = (meta.len() as u32 - work_offset) / 2;
    // Grid x: head blocks, those of one kv head adjacent so that they share its
    // K/V in cache when the group takes more than one.
    let head_blocks = kl.kv_heads as u32 * p.group_ratio.div_ceil(qh);
    let (splits, split_len) = if qb == 1 {
        split_keys(b, args.max_kv_len(), items as usize * head_blocks as usize)
    } else {
        (1, args.max_kv_len().div_ceil(TILE) * TILE)
    };
    let rows = args.queries() * p.q_heads as usize;
    let partial = b.alloc(rows * splits * (d + 2))?;
    let meta_buf = b.alloc(meta.len())?;
    b.upload(&meta_buf, 0, &meta)?;
    let attn_key = if b.lanes && lanes_fit(kl, &args.v.layout) {
        PipelineKey::attention_lanes(kl, &args.v.layout, qh, qb)
    } else {
        PipelineKey::attention(kl, &args.v.layout, qh, qb)
    };
    let uniform = [
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
    ];
    let grid = [head_blocks, splits as u32, items];
    let max = b.info().limits.max_workgroups_per_dimension;
    if grid.iter().any(|&g| g > max) {
        return Err(Error::DeviceLimit {
            limit: "max_compute_workgroups_per_dimension",
            requested: *grid.iter().max().unwrap_or(&0) as u64,
            max: max as u64,
        });
    }
    let reduce_key = PipelineKey::reduce(&args.v.layout);
    b.submit(|enc| {
        b.dispatch(
            enc,
            &attn_key,
            &uniform,
            &[
                args.q,
                &meta_buf,
                args.block_tables,
                &args.k.data,
                &args.k.side,
                &args.v.data,
                &args.v.side,
                &partial,
            ],
            grid,
        )?;
        let x = (rows as u32).min(max);
        b.dispatch(
            enc,
            &reduce_key,
            &[rows as u32, splits as u32, 0, 0],
            &[&partial, args.out],
            [x, (rows as u32).div_ceil(x), 1],
        )
    })?;
    Ok(())
}

/// Splits of the longest sequence's keys: enough workgroups to fill the device,
/// each split a whole number of tiles and not too short to amortise its setup.
fn split_keys(b: &WgpuBackend, max_kv_len: usize, groups: usize) -> (usize, usize) {
    let target: usize = match b.info().device_type {
        DeviceType::Cpu => 16,
        _ => 512,
    };
    let tiles = max_kv_len.div_ceil(TILE).max(1);
    let min_tiles = 4;
    let splits = target
        .div_ceil(groups.max(1))
        .clamp(1, tiles.div_ceil(min_tiles).max(1));
    let split_tiles = tiles.div_ceil(splits);
    (tiles.div_ceil(split_tiles), split_tiles * TILE)
}

#[cfg(test)]
mod tests {
    use super::{decode_heads_per_group, prefill_heads_per_group};

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
