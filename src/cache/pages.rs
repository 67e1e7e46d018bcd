//! Pages out and in: a sequence's raw pool words, every layer, as one blob with a
//! header that says what they mean, so that a sequence prefilled in one cache (on
//! any backend) decodes in another bit for bit (disaggregated serving, swapping
//! to host memory). The storage format is bit-exact on every backend, so the
//! words need no conversion.
//!
//! Blob: little-endian u32 words. Header: magic `kvqpages`, format version,
//! layers, kv_heads, head_dim, block_size, rotation, tokens, blocks, whether an
//! Int4Channel open block follows, the K and V dtype names (16 bytes each, NUL
//! padded), the payload's length in words and its FNV-1a 64 hash. Payload, layer
//! by layer: for K then V, every block's code words then its side words (for
//! Int4Channel keys the block's factors, and after the blocks the open block
//! holding the partly filled block's F16 keys).

use std::ops::Range;

use super::{KvCache, PoolLayout, SeqId};
use crate::backend::Pool;
use crate::{Error, KvDtype, Result};

const MAGIC: [u8; 8] = *b"kvqpages";
const VERSION: u32 = 1;
/// Header words: magic 2, the version and 8 fields 9, two dtype names of 4,
/// the payload length 1 and its hash 2.
const HEADER: usize = 2 + 9 + 8 + 1 + 2;

/// What a blob's words mean; a cache imports only a blob of its own format.
#[derive(Debug, Clone, PartialEq)]
struct Header {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    rotated: bool,
    tokens: usize,
    blocks: usize,
    open: bool,
    k_dtype: KvDtype,
    v_dtype: KvDtype,
}

/// A pool array's word ranges of one block.
fn block_ranges(l: &PoolLayout, block: usize) -> [Range<usize>; 2] {
    let rows = l.kv_heads * l.block_size;
    let data = block * rows * l.words_per_head()..(block + 1) * rows * l.words_per_head();
    let side = if l.dtype.per_channel() {
        l.factors(block, 0)..l.factors(block + 1, 0)
    } else {
        block * rows * l.side_per_head()..(block + 1) * rows * l.side_per_head()
    };
    [data, side]
}

/// The side-array words of an Int4Channel pool's open block `o`.
fn open_range(l: &PoolLayout, o: usize) -> Range<usize> {
    let words = l.kv_heads * l.block_size * l.head_dim / 2;
    l.open_base() + o * words..l.open_base() + (o + 1) * words
}

/// Runs of consecutive blocks in `table`: (first block, first index, count).
fn runs(table: &[u32]) -> Vec<(usize, usize, usize)> {
    let mut out: Vec<(usize, usize, usize)> = Vec::new();
    for (i, &b) in table.iter().enumerate() {
        match out.last_mut() {
            Some((first, _, n)) if *first + *n == b as usize => *n += 1,
            _ => out.push((b as usize, i, 1)),
        }
    }
    out
}

fn fnv1a(words: &[u32]) -> u64 {
    words
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        })
}

fn name_words(dt: KvDtype) -> [u32; 4] {
    let mut bytes = [0u8; 16];
    let name = dt.to_string();
    bytes[..name.len()].copy_from_slice(name.as_bytes());
    std::array::from_fn(|i| u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()))
}

fn name_of(words: &[u32]) -> Result<KvDtype> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let name =
        std::str::from_utf8(&bytes[..end]).map_err(|_| corrupt("a dtype name is not UTF-8"))?;
    name.parse()
}

fn corrupt(why: &str) -> Error {
    Error::InvalidConfig(format!("page import: not a kvq page blob ({why})"))
}

impl Header {
    fn words(&self, payload: &[u32]) -> Vec<u32> {
        let mut w: Vec<u32> = MAGIC
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        w.extend([
            VERSION,
            self.layers as u32,
            self.kv_heads as u32,
            self.head_dim as u32,
            self.block_size as u32,
            self.rotated as u32,
            self.tokens as u32,
            self.blocks as u32,
            self.open as u32,
        ]);
        w.extend(name_words(self.k_dtype));
        w.extend(name_words(self.v_dtype));
        let hash = fnv1a(payload);
        w.extend([payload.len() as u32, hash as u32, (hash >> 32) as u32]);
        w
    }

