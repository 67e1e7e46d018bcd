//! A small reader for GGUF model files (format versions 2 and 3), as written by
//! llama.cpp's converters.
//!
//! The whole file is read into memory and parsed once: the metadata key/value
//! pairs become [`Value`]s, the tensor table becomes [`TensorInfo`]s, and tensor
//! data stays in the file's bytes until [`Gguf::dequantize`] (or
//! [`Gguf::tensor_data`]) asks for it.
//!
//! Every read is bounds-checked and every count is checked against the bytes
//! left in the file before anything is allocated, so a truncated or corrupt file
//! gives a [`GgufError`] that says what was being read, never a panic or a huge
//! allocation.
//!
//! Layout (all little-endian), see ggml's `docs/gguf.md`:
//!
//! ```text
//! "GGUF" u32:version u64:n_tensors u64:n_kv
//! n_kv      x { string:key u32:value_type value }
//! n_tensors x { string:name u32:n_dims u64[n_dims]:dims u32:ggml_type u64:offset }
//! padding to `general.alignment` (default 32), then the tensor data section
//! ```
//!
//! A string is `u64:len` followed by `len` bytes of UTF-8; an array is
//! `u32:element_type u64:count` followed by the elements.

// Module of an example binary, which uses only part of this API.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use half::{bf16, f16};

/// An error from reading or interpreting a GGUF file. The message says what
/// was being read or looked up, e.g. which key or tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufError {
    message: String,
}

impl GgufError {
    /// An error with the given message.
    pub fn new(message: impl Into<String>) -> Self {
        GgufError {
            message: message.into(),
        }
    }

    /// The error's message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefixes the message with what was being done, "what: message".
    fn context(self, what: impl fmt::Display) -> Self {
        GgufError {
            message: format!("{what}: {}", self.message),
        }
    }
}

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for GgufError {}

type Result<T> = std::result::Result<T, GgufError>;

/// A metadata value: one variant per GGUF value type.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an integer, if it is one of the integer types.
    pub fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF name of the value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F32(_) => "float32",
            Value::F64(_) => "float64",
            Value::Bool(_) => "bool",
            Value::Str(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

/// A ggml tensor element type. The named variants are the ones
/// [`Gguf::dequantize`] supports; every other valid ggml type is `Other(id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)] // ggml's own names
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
    /// A valid ggml type that this reader cannot dequantize, by its ggml number.
    Other(u32),
}

/// (ggml id, name, elements per block, bytes per block) of every ggml type that
/// can appear in a GGUF file, from ggml.h and ggml-common.h. Ids 4, 5, 31-33 and
/// 36-38 are types ggml removed.
const GGML_TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
    (40, "NVFP4", 64, 36),
    (41, "Q1_0", 128, 18),
];

