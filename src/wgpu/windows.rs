//! Pools larger than one storage binding (DESIGN §2): a layer's K and V pools are
//! bound in windows of the same whole blocks, each window within one binding and
//! starting at a multiple of the storage offset alignment, and every kernel that
//! reads or writes a pool is dispatched once per window. A kernel sees its window
//! as the pool and skips the slots and keys of blocks outside it.

use super::WgpuBackend;
use super::bindings::Range;
use crate::backend::Pool;
use crate::cache::PoolLayout;
use crate::{Error, Result};

/// The windows of one or more pools of `num_blocks` blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// Blocks per window (the last may hold fewer).
    pub blocks: usize,
    /// Blocks of the pools.
    pub num_blocks: usize,
}

/// One window: blocks `[block0, block0 + blocks)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Its index, from 0.
    pub index: usize,
    /// First block.
    pub block0: usize,
    /// Blocks in it.
    pub blocks: usize,
    /// Whether it covers the whole pool (bound as whole buffers, as without windows).
    pub whole: bool,
}

impl Windows {
    /// Windows for `pools` (of equal block counts) under a binding of at most
    /// `max_binding` bytes at offsets that are multiples of `align` bytes.
    pub fn new(pools: &[&PoolLayout], max_binding: u64, align: u64) -> Result<Self> {
        let num_blocks = pools.first().map_or(0, |l| l.num_blocks);
        // Bytes per block of every array bound, data and side (F16 has no side).
        let arrays: Vec<u64> = pools
            .iter()
            .flat_map(|l| {
                [
                    block_words(l, l.words_per_head()),
                    block_words(l, l.side_per_head()),
                ]
            })
            .filter(|&w| w > 0)
            .map(|w| w * 4)
            .collect();
        // Whole pools fit: one window, bound as before (the data's tail words too).
        let fits = pools.iter().all(|l| {
            l.data_alloc_words() as u64 * 4 <= max_binding
                && l.side_words() as u64 * 4 <= max_binding
        });
        if fits {
            return Ok(Windows {
                blocks: num_blocks.max(1),
                num_blocks,
            });
        }
        // Blocks per window: a multiple of the count that keeps each array's window
        // offset aligned, within the binding less the data's few tail words.
        let align = align.max(4);
        let step = arrays.iter().map(|&b| align / gcd(b, align)).fold(1, lcm);
        let fit = arrays
            .iter()
            .map(|&b| (max_binding.saturating_sub(16)) / b)
            .min()
            .unwrap_or(0);
        let blocks = fit / step * step;
        if blocks == 0 {
            return Err(Error::DeviceLimit {
                limit: "max_storage_buffer_binding_size",
                requested: step * arrays.iter().max().copied().unwrap_or(0),
                max: max_binding,
            });
        }
        Ok(Windows {
            blocks: blocks as usize,
            num_blocks,
        })
    }

    /// Windows of `pools` on `b`.
    pub fn of(b: &WgpuBackend, pools: &[&PoolLayout]) -> Result<Self> {
        let align = b.device.limits().min_storage_buffer_offset_alignment as u64;
        Windows::new(pools, b.pool_binding, align)
    }

    /// How many windows there are (at least one).
    pub fn count(&self) -> usize {
        self.num_blocks.div_ceil(self.blocks).max(1)
    }

    /// Every window, in order.
    pub fn iter(&self) -> impl Iterator<Item = Window> + '_ {
        let count = self.count();
        (0..count).map(move |index| {
            let block0 = index * self.blocks;
            Window {
                index,
                block0,
                blocks: self.blocks.min(self.num_blocks.saturating_sub(block0)),
                whole: count == 1,
            }
        })
    }
}

impl Window {
    /// The one window of a pool of `num_blocks` blocks that fits one binding.
    pub fn whole(num_blocks: usize) -> Self {
        Window {
            index: 0,
            block0: 0,
            blocks: num_blocks,
            whole: true,
        }
    }

