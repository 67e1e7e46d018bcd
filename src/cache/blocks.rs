//! Host-side block bookkeeping shared by every backend: free list, block tables, lengths.

use std::collections::BTreeMap;

use crate::{Error, Result};

/// Identifies a sequence in a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Sequence {
    blocks: Vec<u32>,
    len: usize,
}

/// Block allocator and sequence table. Every mutation checks first and then
/// changes state, so a failed call leaves everything as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockManager {
    block_size: usize,
    num_blocks: usize,
    free: Vec<u32>,
    seqs: BTreeMap<u64, Sequence>,
    next_id: u64,
}

impl BlockManager {
    /// `num_blocks` free blocks of `block_size` tokens.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        BlockManager {
            block_size,
            num_blocks,
            // Pop from the end: block 0 is handed out first.
            free: (0..num_blocks as u32).rev().collect(),
            seqs: BTreeMap::new(),
            next_id: 0,
        }
    }

    /// Starts an empty sequence.
    pub fn add(&mut self) -> SeqId {
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(id, Sequence::default());
        SeqId(id)
    }

    /// Frees a sequence and its blocks.
    pub fn remove(&mut self, id: SeqId) -> Result<()> {
        let seq = self
            .seqs
            .remove(&id.0)
            .ok_or(Error::UnknownSequence(id.0))?;
        self.free.extend(seq.blocks.iter().rev());
        Ok(())
    }

    /// Shortens a sequence to `len` tokens, freeing blocks it no longer needs.
    pub fn truncate(&mut self, id: SeqId, len: usize) -> Result<()> {
        let bs = self.block_size;
        let seq = self.get_mut(id)?;
        if len > seq.len {
            return Err(Error::OutOfRange {
                what: "truncate length",
                value: len,
                limit: seq.len + 1,
            });
        }
        let freed = seq.blocks.split_off(len.div_ceil(bs));
        seq.len = len;
        self.free.extend(freed.iter().rev());
        Ok(())
    }

    /// Tokens in a sequence.
    pub fn len(&self, id: SeqId) -> Result<usize> {
        Ok(self.get(id)?.len)
    }

    /// Blocks of a sequence, in position order.
    pub fn block_table(&self, id: SeqId) -> Result<&[u32]> {
        Ok(&self.get(id)?.blocks)
    }

    /// Live sequences.
    pub fn sequences(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.seqs.keys().map(|&k| SeqId(k))
    }

    /// Free blocks.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks in use.
    pub fn used_blocks(&self) -> usize {
        self.num_blocks - self.free.len()
    }

    /// Tokens stored over all sequences.
    pub fn tokens(&self) -> usize {
        self.seqs.values().map(|s| s.len).sum()
    }

    /// Checks that every sequence exists and appears once.
    pub fn check_batch(&self, ids: impl IntoIterator<Item = SeqId>) -> Result<()> {
        let mut seen = std::collections::BTreeSet::new();
        for id in ids {
            self.get(id)?;
            if !seen.insert(id.0) {
                return Err(Error::DuplicateSequence(id.0));
            }
        }
        Ok(())
    }

    /// Grows each sequence by its count of tokens and returns the pool slot of every
    /// new token, sequence by sequence. All or nothing.
    pub fn extend(&mut self, batch: &[(SeqId, usize)]) -> Result<Vec<u32>> {
        self.check_batch(batch.iter().map(|&(id, _)| id))?;
        let bs = self.block_size;
        let too_many = Error::CapacityExceeded {
            needed: usize::MAX,
            free: self.free.len(),
        };
        let mut needed = 0usize;
        for &(id, n) in batch {
            let seq = self.get(id)?;
            let len = seq.len.checked_add(n).ok_or(too_many.clone())?;
            needed = needed
                .checked_add(len.div_ceil(bs) - seq.blocks.len())
                .ok_or(too_many.clone())?;
        }
        if needed > self.free.len() {
            return Err(Error::CapacityExceeded {
                needed,
                free: self.free.len(),
            });
        }
        let mut slots = Vec::with_capacity(batch.iter().map(|b| b.1).sum());
        for &(id, n) in batch {
            let Some(seq) = self.seqs.get_mut(&id.0) else {
                unreachable!("checked above")
            };
            while seq.blocks.len() < (seq.len + n).div_ceil(bs) {
                seq.blocks.push(self.free.pop().expect("counted above"));
            }
            for p in seq.len..seq.len + n {
                slots.push(seq.blocks[p / bs] * bs as u32 + (p % bs) as u32);
            }
            seq.len += n;
        }
        Ok(slots)
    }

    fn get(&self, id: SeqId) -> Result<&Sequence> {
        self.seqs.get(&id.0).ok_or(Error::UnknownSequence(id.0))
    }

    fn get_mut(&mut self, id: SeqId) -> Result<&mut Sequence> {
        self.seqs.get_mut(&id.0).ok_or(Error::UnknownSequence(id.0))
    }
}