    /// The header of `words` and its payload, checked against the hash.
    fn read(words: &[u32]) -> Result<(Header, &[u32])> {
        if words.len() < HEADER {
            return Err(corrupt("shorter than its header"));
        }
        let magic: Vec<u8> = words[..2].iter().flat_map(|w| w.to_le_bytes()).collect();
        if magic != MAGIC {
            return Err(corrupt("no magic"));
        }
        if words[2] != VERSION {
            return Err(Error::Unsupported(format!(
                "page import: format version {} (this kvq reads {VERSION})",
                words[2]
            )));
        }
        let f = |i: usize| words[3 + i] as usize;
        let header = Header {
            layers: f(0),
            kv_heads: f(1),
            head_dim: f(2),
            block_size: f(3),
            rotated: f(4) != 0,
            tokens: f(5),
            blocks: f(6),
            open: f(7) != 0,
            k_dtype: name_of(&words[11..15])?,
            v_dtype: name_of(&words[15..19])?,
        };
        let len = words[19] as usize;
        let payload = &words[HEADER..];
        if payload.len() != len {
            return Err(corrupt("its length is not the header's"));
        }
        let hash = words[20] as u64 | (words[21] as u64) << 32;
        if fnv1a(payload) != hash {
            return Err(corrupt("its hash does not match"));
        }
        Ok((header, payload))
    }
}

impl KvCache {
    fn header(&self, tokens: usize, blocks: usize, open: bool) -> Header {
        let c = &self.config;
        Header {
            layers: c.layers,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            block_size: c.block_size,
            rotated: c.rotate,
            tokens,
            blocks,
            open,
            k_dtype: c.k_dtype,
            v_dtype: c.v_dtype,
        }
    }

    /// A sequence's pages, every layer's K and V, as one blob (see the module's
    /// docs for its layout) for [`Self::import_pages`] into a cache of the same
    /// format on any backend. Changes nothing.
    pub fn export_pages(&self, seq: SeqId) -> Result<Vec<u8>> {
        let tokens = self.blocks.len(seq)?;
        let table = self.blocks.block_table(seq)?;
        let open = self.blocks.open_block(seq)?;
        let mut payload = Vec::new();
        for layer in 0..self.config.layers {
            let pools = self.layer(layer)?;
            for pool in [&pools.k, &pools.v] {
                self.export_pool(pool, table, &mut payload)?;
                if let (true, Some(o)) = (pool.layout.dtype.per_channel(), open) {
                    let r = open_range(&pool.layout, o as usize);
                    payload.extend(self.backend.download(&pool.side, r.start, r.len())?);
                }
            }
        }
        let mut words = self
            .header(tokens, table.len(), open.is_some())
            .words(&payload);
        words.extend(payload);
        Ok(bytemuck::cast_slice(&words).to_vec())
    }

    /// Appends every block of `table` of `pool` to `out`: each block's code
    /// words, then its side words; one download per run of consecutive blocks
    /// and array.
    fn export_pool(&self, pool: &Pool, table: &[u32], out: &mut Vec<u32>) -> Result<()> {
        let l = &pool.layout;
        for (first, _, n) in runs(table) {
            let [data, side] = [0, 1].map(|a| {
                let (r0, r1) = (
                    &block_ranges(l, first)[a],
                    &block_ranges(l, first + n - 1)[a],
                );
                r0.start..r1.end
            });
            let words = self.backend.download(&pool.data, data.start, data.len())?;
            let sides = self.backend.download(&pool.side, side.start, side.len())?;
            let (dw, sw) = (data.len() / n, side.len() / n);
            for i in 0..n {
                out.extend_from_slice(&words[i * dw..(i + 1) * dw]);
                out.extend_from_slice(&sides[i * sw..(i + 1) * sw]);
            }
        }
        Ok(())
    }

