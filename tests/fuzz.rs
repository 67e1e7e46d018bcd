//! Fuzzed `KvCache` API (DESIGN §6): proptest makes random sequences of add, free,
//! truncate, extend, write, append, decode, prefill, plan and record calls, with
//! random sizes (zero, past capacity, overflowing), unknown and freed sequences,
//! stale and foreign reservations and plans, wrong shapes, out-of-range layers, bad
//! attention parameters, NaN / ±Inf / past-f16 values, bad configs and dtype
//! strings, and runs them against a host model of the cache. Every call succeeds or
//! returns the error the model predicts, and nothing panics; after a failed (or a
//! read-only) call every pool word, the bookkeeping and the decode outputs of every
//! sequence are exactly what they were. Periodically, what each sequence holds is
//! read back and checked against the model, and decode outputs against the f64
//! reference.
//!
//! Per run: at least 10,000 calls on the CPU reference and 1,000 on each GPU
//! backend, times `KVQ_FUZZ_SCALE` (default 1). The seed is fixed (`KVQ_FUZZ_SEED`
//! changes it), so a failure reproduces; proptest shrinks it to a short list of
//! operations. `KVQ_FUZZ_TRACE=1` prints every call; `--nocapture` shows the count
//! of each (call: outcome) at the end.

mod common;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::Rng;
use kvq::attn::Resolved;
use kvq::cache::{BlockManager, Reservation};
use kvq::cpu::CpuBackend;
use kvq::quant::{self, F16_MAX};
use kvq::reference::attention_f64;
use kvq::{
    AttnParams, Backend, CacheConfig, DeviceBuffer, Elem, Encoder, Error, KvCache, KvDtype, Plan,
    SeqId, Tensor,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

// ---------------------------------------------------------------------------
// Sizes
// ---------------------------------------------------------------------------

/// Operations per run on the CPU reference and on each GPU backend (times
/// `KVQ_FUZZ_SCALE`).
const CPU_OPS: usize = 10_000;
const GPU_OPS: usize = 1_000;
/// Operations per generated case (1 up to this).
const MAX_CASE_OPS: usize = 200;
/// Calls a case makes on average (operations, with some expanding into several
/// calls): each round of cases is sized by it, and rounds repeat until the run has
/// made its calls.
const CALLS_PER_CASE: usize = 130;
/// A full read-back of every sequence against the model every this many operations.
const FULL_CHECK_EVERY: usize = 25;
/// The default seed.
const DEFAULT_SEED: u64 = 0x6b76_7120_6675_7a7a;

const LAYERS: usize = 2;
const KV_HEADS: usize = 2;
const D: usize = 64;
const ROW: usize = KV_HEADS * D;
/// Query heads of the decode that watches every sequence.
const WATCH_Q_HEADS: usize = 2 * KV_HEADS;
/// Longest tensor the fuzzer makes; a longer "right" length is replaced by a short one.
const MAX_VALUES: usize = 1 << 20;

/// Storage formats of the fuzzed caches: (K, V, rotated).
const FORMATS: [(KvDtype, KvDtype, bool); 8] = [
    (KvDtype::Int8, KvDtype::Int8, false),
    (KvDtype::Int4 { group: 32 }, KvDtype::Int8, false),
    (KvDtype::F16, KvDtype::Int4 { group: 16 }, false),
    (KvDtype::Int8, KvDtype::Int4 { group: 8 }, true),
    (KvDtype::F16, KvDtype::F16, true),
    (KvDtype::Int4 { group: 64 }, KvDtype::F16, false),
    (KvDtype::Bf16, KvDtype::Fp8E4M3, false),
    (KvDtype::Fp8E5M2, KvDtype::Bf16, true),
];
/// (block_size, num_blocks) of the fuzzed caches: 32 to 80 tokens.
const SHAPES: [(usize, usize); 4] = [(4, 12), (3, 16), (1, 32), (5, 8)];

const STEP_TOKENS: &str = "tokens of a sequence in a step (must be at least 1)";
const QUERIES: &str = "queries of a sequence (must be 1..=its length)";

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

/// A sequence id, chosen when the operation runs.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// A live sequence (the i-th, modulo their number); unknown if none is live.
    Live(u8),
    /// A freed sequence; unknown if none was freed.
    Freed(u8),
    /// An id never handed out (255: `u64::MAX`).
    Unknown(u8),
}

/// Tokens to add to a sequence.
#[derive(Debug, Clone, Copy)]
enum Count {
    Zero,
    Small(u8),
    /// Exactly what still fits.
    Rest,
    /// More than fits.
    Over(u8),
    Huge(u8),
}
const HUGE_COUNTS: [usize; 5] = [
    usize::MAX,
    usize::MAX / 2 + 1,
    usize::MAX / 16,
    1 << 40,
    1 << 32,
];

/// Queries at a sequence's last positions.
#[derive(Debug, Clone, Copy)]
enum QCount {
    Zero,
    One,
    All,
    Over,
    Some(u8),
    Huge,
}

/// New length for `truncate`.
#[derive(Debug, Clone, Copy)]
enum Trunc {
    Zero,
    Keep(u8),
    Same,
    Over(u8),
    Max,
}

/// A tensor's length against what the call needs.
#[derive(Debug, Clone, Copy)]
enum Len {
    Right,
    Short(u8),
    Long(u8),
    Empty,
}

/// Finite values of a tensor.
#[derive(Debug, Clone, Copy)]
enum Fill {
    /// Normal values.
    Normal,
    /// Some of them ±65504, ±0, subnormal.
    Extreme,
    /// All 65504 (the largest f16), which a rotation sums up past f16's range.
    AllMax,
}
const EXTREMES: [f32; 7] = [F16_MAX, -F16_MAX, 0.0, -0.0, 1e-40, 6e-8, 65000.0];

/// A value the host API must refuse.
#[derive(Debug, Clone, Copy)]
enum Bad {
    Nan,
    NegNan,
    Inf,
    NegInf,
    Big,
    Max,
    JustOver,
    NegJustOver,
}

impl Bad {
    fn value(self) -> f32 {
        match self {
            Bad::Nan => f32::NAN,
            Bad::NegNan => f32::from_bits(0xffc0_0001),
            Bad::Inf => f32::INFINITY,
            Bad::NegInf => f32::NEG_INFINITY,
            Bad::Big => 1e30,
            Bad::Max => f32::MAX,
            Bad::JustOver => 65505.0,
            Bad::NegJustOver => -65520.0,
        }
    }
}

/// The values of one tensor.
#[derive(Debug, Clone, Copy)]
struct Data {
    len: Len,
    fill: Fill,
    /// A bad value at (position modulo the length).
    bad: Option<(Bad, u32)>,
    seed: u64,
}

/// A layer index.
#[derive(Debug, Clone, Copy)]
enum Layer {
    In(u8),
    Limit,
    Huge,
}