impl GgmlType {
    /// The type with ggml number `id`, or `None` if ggml has no such type.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GGML_TYPES.iter().find(|t| t.0 == id)?;
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        })
    }

    /// The ggml number of the type.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
            GgmlType::Other(id) => id,
        }
    }

    fn entry(self) -> Option<&'static (u32, &'static str, u64, u64)> {
        let id = self.id();
        GGML_TYPES.iter().find(|t| t.0 == id)
    }

    /// ggml's name of the type ("Q4_1"), or "unknown".
    pub fn name(self) -> &'static str {
        self.entry().map_or("unknown", |t| t.1)
    }

    /// Elements per block and bytes per block, or `None` for an id that is not
    /// a ggml type (only constructible by hand as `Other`).
    pub fn block_layout(self) -> Option<(u64, u64)> {
        self.entry().map(|t| (t.2, t.3))
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (type {})", self.name(), self.id())
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name, e.g. "blk.0.attn_q.weight".
    pub name: String,
    /// The shape in ggml order: `dims[0]` is the fastest-varying dimension
    /// (the row length), so a `[576, 49152]` matrix has 49152 rows of 576.
    pub dims: Vec<u64>,
    /// The element type.
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The number of elements, the product of `dims` (parsing checked that it
    /// does not overflow; for a hand-made info it saturates at `u64::MAX`).
    pub fn n_elements(&self) -> u64 {
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .unwrap_or(u64::MAX)
    }

    /// The size of the tensor's data in bytes (checked by parsing, saturating
    /// like `n_elements`; 0 for a type of unknown layout).
    pub fn n_bytes(&self) -> u64 {
        match self.ty.block_layout() {
            Some((block, bytes)) => (self.n_elements() / block).saturating_mul(bytes),
            None => 0,
        }
    }
}

/// Most dimensions a ggml tensor has (GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays in metadata; real files use 1, nested arrays are rare.
const MAX_ARRAY_DEPTH: u32 = 8;
/// Alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Smallest encoding of a key/value pair: empty key (8) + type (4) + a 1-byte value.
const MIN_KV_BYTES: usize = 13;
/// Smallest encoding of a tensor info: empty name (8) + n_dims (4) + type (4) + offset (8).
const MIN_TENSOR_INFO_BYTES: usize = 24;

/// A parsed GGUF file: metadata, the tensor table and the file's bytes.
#[derive(Debug, Clone)]
pub struct Gguf {
    version: u32,
    metadata: Vec<(String, Value)>,
    index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_start: usize,
    bytes: Vec<u8>,
}

impl Gguf {
    /// Reads and parses the GGUF file at `path`.
    pub fn open(path: &Path) -> Result<Gguf> {
        let bytes = std::fs::read(path)
            .map_err(|e| GgufError::new(format!("cannot read {}: {e}", path.display())))?;
        Gguf::parse(bytes).map_err(|e| e.context(path.display()))
    }

    /// Parses a GGUF file held in memory.
    pub fn parse(bytes: Vec<u8>) -> Result<Gguf> {
        let mut r = Reader::new(&bytes);

        let magic = r
            .bytes(4)
            .map_err(|e| e.context("reading the magic number"))?;
        if magic != b"GGUF" {
            return Err(GgufError::new(format!(
                "not a GGUF file: the magic number is {magic:02x?}, expected \"GGUF\""
            )));
        }
        let version = r.u32().map_err(|e| e.context("reading the version"))?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::new(format!(
                "unsupported GGUF version {version} (supported: 2 and 3)"
            )));
        }
        let n_tensors = r.u64().map_err(|e| e.context("reading the tensor count"))?;
        let n_kv = r
            .u64()
            .map_err(|e| e.context("reading the metadata count"))?;

        // Bound both counts by what the rest of the file could hold before
        // allocating for them: a corrupt count must not become a huge allocation.
        let n_kv = bounded_count(n_kv, r.remaining(), MIN_KV_BYTES)
            .map_err(|e| e.context("metadata count"))?;
        let mut metadata = Vec::with_capacity(n_kv);
        let mut index = HashMap::with_capacity(n_kv);
        for i in 0..n_kv {
            let key = r
                .string()
                .map_err(|e| e.context(format!("reading the key of metadata entry {i}")))?;
            let ty = r
                .u32()
                .map_err(|e| e.context(format!("reading the type of key '{key}'")))?;
            let value = r
                .value(ty, 0)
                .map_err(|e| e.context(format!("reading the value of key '{key}'")))?;
            if index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::new(format!("duplicate metadata key '{key}'")));
            }
            metadata.push((key, value));
        }

        let mut gguf = Gguf {
            version,
            metadata,
            index,
            tensors: Vec::new(),
            tensor_index: HashMap::new(),
            alignment: DEFAULT_ALIGNMENT,
            data_start: 0,
            bytes: Vec::new(),
        };
        if gguf.get("general.alignment").is_some() {
            let a = gguf.u32("general.alignment")?;
            if a == 0 || !a.is_power_of_two() {
                return Err(GgufError::new(format!(
                    "general.alignment is {a}, expected a power of two"
                )));
            }
            gguf.alignment = a.into();
        }

        let n_tensors = bounded_count(n_tensors, r.remaining(), MIN_TENSOR_INFO_BYTES)
            .map_err(|e| e.context("tensor count"))?;
        let mut tensors = Vec::with_capacity(n_tensors);
        let mut tensor_index = HashMap::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let info = read_tensor_info(&mut r, i, gguf.alignment)?;
            if tensor_index
                .insert(info.name.clone(), tensors.len())
                .is_some()
            {
                return Err(GgufError::new(format!(
                    "duplicate tensor name '{}'",
                    info.name
                )));
            }
            tensors.push(info);
        }

        // The data section starts at the next multiple of the alignment.
        let data_start = align_up(r.pos as u64, gguf.alignment)
            .ok_or_else(|| GgufError::new("data section offset overflows"))?;
        let file_len = bytes.len() as u64;
        for t in &tensors {
            let end = data_start
                .checked_add(t.offset)
                .and_then(|start| start.checked_add(t.n_bytes()));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(GgufError::new(format!(
                        "truncated or corrupt file: the data of tensor '{}' ({} bytes at offset {} \
                         of the data section, which starts at {data_start}) extends past the end \
                         of the file ({file_len} bytes)",
                        t.name,
                        t.n_bytes(),
                        t.offset
                    )));
                }
            }
        }

        gguf.tensors = tensors;
        gguf.tensor_index = tensor_index;
        // Every tensor's data lies below file_len, so data_start fits in usize
        // whenever there is a tensor; with none it is never used to index.
        gguf.data_start = usize::try_from(data_start).unwrap_or(usize::MAX);
        gguf.bytes = bytes;
        Ok(gguf)
    }

    /// The GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Where the data section starts in the file; tensor offsets count from here.
    pub fn data_offset(&self) -> usize {
        self.data_start
    }

    /// The alignment of tensor data (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// All metadata pairs in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The value of metadata key `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| GgufError::new(format!("missing metadata key '{key}'")))
    }

    /// An integer key as `u32`: any integer type whose value fits is accepted.
    pub fn u32(&self, key: &str) -> Result<u32> {
        let v = self.require(key)?;
        let i = v.as_integer().ok_or_else(|| {
            GgufError::new(format!(
                "metadata key '{key}' is a {}, expected an integer",
                v.type_name()
            ))
        })?;
        u32::try_from(i).map_err(|_| {
            GgufError::new(format!(
                "metadata key '{key}' is {i}, which does not fit in a u32"
            ))
        })
    }

    /// A floating-point key as `f32` (float32, or float64 rounded to f32).
    pub fn f32(&self, key: &str) -> Result<f32> {
        match self.require(key)? {
            Value::F32(x) => Ok(*x),
            Value::F64(x) => Ok(*x as f32),
            v => Err(GgufError::new(format!(
                "metadata key '{key}' is a {}, expected a float",
                v.type_name()
            ))),
        }
    }

    /// A boolean key.
    pub fn bool(&self, key: &str) -> Result<bool> {
        match self.require(key)? {
            Value::Bool(b) => Ok(*b),
            v => Err(GgufError::new(format!(
                "metadata key '{key}' is a {}, expected a bool",
                v.type_name()
            ))),
        }
    }

    /// A string key.
    pub fn str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| {
            GgufError::new(format!(
                "metadata key '{key}' is a {}, expected a string",
                v.type_name()
            ))
        })
    }

    /// An array key's elements, of whatever type.
    pub fn array(&self, key: &str) -> Result<&[Value]> {
        let v = self.require(key)?;
        v.as_array().ok_or_else(|| {
            GgufError::new(format!(
                "metadata key '{key}' is a {}, expected an array",
                v.type_name()
            ))
        })
    }

    /// A string-array key, such as `tokenizer.ggml.tokens` or `tokenizer.ggml.merges`.
    pub fn strings(&self, key: &str) -> Result<Vec<&str>> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().ok_or_else(|| {
                    GgufError::new(format!(
                        "element {i} of metadata key '{key}' is a {}, expected a string",
                        v.type_name()
                    ))
                })
            })
            .collect()
    }

    /// The table entry of tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor_index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| GgufError::new(format!("no tensor named '{name}'")))
    }

    /// All tensor table entries in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The raw bytes of tensor `name` (blocks exactly as stored in the file).
    pub fn tensor_data(&self, name: &str) -> Result<&[u8]> {
        let t = self.tensor(name)?;
        // Parsing checked data_start + offset + n_bytes <= file length; this
        // only repeats that check without a way to panic.
        let start = usize::try_from(t.offset)
            .ok()
            .and_then(|o| self.data_start.checked_add(o));
        let end = start.and_then(|s| s.checked_add(usize::try_from(t.n_bytes()).ok()?));
        start
            .zip(end)
            .and_then(|(s, e)| self.bytes.get(s..e))
            .ok_or_else(|| GgufError::new(format!("data of tensor '{name}' is out of range")))
    }

    /// Tensor `name` converted to f32, in ggml element order (`dims[0]`
    /// fastest). Supports F32, F16, BF16, Q4_0, Q4_1 and Q8_0, with the same
    /// arithmetic as ggml's reference `dequantize_row_*` functions.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor(name)?;
        let data = self.tensor_data(name)?;
        let n = usize::try_from(t.n_elements()).map_err(|_| {
            GgufError::new(format!(
                "tensor '{name}' has too many elements for this platform"
            ))
        })?;
        let mut out = Vec::with_capacity(n);
        match t.ty {
            GgmlType::F32 => out.extend(
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            GgmlType::F16 => out.extend(
                data.chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            GgmlType::BF16 => out.extend(
                data.chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            GgmlType::Q8_0 => {
                // block_q8_0: f16 d, i8 qs[32]; x = qs[j] * d
                for b in data.chunks_exact(34) {
                    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    out.extend(b[2..].iter().map(|&q| f32::from(q as i8) * d));
                }
            }
            GgmlType::Q4_0 => {
                // block_q4_0: f16 d, u8 qs[16]; low nibbles are elements 0..16,
                // high nibbles 16..32; x = (nibble - 8) * d
                for b in data.chunks_exact(18) {
                    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    let qs = &b[2..];
                    out.extend(qs.iter().map(|&q| f32::from(i16::from(q & 0x0F) - 8) * d));
                    out.extend(qs.iter().map(|&q| f32::from(i16::from(q >> 4) - 8) * d));
                }
            }
            GgmlType::Q4_1 => {
                // block_q4_1: f16 d, f16 m, u8 qs[16]; same nibble order as
                // Q4_0; x = nibble * d + m (two roundings, no fused multiply-add)
                for b in data.chunks_exact(20) {
                    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
                    let qs = &b[4..];
                    out.extend(qs.iter().map(|&q| f32::from(q & 0x0F) * d + m));
                    out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
                }
            }
            GgmlType::Other(_) => {
                return Err(GgufError::new(format!(
                    "tensor '{name}' has type {}, which cannot be dequantized \
                     (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0)",
                    t.ty
                )));
            }
        }
        debug_assert_eq!(out.len(), n);
        Ok(out)
    }
}

/// Reads one tensor table entry and checks its shape, type and offset.
fn read_tensor_info(r: &mut Reader<'_>, i: usize, alignment: u64) -> Result<TensorInfo> {
    let name = r
        .string()
        .map_err(|e| e.context(format!("reading the name of tensor {i}")))?;
    let what = |field: &str| format!("reading the {field} of tensor '{name}'");
    let n_dims = r.u32().map_err(|e| e.context(what("dimension count")))?;
    if n_dims > MAX_DIMS {
        return Err(GgufError::new(format!(
            "tensor '{name}' has {n_dims} dimensions, at most {MAX_DIMS} are allowed"
        )));
    }
    let dims = (0..n_dims)
        .map(|_| r.u64())
        .collect::<Result<Vec<u64>>>()
        .map_err(|e| e.context(what("dimensions")))?;
    let type_id = r.u32().map_err(|e| e.context(what("type")))?;
    let offset = r.u64().map_err(|e| e.context(what("data offset")))?;

    let ty = GgmlType::from_id(type_id).ok_or_else(|| {
        GgufError::new(format!("tensor '{name}' has invalid ggml type {type_id}"))
    })?;
    // ggml stores dimensions as int64_t, so they must fit in one.
    let n_elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| {
            GgufError::new(format!(
                "tensor '{name}' has dimensions {dims:?} whose element count overflows"
            ))
        })?;
    let (block, block_bytes) = ty
        .block_layout()
        .ok_or_else(|| GgufError::new(format!("tensor '{name}' has unknown type {ty}")))?;
    let row = dims.first().copied().unwrap_or(1);
    if row % block != 0 {
        return Err(GgufError::new(format!(
            "tensor '{name}' has rows of {row} elements, not a multiple of the block size \
             {block} of type {ty}"
        )));
    }
    (n_elements / block)
        .checked_mul(block_bytes)
        .ok_or_else(|| GgufError::new(format!("the data size of tensor '{name}' overflows")))?;
    if offset % alignment != 0 {
        return Err(GgufError::new(format!(
            "tensor '{name}' has data offset {offset}, not a multiple of the alignment {alignment}"
        )));
    }
    Ok(TensorInfo {
        name,
        dims,
        ty,
        offset,
    })
}

