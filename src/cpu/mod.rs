//! The CPU reference backend: straightforward code, one function per GPU kernel,
//! used by tests as ground truth.

mod append;
mod attention;
mod dequantize;

use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::attn::Resolved;
use crate::backend::{
    Backend, BackendInfo, BackendKind, DeviceBuffer, DeviceLimits, DeviceType, Elem, Encoder, Pool,
    Prepared, Seal, SeqInfo, Step, Tensor,
};
use crate::{Error, Result};

/// Host memory standing in for device memory.
type Words = RwLock<Vec<u32>>;

const NAME: &str = "cpu";

/// The reference backend. Slow; chosen only when a caller allows it.
#[derive(Debug)]
pub struct CpuBackend {
    info: BackendInfo,
    /// Buffers allocated.
    created: AtomicU64,
}

/// A step as the CPU keeps it: the host's records, as they are.
#[derive(Debug)]
pub(crate) struct CpuStep {
    slots: Vec<u32>,
    open_slots: Vec<u32>,
    seals: Vec<Seal>,
    seqs: Vec<SeqInfo>,
    tables: Vec<u32>,
    params: Option<Resolved>,
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
                    max_binding_bytes: isize::MAX as u64,
                    max_workgroup_storage_bytes: 0,
                    max_invocations_per_workgroup: 1,
                    max_workgroups_per_dimension: u32::MAX,
                },
                features: Vec::new(),
            },
            created: AtomicU64::new(0),
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

/// The first `n` elements of a tensor, as f32.
fn read_tensor(t: &Tensor<'_>, what: &'static str, n: usize) -> Result<Vec<f32>> {
    t.check(what, n, 4)?;
    let words = read(t.buffer)?;
    let w = &words[(t.offset / 4) as usize..];
    Ok(match t.elem {
        Elem::F32 => bytemuck::cast_slice(&w[..n]).to_vec(),
        Elem::F16 => (0..n)
            .map(|i| half::f16::from_bits((w[i / 2] >> (16 * (i % 2))) as u16).to_f32())
            .collect(),
    })
}

/// Writes `x` into a tensor (f16 rounded to nearest even).
fn write_tensor(t: &Tensor<'_>, what: &'static str, x: &[f32]) -> Result<()> {
    t.check(what, x.len(), 4)?;
    let mut words = write(t.buffer)?;
    let w = &mut words[(t.offset / 4) as usize..];
    match t.elem {
        Elem::F32 => w[..x.len()].copy_from_slice(bytemuck::cast_slice(x)),
        Elem::F16 => {
            for (i, pair) in x.chunks(2).enumerate() {
                let h = |j: usize| pair.get(j).map_or(0, |&v| half::f16::from_f32(v).to_bits());
                let keep = if pair.len() == 1 {
                    w[i] & 0xffff_0000
                } else {
                    0
                };
                w[i] = keep | h(0) as u32 | (h(1) as u32) << 16;
            }
        }
    }
    Ok(())
}

fn immediate(enc: &Encoder<'_>) -> Result<()> {
    match enc {
        Encoder::Immediate => Ok(()),
        other => Err(Error::InvalidConfig(format!(
            "the CPU reference runs work as it is recorded: it takes Encoder::Immediate, not {other:?}"
        ))),
    }
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

    /// Dequantized vector of (slot, head); an Int4Channel pool's slots past its
    /// capacity are in its open blocks.
    fn load(&self, slot: usize, head: usize, out: &mut [f32]) {
        let l = &self.pool.layout;
        if l.dtype.per_channel() {
            return self.load_int4c(slot, head, out);
        }
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

impl PoolView<'_> {
    fn load_int4c(&self, slot: usize, head: usize, out: &mut [f32]) {
        let l = &self.pool.layout;
        let d = l.head_dim;
        match slot.checked_sub(l.capacity()) {
            None => {
                let row = l.row(slot, head);
                let f = l.factors(slot / l.block_size, head);
                crate::quant::dequantize_int4c(
                    &self.data[row * d / 8..][..d / 8],
                    &self.side[f..f + d],
                    out,
                );
            }
            Some(open) => {
                let row = l.open_base() / (d / 2) + l.row(open, head);
                crate::quant::dequantize_f16(&self.side[row * d / 2..][..d / 2], out);
            }
        }
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
        self.created.fetch_add(1, Ordering::Relaxed);
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

    fn prepare(&self, step: &Step<'_>) -> Result<Prepared> {
        step.check()?;
        let state = CpuStep {
            slots: step.slots.to_vec(),
            open_slots: step.open_slots.to_vec(),
            seals: step.seals.to_vec(),
            seqs: step.seqs.to_vec(),
            tables: step.tables.to_vec(),
            params: step.params,
        };
        Ok(Prepared::new(step, state))
    }

    fn record_append(
        &self,
        enc: &mut Encoder<'_>,
        step: &Prepared,
        pools: (&Pool, &Pool),
        k: &Tensor<'_>,
        v: &Tensor<'_>,
    ) -> Result<()> {
        immediate(enc)?;
        let state = step.inner::<CpuStep>(NAME)?;
        step.check_pools(pools)?;
        let n = step.tokens * pools.0.layout.kv_heads * pools.0.layout.head_dim;
        let (k, v) = (read_tensor(k, "k", n)?, read_tensor(v, "v", n)?);
        append::quantize_append(pools, state, &k, &v)
    }

    fn record_attention(
        &self,
        enc: &mut Encoder<'_>,
        step: &Prepared,
        pools: (&Pool, &Pool),
        q: &Tensor<'_>,
        out: &Tensor<'_>,
    ) -> Result<()> {
        immediate(enc)?;
        let state = step.inner::<CpuStep>(NAME)?;
        step.check_pools(pools)?;
        let n = step.queries * step.q_heads * pools.0.layout.head_dim;
        out.check("out", n, 4)?;
        let q = read_tensor(q, "q", n)?;
        let o = attention::attention(pools, state, &q)?;
        write_tensor(out, "out", &o)
    }

    fn run(&self, record: &mut dyn FnMut(&mut Encoder<'_>) -> Result<()>) -> Result<()> {
        record(&mut Encoder::Immediate)
    }

    fn reopen(&self, pools: &[&Pool], moves: &[[u32; 2]]) -> Result<()> {
        append::reopen(pools, moves)
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

    fn stream(&self, buf: &DeviceBuffer, words: usize) -> Result<()> {
        buf.check_range("stream", 0, words)?;
        let sum = read(buf)?[..words].iter().fold(0u32, |a, &w| a ^ w);
        std::hint::black_box(sum);
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn creations(&self) -> u64 {
        self.created.load(Ordering::Relaxed)
    }
}
