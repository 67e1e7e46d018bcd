//! The CPU reference backend: straightforward code, one function per GPU kernel,
//! used by tests as ground truth.

mod append;
mod attention;
mod dequantize;

use std::sync::RwLock;

use crate::backend::{
    AppendArgs, AttnArgs, Backend, BackendInfo, BackendKind, DeviceBuffer, DeviceLimits,
    DeviceType, Pool,
};
use crate::{Error, Result};

/// Host memory standing in for device memory.
type Words = RwLock<Vec<u32>>;

const NAME: &str = "cpu";

/// The reference backend. Slow; chosen only when a caller allows it.
#[derive(Debug)]
pub struct CpuBackend {
    info: BackendInfo,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    /// A CPU backend.
    pub fn new() -> Self {
        CpuBackend {
            info: BackendInfo {
                kind: BackendKind::Cpu,
                name: "kvq CPU reference".into(),
                device_type: DeviceType::Cpu,
                api: "host".into(),
                driver: format!("kvq {}", env!("CARGO_PKG_VERSION")),
                limits: DeviceLimits {
                    max_buffer_bytes: isize::MAX as u64,
                    max_workgroup_storage_bytes: 0,
                    max_invocations_per_workgroup: 1,
                    max_workgroups_per_dimension: u32::MAX,
                },
                features: Vec::new(),
            },
        }
    }
}

fn words(buf: &DeviceBuffer) -> Result<&Words> {
    buf.downcast::<Words>(NAME)
}

/// Reads a whole buffer (tolerates a poisoned lock: the data is plain words).
fn read(buf: &DeviceBuffer) -> Result<std::sync::RwLockReadGuard<'_, Vec<u32>>> {
    Ok(words(buf)?.read().unwrap_or_else(|e| e.into_inner()))
}

fn write(buf: &DeviceBuffer) -> Result<std::sync::RwLockWriteGuard<'_, Vec<u32>>> {
    Ok(words(buf)?.write().unwrap_or_else(|e| e.into_inner()))
}

fn floats(buf: &DeviceBuffer) -> Result<Vec<f32>> {
    Ok(bytemuck::cast_slice(&read(buf)?).to_vec())
}

/// A pool's data and side words, read-locked.
struct PoolView<'a> {
    pool: &'a Pool,
    data: std::sync::RwLockReadGuard<'a, Vec<u32>>,
    side: std::sync::RwLockReadGuard<'a, Vec<u32>>,
}

impl<'a> PoolView<'a> {
    fn new(pool: &'a Pool) -> Result<Self> {
        Ok(PoolView {
            pool,
            data: read(&pool.data)?,
            side: read(&pool.side)?,
        })
    }

    /// Dequantized vector of (slot, head).
    fn load(&self, slot: usize, head: usize, out: &mut [f32]) {
        let l = &self.pool.layout;
        let row = l.row(slot, head);
        let (w, s) = (l.words_per_head(), l.side_per_head());
        crate::quant::dequantize(
            l.dtype,
            &self.data[row * w..(row + 1) * w],
            &self.side[row * s..(row + 1) * s],
            out,
        );
    }
}

impl Backend for CpuBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn alloc(&self, words: usize) -> Result<DeviceBuffer> {
        let mut v: Vec<u32> = Vec::new();
        v.try_reserve_exact(words)
            .map_err(|e| Error::OutOfMemory(format!("{words} words: {e}")))?;
        v.resize(words, 0);
        Ok(DeviceBuffer::new(words, RwLock::new(v)))
    }

    fn upload(&self, buf: &DeviceBuffer, offset: usize, data: &[u32]) -> Result<()> {
        buf.check_range("upload end", offset, data.len())?;
        write(buf)?[offset..offset + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn download(&self, buf: &DeviceBuffer, offset: usize, len: usize) -> Result<Vec<u32>> {
        buf.check_range("download end", offset, len)?;
        Ok(read(buf)?[offset..offset + len].to_vec())
    }

    fn quantize_append(&self, args: &AppendArgs<'_>) -> Result<()> {
        append::quantize_append(args)
    }

    fn dequantize(
        &self,
        pool: &Pool,
        slots: &DeviceBuffer,
        tokens: usize,
        out: &DeviceBuffer,
    ) -> Result<()> {
        dequantize::dequantize(pool, slots, tokens, out)
    }

    fn decode(&self, args: &AttnArgs<'_>) -> Result<()> {
        attention::attention(args)
    }

    fn prefill(&self, args: &AttnArgs<'_>) -> Result<()> {
        attention::attention(args)
    }

    fn stream(&self, buf: &DeviceBuffer, words: usize) -> Result<()> {
        buf.check_range("stream", 0, words)?;
        let sum = read(buf)?[..words].iter().fold(0u32, |a, &w| a ^ w);
        std::hint::black_box(sum);
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