    /// The window's bindings of `pool`'s data and side arrays.
    pub fn ranges(&self, pool: &Pool) -> Result<[Range; 2]> {
        let l = &pool.layout;
        let (data, side) = (WgpuBackend::raw(&pool.data)?, WgpuBackend::raw(&pool.side)?);
        if self.whole {
            return Ok([Range::whole(data), Range::whole(side)]);
        }
        let range = |buffer: &wgpu::Buffer, per_head: usize| {
            let per_block = block_words(l, per_head) * 4;
            if per_block == 0 {
                return Range::whole(buffer); // F16's unused side word
            }
            let offset = self.block0 as u64 * per_block;
            let last = self.block0 + self.blocks >= l.num_blocks;
            let size = if last {
                buffer.size() - offset // with the data's tail words
            } else {
                self.blocks as u64 * per_block
            };
            Range::new(buffer, offset, size)
        };
        Ok([
            range(data, l.words_per_head()),
            range(side, l.side_per_head()),
        ])
    }

    /// First pool slot of the window, and slots in it: the per-row kernels'
    /// `slot0` and `capacity`.
    pub fn slots(&self, block_size: usize) -> (u32, u32) {
        (
            (self.block0 * block_size) as u32,
            (self.blocks * block_size) as u32,
        )
    }
}

/// Words of one block of an array with `per_head` words per (token, head).
fn block_words(l: &PoolLayout, per_head: usize) -> u64 {
    (l.kv_heads * l.block_size * per_head) as u64
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn lcm(a: u64, b: u64) -> u64 {
    a / gcd(a, b) * b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KvDtype;
    use crate::cache::CacheConfig;

    fn layouts(blocks: usize) -> (PoolLayout, PoolLayout) {
        let c = CacheConfig::new(1, 8, 128, blocks * 16)
            .with_dtypes(KvDtype::F16, KvDtype::Int4 { group: 32 });
        (c.layout(c.k_dtype), c.layout(c.v_dtype))
    }

    #[test]
    fn a_pool_that_fits_is_one_whole_window() {
        let (k, v) = layouts(100);
        let w = Windows::new(&[&k, &v], 128 << 20, 256).unwrap();
        let all: Vec<_> = w.iter().collect();
        assert_eq!(all.len(), 1);
        assert!(all[0].whole && all[0].block0 == 0 && all[0].blocks == 100);
    }

    #[test]
    fn windows_hold_whole_aligned_blocks_within_a_binding() {
        // F16 K: 32 KiB a block; Int4 V: 8 KiB of codes and 2 KiB of side a block.
        let (k, v) = layouts(1000);
        let max = 1 << 20;
        let w = Windows::new(&[&k, &v], max, 256).unwrap();
        assert_eq!(w.blocks, 31); // 31 * 32 KiB <= 1 MiB - 16 bytes
        let all: Vec<_> = w.iter().collect();
        assert_eq!(all.len(), 1000usize.div_ceil(31));
        assert_eq!(all.iter().map(|w| w.blocks).sum::<usize>(), 1000);
        for (i, win) in all.iter().enumerate() {
            assert_eq!(win.block0, i * 31);
            assert!(!win.whole);
            for (l, per_head) in [(&k, k.words_per_head()), (&v, v.side_per_head())] {
                let bytes = block_words(l, per_head) * 4;
                assert_eq!(win.block0 as u64 * bytes % 256, 0);
                assert!(win.blocks as u64 * bytes <= max);
            }
        }
    }

    #[test]
    fn alignment_rounds_the_blocks_per_window_down() {
        // Int8, head_dim 8, one head, block 1: 2 words of codes and 1 of side a
        // block, so windows start every 64 blocks for 256-byte offsets.
        let l = PoolLayout {
            dtype: KvDtype::Int8,
            kv_heads: 1,
            head_dim: 8,
            block_size: 1,
            num_blocks: 1000,
            rotated: false,
            open_blocks: 0,
        };
        let w = Windows::new(&[&l], 1024, 256).unwrap();
        assert_eq!(w.blocks, 64);
    }

    #[test]
    fn a_block_larger_than_a_binding_is_refused() {
        let (k, v) = layouts(10);
        let err = Windows::new(&[&k, &v], 16 << 10, 256).unwrap_err();
        assert!(matches!(err, Error::DeviceLimit { .. }), "{err}");
    }
}
