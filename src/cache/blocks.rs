//! Host-side block bookkeeping shared by every backend: free list, block tables, lengths.

use std::collections::BTreeMap;

use crate::backend::Seal;
use crate::{Error, Result};

/// Identifies a sequence in a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Sequence {
    blocks: Vec<u32>,
    len: usize,
    /// Its open block, while its last block is partly filled (Int4Channel keys).
    open: Option<u32>,
}

/// Where an append's new tokens go: their pool slots and, for a cache with open
/// blocks (Int4Channel keys), where their keys go (DESIGN §2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extension {
    /// Pool slot of each new token, in batch order.
    pub slots: Vec<u32>,
    /// Open blocks: each new token's key slot in its open block (`capacity + open *
    /// block_size + offset`), or `u32::MAX` where its block fills in this append and
    /// is sealed instead. Empty without open blocks.
    pub open_slots: Vec<u32>,
    /// The blocks this append fills, to quantize from their open block and the new
    /// keys.
    pub seals: Vec<Seal>,
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
    /// Free open blocks (none without Int4Channel keys).
    open_free: Vec<u32>,
    /// Whether sequences keep their partly filled block open.
    opens: bool,
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
            open_free: Vec::new(),
            opens: false,
        }
    }

    /// The same with `open_blocks` open blocks: each sequence whose last block is
    /// partly filled holds one (Int4Channel keys, DESIGN §2).
    pub fn with_open_blocks(mut self, open_blocks: usize) -> Self {
        self.open_free = (0..open_blocks as u32).rev().collect();
        self.opens = true;
        self
    }

    /// The open block of a sequence, if its last block is partly filled and the
    /// cache has open blocks.
    pub fn open_block(&self, id: SeqId) -> Result<Option<u32>> {
        Ok(self.get(id)?.open)
    }

    /// Free open blocks.
    pub fn free_open_blocks(&self) -> usize {
        self.open_free.len()
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
        self.open_free.extend(seq.open);
        Ok(())
    }

    /// Shortens a sequence to `len` tokens, freeing blocks it no longer needs. With
    /// open blocks, a cut inside a block that was full reopens it: returns the
    /// (quantized slot, open slot) of each of its remaining tokens, whose keys the
    /// caller moves into the open block. All or nothing.
    pub fn truncate(&mut self, id: SeqId, len: usize) -> Result<Vec<[u32; 2]>> {
        let bs = self.block_size;
        let capacity = (self.num_blocks * bs) as u32;
        let seq = self.get(id)?;
        if len > seq.len {
            return Err(Error::OutOfRange {
                what: "truncate length",
                value: len,
                limit: seq.len + 1,
            });
        }
        let open_needed = self.opens && len % bs != 0;
        if open_needed && seq.open.is_none() && self.open_free.is_empty() {
            return Err(Error::OpenBlocksExhausted { needed: 1, free: 0 });
        }
        let (old, block) = (seq.len, len / bs);
        let kept = seq.blocks.get(block).copied();
        let mut moves = Vec::new();
        let mut open = seq.open;
        if open_needed {
            // A full (sealed) block that is cut reopens: its kept tokens go back
            // to an open block. A free one when there is one, so that the
            // sequence's own is not written until the reopen is done (a failed
            // reopen then leaves every block in use as it was).
            let refill = kept.filter(|_| old >= (block + 1) * bs);
            let own = open.take();
            let o = match (own, refill) {
                (Some(own), Some(_)) => match self.open_free.pop() {
                    Some(fresh) => {
                        self.open_free.push(own);
                        fresh
                    }
                    None => own,
                },
                (Some(own), None) => own,
                (None, _) => self
                    .open_free
                    .pop()
                    .ok_or(Error::OpenBlocksExhausted { needed: 1, free: 0 })?,
            };
            open = Some(o);
            if let Some(b) = refill {
                moves = (block * bs..len)
                    .map(|p| {
                        let s = (p % bs) as u32;
                        [b * bs as u32 + s, capacity + o * bs as u32 + s]
                    })
                    .collect();
            }
        } else if let Some(o) = open.take() {
            self.open_free.push(o);
        }
        let seq = self.get_mut(id)?;
        seq.open = open;
        let freed = seq.blocks.split_off(len.div_ceil(bs));
        seq.len = len;
        self.free.extend(freed.iter().rev());
        Ok(moves)
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

    /// Grows each sequence by its count of tokens and returns where every new
    /// token goes: its pool slot, sequence by sequence, and its key's where the
    /// cache has open blocks. All or nothing.
    pub fn extend(&mut self, batch: &[(SeqId, usize)]) -> Result<Extension> {
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
        if self.opens {
            self.check_open(batch)?;
        }
        let tokens = batch.iter().map(|b| b.1).sum();
        let mut ext = Extension {
            slots: Vec::with_capacity(tokens),
            ..Extension::default()
        };
        for &(id, n) in batch {
            let Some(seq) = self.seqs.get_mut(&id.0) else {
                unreachable!("checked above")
            };
            while seq.blocks.len() < (seq.len + n).div_ceil(bs) {
                seq.blocks.push(self.free.pop().expect("counted above"));
            }
            for p in seq.len..seq.len + n {
                ext.slots
                    .push(seq.blocks[p / bs] * bs as u32 + (p % bs) as u32);
            }
        }
        if self.opens {
            self.extend_open(batch, &mut ext);
        }
        for &(id, n) in batch {
            self.get_mut(id).expect("checked above").len += n;
        }
        Ok(ext)
    }

    /// Checks that the sequences that will hold a partly filled block can have an
    /// open block: those that need one beyond those that hold one, against the free
    /// ones and those released.
    fn check_open(&self, batch: &[(SeqId, usize)]) -> Result<()> {
        let (mut acquire, mut release) = (0, 0);
        for &(id, n) in batch {
            let seq = self.get(id)?;
            let needs = (seq.len + n) % self.block_size != 0;
            acquire += (needs && seq.open.is_none()) as usize;
            release += (!needs && seq.open.is_some()) as usize;
        }
        let free = self.open_free.len() + release;
        if acquire > free {
            return Err(Error::OpenBlocksExhausted {
                needed: acquire,
                free,
            });
        }
        Ok(())
    }

    /// The keys' side of an extension (lengths not yet grown): the blocks each
    /// sequence fills are sealed, its open block released when none stays partly
    /// filled, and its remaining new tokens go to its open block. Releases come
    /// first, so a block released here may be taken by a later sequence of the same
    /// append: kernels seal before they write open blocks.
    fn extend_open(&mut self, batch: &[(SeqId, usize)], ext: &mut Extension) {
        let bs = self.block_size;
        let capacity = (self.num_blocks * bs) as u32;
        let mut first = 0u32;
        let mut starts = Vec::with_capacity(batch.len());
        for &(id, n) in batch {
            let seq = self.seqs.get_mut(&id.0).expect("checked above");
            let (old, new) = (seq.len, seq.len + n);
            for j in old / bs..new / bs {
                let from_open = old.saturating_sub(j * bs) as u32;
                ext.seals.push(Seal {
                    block: seq.blocks[j],
                    open: seq.open.unwrap_or(0),
                    from_open,
                    first: first + (j * bs + from_open as usize - old) as u32,
                });
            }
            if new % bs == 0 {
                self.open_free.extend(seq.open.take());
            }
            starts.push(first);
            first += n as u32;
        }
        ext.open_slots = vec![u32::MAX; first as usize];
        for (&(id, n), start) in batch.iter().zip(starts) {
            let seq = self.seqs.get_mut(&id.0).expect("checked above");
            let (old, new) = (seq.len, seq.len + n);
            if new % bs == 0 {
                continue;
            }
            let o = *seq
                .open
                .get_or_insert_with(|| self.open_free.pop().expect("counted in check_open"));
            for p in old.max(new / bs * bs)..new {
                ext.open_slots[start as usize + p - old] =
                    capacity + o * bs as u32 + (p % bs) as u32;
            }
        }
    }

    fn get(&self, id: SeqId) -> Result<&Sequence> {
        self.seqs.get(&id.0).ok_or(Error::UnknownSequence(id.0))
    }

    fn get_mut(&mut self, id: SeqId) -> Result<&mut Sequence> {
        self.seqs.get_mut(&id.0).ok_or(Error::UnknownSequence(id.0))
    }
}
