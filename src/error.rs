//! The one error type of the crate (DESIGN §6).

use thiserror::Error;

/// Result alias used by every public function of kvq.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in kvq. Messages name the offending value.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A dtype string that does not parse (`f16`, `int8`, `int4`, `int4:g64`, …).
    #[error(
        "unknown KV dtype {0:?}: expected f16, bf16, int8, fp8 (fp8-e4m3), fp8-e5m2, int4, int4:gN (N a multiple of 8) or int4c"
    )]
    UnknownDtype(String),

    /// A configuration that cannot describe a cache.
    #[error("invalid cache configuration: {0}")]
    InvalidConfig(String),

    /// A dtype, head_dim or group this backend (or the format) cannot store.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// A tensor whose length does not match what the call needs.
    #[error("shape mismatch for {what}: expected {expected} values, got {got}")]
    ShapeMismatch {
        /// Which argument.
        what: &'static str,
        /// Expected number of elements.
        expected: usize,
        /// Number of elements given.
        got: usize,
    },

    /// An index (layer, head, position, …) past its range.
    #[error("{what} {value} out of range{}", bound(.limit))]
    OutOfRange {
        /// Which index.
        what: &'static str,
        /// The value given.
        value: usize,
        /// The exclusive upper bound; `usize::MAX` where `what` states the rule
        /// (not printed).
        limit: usize,
    },

    /// Appending tokens needs more free blocks than the cache has.
    #[error("cache capacity exceeded: need {} more blocks, {free} free", count(.needed))]
    CapacityExceeded {
        /// Blocks the request needs; `usize::MAX` when the count overflowed.
        needed: usize,
        /// Blocks that are free.
        free: usize,
    },

    /// Int4Channel keys: more sequences would hold a partly filled block than the
    /// cache has open blocks (`CacheConfig::open_blocks`).
    #[error(
        "open blocks exhausted: {needed} sequences need an open block for their partly filled block, {free} free (raise CacheConfig::open_blocks)"
    )]
    OpenBlocksExhausted {
        /// Open blocks the request needs.
        needed: usize,
        /// Open blocks that are free (or released by the request).
        free: usize,
    },

    /// A sequence id the cache does not know (never added, or freed).
    #[error("unknown sequence {0}")]
    UnknownSequence(u64),

    /// The same sequence named twice in one batch.
    #[error("sequence {0} appears twice in one batch")]
    DuplicateSequence(u64),

    /// A reservation used after its cache changed (another extend, free or
    /// truncate), or on a cache that did not make it.
    #[error("stale reservation: reserve again with extend() after changing the cache")]
    StaleReservation,

    /// A plan used after its cache changed (an extend, free, truncate or a later
    /// plan that appends), or on a cache that did not make it.
    #[error("stale plan: plan the step again after changing the cache")]
    StalePlan,

    /// NaN, ±Inf or a value outside f16's finite range in an input.
    #[error("non-finite or out-of-f16-range value {value} at index {index} of {what}")]
    NonFinite {
        /// Which argument.
        what: &'static str,
        /// Flat index of the first bad value.
        index: usize,
        /// The bad value.
        value: f32,
    },

    /// A request beyond a device limit, naming the limit.
    #[error("device limit {limit} exceeded: requested {requested}, maximum {max}")]
    DeviceLimit {
        /// Name of the limit (as the API spells it).
        limit: &'static str,
        /// What was asked for.
        requested: u64,
        /// What the device allows.
        max: u64,
    },

    /// A buffer made by another backend was passed in.
    #[error("buffer belongs to another backend (expected a {expected} buffer)")]
    ForeignBuffer {
        /// The backend that was called.
        expected: &'static str,
    },

    /// A step prepared by another backend was passed in.
    #[error(
        "step prepared by another backend (expected a {expected} step): prepare it on this one"
    )]
    ForeignStep {
        /// The backend that was called.
        expected: &'static str,
    },

    /// No backend could be selected; the message lists every candidate and why.
    #[error("no usable backend: {0}")]
    NoBackend(String),

    /// The `cuda` feature is not compiled in.
    #[error("kvq was built without the `cuda` feature: rebuild with `--features cuda`")]
    CudaNotCompiled,

    /// Out of device memory.
    #[error("device out of memory: {0}")]
    OutOfMemory(String),

    /// No way to store the cache fits the memory budget.
    #[error("the most compact KV cache takes {needed} bytes: {} more than the budget of {budget}", needed - budget)]
    OverBudget {
        /// Bytes the most compact measured choice takes.
        needed: u64,
        /// The budget.
        budget: u64,
    },

    /// The device was lost (removed, reset, destroyed): every later call on the
    /// backend answers this; its caches must be rebuilt on a new one.
    #[error("device lost: {0}")]
    DeviceLost(String),

    /// The device reported an error (validation, driver).
    #[error("device error: {0}")]
    Device(String),
}

/// `OutOfRange`'s bound, unless there is none to state (`usize::MAX`).
fn bound(limit: &usize) -> String {
    match *limit {
        usize::MAX => String::new(),
        l => format!(" (must be < {l})"),
    }
}

/// A count that may have overflowed (`usize::MAX`).
fn count(n: &usize) -> String {
    match *n {
        usize::MAX => "uncountably many".into(),
        n => n.to_string(),
    }
}