impl Layer {
    fn index(self) -> usize {
        match self {
            Layer::In(i) => i as usize % LAYERS,
            Layer::Limit => LAYERS,
            Layer::Huge => usize::MAX,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Heads {
    Ratio(u8),
    Zero,
    Odd,
    Huge(u8),
}
const HUGE_HEADS: [usize; 5] = [
    usize::MAX - 1,
    1 << 32,
    (1 << 32) + 2,
    u32::MAX as usize - 1,
    1 << 20,
];

#[derive(Debug, Clone, Copy)]
struct Params {
    heads: Heads,
    scale: Option<f32>,
    softcap: Option<f32>,
    window: Option<usize>,
}

impl Params {
    fn attn(&self) -> AttnParams {
        AttnParams {
            q_heads: match self.heads {
                Heads::Ratio(r) => KV_HEADS * [1, 2, 4][r as usize % 3],
                Heads::Zero => 0,
                Heads::Odd => KV_HEADS + 1,
                Heads::Huge(i) => HUGE_HEADS[i as usize % HUGE_HEADS.len()],
            },
            scale: self.scale,
            softcap: self.softcap,
            window: self.window,
        }
    }
}

/// Which reservation or plan: the newest, an older one, or one of another cache.
#[derive(Debug, Clone, Copy)]
enum Pick {
    Newest,
    Older(u8),
    Foreign,
}

#[derive(Debug, Clone)]
enum PlanKind {
    Decode(Vec<Target>),
    Prefill(Vec<(Target, Count)>),
    Attention(Vec<(Target, QCount)>),
}

/// Byte offset of a device tensor.
#[derive(Debug, Clone, Copy)]
enum Off {
    Zero,
    Aligned,
    Misaligned,
    Huge,
}

impl Off {
    fn bytes(self) -> u64 {
        match self {
            Off::Zero => 0,
            Off::Aligned => 256,
            Off::Misaligned => 2,
            Off::Huge => !0xffff,
        }
    }
}

/// A device tensor: its values (bad ones are not refused on the device path: they
/// may only spoil their own token), offset and element type.
#[derive(Debug, Clone, Copy)]
struct TensorSpec {
    data: Data,
    off: Off,
    f16: bool,
    /// In a buffer of another backend (wgpu for the CPU reference, the CPU
    /// reference for a GPU).
    foreign: bool,
}

#[derive(Debug, Clone, Copy)]
enum Dim {
    Small(u8),
    Zero,
    Huge(u8),
}
const HUGE_DIMS: [usize; 4] = [1 << 32, usize::MAX, 1 << 62, u32::MAX as usize];
const HEAD_DIMS: [usize; 12] = [
    0,
    4,
    8,
    12,
    16,
    24,
    40,
    64,
    128,
    256,
    1 << 33,
    usize::MAX - 7,
];
const GROUPS: [u32; 12] = [0, 4, 8, 12, 16, 24, 32, 64, 128, 256, u32::MAX, 1 << 31];

#[derive(Debug, Clone, Copy)]
enum DtSpec {
    F16,
    Int8,
    Int4(u8),
}

#[derive(Debug, Clone, Copy)]
struct ConfigSpec {
    layers: Dim,
    kv_heads: Dim,
    head_dim: u8,
    block_size: Dim,
    num_blocks: Dim,
    k: DtSpec,
    v: DtSpec,
    rotate: bool,
}

#[derive(Debug, Clone)]
enum Op {
    Add,
    Free(Target),
    Truncate(Target, Trunc),
    /// seq_len, block_table and pools.
    Query(Target, Layer),
    Extend(Vec<(Target, Count)>),
    Write {
        res: Pick,
        layer: Layer,
        k: Data,
        v: Data,
    },
    Append {
        batch: Vec<(Target, Count)>,
        k: Data,
        v: Data,
    },
    Decode {
        layer: Layer,
        seqs: Vec<Target>,
        q: Data,
        params: Params,
    },
    Prefill {
        layer: Layer,
        chunks: Vec<(Target, QCount)>,
        q: Data,
        params: Params,
    },
    Plan(PlanKind, Params),
    /// `direct`: recorded into `Encoder::Immediate` rather than the backend's
    /// own encoder (wrong on a GPU).
    RecordAppend {
        plan: Pick,
        layer: Layer,
        k: TensorSpec,
        v: TensorSpec,
        direct: bool,
    },
    RecordAttention {
        plan: Pick,
        layer: Layer,
        q: TensorSpec,
        out: TensorSpec,
        direct: bool,
    },
    NewCache(ConfigSpec),
    ParseDtype(String),
    /// Extend, then writes with that reservation.
    Reserve(Vec<(Target, Count)>, Vec<(Layer, Data, Data)>),
    /// A plan, then records with it (append when `true`, else attention).
    Step(PlanKind, Params, Vec<(bool, Layer, TensorSpec, TensorSpec)>),
}

impl Op {
    /// The calls an operation makes, one after the other.
    fn calls(&self) -> Vec<Op> {
        match self {
            Op::Reserve(batch, writes) => std::iter::once(Op::Extend(batch.clone()))
                .chain(writes.iter().map(|&(layer, k, v)| Op::Write {
                    res: Pick::Newest,
                    layer,
                    k,
                    v,
                }))
                .collect(),
            Op::Step(kind, params, records) => std::iter::once(Op::Plan(kind.clone(), *params))
                .chain(records.iter().map(|&(append, layer, a, b)| {
                    if append {
                        Op::RecordAppend {
                            plan: Pick::Newest,
                            layer,
                            k: a,
                            v: b,
                            direct: false,
                        }
                    } else {
                        Op::RecordAttention {
                            plan: Pick::Newest,
                            layer,
                            q: a,
                            out: b,
                            direct: false,
                        }
                    }
                }))
                .collect(),
            op => vec![op.clone()],
        }
    }
}

/// One generated case: the cache's format and shape, and its operations.
#[derive(Debug, Clone)]
struct Case {
    format: usize,
    shape: usize,
    ops: Vec<Op>,
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        12 => any::<u8>().prop_map(Target::Live),
        1 => any::<u8>().prop_map(Target::Freed),
        1 => any::<u8>().prop_map(Target::Unknown),
    ]
}

fn count() -> impl Strategy<Value = Count> {
    prop_oneof![
        1 => Just(Count::Zero),
        10 => (1u8..=6).prop_map(Count::Small),
        1 => Just(Count::Rest),
        1 => (0u8..8).prop_map(Count::Over),
        1 => any::<u8>().prop_map(Count::Huge),
    ]
}

fn qcount() -> impl Strategy<Value = QCount> {
    prop_oneof![
        1 => Just(QCount::Zero),
        6 => Just(QCount::One),
        2 => Just(QCount::All),
        1 => Just(QCount::Over),
        4 => any::<u8>().prop_map(QCount::Some),
        1 => Just(QCount::Huge),
    ]
}

fn trunc() -> impl Strategy<Value = Trunc> {
    prop_oneof![
        1 => Just(Trunc::Zero),
        4 => any::<u8>().prop_map(Trunc::Keep),
        1 => Just(Trunc::Same),
        1 => any::<u8>().prop_map(Trunc::Over),
        1 => Just(Trunc::Max),
    ]
}

fn bad() -> impl Strategy<Value = Bad> {
    prop::sample::select(vec![
        Bad::Nan,
        Bad::NegNan,
        Bad::Inf,
        Bad::NegInf,
        Bad::Big,
        Bad::Max,
        Bad::JustOver,
        Bad::NegJustOver,
    ])
}

fn data() -> impl Strategy<Value = Data> {
    let len = prop_oneof![
        30 => Just(Len::Right),
        1 => any::<u8>().prop_map(Len::Short),
        1 => any::<u8>().prop_map(Len::Long),
        1 => Just(Len::Empty),
    ];
    let fill = prop_oneof![
        12 => Just(Fill::Normal),
        2 => Just(Fill::Extreme),
        1 => Just(Fill::AllMax),
    ];
    (
        len,
        fill,
        prop::option::weighted(0.08, (bad(), any::<u32>())),
        any::<u64>(),
    )
        .prop_map(|(len, fill, bad, seed)| Data {
            len,
            fill,
            bad,
            seed,
        })
}

fn layer() -> impl Strategy<Value = Layer> {
    prop_oneof![
        20 => any::<u8>().prop_map(Layer::In),
        1 => Just(Layer::Limit),
        1 => Just(Layer::Huge),
    ]
}

fn params() -> impl Strategy<Value = Params> {
    let heads = prop_oneof![
        24 => any::<u8>().prop_map(Heads::Ratio),
        1 => Just(Heads::Zero),
        1 => Just(Heads::Odd),
        1 => any::<u8>().prop_map(Heads::Huge),
    ];
    let scale = prop::option::weighted(
        0.1,
        prop::sample::select(vec![
            0.05f32,
            -1.0,
            0.0,
            1e30,
            f32::MAX,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ]),
    );
    let softcap = prop::option::weighted(
        0.1,
        prop::sample::select(vec![30.0f32, 0.5, 0.0, -1.0, f32::NAN, f32::INFINITY]),
    );
    let window = prop::option::weighted(
        0.1,
        prop::sample::select(vec![1usize, 3, 17, 0, usize::MAX, u32::MAX as usize + 1]),
    );
    (heads, scale, softcap, window).prop_map(|(heads, scale, softcap, window)| Params {
        heads,
        scale,
        softcap,
        window,
    })
}

fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![
        8 => Just(Pick::Newest),
        2 => any::<u8>().prop_map(Pick::Older),
        1 => Just(Pick::Foreign),
    ]
}

fn tensor() -> impl Strategy<Value = TensorSpec> {
    let off = prop_oneof![
        12 => Just(Off::Zero),
        3 => Just(Off::Aligned),
        1 => Just(Off::Misaligned),
        1 => Just(Off::Huge),
    ];
    (
        data(),
        off,
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.03),
    )
        .prop_map(|(data, off, f16, foreign)| TensorSpec {
            data,
            off,
            f16,
            foreign,
        })
}

fn batch<S: Strategy + 'static>(n: S) -> impl Strategy<Value = Vec<(Target, S::Value)>> {
    prop::collection::vec((target(), n), 0..4)
}

fn config_spec() -> impl Strategy<Value = ConfigSpec> {
    let dim = || {
        prop_oneof![
            12 => any::<u8>().prop_map(Dim::Small),
            1 => Just(Dim::Zero),
            1 => any::<u8>().prop_map(Dim::Huge),
        ]
    };
    let dt = || {
        prop_oneof![
            Just(DtSpec::F16),
            Just(DtSpec::Int8),
            any::<u8>().prop_map(DtSpec::Int4),
        ]
    };
    (
        dim(),
        dim(),
        any::<u8>(),
        dim(),
        dim(),
        dt(),
        dt(),
        any::<bool>(),
    )
        .prop_map(
            |(layers, kv_heads, head_dim, block_size, num_blocks, k, v, rotate)| ConfigSpec {
                layers,
                kv_heads,
                head_dim,
                block_size,
                num_blocks,
                k,
                v,
                rotate,
            },
        )
}

const DTYPE_STRINGS: [&str; 34] = [
    "f16",
    "F16",
    "int8",
    " Int8\t",
    "int4",
    "INT4",
    "int4:g8",
    "int4:g16",
    "int4:g64",
    "int4:G32",
    "int4:g4294967288",
    "int4:g4294967296",
    "int4:g0",
    "int4:g08",
    "int4:g+8",
    "int4:g-8",
    "int4:g12",
    "int4:g",
    "int4:",
    "int4g8",
    "int4 :g8",
    "",
    " ",
    "f32",
    "bf16",
    "int2",
    "fp16",
    "\u{131}nt8",
    "int8\u{0}",
    "\u{3000}f16\u{3000}",
    "int4:g1_6",
    "int4:g\u{661}\u{666}",
    "int4:g 16",
    "int4:g16:g16",
];
const DTYPE_PIECES: [&str; 16] = [
    "int", "4", "8", ":", "g", "0", "1", "16", "32", "f", " ", "+", "-", "G", "I", "x",
];

fn dtype_string() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(DTYPE_STRINGS.to_vec()).prop_map(String::from),
        prop::collection::vec(prop::sample::select(DTYPE_PIECES.to_vec()), 0..6)
            .prop_map(|p| p.concat()),
    ]
}

fn plan_kind() -> impl Strategy<Value = PlanKind> {
    prop_oneof![
        prop::collection::vec(target(), 0..4).prop_map(PlanKind::Decode),
        batch(count()).prop_map(PlanKind::Prefill),
        batch(qcount()).prop_map(PlanKind::Attention),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => Just(Op::Add),
        2 => target().prop_map(Op::Free),
        3 => (target(), trunc()).prop_map(|(t, n)| Op::Truncate(t, n)),
        1 => (target(), layer()).prop_map(|(t, l)| Op::Query(t, l)),
        4 => batch(count()).prop_map(Op::Extend),
        3 => (pick(), layer(), data(), data())
            .prop_map(|(res, layer, k, v)| Op::Write { res, layer, k, v }),
        8 => (batch(count()), data(), data())
            .prop_map(|(batch, k, v)| Op::Append { batch, k, v }),
        5 => (layer(), prop::collection::vec(target(), 0..4), data(), params())
            .prop_map(|(layer, seqs, q, params)| Op::Decode { layer, seqs, q, params }),
        4 => (layer(), batch(qcount()), data(), params())
            .prop_map(|(layer, chunks, q, params)| Op::Prefill { layer, chunks, q, params }),
        2 => (plan_kind(), params()).prop_map(|(k, p)| Op::Plan(k, p)),
        2 => (pick(), layer(), tensor(), tensor(), prop::bool::weighted(0.05))
            .prop_map(|(plan, layer, k, v, direct)| Op::RecordAppend {
                plan,
                layer,
                k,
                v,
                direct
            }),
        2 => (pick(), layer(), tensor(), tensor(), prop::bool::weighted(0.05))
            .prop_map(|(plan, layer, q, out, direct)| Op::RecordAttention {
                plan,
                layer,
                q,
                out,
                direct
            }),
        4 => (
            batch(count()),
            prop::collection::vec((layer(), data(), data()), 0..4),
        )
            .prop_map(|(b, w)| Op::Reserve(b, w)),
        5 => (
            plan_kind(),
            params(),
            prop::collection::vec((any::<bool>(), layer(), tensor(), tensor()), 0..5),
        )
            .prop_map(|(k, p, r)| Op::Step(k, p, r)),
        1 => config_spec().prop_map(Op::NewCache),
        1 => dtype_string().prop_map(Op::ParseDtype),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        0..FORMATS.len(),
        0..SHAPES.len(),
        prop::collection::vec(op(), 1..=MAX_CASE_OPS),
    )
        .prop_map(|(format, shape, ops)| Case { format, shape, ops })
}

// ---------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------

impl Data {
    /// Values for a tensor of `n` elements (`None`: more than can be made), and the
    /// first bad one.
    fn make(&self, n: Option<usize>) -> (Vec<f32>, Option<(usize, f32)>) {
        let n = n.filter(|&n| n <= MAX_VALUES);
        let len = match (self.len, n) {
            (Len::Right, Some(n)) => n,
            (Len::Right, None) => 3,
            (Len::Short(k), Some(n)) => n.saturating_sub(1 + k as usize % 64),
            (Len::Short(k), None) => k as usize % 8,
            (Len::Long(k), Some(n)) => n + 1 + k as usize % 64,
            (Len::Long(k), None) => 5 + k as usize,
            (Len::Empty, _) => 0,
        };
        let mut rng = Rng::new(self.seed);
        let scale = [0.5, 1.0, 3.0][(self.seed % 3) as usize];
        let mut x: Vec<f32> = (0..len).map(|_| rng.normal() * scale).collect();
        match self.fill {
            Fill::Normal => {}
            Fill::Extreme if len > 0 => {
                for _ in 0..1 + len / 50 {
                    let i = rng.below(len);
                    x[i] = EXTREMES[rng.below(EXTREMES.len())];
                }
            }
            Fill::Extreme => {}
            Fill::AllMax => x.fill(F16_MAX),
        }
        let bad = match self.bad {
            Some((b, at)) if len > 0 => {
                let i = at as usize % len;
                x[i] = b.value();
                Some((i, x[i]))
            }
            _ => None,
        };
        (x, bad)
    }
}

/// f16 rounding (what an f16 tensor holds of `x`).
fn to_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// The value as the host API refuses it: non-finite or past f16's range.
fn is_bad(x: f32) -> bool {
    x.is_nan() || x.abs() > F16_MAX
}

/// `x > limit`, NaN included.
fn above(x: f32, limit: f32) -> bool {
    x.is_nan() || x > limit
}

