//! GPT-2 style byte-level BPE tokenizer built from a GGUF file's
//! `tokenizer.ggml.*` metadata, written to give the same token ids as
//! llama.cpp (`src/llama-vocab.cpp`, `src/unicode.cpp`) for the `smollm` and
//! `gpt2` pre-tokenizers.
//!
//! Encoding a text takes four steps, as in llama.cpp:
//!
//! 1. Special tokens written literally in the text ("<|im_start|>") are split
//!    out first, longest token text first ([`Tokenizer::encode_with_special`]
//!    does this for control tokens; both encoders do it for user-defined ones).
//! 2. Each remaining text fragment is pre-tokenized into pieces. `smollm`
//!    first makes every numeric character a piece of its own (regex `\p{N}`),
//!    then applies the GPT-2 split
//!    `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
//!    to the text between digits; `gpt2` applies only the GPT-2 split.
//! 3. Each piece's UTF-8 bytes become one symbol per byte (the vocabulary spells
//!    bytes with GPT-2's printable byte-to-unicode mapping).
//! 4. Within a piece, the adjacent pair with the lowest merge rank (leftmost on
//!    ties) is merged until no pair has a rank.
//!
//! The character classes of step 2 come from Rust's `char` methods instead of
//! llama.cpp's generated Unicode tables: `is_whitespace` is the White_Space
//! property in both, and `is_numeric` is Unicode's N category as llama.cpp's
//! `\p{N}`, but `is_alphabetic` (the Alphabetic property) also counts the
//! marks and symbols with Other_Alphabetic, e.g. Devanagari vowel signs
//! (U+093E) or circled letters (U+24B6), which llama.cpp's `\p{L}` does not.
//! Text in such scripts can therefore split differently. The two Unicode
//! versions can also differ on recently assigned characters.

// Module of an example binary, which uses only part of this API.
#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use crate::gguf::{Gguf, GgufError};

/// llama.cpp's token types (`tokenizer.ggml.token_type`, `llama_token_type`).
const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;

/// Marks a byte with no single-byte token; such bytes are dropped, as llama.cpp drops them.
const NO_TOKEN: u32 = u32::MAX;

/// Token texts that llama.cpp treats as end of generation (a subset of its list
/// in `llama_vocab::impl::load`, the ones ChatML-style models use).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<end_of_utterance>",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreTokenizer {
    /// Digits isolated, then the GPT-2 split.
    Smollm,
    /// The GPT-2 split alone.
    Gpt2,
}

/// A fast hash for the merge table's integer keys (FxHash's mixing step);
/// the default SipHash would dominate the time spent merging.
#[derive(Default)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b.into());
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// A byte-level BPE tokenizer loaded from GGUF metadata.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    /// Each token's text as stored in the vocabulary (GPT-2 byte-level
    /// spelling for normal tokens, literal text for control tokens).
    texts: Vec<String>,
    /// The bytes each token stands for in output.
    bytes: Vec<Vec<u8>>,
    /// Vocabulary text to token id; on duplicate texts the last id wins, as in llama.cpp.
    by_text: HashMap<String, u32>,
    /// The token of each single byte, or NO_TOKEN.
    byte_token: [u32; 256],
    /// (left id << 32 | right id) -> (merge rank, merged id).
    merges: FxMap<u64, (u32, u32)>,
    /// Tokens split out of the text by `encode_with_special`: control,
    /// user-defined and unknown tokens, longest text first.
    specials: Vec<u32>,
    /// Tokens split out by `encode`: user-defined ones only, longest first.
    user_defined: Vec<u32>,
    pre: PreTokenizer,
    eos: u32,
    eog: Vec<u32>,
}

impl Tokenizer {
    /// Builds the tokenizer from `tokenizer.ggml.*` metadata. Requires
    /// `tokenizer.ggml.model` = "gpt2" and a `tokenizer.ggml.pre` of "smollm"
    /// or "gpt2". "default" (or a missing key) is accepted with the GPT-2
    /// split; note that llama.cpp's "default" also isolates punctuation runs
    /// and digit groups first, so such vocabularies may split differently.
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer, GgufError> {
        let model = g.str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(GgufError::new(format!(
                "unsupported tokenizer model '{model}' (only 'gpt2' byte-level BPE is supported)"
            )));
        }
        let pre = match g.get("tokenizer.ggml.pre") {
            None => PreTokenizer::Gpt2,
            Some(_) => match g.str("tokenizer.ggml.pre")? {
                "smollm" => PreTokenizer::Smollm,
                "gpt2" | "default" => PreTokenizer::Gpt2,
                other => {
                    return Err(GgufError::new(format!(
                        "unsupported pre-tokenizer '{other}' (supported: smollm, gpt2, default)"
                    )));
                }
            },
        };