    /// A new sequence holding the pages of `blob` (from [`Self::export_pages`] of a
    /// cache of the same format, on any backend): the same words, so it attends
    /// and decodes exactly as the exported one did. A blob of another format is an
    /// error naming the field; a corrupt or truncated one is an error; either way,
    /// and when the cache has too few free blocks, nothing changes.
    pub fn import_pages(&mut self, blob: &[u8]) -> Result<SeqId> {
        if blob.len() % 4 != 0 {
            return Err(corrupt("not whole words"));
        }
        let words: Vec<u32> = blob
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let (h, payload) = Header::read(&words)?;
        let mine = self.header(h.tokens, h.tokens.div_ceil(self.config.block_size), h.open);
        let fields = [
            ("layers", h.layers, mine.layers),
            ("kv_heads", h.kv_heads, mine.kv_heads),
            ("head_dim", h.head_dim, mine.head_dim),
            ("block_size", h.block_size, mine.block_size),
            ("rotation", h.rotated as usize, mine.rotated as usize),
        ];
        if let Some((name, theirs, ours)) = fields.iter().find(|f| f.1 != f.2) {
            return Err(Error::InvalidConfig(format!(
                "page import: the pages have {name} {theirs}, this cache {ours}"
            )));
        }
        for (name, theirs, ours) in [
            ("K dtype", h.k_dtype, mine.k_dtype),
            ("V dtype", h.v_dtype, mine.v_dtype),
        ] {
            if theirs != ours {
                return Err(Error::InvalidConfig(format!(
                    "page import: the pages have {name} {theirs}, this cache {ours}"
                )));
            }
        }
        let opens = self.config.k_dtype.per_channel() && h.tokens % h.block_size != 0;
        if h.blocks != mine.blocks || h.open != opens {
            return Err(corrupt("its block count does not fit its tokens"));
        }
        let (k, v) = {
            let p = self.layer(0)?;
            (p.k.layout, p.v.layout)
        };
        let per_block = |l: &PoolLayout| block_ranges(l, 0).iter().map(|r| r.len()).sum::<usize>();
        let open_words = if h.open { open_range(&k, 0).len() } else { 0 };
        let per_layer = h.blocks * (per_block(&k) + per_block(&v)) + open_words;
        if payload.len() != h.layers * per_layer {
            return Err(corrupt("its payload does not fit its header"));
        }
        let before = self.blocks.clone();
        let seq = self.blocks.add();
        let written = self
            .blocks
            .extend(&[(seq, h.tokens)])
            .and_then(|_| self.import_words(seq, payload, per_layer));
        match written {
            Ok(()) => {
                self.epoch += 1;
                Ok(seq)
            }
            Err(e) => {
                self.blocks = before;
                Err(e)
            }
        }
    }

    /// Uploads `payload` (checked against the header) into `seq`'s new blocks.
    fn import_words(&self, seq: SeqId, payload: &[u32], per_layer: usize) -> Result<()> {
        let table = self.blocks.block_table(seq)?.to_vec();
        let open = self.blocks.open_block(seq)?;
        for (layer, words) in payload.chunks_exact(per_layer.max(1)).enumerate() {
            let pools = self.layer(layer)?;
            let mut at = 0;
            for pool in [&pools.k, &pools.v] {
                let l = &pool.layout;
                for &b in &table {
                    for (r, buf) in block_ranges(l, b as usize)
                        .iter()
                        .zip([&pool.data, &pool.side])
                    {
                        self.backend
                            .upload(buf, r.start, &words[at..at + r.len()])?;
                        at += r.len();
                    }
                }
                if let (true, Some(o)) = (l.dtype.per_channel(), open) {
                    let r = open_range(l, o as usize);
                    self.backend
                        .upload(&pool.side, r.start, &words[at..at + r.len()])?;
                    at += r.len();
                }
            }
        }
        Ok(())
    }
}