/// Whether two outputs agree: to `tol` relative, or both NaN.
fn close(a: f32, b: f32, tol: f32) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= tol * (1.0 + b.abs())
}

// ---------------------------------------------------------------------------
// Expected results
// ---------------------------------------------------------------------------

/// What a call should return.
#[derive(Debug, Clone)]
enum Want {
    Ok,
    /// This error (compared as `{:?}`, so that NaN values compare equal).
    Err(Error),
    /// An error of this variant.
    Kind(&'static str),
    /// An error of this variant whose message contains the string.
    Msg(&'static str, String),
    /// Any of these.
    Any(Vec<Want>),
}

impl Want {
    fn matches(&self, e: &Error) -> bool {
        match self {
            Want::Ok => false,
            Want::Err(w) => format!("{w:?}") == format!("{e:?}"),
            Want::Kind(k) => kind(e) == *k,
            Want::Msg(k, s) => kind(e) == *k && e.to_string().contains(s.as_str()),
            Want::Any(ws) => ws.iter().any(|w| w.matches(e)),
        }
    }

    fn is_ok(&self) -> bool {
        match self {
            Want::Ok => true,
            Want::Any(ws) => ws.iter().any(Want::is_ok),
            _ => false,
        }
    }
}

fn kind(e: &Error) -> &'static str {
    match e {
        Error::UnknownDtype(_) => "UnknownDtype",
        Error::InvalidConfig(_) => "InvalidConfig",
        Error::Unsupported(_) => "Unsupported",
        Error::ShapeMismatch { .. } => "ShapeMismatch",
        Error::OutOfRange { .. } => "OutOfRange",
        Error::CapacityExceeded { .. } => "CapacityExceeded",
        Error::UnknownSequence(_) => "UnknownSequence",
        Error::DuplicateSequence(_) => "DuplicateSequence",
        Error::StaleReservation => "StaleReservation",
        Error::StalePlan => "StalePlan",
        Error::NonFinite { .. } => "NonFinite",
        Error::DeviceLimit { .. } => "DeviceLimit",
        Error::ForeignBuffer { .. } => "ForeignBuffer",
        Error::ForeignStep { .. } => "ForeignStep",
        Error::NoBackend(_) => "NoBackend",
        Error::CudaNotCompiled => "CudaNotCompiled",
        Error::OutOfMemory(_) => "OutOfMemory",
        Error::Device(_) => "Device",
        _ => "other",
    }
}

/// The variant and the argument it names, for the tally.
fn describe(e: &Error) -> String {
    match e {
        Error::ShapeMismatch { what, .. }
        | Error::OutOfRange { what, .. }
        | Error::NonFinite { what, .. } => {
            let what = what.split(' ').next().unwrap_or(what);
            format!("{}({what})", kind(e))
        }
        _ => kind(e).to_string(),
    }
}

/// Checks a result against what the model wants.
fn expect<T>(call: &str, want: &Want, got: &Result<T, Error>) -> Result<(), String> {
    let ok = match got {
        Ok(_) => want.is_ok(),
        Err(e) => want.matches(e),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{call}: expected {want:?}, got {:?}",
            got.as_ref().map(|_| "Ok")
        ))
    }
}

/// What `AttnParams::resolve` (and the cache, for heads kernels cannot index)
/// makes of `p`.
fn want_params(p: &AttnParams) -> Option<Want> {
    let bad = p.q_heads == 0
        || p.q_heads % KV_HEADS != 0
        || p.q_heads > u32::MAX as usize
        || p.scale.is_some_and(|s| !s.is_finite())
        || p.softcap.is_some_and(|c| !(c.is_finite() && c > 0.0))
        || p.window == Some(0);
    bad.then_some(Want::Kind("InvalidConfig"))
}

/// The error recording gives for a tensor of `n` elements in a buffer of `words`
/// words, if any: `Tensor::check`'s (offset alignment, size), then another
/// backend's buffer.
fn want_tensor(what: &'static str, n: usize, t: &TensorSpec, words: usize) -> Option<Want> {
    let (off, f16) = (t.off.bytes(), t.f16);
    if off % 4 != 0 {
        return Some(Want::Kind("InvalidConfig"));
    }
    let elem = if f16 { Elem::F16 } else { Elem::F32 };
    let have = words as u64 * 4;
    let fits = off
        .checked_add(elem.bytes(n) as u64)
        .is_some_and(|end| end <= have);
    if !fits {
        return Some(Want::Err(Error::ShapeMismatch {
            what,
            expected: n,
            got: (have.saturating_sub(off) / 4) as usize * if f16 { 2 } else { 1 },
        }));
    }
    t.foreign.then_some(Want::Kind("ForeignBuffer"))
}

/// What `CacheConfig::validate` should say.
fn want_config(c: &CacheConfig) -> Want {
    for (name, v) in [
        ("layers", c.layers),
        ("kv_heads", c.kv_heads),
        ("head_dim", c.head_dim),
        ("block_size", c.block_size),
        ("num_blocks", c.num_blocks),
    ] {
        if v == 0 {
            return Want::Msg("InvalidConfig", format!("{name} is 0"));
        }
    }
    let d = c.head_dim;
    for dt in [c.k_dtype, c.v_dtype] {
        if d % 8 != 0 {
            return Want::Kind("Unsupported");
        }
        if let KvDtype::Int4 { group } = dt {
            let g = group as usize;
            if g == 0 || g % 8 != 0 || d % g != 0 {
                return Want::Kind("Unsupported");
            }
        }
    }
    if c.rotate && !d.is_power_of_two() {
        return Want::Kind("InvalidConfig");
    }
    for dt in [c.k_dtype, c.v_dtype] {
        let words = [c.num_blocks, c.kv_heads, c.block_size, row_words(dt, d)]
            .iter()
            .try_fold(1u128, |a, &b| a.checked_mul(b as u128));
        if words.is_none_or(|w| w > u32::MAX as u128) {
            return Want::Kind("InvalidConfig");
        }
    }
    // The whole cache (all layers), even as f32, has a size.
    let f32_bytes = [c.layers, c.kv_heads, c.head_dim, c.num_blocks, c.block_size]
        .iter()
        .try_fold(8u128, |a, &b| a.checked_mul(b as u128));
    if f32_bytes.is_none_or(|b| b > usize::MAX as u128) {
        return Want::Msg("InvalidConfig", "do not fit in memory".into());
    }
    Want::Ok
}

/// Code and side words of one (token, head) vector.
fn row_words(dt: KvDtype, d: usize) -> usize {
    match dt {
        KvDtype::F16 | KvDtype::Bf16 => d / 2,
        KvDtype::Int8 | KvDtype::Fp8E4M3 | KvDtype::Fp8E5M2 => d / 4 + 1,
        KvDtype::Int4 { group } => d / 8 + d / group as usize,
        KvDtype::Int4Channel => d / 8 + d.div_ceil(32),
    }
}

