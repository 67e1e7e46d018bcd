//! The paged KV cache: configuration, host-side block bookkeeping, and the
//! `KvCache` that ties them to a backend's device pools.

mod blocks;
mod config;
mod kv_cache;
mod pages;
mod plan;

pub use blocks::{BlockManager, Extension, SeqId};
pub use config::{CacheConfig, OPEN_BLOCKS, PoolLayout};
pub use kv_cache::{KvCache, MemoryReport, Reservation};
pub use plan::Plan;