/// `count` as usize if `count` items of at least `min_size` bytes each fit in
/// `remaining` bytes.
fn bounded_count(count: u64, remaining: usize, min_size: usize) -> Result<usize> {
    match usize::try_from(count) {
        Ok(n) if n <= remaining / min_size => Ok(n),
        _ => Err(GgufError::new(format!(
            "{count} entries cannot fit in the {remaining} bytes left in the file"
        ))),
    }
}

fn align_up(x: u64, alignment: u64) -> Option<u64> {
    Some(x.checked_add(alignment - 1)? / alignment * alignment)
}

/// A bounds-checked little-endian cursor over the file's bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::new(format!(
                "unexpected end of file: need {n} bytes at offset {}, but the file has {} bytes",
                self.pos,
                self.buf.len()
            )));
        }
        let b = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(b)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64> {
        self.array().map(u64::from_le_bytes)
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        let len = match usize::try_from(len) {
            Ok(n) if n <= self.remaining() => n,
            _ => {
                return Err(GgufError::new(format!(
                    "string length {len} at offset {} exceeds the {} bytes left in the file",
                    self.pos - 8,
                    self.remaining()
                )));
            }
        };
        let at = self.pos;
        let b = self.bytes(len)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| GgufError::new(format!("string at offset {at} is not valid UTF-8")))
    }

    /// Reads a value of GGUF value type `ty`; `depth` counts enclosing arrays.
    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.array()?)),
            1 => Value::I8(i8::from_le_bytes(self.array()?)),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(GgufError::new(format!(
                        "bool at offset {} is {b}, expected 0 or 1",
                        self.pos - 1
                    )));
                }
            },
            8 => Value::Str(self.string()?),
            9 => self.array_value(depth)?,
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            _ => {
                return Err(GgufError::new(format!(
                    "unknown value type {ty} at offset {}",
                    self.pos - 4
                )));
            }
        })
    }

    fn array_value(&mut self, depth: u32) -> Result<Value> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(GgufError::new(format!(
                "arrays nested more than {MAX_ARRAY_DEPTH} deep"
            )));
        }
        let elem_ty = self.u32()?;
        let count = self.u64()?;
        // Smallest encoding of one element, to bound `count` before allocating.
        let min_size = match elem_ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            _ => {
                return Err(GgufError::new(format!(
                    "unknown array element type {elem_ty} at offset {}",
                    self.pos - 12
                )));
            }
        };
        let n = bounded_count(count, self.remaining(), min_size)
            .map_err(|e| e.context("array length"))?;
        let mut v = Vec::with_capacity(n);
        for i in 0..n {
            v.push(
                self.value(elem_ty, depth + 1)
                    .map_err(|e| e.context(format!("element {i}")))?,
            );
        }
        Ok(Value::Array(v))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The model file for the tests that need one: `KVQ_MODEL`, or the default
    /// path under target/. `None` (after a warning) when it is absent, except
    /// under CI=true, where a missing model fails the test.
    pub(crate) fn model_path() -> Option<PathBuf> {
        let path = std::env::var_os("KVQ_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target/model/SmolLM2-135M-Instruct.Q4_1.gguf"));
        if path.is_file() {
            return Some(path);
        }
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "model file {} is missing (set KVQ_MODEL); CI=true requires it",
                path.display()
            );
        }
        eprintln!(
            "warning: skipping test: model file {} not found (set KVQ_MODEL)",
            path.display()
        );
        None
    }

    /// The reference data: lines of `kind<TAB>name<TAB>values`, '#' comments.
    pub(crate) const REFERENCE: &str = include_str!("testdata/reference.txt");

    /// Lines of REFERENCE whose first field is `kind`, split into the other fields.
    pub(crate) fn reference_lines(kind: &str) -> Vec<Vec<&'static str>> {
        REFERENCE
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.split('\t').collect::<Vec<_>>())
            .filter(|f| f[0] == kind)
            .map(|f| f[1..].to_vec())
            .collect()
    }

    // ---- a writer for synthetic files ----

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    /// Raw encoding of a metadata value with its type tag.
    fn put_value(out: &mut Vec<u8>, v: &Value) {
        fn tag(v: &Value) -> u32 {
            match v {
                Value::U8(_) => 0,
                Value::I8(_) => 1,
                Value::U16(_) => 2,
                Value::I16(_) => 3,
                Value::U32(_) => 4,
                Value::I32(_) => 5,
                Value::F32(_) => 6,
                Value::Bool(_) => 7,
                Value::Str(_) => 8,
                Value::Array(_) => 9,
                Value::U64(_) => 10,
                Value::I64(_) => 11,
                Value::F64(_) => 12,
            }
        }
        fn body(out: &mut Vec<u8>, v: &Value) {
            match v {
                Value::U8(x) => out.push(*x),
                Value::I8(x) => out.extend(x.to_le_bytes()),
                Value::U16(x) => out.extend(x.to_le_bytes()),
                Value::I16(x) => out.extend(x.to_le_bytes()),
                Value::U32(x) => out.extend(x.to_le_bytes()),
                Value::I32(x) => out.extend(x.to_le_bytes()),
                Value::U64(x) => out.extend(x.to_le_bytes()),
                Value::I64(x) => out.extend(x.to_le_bytes()),
                Value::F32(x) => out.extend(x.to_le_bytes()),
                Value::F64(x) => out.extend(x.to_le_bytes()),
                Value::Bool(x) => out.push(u8::from(*x)),
                Value::Str(s) => put_str(out, s),
                Value::Array(a) => {
                    let t = a.first().map_or(4, tag);
                    out.extend(t.to_le_bytes());
                    out.extend((a.len() as u64).to_le_bytes());
                    for e in a {
                        body(out, e);
                    }
                }
            }
        }
        out.extend(tag(v).to_le_bytes());
        body(out, v);
    }

    pub(crate) struct TestTensor {
        name: &'static str,
        dims: Vec<u64>,
        ty: u32,
        data: Vec<u8>,
    }

    /// A GGUF v3 file with the given metadata and tensors; tensor data is laid
    /// out in order, each padded to 32 bytes, and the file ends with the last
    /// tensor's data.
    pub(crate) fn build(kvs: &[(&str, Value)], tensors: &[TestTensor]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((kvs.len() as u64).to_le_bytes());
        for (k, v) in kvs {
            put_str(&mut out, k);
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for t in tensors {
            put_str(&mut out, t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = align_up(offset + t.data.len() as u64, 32).unwrap();
        }
        out.resize(align_up(out.len() as u64, 32).unwrap() as usize, 0);
        let base = out.len();
        for (t, off) in tensors.iter().zip(offsets) {
            out.resize(base + off as usize, 0);
            out.extend(&t.data);
        }
        out
    }

    fn f16_bytes(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    /// One tensor of each supported type with hand-checkable values.
    fn sample_tensors() -> (Vec<TestTensor>, Vec<Vec<f32>>) {
        let mut tensors = Vec::new();
        let mut expected = Vec::new();

        let vals = [1.5f32, -2.25, 0.0, 1e-3];
        tensors.push(TestTensor {
            name: "f32",
            dims: vec![2, 2],
            ty: 0,
            data: vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        expected.push(vals.to_vec());

        let vals = [0.5f32, -1.0, 65504.0, 2.0f32.powi(-24)];
        tensors.push(TestTensor {
            name: "f16",
            dims: vec![4],
            ty: 1,
            data: vals.iter().flat_map(|&v| f16_bytes(v)).collect(),
        });
        expected.push(vals.to_vec());

        let vals = [1.0f32, -3.5, 2.0f32.powi(60), -0.0];
        tensors.push(TestTensor {
            name: "bf16",
            dims: vec![4],
            ty: 30,
            data: vals
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        });
        expected.push(vals.to_vec());

        // Q8_0: d = 0.25, qs = -16..16
        let mut data = f16_bytes(0.25).to_vec();
        data.extend((-16i8..16).map(|q| q as u8));
        tensors.push(TestTensor {
            name: "q8_0",
            dims: vec![32],
            ty: 8,
            data,
        });
        expected.push((-16..16).map(|q| q as f32 * 0.25).collect());

        // Q4_0: d = 0.5, qs[j] = j | (15 - j) << 4
        let mut data = f16_bytes(0.5).to_vec();
        data.extend((0u8..16).map(|j| j | ((15 - j) << 4)));
        tensors.push(TestTensor {
            name: "q4_0",
            dims: vec![32],
            ty: 2,
            data,
        });
        let mut e: Vec<f32> = (0..16).map(|j| (j as f32 - 8.0) * 0.5).collect();
        e.extend((0..16).map(|j| ((15 - j) as f32 - 8.0) * 0.5));
        expected.push(e);

        // Q4_1, two blocks: (d, m) = (0.5, -1) and (2, 3)
        let mut data = Vec::new();
        let mut e = Vec::new();
        for (d, m) in [(0.5f32, -1.0f32), (2.0, 3.0)] {
            data.extend(f16_bytes(d));
            data.extend(f16_bytes(m));
            data.extend((0u8..16).map(|j| j | ((15 - j) << 4)));
            e.extend((0..16).map(|j| j as f32 * d + m));
            e.extend((0..16).map(|j| (15 - j) as f32 * d + m));
        }
        tensors.push(TestTensor {
            name: "q4_1",
            dims: vec![32, 2],
            ty: 3,
            data,
        });
        expected.push(e);
        (tensors, expected)
    }

    fn sample_file() -> Vec<u8> {
        let kvs = [
            ("general.architecture", Value::Str("llama".into())),
            ("llama.block_count", Value::U32(30)),
            ("small", Value::U8(7)),
            ("negative", Value::I32(-1)),
            ("big", Value::U64(1 << 40)),
            ("eps", Value::F32(1e-5)),
            ("flag", Value::Bool(true)),
            (
                "list",
                Value::Array(vec![Value::Str("a b".into()), Value::Str("c".into())]),
            ),
        ];
        build(&kvs, &sample_tensors().0)
    }

    fn parse_err(bytes: Vec<u8>) -> String {
        match Gguf::parse(bytes) {
            Ok(_) => panic!("expected a parse error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_metadata_and_typed_getters() {
        let g = Gguf::parse(sample_file()).unwrap();
        assert_eq!(g.version(), 3);
        assert_eq!(g.alignment(), 32);
        assert_eq!(g.str("general.architecture").unwrap(), "llama");
        assert_eq!(g.u32("llama.block_count").unwrap(), 30);
        assert_eq!(g.u32("small").unwrap(), 7);
        assert!(
            g.u32("negative")
                .unwrap_err()
                .to_string()
                .contains("negative")
        );
        assert!(
            g.u32("big")
                .unwrap_err()
                .to_string()
                .contains("does not fit")
        );
        assert_eq!(g.f32("eps").unwrap(), 1e-5);
        assert!(g.bool("flag").unwrap());
        assert_eq!(g.strings("list").unwrap(), vec!["a b", "c"]);
        let missing = g.u32("nope").unwrap_err().to_string();
        assert!(
            missing.contains("missing") && missing.contains("'nope'"),
            "{missing}"
        );
        let wrong = g.str("llama.block_count").unwrap_err().to_string();
        assert!(
            wrong.contains("'llama.block_count'") && wrong.contains("uint32"),
            "{wrong}"
        );
        assert!(g.strings("general.architecture").is_err());
        assert!(g.f32("flag").is_err());
        assert_eq!(g.metadata().count(), 8);
        assert!(g.tensor("nope").unwrap_err().to_string().contains("'nope'"));
    }

    #[test]
    fn dequantizes_every_supported_type() {
        let g = Gguf::parse(sample_file()).unwrap();
        let (tensors, expected) = sample_tensors();
        assert_eq!(g.tensors().len(), tensors.len());
        for (t, want) in tensors.iter().zip(expected) {
            let info = g.tensor(t.name).unwrap();
            assert_eq!(info.dims, t.dims);
            assert_eq!(info.n_bytes() as usize, t.data.len(), "{}", t.name);
            assert_eq!(g.tensor_data(t.name).unwrap(), &t.data[..]);
            let got = g.dequantize(t.name).unwrap();
            let got_bits: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
            let want_bits: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
            assert_eq!(got_bits, want_bits, "{}", t.name);
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample_file();
        for cut in 0..bytes.len() {
            let err = parse_err(bytes[..cut].to_vec());
            assert!(!err.is_empty());
            if cut < 24 {
                assert!(err.contains("reading the"), "cut {cut}: {err}");
            }
        }
        assert!(Gguf::parse(bytes).is_ok());
    }

    #[test]
    fn rejects_bad_headers() {
        let good = sample_file();
        let mut b = good.clone();
        b[..4].copy_from_slice(b"GGML");
        assert!(parse_err(b).contains("not a GGUF file"));
        for version in [0u32, 1, 4, 0xFFFF_FFFF] {
            let mut b = good.clone();
            b[4..8].copy_from_slice(&version.to_le_bytes());
            let err = parse_err(b);
            assert!(
                err.contains(&format!("unsupported GGUF version {version}")),
                "{err}"
            );
        }
        let mut b = good.clone();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse_err(b).contains("tensor count"));
        let mut b = good.clone();
        b[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(parse_err(b).contains("metadata count"));
    }

    #[test]
    fn rejects_bad_metadata() {
        let one = |kv: (&str, Value)| build(&[kv], &[]);
        // A string length far beyond the file.
        let mut b = one(("k", Value::Str("v".into())));
        let at = 24 + 8 + 1 + 4;
        b[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = parse_err(b);
        assert!(
            err.contains("value of key 'k'") && err.contains("string length"),
            "{err}"
        );
        // A huge array count.
        let mut b = one(("arr", Value::Array(vec![Value::U32(1)])));
        let at = 24 + 8 + 3 + 4 + 4;
        b[at..at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        let err = parse_err(b);
        assert!(
            err.contains("'arr'") && err.contains("array length"),
            "{err}"
        );
        // Unknown value type.
        let mut b = one(("k", Value::U32(1)));
        b[24 + 9..24 + 13].copy_from_slice(&13u32.to_le_bytes());
        assert!(parse_err(b).contains("unknown value type 13"));
        // A bool that is neither 0 nor 1.
        let mut b = one(("k", Value::Bool(true)));
        b[24 + 8 + 1 + 4] = 2;
        assert!(parse_err(b).contains("expected 0 or 1"));
        // Invalid UTF-8 in a key.
        let mut b = one(("k", Value::U8(1)));
        b[24 + 8] = 0xFF;
        assert!(parse_err(b).contains("not valid UTF-8"));
        // Arrays nested too deep.
        let mut v = Value::U8(0);
        for _ in 0..10 {
            v = Value::Array(vec![v]);
        }
        assert!(parse_err(one(("deep", v))).contains("nested"));
        // Duplicate keys.
        let b = build(&[("k", Value::U8(1)), ("k", Value::U8(2))], &[]);
        assert!(parse_err(b).contains("duplicate metadata key 'k'"));
        // Bad alignment.
        let b = build(&[("general.alignment", Value::U32(3))], &[]);
        assert!(parse_err(b).contains("power of two"));
        let b = build(&[("general.alignment", Value::Str("x".into()))], &[]);
        assert!(parse_err(b).contains("general.alignment"));
    }

    #[test]
    fn rejects_bad_tensor_infos() {
        let t = |name, dims: Vec<u64>, ty, len| TestTensor {
            name,
            dims,
            ty,
            data: vec![0; len],
        };
        // Type numbers ggml does not have (4 was Q4_2, removed).
        for ty in [4u32, 31, 1000] {
            let err = parse_err(build(&[], &[t("w", vec![32], ty, 32)]));
            assert!(err.contains(&format!("invalid ggml type {ty}")), "{err}");
        }
        let err = parse_err(build(&[], &[t("w", vec![1, 2, 3, 4, 5], 0, 480)]));
        assert!(err.contains("5 dimensions"), "{err}");
        let err = parse_err(build(&[], &[t("w", vec![1 << 32, 1 << 32], 0, 4)]));
        assert!(err.contains("overflows"), "{err}");
        let err = parse_err(build(&[], &[t("w", vec![1 << 62, 2], 0, 4)]));
        assert!(err.contains("element count overflows"), "{err}");
        let err = parse_err(build(&[], &[t("w", vec![1 << 62], 0, 4)]));
        assert!(err.contains("data size of tensor 'w' overflows"), "{err}");
        let err = parse_err(build(&[], &[t("w", vec![48], 3, 40)]));
        assert!(err.contains("not a multiple of the block size 32"), "{err}");
        let err = parse_err(build(&[], &[t("w", vec![1000], 0, 400)]));
        assert!(err.contains("'w'") && err.contains("past the end"), "{err}");
        let err = parse_err(build(&[], &[t("w", vec![1], 0, 4), t("w", vec![1], 0, 4)]));
        assert!(err.contains("duplicate tensor name 'w'"), "{err}");
        // A misaligned offset (the only tensor's offset field is the last 8
        // bytes before the padding).
        let mut b = build(&[], &[t("w", vec![8], 0, 32)]);
        let at = 24 + 8 + 1 + 4 + 8 + 4;
        b[at..at + 8].copy_from_slice(&4u64.to_le_bytes());
        assert!(parse_err(b).contains("not a multiple of the alignment"));
        // An offset that points past the end.
        let mut b = build(&[], &[t("w", vec![8], 0, 32)]);
        b[at..at + 8].copy_from_slice(&(u64::MAX - 31).to_le_bytes());
        assert!(parse_err(b).contains("past the end"));
    }

    #[test]
    fn unsupported_type_parses_but_does_not_dequantize() {
        let b = build(
            &[],
            &[TestTensor {
                name: "k",
                dims: vec![256],
                ty: 12,
                data: vec![0; 144],
            }],
        );
        let g = Gguf::parse(b).unwrap();
        let info = g.tensor("k").unwrap();
        assert_eq!(info.ty, GgmlType::Other(12));
        assert_eq!(g.tensor_data("k").unwrap().len(), 144);
        let err = g.dequantize("k").unwrap_err().to_string();
        assert!(
            err.contains("'k'") && err.contains("type 12") && err.contains("Q4_K"),
            "{err}"
        );
    }

    #[test]
    fn open_reports_missing_file() {
        let err = Gguf::open(Path::new("/nonexistent/model.gguf")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/model.gguf"));
    }

    // ---- tests on the real model ----

    #[test]
    fn real_model_structure() {
        let Some(path) = model_path() else { return };
        let g = Gguf::open(&path).unwrap();
        assert_eq!(g.version(), 3);
        assert_eq!(g.tensors().len(), 272);
        assert_eq!(g.str("general.architecture").unwrap(), "llama");
        assert_eq!(g.u32("llama.block_count").unwrap(), 30);
        assert_eq!(g.u32("llama.embedding_length").unwrap(), 576);
        assert_eq!(g.u32("llama.attention.head_count").unwrap(), 9);
        assert_eq!(g.u32("llama.attention.head_count_kv").unwrap(), 3);
        assert_eq!(g.f32("llama.rope.freq_base").unwrap(), 100000.0);
        assert_eq!(g.strings("tokenizer.ggml.tokens").unwrap().len(), 49152);
        assert_eq!(g.strings("tokenizer.ggml.merges").unwrap().len(), 48900);
        let emb = g.tensor("token_embd.weight").unwrap();
        assert_eq!(
            (emb.dims.as_slice(), emb.ty),
            (&[576u64, 49152][..], GgmlType::Q8_0)
        );
        let q = g.tensor("blk.0.attn_q.weight").unwrap();
        assert_eq!(
            (q.dims.as_slice(), q.ty),
            (&[576u64, 576][..], GgmlType::Q4_1)
        );
        let norm = g.tensor("blk.0.attn_norm.weight").unwrap();
        assert_eq!(
            (norm.dims.as_slice(), norm.ty),
            (&[576u64][..], GgmlType::F32)
        );
        for t in g.tensors() {
            assert!(matches!(
                t.ty,
                GgmlType::F32 | GgmlType::Q4_1 | GgmlType::Q8_0
            ));
        }
    }

    /// Order-sensitive checksum of f32 bit patterns, the same as the reference
    /// script's: sum over i of bits(x[i]) * (i + 1), wrapping at 2^64.
    fn weighted_bit_sum(xs: &[f32]) -> u64 {
        xs.iter().enumerate().fold(0u64, |acc, (i, x)| {
            acc.wrapping_add(u64::from(x.to_bits()).wrapping_mul(i as u64 + 1))
        })
    }

    #[test]
    fn real_model_dequantize_matches_reference() {
        let Some(path) = model_path() else { return };
        let g = Gguf::open(&path).unwrap();
        let lines = reference_lines("dequant");
        assert!(lines.len() >= 4);
        for f in lines {
            // name, element count, weighted bit sum, then index:bits pairs
            let (name, n, sum) = (f[0], f[1], f[2]);
            let x = g.dequantize(name).unwrap();
            assert_eq!(x.len().to_string(), n, "{name}");
            assert_eq!(weighted_bit_sum(&x).to_string(), sum, "{name}: checksum");
            for pair in f[3].split(' ') {
                let (i, bits) = pair.split_once(':').unwrap();
                let i: usize = i.parse().unwrap();
                let bits = u32::from_str_radix(bits.trim_start_matches("0x"), 16).unwrap();
                assert_eq!(x[i].to_bits(), bits, "{name}[{i}] = {} ", x[i]);
            }
        }
    }

    #[test]
    fn real_model_truncations_are_errors() {
        let Some(path) = model_path() else { return };
        let bytes = std::fs::read(&path).unwrap();
        let g = Gguf::parse(bytes.clone()).unwrap();
        let data_start = g.data_start;
        let len = bytes.len();
        // Inside the header, the metadata (early, inside the token list, late),
        // the tensor infos, and the data.
        let cuts = [
            (0, "magic"),
            (6, "version"),
            (20, "metadata count"),
            // Too short for 33 entries: caught by the count check.
            (100, "metadata count"),
            (600, "key"),
            (500_000, "value of key 'tokenizer.ggml.tokens'"),
            (900_000, "value of key 'tokenizer.ggml.token_type'"),
            (1_500_000, "value of key 'tokenizer.ggml.merges'"),
            (1_769_300, "value of key 'tokenizer.chat_template'"),
            (data_start - 200, "tensor"),
            (data_start + 1000, "past the end"),
            (len / 2, "past the end"),
            (len - 1, "past the end"),
        ];
        for (cut, what) in cuts {
            let err = parse_err(bytes[..cut].to_vec());
            assert!(err.contains(what), "cut at {cut}: {err}");
        }
    }
}