/// What `KvDtype::from_str` should make of `s`: f16 (fp16), bf16, int8, fp8
/// (fp8-e4m3), fp8-e5m2, int4 or int4:gN (N a positive multiple of 8 in plain
/// decimal digits), any case, surrounding space.
fn want_dtype(s: &str) -> Result<KvDtype, Error> {
    let bad = Err(Error::UnknownDtype(s.to_string()));
    let t = s.trim().to_ascii_lowercase();
    match t.as_str() {
        "f16" | "fp16" => Ok(KvDtype::F16),
        "bf16" => Ok(KvDtype::Bf16),
        "int8" => Ok(KvDtype::Int8),
        "fp8" | "fp8-e4m3" => Ok(KvDtype::Fp8E4M3),
        "fp8-e5m2" => Ok(KvDtype::Fp8E5M2),
        "int4" => Ok(KvDtype::Int4 { group: 32 }),
        _ => {
            let Some(n) = t.strip_prefix("int4:g") else {
                return bad;
            };
            if n.is_empty() || !n.bytes().all(|c| c.is_ascii_digit()) || n.starts_with('0') {
                return bad;
            }
            match n.parse::<u32>() {
                Ok(g) if g % 8 == 0 => Ok(KvDtype::Int4 { group: g }),
                _ => bad,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------

/// What one token of one layer holds, as attention sees it (`quant::stored`).
#[derive(Debug, Clone)]
struct Row {
    k: Vec<f32>,
    v: Vec<f32>,
    /// All input values were small: the f64 reference can be compared closely.
    tame: bool,
}

#[derive(Debug, Clone, Default)]
struct SeqModel {
    len: usize,
    /// `[layer][position]`: `None` where reserved but not written, or written with
    /// values the device path took unchecked.
    rows: Vec<Vec<Option<Row>>>,
}

#[derive(Debug, Clone)]
struct Model {
    bs: usize,
    num_blocks: usize,
    k_dt: KvDtype,
    v_dt: KvDtype,
    rotate: bool,
    seqs: BTreeMap<u64, SeqModel>,
    freed: Vec<u64>,
    next_id: u64,
    /// Successful changes of the bookkeeping; reservations and plans of older
    /// epochs are stale.
    epoch: u64,
    /// A GPU, which may refuse a step of very many query heads (`DeviceLimit`)
    /// when it prepares it.
    gpu: bool,
}

/// (sequence, first new position, tokens) of a reservation or plan, in batch order.
type Spans = Vec<(u64, usize, usize)>;

impl Model {
    fn used_blocks(&self) -> usize {
        self.seqs.values().map(|s| s.len.div_ceil(self.bs)).sum()
    }

    fn free_blocks(&self) -> usize {
        self.num_blocks - self.used_blocks()
    }

    fn len(&self, id: u64) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.len)
    }

    fn resolve(&self, t: Target) -> u64 {
        let unknown = |x: u8| {
            if x == 255 {
                u64::MAX
            } else {
                self.next_id + (x % 4) as u64
            }
        };
        match t {
            Target::Live(i) if !self.seqs.is_empty() => {
                *self.seqs.keys().nth(i as usize % self.seqs.len()).unwrap()
            }
            Target::Freed(i) if !self.freed.is_empty() => self.freed[i as usize % self.freed.len()],
            Target::Live(x) | Target::Freed(x) | Target::Unknown(x) => unknown(x),
        }
    }

    fn count(&self, id: u64, c: Count) -> usize {
        let len = self.len(id).unwrap_or(0);
        let rest = len.div_ceil(self.bs) * self.bs - len + self.free_blocks() * self.bs;
        match c {
            Count::Zero => 0,
            Count::Small(n) => n as usize,
            Count::Rest => rest,
            Count::Over(k) => rest + 1 + k as usize,
            Count::Huge(i) => HUGE_COUNTS[i as usize % HUGE_COUNTS.len()],
        }
    }

    fn qcount(&self, id: u64, c: QCount) -> usize {
        let len = self.len(id).unwrap_or(0);
        match c {
            QCount::Zero => 0,
            QCount::One => 1,
            QCount::All => len,
            QCount::Over => len + 1,
            QCount::Some(k) => 1 + k as usize % len.max(1),
            QCount::Huge => usize::MAX,
        }
    }

    fn check_batch(&self, ids: impl IntoIterator<Item = u64>) -> Result<(), Error> {
        let mut seen = BTreeSet::new();
        for id in ids {
            if !self.seqs.contains_key(&id) {
                return Err(Error::UnknownSequence(id));
            }
            if !seen.insert(id) {
                return Err(Error::DuplicateSequence(id));
            }
        }
        Ok(())
    }

    /// Whether the blocks `batch` needs are free (the sequences exist).
    fn capacity(&self, batch: &[(u64, usize)]) -> Result<(), Error> {
        let free = self.free_blocks();
        let too_many = Error::CapacityExceeded {
            needed: usize::MAX,
            free,
        };
        let mut needed = 0usize;
        for &(id, n) in batch {
            let len = self.seqs[&id].len;
            let Some(new) = len.checked_add(n) else {
                return Err(too_many);
            };
            let Some(sum) = needed.checked_add(new.div_ceil(self.bs) - len.div_ceil(self.bs))
            else {
                return Err(too_many);
            };
            needed = sum;
        }
        if needed > free {
            return Err(Error::CapacityExceeded { needed, free });
        }
        Ok(())
    }

    fn want_extend(&self, batch: &[(u64, usize)]) -> Want {
        match self
            .check_batch(batch.iter().map(|b| b.0))
            .and_then(|()| self.capacity(batch))
        {
            Ok(()) => Want::Ok,
            Err(e) => Want::Err(e),
        }
    }

    /// What decode or prefill (attention over cached tokens) should return.
    fn want_attend(
        &self,
        layer: usize,
        batch: &[(u64, usize)],
        p: &AttnParams,
        q_len: usize,
        q_bad: Option<(usize, f32)>,
    ) -> Want {
        if layer >= LAYERS {
            return Want::Err(Error::OutOfRange {
                what: "layer",
                value: layer,
                limit: LAYERS,
            });
        }
        if let Some(w) = self.want_plan_attention(batch, p) {
            return w;
        }
        self.or_device_limit(p, self.want_q(batch, p, q_len, q_bad))
    }

    /// `want`, or on a GPU a device limit for very many query heads.
    fn or_device_limit(&self, p: &AttnParams, want: Want) -> Want {
        if self.gpu && p.q_heads > 1024 {
            Want::Any(vec![want, Want::Kind("DeviceLimit")])
        } else {
            want
        }
    }

    fn want_q(
        &self,
        batch: &[(u64, usize)],
        p: &AttnParams,
        q_len: usize,
        q_bad: Option<(usize, f32)>,
    ) -> Want {
        let queries: usize = batch.iter().map(|b| b.1).sum();
        let q_words = queries * p.q_heads * D;
        if q_len != q_words {
            return Want::Err(Error::ShapeMismatch {
                what: "q",
                expected: q_words,
                got: q_len,
            });
        }
        if let Some((index, value)) = q_bad {
            return Want::Err(Error::NonFinite {
                what: "q",
                index,
                value,
            });
        }
        Want::Ok
    }

    /// The error of `plan_attention(batch, p)`, if any.
    fn want_plan_attention(&self, batch: &[(u64, usize)], p: &AttnParams) -> Option<Want> {
        if let Some(w) = self.want_step(batch, p) {
            return Some(w);
        }
        for &(id, n) in batch {
            let len = self.seqs[&id].len;
            if n > len {
                return Some(Want::Err(Error::OutOfRange {
                    what: QUERIES,
                    value: n,
                    limit: len + 1,
                }));
            }
        }
        None
    }

    /// The error of checking a step's batch and parameters, if any.
    fn want_step(&self, batch: &[(u64, usize)], p: &AttnParams) -> Option<Want> {
        if let Some(w) = want_params(p) {
            return Some(w);
        }
        if let Err(e) = self.check_batch(batch.iter().map(|b| b.0)) {
            return Some(Want::Err(e));
        }
        if batch.iter().any(|b| b.1 == 0) {
            return Some(Want::Err(Error::OutOfRange {
                what: STEP_TOKENS,
                value: 0,
                limit: usize::MAX,
            }));
        }
        None
    }

    /// What write (or append, after its batch checks) says of K and V of `n` values.
    fn want_kv(
        &self,
        n: usize,
        k: &[f32],
        kbad: Option<(usize, f32)>,
        v: &[f32],
        vbad: Option<(usize, f32)>,
    ) -> Want {
        let shape = |what, got| {
            Want::Err(Error::ShapeMismatch {
                what,
                expected: n,
                got,
            })
        };
        let bad = |what, (index, value)| Want::Err(Error::NonFinite { what, index, value });
        if k.len() != n {
            shape("k", k.len())
        } else if v.len() != n {
            shape("v", v.len())
        } else if let Some(b) = kbad {
            bad("k", b)
        } else if let Some(b) = vbad {
            bad("v", b)
        } else if let Some(b) = self.past_f16("k", self.k_dt, k) {
            b
        } else if let Some(b) = self.past_f16("v", self.v_dt, v) {
            b
        } else {
            Want::Ok
        }
    }

    /// A rotated F16 or Int4 pool stores f16 values of each head vector rotated:
    /// the first rotated component past f16's range is refused.
    fn past_f16(&self, what: &'static str, dt: KvDtype, x: &[f32]) -> Option<Want> {
        if !self.rotate || !dt.f16_bounded() {
            return None;
        }
        for (i, head) in x.chunks_exact(D).enumerate() {
            let mut r = head.to_vec();
            quant::hadamard(&mut r);
            if let Some(j) = r.iter().position(|&x| is_bad(x)) {
                return Some(Want::Err(Error::NonFinite {
                    what,
                    index: i * D + j,
                    value: r[j],
                }));
            }
        }
        None
    }

    fn add(&mut self) {
        self.seqs.insert(
            self.next_id,
            SeqModel {
                len: 0,
                rows: vec![Vec::new(); LAYERS],
            },
        );
        self.next_id += 1;
    }

    fn free(&mut self, id: u64) {
        self.seqs.remove(&id);
        self.freed.push(id);
        self.epoch += 1;
    }

    fn truncate(&mut self, id: u64, len: usize) {
        let s = self.seqs.get_mut(&id).unwrap();
        s.len = len;
        for r in &mut s.rows {
            r.truncate(len);
        }
        self.epoch += 1;
    }

    /// Grows the sequences of `batch` by unwritten tokens; their spans.
    fn grow(&mut self, batch: &[(u64, usize)]) -> Spans {
        let mut spans = Vec::new();
        for &(id, n) in batch {
            let s = self.seqs.get_mut(&id).unwrap();
            spans.push((id, s.len, n));
            s.len += n;
            for r in &mut s.rows {
                r.resize(s.len, None);
            }
        }
        spans
    }

    /// Sets the rows of `spans` in `layer` from `k` and `v` (`[tokens, ROW]` each,
    /// as the kernels read them): tokens with a value the host API would refuse
    /// become unknown.
    fn set(&mut self, layer: usize, spans: &Spans, k: &[f32], v: &[f32]) {
        let mut t = 0;
        for &(id, start, n) in spans {
            for p in start..start + n {
                let (kr, vr) = (&k[t * ROW..][..ROW], &v[t * ROW..][..ROW]);
                // Values past f16's range, or rotated past it where f16 is stored
                // (the device path takes them unchecked), spoil the token.
                let row = Some(self.stored(kr, vr)).filter(|r| {
                    !kr.iter().chain(vr).any(|&x| is_bad(x))
                        && r.k.iter().chain(&r.v).all(|x| x.is_finite())
                });
                self.seqs.get_mut(&id).unwrap().rows[layer][p] = row;
                t += 1;
            }
        }
    }

    fn stored(&self, k: &[f32], v: &[f32]) -> Row {
        let per_head = |dt: KvDtype, x: &[f32]| -> Vec<f32> {
            x.chunks(D)
                .flat_map(|h| quant::stored(dt, self.rotate, h))
                .collect()
        };
        Row {
            k: per_head(self.k_dt, k),
            v: per_head(self.v_dt, v),
            tame: k.iter().chain(v).all(|x| x.abs() <= 100.0),
        }
    }

    /// Sequences with tokens, in id order (those the watching decode attends).
    fn watched(&self) -> Vec<u64> {
        self.seqs
            .iter()
            .filter(|(_, s)| s.len > 0)
            .map(|(&id, _)| id)
            .collect()
    }
}

// ---------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------

/// Everything observable about a cache: the bookkeeping, every pool word and the
/// decode output of every sequence.
#[derive(PartialEq)]
struct Observed {
    blocks: BlockManager,
    words: Vec<Vec<u32>>,
    outputs: Vec<Vec<u32>>,
}

struct ResRec {
    res: Reservation,
    epoch: u64,
    spans: Spans,
}

struct PlanRec {
    plan: Plan,
    epoch: u64,
    /// New tokens (empty for an attention plan).
    spans: Spans,
    /// (sequence, queries), in batch order.
    queries: Vec<(u64, usize)>,
    params: AttnParams,
    /// Layers whose append was recorded with it: in a plan that appends,
    /// attention needs its layer's first.
    appended: [bool; LAYERS],
}

/// Counts of (operation: outcome), over the run.
type Tally = Mutex<BTreeMap<String, usize>>;

struct Harness<'a> {
    b: Arc<dyn Backend>,
    cache: KvCache,
    /// Another cache of the same shape: its reservations and plans are foreign.
    other: KvCache,
    other_seq: SeqId,
    other_epoch: u64,
    model: Model,
    reservations: Vec<ResRec>,
    plans: Vec<PlanRec>,
    /// The observation of the current state, while valid.
    observed: Option<Observed>,
    tally: &'a Tally,
    name: &'static str,
    /// Another backend, whose buffers this one refuses.
    foreign: Option<Arc<dyn Backend>>,
}

/// Result of one operation: its name for the tally, and whether it changed the
/// cache (`Ok(true)`), left it alone (`Ok(false)`) or failed.
type Outcome = (&'static str, Result<bool, Error>);

impl<'a> Harness<'a> {
    fn new(b: Arc<dyn Backend>, case: &Case, tally: &'a Tally) -> Result<Self, String> {
        let (k, v, rotate) = FORMATS[case.format];
        let (bs, nb) = SHAPES[case.shape];
        let cfg = CacheConfig {
            layers: LAYERS,
            kv_heads: KV_HEADS,
            head_dim: D,
            block_size: bs,
            num_blocks: nb,
            k_dtype: k,
            v_dtype: v,
            rotate,
            open_blocks: kvq::cache::OPEN_BLOCKS,
        };
        let cache = KvCache::new(b.clone(), cfg).map_err(|e| format!("new cache: {e}"))?;
        let mut other = KvCache::new(b.clone(), cfg).map_err(|e| format!("other cache: {e}"))?;
        let other_seq = other.add_sequence();
        let x = vec![0.5f32; LAYERS * ROW];
        other
            .append(&[(other_seq, 1)], &x, &x)
            .map_err(|e| format!("other cache: {e}"))?;
        let name = if b.info().kind == kvq::BackendKind::Cpu {
            "cpu"
        } else {
            "gpu"
        };
        Ok(Harness {
            b,
            cache,
            other,
            other_seq,
            other_epoch: 1,
            model: Model {
                bs,
                num_blocks: nb,
                k_dt: k,
                v_dt: v,
                rotate,
                seqs: BTreeMap::new(),
                freed: Vec::new(),
                next_id: 0,
                epoch: 0,
                gpu: name != "cpu",
            },
            reservations: Vec::new(),
            plans: Vec::new(),
            observed: None,
            tally,
            name,
            foreign: if name == "cpu" {
                common::gpu()
            } else {
                Some(Arc::new(CpuBackend::new()))
            },
        })
    }

    /// Runs one operation and checks what it did.
    fn step(&mut self, op: &Op, i: usize) -> Result<(), String> {
        if self.observed.is_none() {
            self.observed = Some(self.observe()?);
        }
        let (class, result) = self.apply(op)?;
        let key = match &result {
            Ok(_) => format!("{} {class}: Ok", self.name),
            Err(e) => format!("{} {class}: Err({})", self.name, describe(e)),
        };
        *self.tally.lock().unwrap().entry(key).or_default() += 1;
        match result {
            Ok(true) => self.observed = None,
            Ok(false) | Err(_) => {
                let now = self.observe()?;
                self.unchanged(&now)
                    .map_err(|e| format!("{class} ({result:?}) changed the cache: {e}"))?;
                if result.is_err() {
                    self.probe_epoch()?;
                }
            }
        }
        self.check_bookkeeping()?;
        if (i + 1) % FULL_CHECK_EVERY == 0 {
            self.full_check()?;
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<Outcome, String> {
        match op {
            Op::Add => {
                let id = self.cache.add_sequence();
                if id.0 != self.model.next_id {
                    return Err(format!("add_sequence gave {id:?}"));
                }
                self.model.add();
                Ok(("add_sequence", Ok(true)))
            }
            Op::Free(t) => {
                let id = self.model.resolve(*t);
                let want = match self.model.len(id) {
                    Some(_) => Want::Ok,
                    None => Want::Err(Error::UnknownSequence(id)),
                };
                let got = self.cache.free_sequence(SeqId(id));
                expect("free_sequence", &want, &got)?;
                if got.is_ok() {
                    self.model.free(id);
                }
                Ok(("free_sequence", got.map(|()| true)))
            }
            Op::Truncate(t, tr) => {
                let id = self.model.resolve(*t);
                let cur = self.model.len(id);
                let c = cur.unwrap_or(0);
                let len = match *tr {
                    Trunc::Zero => 0,
                    Trunc::Keep(f) => f as usize % c.max(1),
                    Trunc::Same => c,
                    Trunc::Over(k) => c + 1 + k as usize,
                    Trunc::Max => usize::MAX,
                };
                let want = match cur {
                    None => Want::Err(Error::UnknownSequence(id)),
                    Some(c) if len > c => Want::Err(Error::OutOfRange {
                        what: "truncate length",
                        value: len,
                        limit: c + 1,
                    }),
                    Some(_) => Want::Ok,
                };
                let got = self.cache.truncate(SeqId(id), len);
                expect("truncate", &want, &got)?;
                if got.is_ok() {
                    self.model.truncate(id, len);
                }
                Ok(("truncate", got.map(|()| true)))
            }
            Op::Query(t, layer) => {
                let id = self.model.resolve(*t);
                let want = match self.model.len(id) {
                    Some(_) => Want::Ok,
                    None => Want::Err(Error::UnknownSequence(id)),
                };
                let len = self.cache.seq_len(SeqId(id));
                expect("seq_len", &want, &len)?;
                if let (Ok(len), Some(m)) = (&len, self.model.len(id)) {
                    if *len != m {
                        return Err(format!("seq_len {len}, model {m}"));
                    }
                }
                expect(
                    "block_table",
                    &want,
                    &self.cache.blocks().block_table(SeqId(id)),
                )?;
                let l = layer.index();
                let want = if l < LAYERS {
                    Want::Ok
                } else {
                    Want::Err(Error::OutOfRange {
                        what: "layer",
                        value: l,
                        limit: LAYERS,
                    })
                };
                let got = self.cache.pools(l);
                expect("pools", &want, &got)?;
                Ok((
                    "seq_len/block_table/pools",
                    got.map(|_| false).and(len.map(|_| false)),
                ))
            }
            Op::Extend(batch) => {
                let batch = self.counts(batch);
                let want = self.model.want_extend(&batch);
                let got = self.cache.extend(&seq_batch(&batch));
                expect("extend", &want, &got)?;
                match got {
                    Ok(res) => {
                        let spans = self.model.grow(&batch);
                        self.model.epoch += 1;
                        self.check_slots(&res, &spans)?;
                        self.reservations.push(ResRec {
                            res,
                            epoch: self.model.epoch,
                            spans,
                        });
                        if self.reservations.len() > 4 {
                            self.reservations.remove(0);
                        }
                        Ok(("extend", Ok(true)))
                    }
                    Err(e) => Ok(("extend", Err(e))),
                }
            }
            Op::Write { res, layer, k, v } => self.write(*res, *layer, k, v),
            Op::Append { batch, k, v } => self.append(batch, k, v),
            Op::Decode {
                layer,
                seqs,
                q,
                params,
            } => {
                let batch: Vec<_> = seqs.iter().map(|&t| (self.model.resolve(t), 1)).collect();
                self.attend("decode", *layer, &batch, q, params)
            }
            Op::Prefill {
                layer,
                chunks,
                q,
                params,
            } => {
                let batch: Vec<_> = chunks
                    .iter()
                    .map(|&(t, c)| {
                        let id = self.model.resolve(t);
                        (id, self.model.qcount(id, c))
                    })
                    .collect();
                self.attend("prefill", *layer, &batch, q, params)
            }
            Op::Plan(kind, params) => self.plan(kind, params),
            Op::RecordAppend {
                plan,
                layer,
                k,
                v,
                direct,
            } => self.record_append(*plan, *layer, k, v, *direct),
            Op::RecordAttention {
                plan,
                layer,
                q,
                out,
                direct,
            } => self.record_attention(*plan, *layer, q, out, *direct),
            Op::NewCache(spec) => self.new_cache(spec),
            Op::Reserve(..) | Op::Step(..) => Err("a composite operation reached apply".into()),
            Op::ParseDtype(s) => {
                let want = want_dtype(s);
                let got: Result<KvDtype, Error> = s.parse();
                if format!("{want:?}") != format!("{got:?}") {
                    return Err(format!("parse {s:?}: expected {want:?}, got {got:?}"));
                }
                if let Ok(dt) = got {
                    let again: Result<KvDtype, Error> = dt.to_string().parse();
                    if again != Ok(dt) {
                        return Err(format!("{dt} does not parse back: {again:?}"));
                    }
                }
                Ok(("KvDtype::from_str", got.map(|_| false)))
            }
        }
    }

    /// Resolves a batch's sequences and counts.
    fn counts(&self, batch: &[(Target, Count)]) -> Vec<(u64, usize)> {
        batch
            .iter()
            .map(|&(t, c)| {
                let id = self.model.resolve(t);
                (id, self.model.count(id, c))
            })
            .collect()
    }

    fn write(&mut self, pick: Pick, layer: Layer, k: &Data, v: &Data) -> Result<Outcome, String> {
        let foreign;
        let (res, epoch, spans) = match self.pick_reservation(pick) {
            Some(i) => {
                let r = &self.reservations[i];
                (&r.res, r.epoch, r.spans.clone())
            }
            None => {
                foreign = self.foreign_reservation(1 + (k.seed % 3) as usize)?;
                (&foreign, u64::MAX, Vec::new())
            }
        };
        let l = layer.index();
        let n = res.tokens() * ROW;
        let ((kx, kbad), (vx, vbad)) = (k.make(Some(n)), v.make(Some(n)));
        let want = if epoch != self.model.epoch {
            Want::Err(Error::StaleReservation)
        } else if l >= LAYERS {
            Want::Err(Error::OutOfRange {
                what: "layer",
                value: l,
                limit: LAYERS,
            })
        } else {
            self.model.want_kv(n, &kx, kbad, &vx, vbad)
        };
        let got = self.cache.write(l, res, &kx, &vx);
        expect("write", &want, &got)?;
        let changed = got.is_ok() && n > 0;
        if changed {
            self.model.set(l, &spans, &kx, &vx);
        }
        Ok(("write", got.map(|()| changed)))
    }

    fn append(&mut self, batch: &[(Target, Count)], k: &Data, v: &Data) -> Result<Outcome, String> {
        let batch = self.counts(batch);
        let tokens = batch.iter().try_fold(0usize, |a, b| a.checked_add(b.1));
        let per_layer = tokens.and_then(|t| t.checked_mul(ROW));
        let whole = per_layer.and_then(|t| t.checked_mul(LAYERS));
        let ((kx, kbad), (vx, vbad)) = (k.make(whole), v.make(whole));
        let want = if let Err(e) = self.model.check_batch(batch.iter().map(|b| b.0)) {
            Want::Err(e)
        } else if let Some(whole) = whole {
            match self.model.want_kv(whole, &kx, kbad, &vx, vbad) {
                Want::Ok => self.model.want_extend(&batch),
                w => w,
            }
        } else {
            Want::Err(Error::CapacityExceeded {
                needed: usize::MAX,
                free: self.model.free_blocks(),
            })
        };
        let got = self.cache.append(&seq_batch(&batch), &kx, &vx);
        expect("append", &want, &got)?;
        if got.is_ok() {
            let spans = self.model.grow(&batch);
            self.model.epoch += 1;
            let per_layer = per_layer.unwrap();
            for l in 0..LAYERS {
                let span = l * per_layer..(l + 1) * per_layer;
                self.model
                    .set(l, &spans, &kx[span.clone()], &vx[span.clone()]);
            }
        }
        Ok(("append", got.map(|()| true)))
    }

    fn attend(
        &mut self,
        class: &'static str,
        layer: Layer,
        batch: &[(u64, usize)],
        q: &Data,
        params: &Params,
    ) -> Result<Outcome, String> {
        let p = params.attn();
        let l = layer.index();
        let queries = batch.iter().try_fold(0usize, |a, b| a.checked_add(b.1));
        let q_words = queries
            .and_then(|n| n.checked_mul(p.q_heads))
            .and_then(|n| n.checked_mul(D));
        let (qx, qbad) = q.make(q_words);
        let want = self.model.want_attend(l, batch, &p, qx.len(), qbad);
        let got = if class == "decode" {
            let seqs: Vec<SeqId> = batch.iter().map(|b| SeqId(b.0)).collect();
            self.cache.decode(l, &seqs, &qx, &p)
        } else {
            self.cache.prefill(l, &seq_batch(batch), &qx, &p)
        };
        expect(class, &want, &got)?;
        match got {
            Ok(out) => {
                if out.len() != qx.len() {
                    return Err(format!("{class}: {} outputs for {} q", out.len(), qx.len()));
                }
                self.check_outputs(class, l, batch, &qx, &out, &p)?;
                Ok((class, Ok(false)))
            }
            Err(e) => Ok((class, Err(e))),
        }
    }

    fn plan(&mut self, kind: &PlanKind, params: &Params) -> Result<Outcome, String> {
        let p = params.attn();
        let (class, batch, want) = match kind {
            PlanKind::Decode(seqs) => {
                let batch: Vec<_> = seqs.iter().map(|&t| (self.model.resolve(t), 1)).collect();
                let want = self.want_plan_step(&batch, &p);
                ("plan_decode", batch, want)
            }
            PlanKind::Prefill(chunks) => {
                let batch = self.counts(chunks);
                let want = self.want_plan_step(&batch, &p);
                ("plan_prefill", batch, want)
            }
            PlanKind::Attention(chunks) => {
                let batch: Vec<_> = chunks
                    .iter()
                    .map(|&(t, c)| {
                        let id = self.model.resolve(t);
                        (id, self.model.qcount(id, c))
                    })
                    .collect();
                let want = self
                    .model
                    .want_plan_attention(&batch, &p)
                    .unwrap_or_else(|| self.model.or_device_limit(&p, Want::Ok));
                ("plan_attention", batch, want)
            }
        };
        let seqs = seq_batch(&batch);
        let got = match kind {
            PlanKind::Decode(_) => {
                let ids: Vec<SeqId> = seqs.iter().map(|s| s.0).collect();
                self.cache.plan_decode(&ids, &p)
            }
            PlanKind::Prefill(_) => self.cache.plan_prefill(&seqs, &p),
            PlanKind::Attention(_) => self.cache.plan_attention(&seqs, &p),
        };
        expect(class, &want, &got)?;
        let plan = match got {
            Ok(plan) => plan,
            Err(e) => return Ok((class, Err(e))),
        };
        let total: usize = batch.iter().map(|b| b.1).sum();
        let appends = !matches!(kind, PlanKind::Attention(_));
        if plan.batch() != seqs.as_slice()
            || plan.queries() != total
            || plan.tokens() != if appends { total } else { 0 }
        {
            return Err(format!(
                "{class}: plan of {:?}, {} queries, {} tokens for {batch:?}",
                plan.batch(),
                plan.queries(),
                plan.tokens()
            ));
        }
        let spans = if appends {
            self.model.epoch += 1;
            self.model.grow(&batch)
        } else {
            Vec::new()
        };
        self.plans.push(PlanRec {
            plan,
            epoch: self.model.epoch,
            spans,
            queries: batch,
            params: p,
            appended: [false; LAYERS],
        });
        if self.plans.len() > 4 {
            self.plans.remove(0);
        }
        Ok((class, Ok(appends)))
    }

    /// What plan_decode or plan_prefill should return.
    fn want_plan_step(&self, batch: &[(u64, usize)], p: &AttnParams) -> Want {
        let m = &self.model;
        m.want_step(batch, p)
            .unwrap_or_else(|| match m.want_extend(batch) {
                Want::Ok => m.or_device_limit(p, Want::Ok),
                w => w,
            })
    }

    fn record_append(
        &mut self,
        pick: Pick,
        layer: Layer,
        k: &TensorSpec,
        v: &TensorSpec,
        direct: bool,
    ) -> Result<Outcome, String> {
        let foreign;
        let picked = self.pick_plan(pick);
        let (plan, epoch, spans) = match picked {
            Some(i) => {
                let r = &self.plans[i];
                (&r.plan, r.epoch, r.spans.clone())
            }
            None => {
                foreign = self.foreign_plan()?;
                (&foreign, u64::MAX, Vec::new())
            }
        };
        let (k, v) = (&self.effective(k), &self.effective(v));
        let l = layer.index();
        let n = plan.tokens() * ROW;
        let (kb, kx) = self.device_tensor(k, n)?;
        let (vb, vx) = self.device_tensor(v, n)?;
        let want = if epoch != self.model.epoch {
            Want::Err(Error::StalePlan)
        } else if l >= LAYERS {
            Want::Err(Error::OutOfRange {
                what: "layer",
                value: l,
                limit: LAYERS,
            })
        } else if direct && self.name != "cpu" {
            Want::Kind("InvalidConfig")
        } else {
            want_tensor("k", n, k, kb.words())
                .or_else(|| want_tensor("v", n, v, vb.words()))
                .unwrap_or_else(|| {
                    // The device path cannot scan device memory: bad values reach
                    // the kernel and may only spoil their own token. The CPU
                    // reference (run as recorded) refuses them.
                    let bad = |what, x: &[f32]| {
                        let index = x.iter().position(|&x| is_bad(x))?;
                        Some(Error::NonFinite {
                            what,
                            index,
                            value: x[index],
                        })
                    };
                    match bad("k", &kx[..n]).or_else(|| bad("v", &vx[..n])) {
                        None => Want::Ok,
                        Some(e) if self.name == "cpu" => Want::Err(e),
                        Some(e) => Want::Any(vec![Want::Ok, Want::Err(e)]),
                    }
                })
        };
        let (kt, vt) = (tensor_of(&kb, k), tensor_of(&vb, v));
        let cache = &self.cache;
        let got = if direct {
            cache.record_append(&mut Encoder::Immediate, plan, l, &kt, &vt)
        } else {
            self.b
                .run(&mut |enc| cache.record_append(enc, plan, l, &kt, &vt))
        };
        expect("record_append", &want, &got)?;
        if let (Ok(()), Some(i)) = (&got, picked) {
            self.plans[i].appended[l] = true;
        }
        let changed = got.is_ok() && n > 0;
        if changed {
            self.model.set(l, &spans, &kx[..n], &vx[..n]);
        }
        Ok(("record_append", got.map(|()| changed)))
    }

    fn record_attention(
        &mut self,
        pick: Pick,
        layer: Layer,
        q: &TensorSpec,
        out: &TensorSpec,
        direct: bool,
    ) -> Result<Outcome, String> {
        let foreign;
        let (plan, epoch, queries, params, appended) = match self.pick_plan(pick) {
            Some(i) => {
                let r = &self.plans[i];
                (&r.plan, r.epoch, r.queries.clone(), r.params, r.appended)
            }
            None => {
                foreign = self.foreign_plan()?;
                let p = AttnParams::new(WATCH_Q_HEADS);
                (&foreign, u64::MAX, Vec::new(), p, [false; LAYERS])
            }
        };
        let (q, out) = (&self.effective(q), &self.effective(out));
        let l = layer.index();
        let n = plan.queries() * params.q_heads * D;
        let (qb, qx) = self.device_tensor(q, n)?;
        let (ob, _) = self.device_tensor(out, n)?;
        let want = if epoch != self.model.epoch {
            Want::Err(Error::StalePlan)
        } else if l >= LAYERS {
            Want::Err(Error::OutOfRange {
                what: "layer",
                value: l,
                limit: LAYERS,
            })
        } else if (plan.tokens() > 0 && !appended[l]) || (direct && self.name != "cpu") {
            Want::Kind("InvalidConfig")
        } else {
            // The CPU reference checks out before q, wgpu q before out.
            match (
                want_tensor("q", n, q, qb.words()),
                want_tensor("out", n, out, ob.words()),
            ) {
                (None, None) => Want::Ok,
                (Some(w), None) | (None, Some(w)) => w,
                (Some(a), Some(b)) => Want::Any(vec![a, b]),
            }
        };
        let (qt, ot) = (tensor_of(&qb, q), tensor_of(&ob, out));
        let cache = &self.cache;
        let got = if direct {
            cache.record_attention(&mut Encoder::Immediate, plan, l, &qt, &ot)
        } else {
            self.b
                .run(&mut |enc| cache.record_attention(enc, plan, l, &qt, &ot))
        };
        expect("record_attention", &want, &got)?;
        if let Err(e) = got {
            return Ok(("record_attention", Err(e)));
        }
        // The device path gives what the host API gives for the same queries.
        let q_host = &qx[..n.min(qx.len())];
        if n > 0 && n == q_host.len() && !q_host.iter().any(|&x| is_bad(x)) {
            let off = out.off.bytes() as usize / 4;
            let words = self
                .b
                .download(&ob, 0, ob.words())
                .map_err(|e| e.to_string())?;
            let got: Vec<f32> = if out.f16 {
                (0..n)
                    .map(|i| {
                        half::f16::from_bits((words[off + i / 2] >> (16 * (i % 2))) as u16).to_f32()
                    })
                    .collect()
            } else {
                words[off..off + n]
                    .iter()
                    .map(|&w| f32::from_bits(w))
                    .collect()
            };
            let host = self
                .cache
                .prefill(l, &seq_batch(&queries), q_host, &params)
                .map_err(|e| format!("host prefill of a recorded plan: {e}"))?;
            // An f16 output holds the f32 one rounded: ±Inf past f16's range (values
            // near ±65504 come back from storage a little larger).
            let agree = |g: f32, h: f32| {
                if !out.f16 {
                    close(g, h, 1e-5)
                } else {
                    close(g, to_f16(h), 1e-3)
                        || (h.abs() > 65000.0 && (g == to_f16(h * 1.001) || close(g, h, 1e-3)))
                }
            };
            if let Some(i) = (0..n).find(|&i| !agree(got[i], host[i])) {
                return Err(format!(
                    "record_attention output {i}: {} against the host API's {}",
                    got[i], host[i]
                ));
            }
        }
        Ok(("record_attention", Ok(false)))
    }

    fn new_cache(&mut self, spec: &ConfigSpec) -> Result<Outcome, String> {
        let dim = |d: Dim| match d {
            Dim::Small(v) => 1 + v as usize % 8,
            Dim::Zero => 0,
            Dim::Huge(i) => HUGE_DIMS[i as usize % HUGE_DIMS.len()],
        };
        let dt = |d: DtSpec| match d {
            DtSpec::F16 => KvDtype::F16,
            DtSpec::Int8 => KvDtype::Int8,
            DtSpec::Int4(g) => KvDtype::Int4 {
                group: GROUPS[g as usize % GROUPS.len()],
            },
        };
        let cfg = CacheConfig {
            layers: dim(spec.layers),
            kv_heads: dim(spec.kv_heads),
            head_dim: HEAD_DIMS[spec.head_dim as usize % HEAD_DIMS.len()],
            block_size: dim(spec.block_size),
            num_blocks: dim(spec.num_blocks),
            k_dtype: dt(spec.k),
            v_dtype: dt(spec.v),
            rotate: spec.rotate,
            open_blocks: kvq::cache::OPEN_BLOCKS,
        };
        let want = want_config(&cfg);
        let valid = cfg.validate();
        expect(&format!("validate {cfg:?}"), &want, &valid)?;
        if valid.is_ok() {
            // Sizes of a valid config are computed without overflow.
            let _ = (cfg.bytes_per_token(), cfg.capacity_tokens());
        }
        // Valid configs are only built when small (validate bounds one pool, not
        // the number of layers).
        let words = if valid.is_err() {
            0
        } else {
            [cfg.k_dtype, cfg.v_dtype]
                .iter()
                .map(|&dt| {
                    cfg.num_blocks as u128
                        * cfg.kv_heads as u128
                        * cfg.block_size as u128
                        * row_words(dt, cfg.head_dim) as u128
                })
                .sum::<u128>()
                * cfg.layers as u128
        };
        if valid.is_ok() && words > 1 << 20 {
            return Ok(("CacheConfig::validate", Ok(false)));
        }
        let got = KvCache::new(self.b.clone(), cfg);
        expect(&format!("KvCache::new {cfg:?}"), &want, &got)?;
        let mut cache = match got {
            Ok(c) => c,
            Err(e) => return Ok(("KvCache::new", Err(e))),
        };
        // A small new cache works (on the CPU reference: a GPU would compile
        // kernels for every shape).
        if self.b.info().kind == kvq::BackendKind::Cpu {
            let s = cache.add_sequence();
            let row = cfg.kv_heads * cfg.head_dim;
            let x: Vec<f32> = Rng::new(cfg.head_dim as u64).normals(cfg.layers * row);
            cache
                .append(&[(s, 1)], &x, &x)
                .map_err(|e| format!("append to {cfg:?}: {e}"))?;
            let q = &x[..row];
            let out = cache
                .decode(cfg.layers - 1, &[s], q, &AttnParams::new(cfg.kv_heads))
                .map_err(|e| format!("decode in {cfg:?}: {e}"))?;
            if out.iter().any(|o| !o.is_finite()) {
                return Err(format!("decode in {cfg:?}: {out:?}"));
            }
        }
        Ok(("KvCache::new", Ok(false)))
    }

    // -- reservations and plans ----------------------------------------------

    /// Index of the picked reservation; `None` for a foreign one.
    fn pick_reservation(&self, pick: Pick) -> Option<usize> {
        pick_of(pick, self.reservations.len())
    }

    fn pick_plan(&self, pick: Pick) -> Option<usize> {
        pick_of(pick, self.plans.len())
    }

    /// Brings the other cache to the epoch `epoch` (when it is behind).
    fn other_to(&mut self, epoch: u64) -> Result<(), String> {
        while self.other_epoch < epoch {
            self.other
                .truncate(self.other_seq, 1)
                .map_err(|e| format!("other cache: {e}"))?;
            self.other_epoch += 1;
        }
        Ok(())
    }

    /// A reservation of `n` tokens made by the other cache, at this cache's epoch
    /// where it can.
    fn foreign_reservation(&mut self, n: usize) -> Result<Reservation, String> {
        self.other_to(self.model.epoch.saturating_sub(1))?;
        self.other
            .truncate(self.other_seq, 1)
            .map_err(|e| format!("other cache: {e}"))?;
        self.other_epoch += 1;
        let r = self
            .other
            .extend(&[(self.other_seq, n)])
            .map_err(|e| format!("other cache: {e}"))?;
        self.other_epoch += 1;
        Ok(r)
    }

    /// An attention plan made by the other cache, at this cache's epoch where it can.
    fn foreign_plan(&mut self) -> Result<Plan, String> {
        self.other_to(self.model.epoch)?;
        self.other
            .plan_attention(&[(self.other_seq, 1)], &AttnParams::new(WATCH_Q_HEADS))
            .map_err(|e| format!("other cache: {e}"))
    }

    /// `spec`, in this backend's buffer when there is no other backend.
    fn effective(&self, spec: &TensorSpec) -> TensorSpec {
        TensorSpec {
            foreign: spec.foreign && self.foreign.is_some(),
            ..*spec
        }
    }

    /// A device tensor for `spec` where the call needs `n` elements: its buffer,
    /// and its values as the kernels read them (f16-rounded for f16).
    fn device_tensor(
        &self,
        spec: &TensorSpec,
        n: usize,
    ) -> Result<(DeviceBuffer, Vec<f32>), String> {
        let (x, _) = spec.data.make(Some(n));
        let off = match spec.off {
            Off::Zero | Off::Huge => 0,
            Off::Aligned => 64,
            Off::Misaligned => 1,
        };
        let (words, read): (Vec<u32>, Vec<f32>) = if spec.f16 {
            let h: Vec<u16> = x
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect();
            let words = h
                .chunks(2)
                .map(|p| p[0] as u32 | (*p.get(1).unwrap_or(&0) as u32) << 16)
                .collect();
            (words, x.iter().map(|&v| to_f16(v)).collect())
        } else {
            (x.iter().map(|v| v.to_bits()).collect(), x)
        };
        let b = match &self.foreign {
            Some(f) if spec.foreign => f,
            _ => &self.b,
        };
        let buf = b
            .alloc((off + words.len()).max(1))
            .map_err(|e| format!("alloc: {e}"))?;
        if !words.is_empty() {
            b.upload(&buf, off, &words)
                .map_err(|e| format!("upload: {e}"))?;
        }
        let mut read = read;
        if n <= MAX_VALUES {
            read.resize(read.len().max(n), 0.0);
        }
        Ok((buf, read))
    }

    // -- checks ----------------------------------------------------------------

    fn observe(&self) -> Result<Observed, String> {
        let mut words = Vec::new();
        for layer in 0..LAYERS {
            let (k, v) = self.cache.pools(layer).map_err(|e| e.to_string())?;
            for pool in [k, v] {
                for buf in [&pool.data, &pool.side] {
                    words.push(
                        self.b
                            .download(buf, 0, buf.words())
                            .map_err(|e| format!("download: {e}"))?,
                    );
                }
            }
        }
        let outputs = self
            .watch()?
            .into_iter()
            .map(|o| o.iter().map(|x| x.to_bits()).collect())
            .collect();
        Ok(Observed {
            blocks: self.cache.blocks().clone(),
            words,
            outputs,
        })
    }

    /// The decode output of every sequence with tokens, per layer.
    fn watch(&self) -> Result<Vec<Vec<f32>>, String> {
        let seqs: Vec<SeqId> = self.model.watched().into_iter().map(SeqId).collect();
        let q = watch_q(seqs.len());
        (0..LAYERS)
            .map(|l| {
                self.cache
                    .decode(l, &seqs, &q, &AttnParams::new(WATCH_Q_HEADS))
                    .map_err(|e| format!("decode of every sequence in layer {l}: {e}"))
            })
            .collect()
    }

    fn unchanged(&self, now: &Observed) -> Result<(), String> {
        let before = self.observed.as_ref().unwrap();
        if before == now {
            return Ok(());
        }
        if before.blocks != now.blocks {
            return Err(format!(
                "bookkeeping {:?} became {:?}",
                before.blocks, now.blocks
            ));
        }
        for (i, (a, b)) in before.words.iter().zip(&now.words).enumerate() {
            if let Some(w) = (0..a.len()).find(|&w| a[w] != b[w]) {
                let what = ["K data", "K side", "V data", "V side"][i % 4];
                return Err(format!(
                    "layer {} {what} word {w}: {:#x} became {:#x}",
                    i / 4,
                    a[w],
                    b[w]
                ));
            }
        }
        for (l, (a, b)) in before.outputs.iter().zip(&now.outputs).enumerate() {
            if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
                let seq = self.model.watched()[i / (WATCH_Q_HEADS * D)];
                return Err(format!(
                    "decode output {i} (sequence {seq}) of layer {l}: {} became {}",
                    f32::from_bits(a[i]),
                    f32::from_bits(b[i])
                ));
            }
        }
        Err("observations differ".into())
    }

    /// After a failed call, the current reservation and plan are still current.
    fn probe_epoch(&self) -> Result<(), String> {
        let layer_err = Want::Err(Error::OutOfRange {
            what: "layer",
            value: LAYERS,
            limit: LAYERS,
        });
        let current = |epoch: u64| epoch == self.model.epoch;
        if let Some(r) = self.reservations.last().filter(|r| current(r.epoch)) {
            let got = self.cache.write(LAYERS, &r.res, &[], &[]);
            expect(
                "write probing the epoch after a failed call",
                &layer_err,
                &got,
            )?;
        }
        if let Some(p) = self.plans.last().filter(|p| current(p.epoch)) {
            let buf = self.b.alloc(1).map_err(|e| e.to_string())?;
            let t = Tensor::f32(&buf);
            let got = self
                .b
                .run(&mut |enc| self.cache.record_append(enc, &p.plan, LAYERS, &t, &t));
            expect(
                "record_append probing the epoch after a failed call",
                &layer_err,
                &got,
            )?;
        }
        Ok(())
    }

    fn check_slots(&self, r: &Reservation, spans: &Spans) -> Result<(), String> {
        let bs = self.model.bs;
        let mut want = Vec::new();
        for &(id, start, n) in spans {
            let table = self
                .cache
                .blocks()
                .block_table(SeqId(id))
                .map_err(|e| e.to_string())?;
            want.extend((start..start + n).map(|p| table[p / bs] * bs as u32 + (p % bs) as u32));
        }
        if r.slots() != want.as_slice() {
            return Err(format!("reservation slots {:?}, want {want:?}", r.slots()));
        }
        Ok(())
    }

    /// Lengths, block tables and free blocks agree with the model.
    fn check_bookkeeping(&self) -> Result<(), String> {
        let m = &self.model;
        let bm = self.cache.blocks();
        let live: Vec<u64> = bm.sequences().map(|s| s.0).collect();
        if live != m.seqs.keys().copied().collect::<Vec<_>>() {
            return Err(format!(
                "live sequences {live:?}, model {:?}",
                m.seqs.keys()
            ));
        }
        let mut seen = BTreeSet::new();
        for (&id, s) in &m.seqs {
            let len = bm.len(SeqId(id)).map_err(|e| e.to_string())?;
            let table = bm.block_table(SeqId(id)).map_err(|e| e.to_string())?;
            if len != s.len || table.len() != s.len.div_ceil(m.bs) {
                return Err(format!(
                    "sequence {id}: length {len}, table {table:?}; model length {}",
                    s.len
                ));
            }
            for &b in table {
                if b as usize >= m.num_blocks || !seen.insert(b) {
                    return Err(format!("sequence {id}: block {b} out of range or shared"));
                }
            }
        }
        if bm.free_blocks() != m.free_blocks() || bm.used_blocks() != m.used_blocks() {
            return Err(format!(
                "free blocks {}, used {}; model {} and {}",
                bm.free_blocks(),
                bm.used_blocks(),
                m.free_blocks(),
                m.used_blocks()
            ));
        }
        let tokens: usize = m.seqs.values().map(|s| s.len).sum();
        let mem = self.cache.memory();
        if bm.tokens() != tokens || mem.tokens != tokens {
            return Err(format!(
                "tokens {} / {}; model {tokens}",
                bm.tokens(),
                mem.tokens
            ));
        }
        if let Some(&id) = m.freed.last() {
            if bm.len(SeqId(id)) != Err(Error::UnknownSequence(id)) {
                return Err(format!("freed sequence {id}: {:?}", bm.len(SeqId(id))));
            }
        }
        Ok(())
    }

    /// Every known token read back equals the model, and the watching decode
    /// agrees with the f64 reference.
    fn full_check(&mut self) -> Result<(), String> {
        let cfg = *self.cache.config();
        for (&id, s) in &self.model.seqs {
            if s.len == 0 {
                continue;
            }
            let table = self
                .cache
                .blocks()
                .block_table(SeqId(id))
                .map_err(|e| e.to_string())?;
            let bs = cfg.block_size;
            let slots: Vec<u32> = (0..s.len)
                .map(|p| table[p / bs] * bs as u32 + (p % bs) as u32)
                .collect();
            let sb = self.b.alloc(slots.len()).map_err(|e| e.to_string())?;
            self.b.upload(&sb, 0, &slots).map_err(|e| e.to_string())?;
            for layer in 0..LAYERS {
                let (kp, vp) = self.cache.pools(layer).map_err(|e| e.to_string())?;
                for (which, pool) in [("K", kp), ("V", vp)] {
                    let out = self.b.alloc(s.len * ROW).map_err(|e| e.to_string())?;
                    self.b
                        .dequantize(pool, &sb, s.len, &out)
                        .map_err(|e| format!("dequantize: {e}"))?;
                    let got = self
                        .b
                        .download(&out, 0, s.len * ROW)
                        .map_err(|e| e.to_string())?;
                    for (p, row) in s.rows[layer].iter().enumerate() {
                        let Some(row) = row else { continue };
                        let want = if which == "K" { &row.k } else { &row.v };
                        for (e, &w) in want.iter().enumerate() {
                            let g = f32::from_bits(got[p * ROW + e]);
                            if !close(g, w, 1e-6) {
                                return Err(format!(
                                    "sequence {id} layer {layer} {which} position {p} element {e}: \
                                     read back {g}, model {w}"
                                ));
                            }
                        }
                    }
                }
            }
        }
        let outputs = self.watch()?;
        let seqs = self.model.watched();
        let q = watch_q(seqs.len());
        let p = AttnParams::new(WATCH_Q_HEADS);
        for (l, out) in outputs.iter().enumerate() {
            let batch: Vec<_> = seqs.iter().map(|&s| (s, 1)).collect();
            self.check_outputs("watching decode", l, &batch, &q, out, &p)?;
        }
        Ok(())
    }

    /// Attention outputs of sequences whose tokens are all known, against the f64
    /// reference: close when inputs are tame, else within the values' range.
    fn check_outputs(
        &self,
        call: &str,
        layer: usize,
        batch: &[(u64, usize)],
        q: &[f32],
        out: &[f32],
        p: &AttnParams,
    ) -> Result<(), String> {
        let r: Resolved = p.resolve(KV_HEADS, D).map_err(|e| e.to_string())?;
        let per_q = p.q_heads * D;
        let mut at = 0;
        for &(id, n) in batch {
            let span = at * per_q..(at + n) * per_q;
            at += n;
            let rows: Option<Vec<&Row>> = self.model.seqs[&id].rows[layer]
                .iter()
                .map(|r| r.as_ref())
                .collect();
            let Some(rows) = rows else { continue };
            let (qs, got) = (&q[span.clone()], &out[span]);
            let vmax = rows
                .iter()
                .flat_map(|r| r.v.iter())
                .fold(0f32, |a, &x| a.max(x.abs()));
            let tame = rows.iter().all(|r| r.tame)
                && qs.iter().all(|x| x.abs() <= 100.0)
                && r.scale.abs() <= 1.0;
            if tame {
                let k: Vec<f32> = rows.iter().flat_map(|r| r.k.iter().copied()).collect();
                let v: Vec<f32> = rows.iter().flat_map(|r| r.v.iter().copied()).collect();
                let want = attention_f64(qs, &k, &v, KV_HEADS, D, &r);
                let tol = 1e-3 * (1.0 + vmax);
                if let Some(i) = (0..got.len()).find(|&i| above((got[i] - want[i]).abs(), tol)) {
                    return Err(format!(
                        "{call} layer {layer} sequence {id} output {i}: {} against the \
                         reference's {} ({p:?})",
                        got[i], want[i]
                    ));
                }
            } else if r.scale.abs() <= 1.0 {
                let Some(i) = (0..got.len()).find(|&i| above(got[i].abs(), vmax * 1.001 + 1e-3))
                else {
                    continue;
                };
                return Err(format!(
                    "{call} layer {layer} sequence {id} output {i}: {} outside the values' \
                     range {vmax} ({p:?})",
                    got[i]
                ));
            }
        }
        Ok(())
    }
}

/// Index of the picked one of `n` reservations or plans; `None` for a foreign one
/// (or when there is none).
fn pick_of(pick: Pick, n: usize) -> Option<usize> {
    match pick {
        Pick::Newest if n > 0 => Some(n - 1),
        Pick::Older(i) if n > 0 => Some(n - 1 - i as usize % n),
        _ => None,
    }
}

/// Query of the watching decode for `n` sequences.
fn watch_q(n: usize) -> Vec<f32> {
    Rng::new(1234).normals(n * WATCH_Q_HEADS * D)
}

fn seq_batch(batch: &[(u64, usize)]) -> Vec<(SeqId, usize)> {
    batch.iter().map(|&(id, n)| (SeqId(id), n)).collect()
}

fn tensor_of<'b>(buf: &'b DeviceBuffer, spec: &TensorSpec) -> Tensor<'b> {
    let t = if spec.f16 {
        Tensor::f16(buf)
    } else {
        Tensor::f32(buf)
    };
    t.at(spec.off.bytes())
}

// ---------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Runs one case, every call inside `catch_unwind`; counts the calls in `done`.
fn run_case(
    b: &Arc<dyn Backend>,
    case: &Case,
    tally: &Tally,
    done: &Cell<usize>,
) -> Result<(), TestCaseError> {
    let mut h = Harness::new(b.clone(), case, tally).map_err(TestCaseError::fail)?;
    let trace = std::env::var("KVQ_FUZZ_TRACE").is_ok();
    let mut n = 0;
    for (i, op) in case.ops.iter().enumerate() {
        for call in op.calls() {
            if trace {
                eprintln!("op {i}: {call:?}");
            }
            match catch_unwind(AssertUnwindSafe(|| h.step(&call, n))) {
                Ok(Ok(())) => {}
                Ok(Err(msg)) => {
                    return Err(TestCaseError::fail(format!("op {i}, {call:?}: {msg}")));
                }
                Err(p) => {
                    return Err(TestCaseError::fail(format!(
                        "op {i}, {call:?} panicked: {}",
                        panic_message(&*p)
                    )));
                }
            }
            n += 1;
            done.set(done.get() + 1);
        }
    }
    match catch_unwind(AssertUnwindSafe(|| h.full_check())) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(msg)) => Err(TestCaseError::fail(format!("final check: {msg}"))),
        Err(p) => Err(TestCaseError::fail(format!(
            "final check panicked: {}",
            panic_message(&*p)
        ))),
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

/// Fuzzes `b` with at least `ops` operations (times `KVQ_FUZZ_SCALE`).
fn fuzz(b: Arc<dyn Backend>, ops: usize) {
    let scale = env_u64("KVQ_FUZZ_SCALE").unwrap_or(1) as usize;
    let seed = env_u64("KVQ_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let target = ops * scale;
    let config = Config {
        failure_persistence: None,
        max_shrink_iters: 2000,
        max_shrink_time: 300_000,
        ..Config::default()
    };
    // A runner runs its cases once: each round has its own, seeded from the seed
    // and the round.
    let runner = |round: u64, cases: usize| {
        let mut bytes = [0u8; 32];
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            let word = seed ^ (round << 32 | i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        TestRunner::new_with_rng(
            Config {
                cases: cases.clamp(1, 16) as u32,
                ..config.clone()
            },
            TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
        )
    };
    let tally = Tally::default();
    let done = Cell::new(0usize);
    let start = Instant::now();
    let name = format!("{} ({})", b.info().kind, b.info().name);
    let mut round = 0;
    while done.get() < target {
        round += 1;
        let cases = (target - done.get()).div_ceil(CALLS_PER_CASE);
        let result = runner(round, cases).run(&case(), |case| run_case(&b, &case, &tally, &done));
        if let Err(e) = result {
            panic!("{name}: fuzzing failed (KVQ_FUZZ_SEED={seed:#x}, round {round}): {e}");
        }
    }
    eprintln!(
        "{name}: {} operations in {:.1} s (seed {seed:#x})",
        done.get(),
        start.elapsed().as_secs_f64()
    );
    for (k, n) in tally.lock().unwrap().iter() {
        eprintln!("  {k}: {n}");
    }
}

#[test]
fn fuzz_cpu_reference() {
    fuzz(Arc::new(CpuBackend::new()), CPU_OPS);
}

#[test]
fn fuzz_gpu() {
    for b in common::gpus() {
        fuzz(b, GPU_OPS);
    }
}

// ---------------------------------------------------------------------------
// Regressions: what the fuzzer found, as plain tests
// ---------------------------------------------------------------------------

/// Runs fixed operations as a case of the fuzzer on `b`.
fn replay(b: Arc<dyn Backend>, format: usize, ops: Vec<Op>) {
    let case = Case {
        format,
        shape: 0,
        ops,
    };
    if let Err(e) = run_case(&b, &case, &Tally::default(), &Cell::new(0)) {
        panic!("{}: {e}", b.info().name);
    }
}

fn good(seed: u64) -> Data {
    Data {
        len: Len::Right,
        fill: Fill::Normal,
        bad: None,
        seed,
    }
}

/// q_heads past u32 were cut to u32 (2^32 + 2 heads planned as 2) or overflowed
/// `queries * q_heads * head_dim` (a panic in `decode`): now `InvalidConfig`, and
/// counts that fit u32 but no q can hold are a shape mismatch.
#[test]
fn q_heads_past_u32_are_refused() {
    for b in common::backends() {
        let mut cache = KvCache::new(b.clone(), CacheConfig::new(2, KV_HEADS, D, 64)).unwrap();
        let s = cache.add_sequence();
        let x = vec![0.5f32; 2 * ROW];
        cache.append(&[(s, 1)], &x, &x).unwrap();
        let blocks = cache.blocks().clone();
        let q = vec![0.25f32; 2 * D];
        for heads in [usize::MAX - 1, 1 << 32, (1 << 32) + 2, usize::MAX / 2 + 1] {
            let p = AttnParams::new(heads);
            let invalid = |r: Result<(), Error>| matches!(r, Err(Error::InvalidConfig(_)));
            let name = &b.info().name;
            assert!(
                invalid(cache.decode(0, &[s], &q, &p).map(|_| ())),
                "{name} {heads}"
            );
            assert!(
                invalid(cache.prefill(1, &[(s, 1)], &q, &p).map(|_| ())),
                "{name}"
            );
            assert!(
                invalid(cache.plan_attention(&[(s, 1)], &p).map(|_| ())),
                "{name}"
            );
            assert!(invalid(cache.plan_decode(&[s], &p).map(|_| ())), "{name}");
            assert!(
                invalid(cache.plan_prefill(&[(s, 2)], &p).map(|_| ())),
                "{name}"
            );
            assert_eq!(
                cache.blocks(),
                &blocks,
                "{name}: a refused plan changed the cache"
            );
        }
        // A GPU may refuse the grid first.
        let got = cache.decode(0, &[s], &q, &AttnParams::new(u32::MAX as usize - 1));
        assert!(
            matches!(
                got,
                Err(Error::ShapeMismatch { what: "q", .. } | Error::DeviceLimit { .. })
            ),
            "{}: {got:?}",
            b.info().name
        );
        // The fuzzer's shrunk case.
        let huge = Params {
            heads: Heads::Huge(0),
            scale: None,
            softcap: None,
            window: None,
        };
        let ops = vec![
            Op::Add,
            Op::Append {
                batch: vec![(Target::Live(0), Count::Small(2))],
                k: good(1),
                v: good(2),
            },
            Op::Decode {
                layer: Layer::In(0),
                seqs: vec![Target::Live(0)],
                q: good(3),
                params: huge,
            },
            Op::Prefill {
                layer: Layer::In(1),
                chunks: vec![(Target::Live(0), QCount::All)],
                q: good(4),
                params: huge,
            },
            Op::Plan(
                PlanKind::Attention(vec![(Target::Live(0), QCount::One)]),
                huge,
            ),
        ];
        replay(b, 0, ops);
    }
}

/// A rotated F16 or Int4 pool stores rotated f16 values, whose components reach
/// sqrt(head_dim) times the largest input: an input within f16's range (all
/// 65504) was taken and stored as ±Inf, and attention over it gave NaN. Now the
/// host API refuses it (`NonFinite`, naming the rotated value) and changes nothing;
/// Int8 (f32 scale) and unrotated pools take it.
#[test]
fn rotated_values_past_f16_are_refused() {
    let all_max = vec![F16_MAX; ROW];
    for b in common::backends() {
        let name = b.info().name.clone();
        for (dtype, rotate, refused) in [
            (KvDtype::F16, true, true),
            (KvDtype::Int4 { group: 16 }, true, true),
            (KvDtype::Int8, true, false),
            (KvDtype::F16, false, false),
            (KvDtype::Int4 { group: 16 }, false, false),
        ] {
            let cfg = CacheConfig::new(1, KV_HEADS, D, 64)
                .with_dtypes(KvDtype::Int8, dtype)
                .with_rotation(rotate);
            let mut cache = KvCache::new(b.clone(), cfg).unwrap();
            let s = cache.add_sequence();
            let x: Vec<f32> = Rng::new(5).normals(ROW);
            cache.append(&[(s, 1)], &x, &x).unwrap();
            let p = AttnParams::new(KV_HEADS);
            let before = cache.decode(0, &[s], &x, &p).unwrap();
            let blocks = cache.blocks().clone();
            // All 65504 rotates to 65504 * 8 in the first component of each head.
            let want = Error::NonFinite {
                what: "v",
                index: 0,
                value: F16_MAX * 8.0,
            };
            let case = format!("{name} {dtype} rotate {rotate}");
            let appended = cache.append(&[(s, 1)], &x, &all_max);
            if refused {
                assert_eq!(appended, Err(want.clone()), "{case}");
                assert_eq!(cache.blocks(), &blocks, "{case}");
                let r = cache.extend(&[(s, 1)]).unwrap();
                assert_eq!(cache.write(0, &r, &x, &all_max), Err(want), "{case}");
                cache.truncate(s, 1).unwrap();
                let after = cache.decode(0, &[s], &x, &p).unwrap();
                assert_eq!(before, after, "{case}: the refused value changed the cache");
            } else {
                assert_eq!(appended, Ok(()), "{case}");
                let out = cache
                    .prefill(0, &[(s, 2)], &[x.clone(), x].concat(), &p)
                    .unwrap();
                assert!(out.iter().all(|o| o.is_finite()), "{case}: {out:?}");
            }
        }
        // The fuzzer's shrunk case: a rotated F16 cache, K all 65504.
        let all = Data {
            fill: Fill::AllMax,
            ..good(0)
        };
        let ops = vec![
            Op::Add,
            Op::Append {
                batch: vec![(Target::Live(0), Count::Small(1))],
                k: all,
                v: good(1),
            },
            Op::Reserve(
                vec![(Target::Live(0), Count::Small(1))],
                vec![(Layer::In(0), good(2), all), (Layer::In(1), all, good(3))],
            ),
        ];
        replay(b, 4, ops);
    }
}
