//! The paged KV cache: configuration, host-side block bookkeeping, and the
//! `KvCache` that ties them to a backend's device pools.

mod blocks;
mod config;
mod kv_cache;
mod plan;

pub use blocks::{BlockManager, SeqId};
pub use config::{CacheConfig, PoolLayout};
pub use kv_cache::{KvCache, MemoryReport, Reservation};
pub use plan::Plan;