        let texts: Vec<String> = g
            .strings("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_owned)
            .collect();
        let n = texts.len();
        if n == 0 || u32::try_from(n).is_err() {
            return Err(GgufError::new(format!(
                "tokenizer.ggml.tokens has {n} tokens, expected 1 to {}",
                u32::MAX
            )));
        }
        let types: Vec<i32> = match g.get("tokenizer.ggml.token_type") {
            None => vec![TYPE_NORMAL; n],
            Some(_) => {
                let arr = g.array("tokenizer.ggml.token_type")?;
                if arr.len() != n {
                    return Err(GgufError::new(format!(
                        "tokenizer.ggml.token_type has {} entries but there are {n} tokens",
                        arr.len()
                    )));
                }
                arr.iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.as_integer()
                            .and_then(|x| i32::try_from(x).ok())
                            .ok_or_else(|| {
                                GgufError::new(format!(
                                    "element {i} of tokenizer.ggml.token_type is not an int32"
                                ))
                            })
                    })
                    .collect::<Result<_, _>>()?
            }
        };

        let mut by_text = HashMap::with_capacity(n);
        for (id, t) in texts.iter().enumerate() {
            by_text.insert(t.clone(), id as u32);
        }

        let bytes = texts
            .iter()
            .zip(&types)
            .map(|(t, &ty)| match ty {
                TYPE_NORMAL => unmap_bytes(t),
                // Printed literally by llama.cpp's token_to_piece(special = true).
                TYPE_CONTROL | TYPE_USER_DEFINED | TYPE_UNKNOWN => t.as_bytes().to_vec(),
                // Unused, byte and undefined tokens print as nothing in llama.cpp.
                _ => Vec::new(),
            })
            .collect();

        let mut byte_token = [NO_TOKEN; 256];
        for (b, slot) in byte_token.iter_mut().enumerate() {
            let mut buf = [0u8; 4];
            let c = BYTE_TO_CHAR[b].encode_utf8(&mut buf);
            if let Some(&id) = by_text.get(&*c) {
                *slot = id;
            }
        }

        // Merges are "left right" pairs, ranked by position. As llama.cpp, split
        // at the first space after the first byte and keep the first rank of a
        // duplicate pair. A merge whose parts or result are not tokens can never
        // produce a token, so it is left out (none are in consistent vocabularies).
        let merge_list = g.strings("tokenizer.ggml.merges")?;
        let mut merges = FxMap::default();
        merges.reserve(merge_list.len());
        for (rank, m) in merge_list.iter().enumerate() {
            // Byte-wise search: the first char may be multi-byte ("Ġ w").
            let Some(pos) = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else {
                continue;
            };
            let (left, right) = (&m[..pos], &m[pos + 1..]);
            let (Some(&l), Some(&r)) = (by_text.get(left), by_text.get(right)) else {
                continue;
            };
            let Some(&merged) = by_text.get(&format!("{left}{right}")) else {
                continue;
            };
            let rank = u32::try_from(rank).unwrap_or(u32::MAX);
            merges.entry(pair_key(l, r)).or_insert((rank, merged));
        }

        let by_length = |pred: &dyn Fn(i32) -> bool| {
            let mut ids: Vec<u32> = (0..n as u32)
                .filter(|&id| pred(types[id as usize]) && !texts[id as usize].is_empty())
                .collect();
            // Longest first, as llama.cpp's cache_special_tokens; ties by id.
            ids.sort_by_key(|&id| Reverse(texts[id as usize].len()));
            ids
        };
        let specials = by_length(&|t| matches!(t, TYPE_CONTROL | TYPE_USER_DEFINED | TYPE_UNKNOWN));
        let user_defined = by_length(&|t| t == TYPE_USER_DEFINED);

        let eos = g.u32("tokenizer.ggml.eos_token_id")?;
        if eos as usize >= n {
            return Err(GgufError::new(format!(
                "tokenizer.ggml.eos_token_id is {eos}, but there are only {n} tokens"
            )));
        }
        let mut eog: Vec<u32> = EOG_TEXTS
            .iter()
            .filter_map(|t| by_text.get(*t).copied())
            .collect();
        eog.push(eos);
        eog.sort_unstable();
        eog.dedup();

        Ok(Tokenizer {
            texts,
            bytes,
            by_text,
            byte_token,
            merges,
            specials,
            user_defined,
            pre,
            eos,
            eog,
        })
    }

    /// Token ids of plain `text`: no BOS is added, and control tokens written in
    /// the text ("<|im_end|>") are tokenized as ordinary text. (User-defined
    /// tokens are still matched, as llama.cpp does with parse_special = false;
    /// SmolLM2 has none.)
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_impl(text, &self.user_defined)
    }

    /// Like [`encode`](Self::encode), but control tokens written literally in
    /// the text, such as "<|im_start|>" and "<|im_end|>", become their ids, as
    /// llama.cpp's tokenizer does with parse_special = true.
    pub fn encode_with_special(&self, text: &str) -> Vec<u32> {
        self.encode_impl(text, &self.specials)
    }

    /// The bytes token `id` stands for (GPT-2 byte mapping undone; control
    /// tokens give their text). Empty for an id outside the vocabulary. A token
    /// can hold part of a UTF-8 character, so concatenate the bytes of several
    /// tokens before decoding them.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// The text of `ids`: their bytes concatenated and decoded as UTF-8,
    /// invalid sequences replaced by U+FFFD. Control tokens decode to their text.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| self.token_bytes(id))
            .copied()
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    /// The end-of-sequence token (`tokenizer.ggml.eos_token_id`).
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// Whether generation should stop at `id`: the EOS token, or a token whose
    /// text llama.cpp treats as end of generation ("<|im_end|>", "<|endoftext|>", ...).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// The id of the token whose vocabulary text is exactly `text`: literal for
    /// control tokens ("<|im_end|>"), GPT-2 byte-level spelling for normal
    /// tokens (" the" is "Ġthe").
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.by_text.get(text).copied()
    }

    /// The vocabulary text of token `id`, as stored in the GGUF file.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    fn encode_impl(&self, text: &str, specials: &[u32]) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut work = Work::default();
        for fragment in self.partition(text, specials) {
            match fragment {
                Fragment::Text(s) => self.encode_fragment(s, &mut out, &mut work),
                Fragment::Token(id) => out.push(id),
            }
        }
        out
    }

    /// Splits `text` at every occurrence of the given special tokens, taking
    /// them in order (longest first) and each leftmost-first, as llama.cpp's
    /// `tokenizer_st_partition`.
    fn partition<'a>(&self, text: &'a str, specials: &[u32]) -> Vec<Fragment<'a>> {
        let mut fragments = vec![Fragment::Text(text)];
        for &id in specials {
            let pattern = self.texts[id as usize].as_str();
            if !text.contains(pattern) {
                continue;
            }
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for f in fragments {
                let Fragment::Text(s) = f else {
                    next.push(f);
                    continue;
                };
                let mut last = 0;
                for (at, _) in s.match_indices(pattern) {
                    if at > last {
                        next.push(Fragment::Text(&s[last..at]));
                    }
                    next.push(Fragment::Token(id));
                    last = at + pattern.len();
                }
                if last < s.len() {
                    next.push(Fragment::Text(&s[last..]));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// Pre-tokenizes one text fragment and appends the BPE tokens of each piece.
    fn encode_fragment(&self, text: &str, out: &mut Vec<u32>, work: &mut Work) {
        work.chars.clear();
        work.chars
            .extend(text.char_indices().map(|(i, c)| (i, c, classify(c))));
        work.pieces.clear();
        match self.pre {
            PreTokenizer::Gpt2 => split_gpt2(&work.chars, 0, work.chars.len(), &mut work.pieces),
            PreTokenizer::Smollm => {
                // `\p{N}`: each numeric character is a piece, and the runs in
                // between are split further by the GPT-2 rules, on their own.
                let mut start = 0;
                for i in 0..work.chars.len() {
                    if work.chars[i].2 == Class::Number {
                        split_gpt2(&work.chars, start, i, &mut work.pieces);
                        work.pieces.push((i, i + 1));
                        start = i + 1;
                    }
                }
                split_gpt2(&work.chars, start, work.chars.len(), &mut work.pieces);
            }
        }
        let byte_at = |i: usize| work.chars.get(i).map_or(text.len(), |c| c.0);
        for k in 0..work.pieces.len() {
            let (a, b) = work.pieces[k];
            let piece = &text.as_bytes()[byte_at(a)..byte_at(b)];
            self.bpe(piece, out, &mut work.bpe);
        }
    }

    /// Byte-level BPE of one piece: start from one symbol per byte, then merge
    /// the lowest-ranked adjacent pair (leftmost on ties) until none is left.
    /// A heap of candidate pairs keeps long pieces (runs of spaces, base64
    /// blobs) at O(n log n); entries made stale by earlier merges are skipped,
    /// as in llama.cpp's `llm_tokenizer_bpe_session`.
    fn bpe(&self, piece: &[u8], out: &mut Vec<u32>, w: &mut BpeWork) {
        if let [b] = piece {
            let id = self.byte_token[usize::from(*b)];
            if id != NO_TOKEN {
                out.push(id);
            }
            return;
        }
        let n = piece.len();
        w.ids.clear();
        w.ids
            .extend(piece.iter().map(|&b| self.byte_token[usize::from(b)]));
        w.prev.clear();
        w.prev.extend((0..n).map(|i| i.wrapping_sub(1)));
        w.next.clear();
        w.next.extend(1..=n);
        w.heap.clear();
        for i in 1..n {
            self.push_pair(w, i - 1, i);
        }
        while let Some(Reverse((_, left, l_id, r_id))) = w.heap.pop() {
            let right = w.next[left];
            // Stale if either symbol has since merged with another.
            if right >= n || w.ids[left] != l_id || w.ids[right] != r_id {
                continue;
            }
            let Some(&(_, merged)) = self.merges.get(&pair_key(l_id, r_id)) else {
                continue;
            };
            w.ids[left] = merged;
            w.ids[right] = NO_TOKEN; // dead
            let after = w.next[right];
            w.next[left] = after;
            if after < n {
                w.prev[after] = left;
            }
            if w.prev[left] < n {
                self.push_pair(w, w.prev[left], left);
            }
            if after < n {
                self.push_pair(w, left, after);
            }
        }
        let mut i = 0;
        while i < n {
            // Dead symbols are skipped by the links; NO_TOKEN here is a byte the
            // vocabulary cannot spell, which llama.cpp drops as well.
            if w.ids[i] != NO_TOKEN {
                out.push(w.ids[i]);
            }
            i = w.next[i];
        }
    }

    fn push_pair(&self, w: &mut BpeWork, left: usize, right: usize) {
        let (l, r) = (w.ids[left], w.ids[right]);
        if let Some(&(rank, _)) = self.merges.get(&pair_key(l, r)) {
            w.heap.push(Reverse((rank, left, l, r)));
        }
    }
}

fn pair_key(left: u32, right: u32) -> u64 {
    (u64::from(left) << 32) | u64::from(right)
}

enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

/// Buffers reused across the pieces of one `encode` call.
#[derive(Default)]
struct Work {
    /// (byte offset, char, class) of each character of the fragment.
    chars: Vec<(usize, char, Class)>,
    /// Pieces as char index ranges.
    pieces: Vec<(usize, usize)>,
    bpe: BpeWork,
}

#[derive(Default)]
struct BpeWork {
    ids: Vec<u32>,
    prev: Vec<usize>,
    next: Vec<usize>,
    /// (rank, left index, left id, right id), smallest first.
    heap: BinaryHeap<Reverse<(u32, usize, u32, u32)>>,
}

/// The character classes of the GPT-2 split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

/// `\s`, `\p{N}`, `\p{L}` or none of them. Checked in that order so that letter
/// numbers (Nl, e.g. "Ⅻ"), which are also Alphabetic, count as numbers as in
/// llama.cpp; see the module docs for where `is_alphabetic` differs from `\p{L}`.
fn classify(c: char) -> Class {
    if c.is_ascii() {
        // Fast path with the same answers as the general one.
        return if c.is_ascii_alphabetic() {
            Class::Letter
        } else if c.is_ascii_digit() {
            Class::Number
        } else if c.is_whitespace() {
            Class::Space
        } else {
            Class::Other
        };
    }
    if c.is_whitespace() {
        Class::Space
    } else if c.is_numeric() {
        Class::Number
    } else if c.is_alphabetic() {
        Class::Letter
    } else {
        Class::Other
    }
}

/// The GPT-2 split of `chars[lo..hi]`, a transcription of llama.cpp's
/// `unicode_regex_split_custom_gpt2`. Characters outside `lo..hi` are treated
/// as absent, so no piece crosses the range's ends (in particular the
/// lookahead of `\s+(?!\S)` does not see past `hi`). Appends char index ranges.
fn split_gpt2(chars: &[(usize, char, Class)], lo: usize, hi: usize, out: &mut Vec<(usize, usize)>) {
    let class = |i: usize| (i < hi).then(|| chars[i].2);
    let ch = |i: usize| chars[i].1;
    let mut pos = lo;
    while pos < hi {
        let start = pos;
        let c = ch(pos);
        // 's|'t|'re|'ve|'m|'ll|'d (case-sensitive)
        if c == '\'' && pos + 1 < hi {
            let c1 = ch(pos + 1);
            if matches!(c1, 's' | 't' | 'm' | 'd') {
                out.push((start, pos + 2));
                pos += 2;
                continue;
            }
            if pos + 2 < hi && matches!((c1, ch(pos + 2)), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                out.push((start, pos + 3));
                pos += 3;
                continue;
            }
        }
        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: an optional space, then a
        // run of the next character's class.
        let lead = usize::from(c == ' ');
        if let Some(k @ (Class::Letter | Class::Number | Class::Other)) = class(pos + lead) {
            pos += lead;
            while class(pos) == Some(k) {
                pos += 1;
            }
            out.push((start, pos));
            continue;
        }
        // `\s+(?!\S)|\s+`: a whitespace run followed by more text leaves its last
        // character to start the next piece (" word"); at the end it is kept whole.
        let mut spaces = 0;
        while class(pos + spaces) == Some(Class::Space) {
            spaces += 1;
        }
        if spaces > 1 && pos + spaces < hi {
            pos += spaces - 1;
        } else if spaces > 0 {
            pos += spaces;
        } else {
            pos += 1; // unreachable: every character has a class
        }
        out.push((start, pos));
    }
}

/// GPT-2's byte-to-unicode table: printable Latin-1 bytes map to themselves,
/// the rest (controls, space, 0x7F-0xA0, 0xAD) to U+0100 onwards in order.
const BYTE_TO_CHAR: [char; 256] = {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    let mut b = 0usize;
    while b < 256 {
        let printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        let cp = if printable {
            b as u32
        } else {
            n += 1;
            255 + n
        };
        table[b] = match char::from_u32(cp) {
            Some(c) => c,
            None => '\0', // unreachable: all values are below U+0144
        };
        b += 1;
    }
    table
};

/// The inverse of BYTE_TO_CHAR by code point (every mapped char is below U+0144);
/// u16::MAX where a code point is no byte's char.
const CHAR_TO_BYTE: [u16; 0x144] = {
    let mut table = [u16::MAX; 0x144];
    let mut b = 0usize;
    while b < 256 {
        table[BYTE_TO_CHAR[b] as u32 as usize] = b as u16;
        b += 1;
    }
    table
};

/// The byte whose GPT-2 spelling is `c`, if it is one.
fn char_to_byte(c: char) -> Option<u8> {
    CHAR_TO_BYTE
        .get(c as usize)
        .and_then(|&b| u8::try_from(b).ok())
}

/// A normal token's bytes: each char of its GPT-2 spelling back to its byte.
/// A char outside the mapping (not in a well-formed vocabulary) is kept as its
/// own UTF-8, where llama.cpp would print an "[UNK_BYTE_...]" marker.
fn unmap_bytes(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => out.extend(c.encode_utf8(&mut [0u8; 4]).as_bytes()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::Value;
    use crate::gguf::tests::{build, model_path, reference_lines};
    use std::sync::OnceLock;

    fn real() -> Option<&'static Tokenizer> {
        static TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
        TOK.get_or_init(|| {
            let path = model_path()?;
            let g = Gguf::open(&path).unwrap();
            Some(Tokenizer::from_gguf(&g).unwrap())
        })
        .as_ref()
    }

    /// Undoes the reference file's escapes: \\, \n, \t, \r and \xHH.
    fn unescape(s: &str) -> String {
        let mut out = String::new();
        let mut it = s.chars();
        while let Some(c) = it.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match it.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('r') => out.push('\r'),
                Some('\\') => out.push('\\'),
                Some('x') => {
                    let hex: String = it.by_ref().take(2).collect();
                    out.push(char::from(u8::from_str_radix(&hex, 16).unwrap()));
                }
                other => panic!("bad escape \\{other:?} in reference data"),
            }
        }
        out
    }

    fn ids(s: &str) -> Vec<u32> {
        s.split(' ')
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().unwrap())
            .collect()
    }

    /// Pieces of the pre-tokenizer, as strings.
    fn pieces(text: &str, pre: PreTokenizer) -> Vec<String> {
        let chars: Vec<_> = text
            .char_indices()
            .map(|(i, c)| (i, c, classify(c)))
            .collect();
        let mut out = Vec::new();
        match pre {
            PreTokenizer::Gpt2 => split_gpt2(&chars, 0, chars.len(), &mut out),
            PreTokenizer::Smollm => {
                let mut start = 0;
                for i in 0..chars.len() {
                    if chars[i].2 == Class::Number {
                        split_gpt2(&chars, start, i, &mut out);
                        out.push((i, i + 1));
                        start = i + 1;
                    }
                }
                split_gpt2(&chars, start, chars.len(), &mut out);
            }
        }
        let at = |i: usize| chars.get(i).map_or(text.len(), |c| c.0);
        out.iter()
            .map(|&(a, b)| text[at(a)..at(b)].to_string())
            .collect()
    }

    #[test]
    fn gpt2_split_matches_the_regex() {
        let p = |t| pieces(t, PreTokenizer::Gpt2);
        assert_eq!(p("Hello world"), ["Hello", " world"]);
        assert_eq!(p("don't we'll"), ["don", "'t", " we", "'ll"]);
        assert_eq!(p("I'M"), ["I", "'", "M"]); // case-sensitive contractions
        assert_eq!(p("a  b"), ["a", " ", " b"]);
        assert_eq!(p("a\n\n  c"), ["a", "\n\n ", " c"]);
        assert_eq!(p("end   "), ["end", "   "]);
        assert_eq!(p(" 123abc"), [" 123", "abc"]);
        assert_eq!(p("x!!  ?"), ["x", "!!", " ", " ?"]);
        assert_eq!(p(" "), [" "]);
        assert_eq!(p("\t x"), ["\t", " x"]);
        assert_eq!(p("café 日本語"), ["café", " 日本語"]);
        assert!(p("").is_empty());
    }

    #[test]
    fn smollm_split_isolates_digits() {
        let p = |t| pieces(t, PreTokenizer::Smollm);
        assert_eq!(
            p("In 2024, 3.14"),
            ["In", " ", "2", "0", "2", "4", ",", " ", "3", ".", "1", "4"]
        );
        // The whitespace before a digit is at the end of its run, so stays whole.
        assert_eq!(p("a  1"), ["a", "  ", "1"]);
        assert_eq!(p("x²½"), ["x", "²", "½"]); // No category digits too
    }

    #[test]
    fn byte_table_round_trips() {
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = BYTE_TO_CHAR[usize::from(b)];
            assert!(seen.insert(c));
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(BYTE_TO_CHAR[usize::from(b' ')], 'Ġ');
        assert_eq!(BYTE_TO_CHAR[usize::from(b'\n')], 'Ċ');
        assert_eq!(char_to_byte('a'), Some(b'a'));
        assert_eq!(char_to_byte('日'), None);
        assert_eq!(unmap_bytes("Ġhello"), b" hello");
    }

    /// Metadata pairs of a synthetic file.
    type Kvs<'a> = Vec<(&'a str, Value)>;

    /// A tokenizer over a made-up vocabulary: the 256 byte tokens (id = byte),
    /// then the given extra tokens (control tokens in `<...>`), and merges.
    fn synthetic(
        extra: &[&str],
        merges: &[&str],
        edit: impl Fn(&mut Kvs),
    ) -> Result<Tokenizer, GgufError> {
        let mut tokens: Vec<String> = BYTE_TO_CHAR.iter().map(|c| c.to_string()).collect();
        tokens.extend(extra.iter().map(|t| t.to_string()));
        let types = tokens
            .iter()
            .map(|t| {
                Value::I32(if t.starts_with('<') && t.len() > 1 {
                    TYPE_CONTROL
                } else {
                    TYPE_NORMAL
                })
            })
            .collect();
        let strs = |v: Vec<String>| Value::Array(v.into_iter().map(Value::Str).collect());
        let mut kvs = vec![
            ("tokenizer.ggml.model", Value::Str("gpt2".into())),
            ("tokenizer.ggml.pre", Value::Str("smollm".into())),
            ("tokenizer.ggml.tokens", strs(tokens)),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            (
                "tokenizer.ggml.merges",
                strs(merges.iter().map(|m| m.to_string()).collect()),
            ),
            ("tokenizer.ggml.eos_token_id", Value::U32(0)),
        ];
        edit(&mut kvs);
        Tokenizer::from_gguf(&Gguf::parse(build(&kvs, &[])).unwrap())
    }

    #[test]
    fn synthetic_merges_go_by_rank_then_leftmost() {
        let ab = ["ab", "bc", "abc", "aa", "Ġa", "<|end|>"];
        let (id_ab, id_bc, id_abc, id_aa, id_sa, id_end) = (256, 257, 258, 259, 260, 261);
        let t = synthetic(&ab, &["a b", "ab c", "b c", "a a", "Ġ a"], |_| {}).unwrap();
        assert_eq!(t.encode("abc"), [id_abc]); // "a b" (rank 0), then "ab c"
        assert_eq!(t.encode("bc"), [id_bc]);
        assert_eq!(t.encode("ab ab"), [id_ab, u32::from(b' '), id_ab]);
        assert_eq!(t.encode("b a"), [u32::from(b'b'), id_sa]);
        assert_eq!(t.encode("aaa"), [id_aa, u32::from(b'a')]); // leftmost pair first
        assert_eq!(
            t.encode("x abc"),
            [u32::from(b'x'), u32::from(b' '), id_abc] // "a b" beats "Ġ a"
        );
        let t = synthetic(&ab, &["b c", "a b", "ab c"], |_| {}).unwrap();
        assert_eq!(t.encode("abc"), [u32::from(b'a'), id_bc]); // "b c" ranks first now
        // Digits never merge across each other under smollm.
        let t = synthetic(&["12"], &["1 2"], |_| {}).unwrap();
        assert_eq!(t.encode("12"), [u32::from(b'1'), u32::from(b'2')]);
        let t = synthetic(&["12"], &["1 2"], |kv| kv[1].1 = Value::Str("gpt2".into())).unwrap();
        assert_eq!(t.encode("12"), [256]);
        // Control tokens: text to `encode`, a token to `encode_with_special`.
        let t = synthetic(&ab, &[], |_| {}).unwrap();
        assert_eq!(
            t.encode_with_special("a<|end|>b"),
            [u32::from(b'a'), id_end, u32::from(b'b')]
        );
        assert_eq!(t.encode("<|end|>").len(), 7);
        assert_eq!(t.decode(&[id_sa, id_end]), " a<|end|>");
        assert!(t.is_eog(id_end) && t.is_eog(0));
    }

    #[test]
    fn synthetic_metadata_errors() {
        let err = |edit: &dyn Fn(&mut Kvs)| synthetic(&[], &[], edit).unwrap_err().to_string();
        let e = err(&|kv| kv[0].1 = Value::Str("llama".into()));
        assert!(e.contains("unsupported tokenizer model 'llama'"), "{e}");
        let e = err(&|kv| kv[1].1 = Value::Str("qwen2".into()));
        assert!(e.contains("unsupported pre-tokenizer 'qwen2'"), "{e}");
        let e = err(&|kv| kv[1].1 = Value::U32(1));
        assert!(e.contains("tokenizer.ggml.pre"), "{e}");
        let e = err(&|kv| {
            kv.remove(2);
        });
        assert!(
            e.contains("missing metadata key 'tokenizer.ggml.tokens'"),
            "{e}"
        );
        let e = err(&|kv| kv[3].1 = Value::Array(vec![Value::I32(1)]));
        assert!(e.contains("token_type has 1 entries"), "{e}");
        let e = err(&|kv| kv[4].1 = Value::U32(7));
        assert!(e.contains("tokenizer.ggml.merges"), "{e}");
        let e = err(&|kv| kv[5].1 = Value::U32(300));
        assert!(e.contains("eos_token_id is 300"), "{e}");
        let e = err(&|kv| {
            kv.remove(5);
        });
        assert!(e.contains("eos_token_id"), "{e}");
        // A missing pre-tokenizer key means the GPT-2 split, as in llama.cpp.
        assert!(
            synthetic(&[], &[], |kv| {
                kv.remove(1);
            })
            .is_ok()
        );
    }

    #[test]
    fn rejects_unsupported_tokenizers() {
        let Some(path) = model_path() else { return };
        // Rewrite one metadata string in place (same length) to change the model
        // or the pre-tokenizer name.
        let bytes = std::fs::read(&path).unwrap();
        let patch = |from: &[u8], to: &[u8]| {
            let mut b = bytes.clone();
            let at = b.windows(from.len()).position(|w| w == from).unwrap();
            b[at..at + to.len()].copy_from_slice(to);
            Tokenizer::from_gguf(&Gguf::parse(b).unwrap())
                .unwrap_err()
                .to_string()
        };
        // "gpt2" -> "spm!" in tokenizer.ggml.model
        let mut from = b"tokenizer.ggml.model".to_vec();
        from.extend([8, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0]);
        from.extend(b"gpt2");
        let mut to = from.clone();
        let len = to.len();
        to[len - 4..].copy_from_slice(b"spm!");
        let err = patch(&from, &to);
        assert!(err.contains("'spm!'"), "{err}");
        // "smollm" -> "qwen2x" in tokenizer.ggml.pre
        let mut from = b"tokenizer.ggml.pre".to_vec();
        from.extend([8, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0]);
        from.extend(b"smollm");
        let mut to = from.clone();
        let len = to.len();
        to[len - 6..].copy_from_slice(b"qwen2x");
        let err = patch(&from, &to);
        assert!(
            err.contains("'qwen2x'") && err.contains("pre-tokenizer"),
            "{err}"
        );
    }

    #[test]
    fn real_vocabulary_basics() {
        let Some(tok) = real() else { return };
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(tok.eos(), 2);
        assert!(tok.is_eog(2) && tok.is_eog(0) && !tok.is_eog(1) && !tok.is_eog(100));
        assert_eq!(tok.token_id("<|im_start|>"), Some(1));
        assert_eq!(tok.token_id("<|im_end|>"), Some(2));
        assert_eq!(tok.token_id("Ġthe"), Some(260));
        assert_eq!(tok.token_text(260), Some("Ġthe"));
        assert_eq!(tok.token_bytes(260), b" the");
        assert_eq!(tok.token_bytes(2), b"<|im_end|>");
        assert_eq!(tok.token_bytes(u32::MAX), b"");
        assert_eq!(
            tok.decode(&[1, 4093, 198, 26843, 2]),
            "<|im_start|>user\nHi<|im_end|>"
        );
        assert!(tok.encode("").is_empty());
        assert!(tok.encode_with_special("").is_empty());
        // Control tokens are text to `encode`.
        assert!(!tok.encode("<|im_end|>").contains(&2));
        assert_eq!(tok.encode_with_special("<|im_end|>"), [2]);
    }

    #[test]
    fn real_encode_matches_llama_cpp() {
        let Some(tok) = real() else { return };
        let mut n = 0;
        for (kind, special) in [("encode", false), ("encode_special", true)] {
            for f in reference_lines(kind) {
                let text = unescape(f[0]);
                let want = ids(f[1]);
                let got = if special {
                    tok.encode_with_special(&text)
                } else {
                    tok.encode(&text)
                };
                assert_eq!(got, want, "{kind} {text:?}");
                // Every text without unspellable bytes decodes back to itself.
                if !text.contains(['\x04', '\x06']) {
                    assert_eq!(tok.decode(&got), text, "{kind} {text:?}");
                }
                n += 1;
            }
        }
        assert!(n >= 10, "only {n} reference texts");
    }

    #[test]
    fn real_streaming_bytes_reassemble_utf8() {
        let Some(tok) = real() else { return };
        let text = "日本語 café 🦀";
        let ids = tok.encode(text);
        // Some tokens hold partial characters; their bytes still concatenate.
        assert!(
            ids.iter()
                .any(|&id| std::str::from_utf8(tok.token_bytes(id)).is_err())
        );
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| tok.token_bytes(id).to_vec())
            .collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), text);
    }

    #[test]
    fn real_long_inputs_are_fast_and_exact() {
        let Some(tok) = real() else { return };
        // A long run of one character is one piece; the heap keeps it O(n log n).
        let spaces = " ".repeat(20_000);
        let ids = tok.encode(&format!("a{spaces}b"));
        assert_eq!(tok.decode(&ids), format!("a{spaces}b"));
        let blob: String = (0..50_000u32)
            .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
            .collect();
        assert_eq!(tok.decode(&tok.encode(&blob)), blob);
    }
}
