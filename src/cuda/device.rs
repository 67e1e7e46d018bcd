//! The CUDA backend: cudarc with dynamic loading (no toolkit to build; the driver's
//! libcuda.so.1 and NVRTC's libnvrtc.so.13 or .so.12 at run time), the kernels of
//! `shaders/cuda/` compiled by NVRTC for the device's architecture and cached per
//! specialisation. Same formats and layout as every backend (DESIGN §1–§2), the
//! device path of DESIGN §7 on a CUDA stream ([`Encoder::Cuda`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
};
use cudarc::driver::{result, sys};

use super::kernels::{CudaKernel, KernelKey, compile, nvrtc_missing};
use crate::attn::work::{LANE_FLOATS, TILE, WG, Work, lane_shape};
use crate::backend::lease::{FreeList, Lease, grow};
use crate::backend::{
    Backend, BackendInfo, BackendKind, Candidate, DeviceBuffer, DeviceLimits, DeviceType, Elem,
    Encoder, Opener, Pool, Prepared, Step, Tensor,
};
use crate::cache::PoolLayout;
use crate::quant::hadamard_norm;
use crate::{Error, Result};

const NAME: &str = "cuda";
/// Blocks a decode call aims for per multiprocessor: two waves of the four that
/// fit at attention.cu's register use (157–255 registers a thread, ptxas sm_90).
const BLOCKS_PER_SM: usize = 8;
/// Fewest keys in a split on CUDA: one tile (a split's setup is small next to the
/// parallelism a batch-1 decode needs on a GPU of 100+ SMs).
const MIN_SPLIT: usize = TILE;
/// The largest grid y or z dimension CUDA launches.
const MAX_GRID: u32 = 65535;
/// Smallest workspace buffer, in words (64 KiB).
const MIN_WORKSPACE_WORDS: u64 = 16 << 10;
/// Blocks of the roofline kernel per multiprocessor.
const STREAM_BLOCKS_PER_SM: usize = 32;

fn driver_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device(format!("CUDA {what}: {e:?}"))
}

/// CUDA devices as selection candidates: each with its verdict, or one rejected
/// candidate saying why there is none. Never panics (a driver that does is caught).
pub(crate) fn probe() -> Vec<Candidate> {
    std::panic::catch_unwind(list).unwrap_or_else(|_| {
        vec![rejected(
            "rejected: the CUDA driver panicked while probing".into(),
        )]
    })
}

fn rejected(reason: String) -> Candidate {
    Candidate {
        info: BackendInfo {
            kind: BackendKind::Cuda,
            name: "CUDA".into(),
            device_type: DeviceType::Other,
            api: "CUDA".into(),
            driver: String::new(),
            limits: DeviceLimits {
                max_buffer_bytes: 0,
                max_binding_bytes: 0,
                max_workgroup_storage_bytes: 0,
                max_invocations_per_workgroup: 0,
                max_workgroups_per_dimension: 0,
            },
            features: Vec::new(),
        },
        rank: None,
        reason,
        opener: Opener::Cuda(usize::MAX),
    }
}

/// The driver's CUDA version, as 1000 * major + 10 * minor.
fn driver_version() -> Result<i32> {
    let mut v = 0;
    // SAFETY: every caller runs after `is_culib_present` (`list`, `describe` via
    // `device_count`, or a backend that `describe` opened), so the symbol is
    // loaded; cuDriverGetVersion only writes one int through a pointer to the
    // live local `v`.
    unsafe { sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|e| driver_err("driver version", e))?;
    Ok(v)
}

/// NVRTC's major version, where it loads.
fn nvrtc_major() -> Option<i32> {
    if !super::kernels::nvrtc_present() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: `nvrtc_present` above has loaded NVRTC; nvrtcVersion only writes
    // one int through each pointer, both to live locals.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some(major)
}

/// Why this machine's NVRTC cannot serve its driver, if it cannot: missing, or
/// making PTX of a newer CUDA than the driver loads.
fn nvrtc_unusable() -> Option<String> {
    let Some(nvrtc) = nvrtc_major() else {
        return Some(nvrtc_missing());
    };
    let driver = driver_version().ok()? / 1000;
    (nvrtc > driver).then(|| {
        format!(
            "NVRTC {nvrtc} makes PTX the CUDA {driver} driver cannot load: put NVRTC {driver} \
             (pip install nvidia-cuda-nvrtc-cu{driver}) first on LD_LIBRARY_PATH"
        )
    })
}

fn list() -> Vec<Candidate> {
    // SAFETY: `is_culib_present` only tries to load libcuda.so.1 (dlopen) and
    // reports whether it loaded; it calls no function of the driver.
    if !unsafe { sys::is_culib_present() } {
        return vec![rejected(
            "rejected: no CUDA driver (libcuda.so.1 not found)".into(),
        )];
    }
    if let Err(e) = result::init() {
        return vec![rejected(format!("rejected: cuInit failed: {e:?}"))];
    }
    let count = match result::device::get_count() {
        Ok(n) => n.max(0) as usize,
        Err(e) => return vec![rejected(format!("rejected: no CUDA device count: {e:?}"))],
    };
    let nvrtc = nvrtc_unusable();
    (0..count)
        .map(|i| match describe(i) {
            Ok(info) => Candidate {
                reason: match (&nvrtc, device_arch(i)) {
                    (Some(why), _) => format!("rejected: {why}"),
                    (None, Err(e)) => format!("rejected: {e}"),
                    (None, Ok(_)) => String::new(),
                },
                info,
                rank: None,
                opener: Opener::Cuda(i),
            },
            Err(e) => rejected(format!("rejected: CUDA device {i}: {e}")),
        })
        .collect()
}

/// Number of CUDA devices the driver reports.
pub fn device_count() -> Result<usize> {
    // SAFETY: `is_culib_present` only tries to load libcuda.so.1 (dlopen) and
    // reports whether it loaded; it calls no function of the driver.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::NoBackend(
            "no CUDA driver (libcuda.so.1 not found)".into(),
        ));
    }
    result::init().map_err(|e| driver_err("init", e))?;
    let n = result::device::get_count().map_err(|e| driver_err("device count", e))?;
    Ok(n.max(0) as usize)
}

fn attribute(dev: sys::CUdevice, a: sys::CUdevice_attribute) -> Result<i32> {
    // SAFETY: every caller passes a handle that `result::device::get` returned
    // (as `get_attribute` requires) for an ordinal below the driver's count, and
    // `a` is a variant of the driver's own attribute enum.
    unsafe { result::device::get_attribute(dev, a) }.map_err(|e| driver_err("attribute", e))
}

/// Describes CUDA device `ordinal`.
pub fn describe(ordinal: usize) -> Result<BackendInfo> {
    use sys::CUdevice_attribute as A;
    if ordinal >= device_count()? {
        return Err(Error::OutOfRange {
            what: "CUDA device",
            value: ordinal,
            limit: device_count()?,
        });
    }
    let dev = result::device::get(ordinal as i32).map_err(|e| driver_err("device", e))?;
    let name = result::device::get_name(dev).map_err(|e| driver_err("name", e))?;
    // SAFETY: `dev` was returned by `result::device::get` just above, for an
    // ordinal checked against the device count (what `total_mem` requires).
    let memory = unsafe { result::device::total_mem(dev) }.map_err(|e| driver_err("memory", e))?;
    let major = attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let sms = attribute(dev, A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    let shared = attribute(dev, A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK)?;
    let integrated = attribute(dev, A::CU_DEVICE_ATTRIBUTE_INTEGRATED)? != 0;
    let driver = driver_version()?;
    Ok(BackendInfo {
        kind: BackendKind::Cuda,
        name,
        device_type: if integrated {
            DeviceType::Integrated
        } else {
            DeviceType::Discrete
        },
        api: "CUDA".into(),
        driver: format!(
            "CUDA {}.{}, compute capability {major}.{minor}, {sms} SMs",
            driver / 1000,
            driver % 1000 / 10
        ),
        limits: DeviceLimits {
            max_buffer_bytes: memory as u64,
            max_binding_bytes: memory as u64,
            max_workgroup_storage_bytes: shared.max(0) as u32,
            max_invocations_per_workgroup: 1024,
            max_workgroups_per_dimension: 65535,
        },
        features: vec![
            format!("sm_{major}{minor}"),
            "warp-shuffle 32".into(),
            "events".into(),
        ],
    })
}

/// Opens CUDA device `ordinal`.
pub fn open(ordinal: usize) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(CudaBackend::new(ordinal)?))
}

/// Device memory: kvq's own (freed on drop) or the application's.
#[derive(Debug)]
struct Mem {
    ptr: u64,
    owned: Option<Arc<CudaContext>>,
}

impl Drop for Mem {
    fn drop(&mut self) {
        if let Some(ctx) = &self.owned {
            // A failure here cannot be reported; the memory is the driver's again at exit.
            let _ = ctx.bind_to_thread();
            // SAFETY: `owned` is set only by `alloc`, for a pointer that
            // `malloc_sync` returned in this context (as `free_sync` requires); a
            // `Mem` is never cloned (buffers share it through an `Arc`), so this
            // drop runs once and frees it once. Work still queued that reads it
            // is not overtaken: cuMemFree synchronises with the context's
            // outstanding work before it releases the memory.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// kvq on one CUDA device.
#[derive(Debug)]
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: BackendInfo,
    arch: &'static str,
    sms: usize,
    /// The driver's CUDA version (1000 * major + 10 * minor).
    driver: i32,
    modules: Mutex<HashMap<KernelKey, Arc<cudarc::driver::CudaModule>>>,
    functions: Mutex<HashMap<(KernelKey, &'static str), CudaFunction>>,
    /// One word per thread of the roofline kernel.
    sink: OnceLock<DeviceBuffer>,
    workspaces: FreeList<Workspace>,
    created: AtomicU64,
    /// Events around every launch, while timing is on.
    timing: Mutex<Option<Vec<(CudaEvent, CudaEvent)>>>,
}

/// Device memory of a prepared step: its records (slots, work, tables) and partials.
#[derive(Debug, Clone)]
struct Workspace {
    meta: Arc<DeviceBuffer>,
    partial: Arc<DeviceBuffer>,
    /// Int4Channel keys: the new keys staged as F16 for the seals.
    stage: Arc<DeviceBuffer>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A step as the CUDA backend keeps it: its records on the host until the first
/// record uploads them on the recording stream (after that stream's earlier work,
/// which may still read the workspace), and the partition.
#[derive(Debug)]
struct CudaStep {
    lease: Lease<Workspace>,
    meta: Vec<u32>,
    uploaded: Mutex<Option<usize>>,
    slots: u64,
    work: u64,
    tables: u64,
    append_grid: (u32, u32, u32),
    attention: Option<Attention>,
    /// Int4Channel keys: where the open slots, seals and staging slots start in
    /// the records (bytes), and the seals' grid (`None` when none).
    open: OpenRecords,
}

#[derive(Debug, Clone, Copy)]
struct OpenRecords {
    open_slots: u64,
    seals: u64,
    stage: u64,
    seal_count: u32,
    seal_grid: Option<(u32, u32, u32)>,
}

#[derive(Debug)]
struct Attention {
    key: KernelKey,
    params: AttnParams,
    shape: AttnShape,
    grid: (u32, u32, u32),
    reduce: ReduceParams,
    reduce_grid: (u32, u32, u32),
}

/// `AttnParams` of `attention.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct AttnParams([u32; 12]);
// SAFETY: plain old data passed by value as a kernel argument: `repr(C)`, twelve
// u32 words (no padding, no pointers, every bit pattern valid), the 48 bytes of
// attention.cu's `AttnParams` (ten u32, `scale` and `softcap` as f32 bits at
// words 8 and 9, two u32 of padding), which `Work::params_words` fills in order.
unsafe impl DeviceRepr for AttnParams {}

/// `AttnShape` of `attention.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct AttnShape {
    head_dim: u32,
    k_group: u32,
    v_group: u32,
    qh: u32,
    kt: u32,
    rotate_q: u32,
    q_f16: u32,
    norm: f32,
}
// SAFETY: plain old data passed by value as a kernel argument: `repr(C)`, seven
// u32 then one f32 (4-byte fields, so no padding; no pointers; every bit pattern
// valid), field for field attention.cu's `AttnShape` (32 bytes).
unsafe impl DeviceRepr for AttnShape {}

/// `ReduceParams` of `attn_reduce.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct ReduceParams {
    rows: u32,
    splits: u32,
    head_dim: u32,
    rotate_out: u32,
    norm: f32,
    out_f16: u32,
    pad: [u32; 2],
}
// SAFETY: plain old data passed by value as a kernel argument: `repr(C)`, four
// u32, one f32 and three u32 (4-byte fields, so no padding; no pointers; every
// bit pattern valid), field for field attn_reduce.cu's `ReduceParams` (32 bytes).
unsafe impl DeviceRepr for ReduceParams {}

/// `RowParams` of `rows.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RowParams {
    tokens: u32,
    kv_heads: u32,
    block_size: u32,
    capacity: u32,
    dtype: u32,
    head_dim: u32,
    group: u32,
    rotate: u32,
    norm: f32,
    src_f16: u32,
    code: u32,
    slot0: u32,
    open_base: u32,
    pad: u32,
}
// SAFETY: plain old data passed by value as a kernel argument: `repr(C)`, eight
// u32, one f32 and five u32 (4-byte fields, so no padding; no pointers; every
// bit pattern valid), field for field rows.cu's `RowParams` (56 bytes).
unsafe impl DeviceRepr for RowParams {}

impl RowParams {
    fn new(tokens: usize, l: &PoolLayout, src_f16: bool) -> Self {
        RowParams {
            tokens: tokens as u32,
            kv_heads: l.kv_heads as u32,
            block_size: l.block_size as u32,
            capacity: (l.num_blocks * l.block_size) as u32,
            dtype: l.dtype.packing(),
            code: l.dtype.code(),
            head_dim: l.head_dim as u32,
            group: l.dtype.group().max(8),
            rotate: l.rotated as u32,
            norm: hadamard_norm(l.head_dim),
            src_f16: src_f16 as u32,
            slot0: 0,
            open_base: if l.dtype.per_channel() {
                l.open_base() as u32
            } else {
                0
            },
            pad: 0,
        }
    }

    /// F16 rows into an Int4Channel pool's open blocks (the side array from its
    /// open base), at slots `capacity + open * block_size + offset`.
    fn open_blocks(tokens: usize, l: &PoolLayout, src_f16: bool) -> Self {
        RowParams {
            slot0: l.capacity() as u32,
            ..RowParams::new(tokens, &l.open_view(), src_f16)
        }
    }
}

/// `SealParams` of `rows.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct SealParams {
    seals: u32,
    kv_heads: u32,
    block_size: u32,
    head_dim: u32,
    open_base: u32,
    pad: [u32; 3],
}
// SAFETY: plain old data passed by value as a kernel argument: `repr(C)`, eight u32
// (no padding, no pointers, every bit pattern valid), field for field rows.cu's
// `SealParams` (32 bytes).
unsafe impl DeviceRepr for SealParams {}

impl CudaBackend {
    /// Opens CUDA device `ordinal` on a stream of kvq's own.
    pub fn new(ordinal: usize) -> Result<Self> {
        let info = describe(ordinal)?;
        if let Some(why) = nvrtc_unusable() {
            return Err(Error::Unsupported(why));
        }
        let arch = device_arch(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("context", e))?;
        // Raw pointers and one stream per call: kvq orders its own work.
        // SAFETY: the tracking switched off concerns `CudaSlice`s only, and kvq
        // makes none: its memory is raw `malloc_sync` pointers (`Mem`), ordered by
        // kvq itself (allocations are zeroed and waited for; copies synchronise
        // the stream; workspaces are reused only by work ordered after their
        // plan, see `Plan`), and the context is kvq's own.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| driver_err("stream", e))?;
        let dev = result::device::get(ordinal as i32).map_err(|e| driver_err("device", e))?;
        use sys::CUdevice_attribute as A;
        let sms = attribute(dev, A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as usize;
        Ok(CudaBackend {
            ctx,
            stream,
            info,
            arch,
            sms,
            driver: driver_version()?,
            modules: Mutex::default(),
            functions: Mutex::default(),
            sink: OnceLock::new(),
            workspaces: FreeList::default(),
            created: AtomicU64::new(0),
            timing: Mutex::new(None),
        })
    }

    /// The stream kvq's own calls ([`Backend::run`], uploads, downloads) use.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Device memory the application owns (`bytes` from `ptr`, on this backend's
    /// device) as a [`DeviceBuffer`] for the device path's [`Tensor`]s; kvq never
    /// frees it.
    ///
    /// # Safety
    ///
    /// `ptr` must be the start of at least `bytes` bytes of device memory usable
    /// in this backend's context, 4-byte aligned, that stays allocated while the
    /// buffer (or any clone) exists and until the work recorded with it is done:
    /// kvq's kernels read and write through it unchecked.
    pub unsafe fn buffer(ptr: u64, bytes: usize) -> DeviceBuffer {
        DeviceBuffer::new(bytes / 4, Mem { ptr, owned: None })
    }

    fn ptr(buf: &DeviceBuffer) -> Result<u64> {
        Ok(buf.downcast::<Mem>(NAME)?.ptr)
    }

    /// The function `entry` of `key`, its module compiled (outside the locks) and
    /// loaded on first use.
    fn function(&self, key: &KernelKey, entry: &'static str) -> Result<CudaFunction> {
        if let Some(f) = lock(&self.functions).get(&(key.clone(), entry)) {
            return Ok(f.clone());
        }
        let loaded = lock(&self.modules).get(key).cloned();
        let module = match loaded {
            Some(m) => m,
            None => {
                let ptx = compile(key, self.arch)?;
                self.created.fetch_add(1, Ordering::Relaxed);
                let m = self
                    .ctx
                    .load_module(ptx)
                    .map_err(|e| driver_err("module", e))?;
                lock(&self.modules).entry(key.clone()).or_insert(m).clone()
            }
        };
        let f = module
            .load_function(entry)
            .map_err(|e| driver_err(entry, e))?;
        lock(&self.functions).insert((key.clone(), entry), f.clone());
        Ok(f)
    }

    /// Launches what `builder` holds (a function of this backend and its arguments)
    /// on `stream`, timed while timing is on.
    fn launch(
        &self,
        stream: &CudaStream,
        mut builder: cudarc::driver::LaunchArgs<'_>,
        grid: (u32, u32, u32),
    ) -> Result<()> {
        let mut timing = lock(&self.timing);
        let start = match timing.as_mut() {
            Some(_) => Some(self.event(stream)?),
            None => None,
        };
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (WG, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: each caller pushes exactly the parameters its kernel declares,
        // in order and of the same types (`quantize_append` and `dequantize` of
        // rows.cu, `attention`, `attn_reduce`, `stream`: a `DeviceRepr` struct
        // matching the kernel's, then u64 device pointers), for a function loaded
        // in this backend's context on a stream of that context (`stream_of`).
        // Every pointer is into live memory of this context (kvq's `Mem`, or an
        // application buffer whose `CudaBackend::buffer` caller vouched for it)
        // and was checked to cover what the kernel indexes from the same layout:
        // tensors by `Tensor::check`, pools by `check_pools` /
        // `check_dequantize`, records by the workspace lease, `stream`'s source
        // by `check_range`. The buffers outlive the launch: the caller holds them
        // and `Mem` frees only after the context's work is done.
        unsafe { builder.launch(cfg) }.map_err(|e| driver_err("launch", e))?;
        if let (Some(start), Some(list)) = (start, timing.as_mut()) {
            list.push((start, self.event(stream)?));
        }
        Ok(())
    }

    fn event(&self, stream: &CudaStream) -> Result<CudaEvent> {
        self.created.fetch_add(1, Ordering::Relaxed);
        let e = self
            .ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| driver_err("event", e))?;
        e.record(stream).map_err(|e| driver_err("event", e))?;
        Ok(e)
    }

    /// A workspace with at least `meta_words` and `partial_words`: a free one that
    /// fits, else a free one (or a new one) with its short buffers grown.
    fn lease(
        &self,
        [meta_words, partial_words, stage_words]: [usize; 3],
    ) -> Result<Lease<Workspace>> {
        let fits = |w: &Workspace| {
            w.meta.words() >= meta_words
                && w.partial.words() >= partial_words
                && w.stage.words() >= stage_words
        };
        let buffer = |have: Option<&Arc<DeviceBuffer>>, need: usize| {
            let words = |b: &Arc<DeviceBuffer>| b.words() as u64;
            grow(have, words, need as u64, MIN_WORKSPACE_WORDS, |size| {
                Ok(Arc::new(self.alloc(size as usize)?))
            })
        };
        self.workspaces.lease(fits, |old| {
            Ok(Workspace {
                meta: buffer(old.as_ref().map(|w| &w.meta), meta_words)?,
                partial: buffer(old.as_ref().map(|w| &w.partial), partial_words)?,
                stage: buffer(old.as_ref().map(|w| &w.stage), stage_words)?,
            })
        })
    }

    /// Uploads a step's records on `stream` the first time they are recorded there.
    fn upload_step(&self, st: &CudaStep, stream: &CudaStream) -> Result<()> {
        let mut uploaded = lock(&st.uploaded);
        let id = stream.cu_stream() as usize;
        if *uploaded == Some(id) || st.meta.is_empty() {
            return Ok(());
        }
        let dst = Self::ptr(&st.lease.get().meta)?;
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_err("context", e))?;
        // SAFETY: `lease` gave a meta buffer of at least `meta.len()` words, live
        // while the step holds its lease; `stream` belongs to this context
        // (`stream_of`). A copy from pageable host memory (a `Vec`) has read its
        // source when it returns, so `st.meta` may move or drop after.
        unsafe { result::memcpy_htod_async(dst, &st.meta, stream.cu_stream()) }
            .map_err(|e| driver_err("upload", e))?;
        *uploaded = Some(id);
        Ok(())
    }

    /// The stream of `enc`, which must belong to this backend's context.
    fn stream_of<'a>(&self, enc: &'a Encoder<'_>) -> Result<&'a CudaStream> {
        match enc {
            Encoder::Cuda(s) if Arc::ptr_eq(s.context(), &self.ctx) => Ok(s),
            Encoder::Cuda(_) => Err(Error::InvalidConfig(
                "the stream belongs to another CUDA context than the backend's".into(),
            )),
            other => Err(Error::InvalidConfig(format!(
                "the CUDA backend records into Encoder::Cuda, not {other:?}"
            ))),
        }
    }

    /// The keys' append into an Int4Channel pool: the new keys staged as F16
    /// (rotated with the pool) and the blocks they fill sealed, then the other new
    /// keys written into their open blocks, after the seals read them.
    fn append_keys(
        &self,
        stream: &CudaStream,
        st: &CudaStep,
        (pool, tokens): (&Pool, usize),
        src: u64,
        src_f16: bool,
    ) -> Result<()> {
        let l = &pool.layout;
        let meta = Self::ptr(&st.lease.get().meta)?;
        let (data, side) = pool_ptrs(pool)?;
        let rows = self.function(&KernelKey::plain(CudaKernel::Rows), "quantize_append")?;
        let open = st.open;
        if let Some(seal_grid) = open.seal_grid {
            // Every new key, F16 (rotated with the pool), at row `token * kv_heads + head`.
            let stage = Self::ptr(&st.lease.get().stage)?;
            let staged = RowParams {
                block_size: 1,
                capacity: tokens as u32,
                ..RowParams::new(tokens, &l.open_view(), src_f16)
            };
            let slots = meta + open.stage;
            let mut b = stream.launch_builder(&rows);
            b.arg(&staged).arg(&src).arg(&slots).arg(&stage).arg(&data);
            self.launch(stream, b, st.append_grid)?;
            let f = self.function(&KernelKey::plain(CudaKernel::Rows), "seal")?;
            let params = SealParams {
                seals: open.seal_count,
                kv_heads: l.kv_heads as u32,
                block_size: l.block_size as u32,
                head_dim: l.head_dim as u32,
                open_base: l.open_base() as u32,
                pad: [0; 3],
            };
            let seals = meta + open.seals;
            let mut b = stream.launch_builder(&f);
            b.arg(&params).arg(&stage).arg(&seals).arg(&data).arg(&side);
            self.launch(stream, b, seal_grid)?;
        }
        let params = RowParams::open_blocks(tokens, l, src_f16);
        let (slots, opens) = (meta + open.open_slots, side + 4 * l.open_base() as u64);
        let mut b = stream.launch_builder(&rows);
        b.arg(&params).arg(&src).arg(&slots).arg(&opens).arg(&data);
        self.launch(stream, b, st.append_grid)
    }

    /// The device pointer of `n` elements of `t`, checked.
    fn tensor_ptr(t: &Tensor<'_>, what: &'static str, n: usize) -> Result<u64> {
        t.check(what, n, 4)?;
        Ok(Self::ptr(t.buffer)? + t.offset)
    }
}

/// NVRTC's name of device `ordinal`'s architecture, among those kvq compiles for.
fn device_arch(ordinal: usize) -> Result<&'static str> {
    use sys::CUdevice_attribute as A;
    const KNOWN: [&str; 13] = [
        "sm_72", "sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_100", "sm_101",
        "sm_103", "sm_110", "sm_120", "sm_121",
    ];
    let dev = result::device::get(ordinal as i32).map_err(|e| driver_err("device", e))?;
    let major = attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let name = format!("sm_{major}{minor}");
    KNOWN.iter().find(|&&k| k == name).copied().ok_or_else(|| {
        Error::Unsupported(format!(
            "compute capability {major}.{minor}: kvq compiles for {KNOWN:?}"
        ))
    })
}

/// The per-row and attention kernels hold a head vector in 256 registers or words.
fn check_layout(l: &PoolLayout) -> Result<()> {
    if l.head_dim > 256 {
        return Err(Error::Unsupported(format!(
            "head_dim {} on CUDA: at most 256",
            l.head_dim
        )));
    }
    Ok(())
}

/// The grid of the per-row kernels: one thread per (token, kv head), folded into 2-D.
fn rows_grid(tokens: usize, kv_heads: usize) -> Result<(u32, u32, u32)> {
    let max = MAX_GRID as usize;
    let blocks = tokens
        .checked_mul(kv_heads)
        .map(|rows| rows.div_ceil(WG as usize).max(1))
        .filter(|&b| b <= max * max)
        .ok_or(Error::OutOfRange {
            what: "tokens * kv_heads",
            value: tokens.saturating_mul(kv_heads),
            limit: max * max * WG as usize,
        })?;
    let x = blocks.min(max);
    Ok((x as u32, blocks.div_ceil(x) as u32, 1))
}

/// A pool's data, side and layout as kernel arguments.
fn pool_ptrs(pool: &Pool) -> Result<(u64, u64)> {
    Ok((CudaBackend::ptr(&pool.data)?, CudaBackend::ptr(&pool.side)?))
}

impl Backend for CudaBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn alloc(&self, words: usize) -> Result<DeviceBuffer> {
        let bytes = words.max(1).checked_mul(4).ok_or(Error::OutOfRange {
            what: "words",
            value: words,
            limit: usize::MAX / 4,
        })?;
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_err("context", e))?;
        // SAFETY: `malloc_sync`'s only hazard is uninitialised memory; it is
        // zeroed just below, before the buffer is handed out.
        let ptr = unsafe { result::malloc_sync(bytes) }
            .map_err(|e| Error::OutOfMemory(format!("{bytes} bytes: {e:?}")))?;
        let mem = Mem {
            ptr,
            owned: Some(self.ctx.clone()),
        };
        // Zeroed on kvq's stream and waited for, so that no later work on any
        // stream (kvq's or an application's) overtakes it.
        // SAFETY: `ptr` was just allocated, `bytes` long, in this context (bound
        // above) and not yet freed; any byte pattern is a valid u32 word.
        unsafe { result::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) }
            .map_err(|e| driver_err("memset", e))?;
        self.synchronize()?;
        self.created.fetch_add(1, Ordering::Relaxed);
        Ok(DeviceBuffer::new(words, mem))
    }

    fn upload(&self, buf: &DeviceBuffer, offset: usize, data: &[u32]) -> Result<()> {
        buf.check_range("upload end", offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let dst = Self::ptr(buf)? + offset as u64 * 4;
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_err("context", e))?;
        // SAFETY: `check_range` put `[offset, offset + data.len())` inside the
        // buffer, live while `buf` is borrowed; `data` is u32 words, as the buffer
        // holds, and the stream is synchronised before return, so `data` is read
        // before the borrow ends.
        unsafe { result::memcpy_htod_async(dst, data, self.stream.cu_stream()) }
            .map_err(|e| driver_err("upload", e))?;
        self.synchronize()
    }

    fn download(&self, buf: &DeviceBuffer, offset: usize, len: usize) -> Result<Vec<u32>> {
        buf.check_range("download end", offset, len)?;
        let mut out = vec![0u32; len];
        if len == 0 {
            return Ok(out);
        }
        let src = Self::ptr(buf)? + offset as u64 * 4;
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_err("context", e))?;
        // SAFETY: `check_range` put `[offset, offset + len)` inside the buffer,
        // live while `buf` is borrowed; `out` holds `len` u32 words, and the
        // stream is synchronised before `out` is read or moved.
        unsafe { result::memcpy_dtoh_async(&mut out, src, self.stream.cu_stream()) }
            .map_err(|e| driver_err("download", e))?;
        self.synchronize()?;
        Ok(out)
    }

    fn prepare(&self, step: &Step<'_>) -> Result<Prepared> {
        step.check()?;
        check_layout(step.k)?;
        check_layout(step.v)?;
        let attention = match (step.params, step.seqs.is_empty()) {
            (Some(params), false) => Some(self.partition(step, params)?),
            _ => None,
        };
        let work = attention.as_ref().map_or(&[][..], |a| &a.1);
        // 64-byte alignment for every region.
        let records = step.records(work, 64);
        let partial_words = attention.as_ref().map_or(0, |a| a.2);
        let append_grid = rows_grid(step.slots.len(), step.k.kv_heads)?;
        let seal_grid = if step.seals.is_empty() {
            None
        } else {
            Some(rows_grid(
                step.seals.len() * step.k.head_dim / 8,
                step.k.kv_heads,
            )?)
        };
        // Staged new keys, F16: [tokens, kv_heads, head_dim / 2] words.
        let stage_words = match seal_grid {
            Some(_) => step.slots.len() * step.k.kv_heads * step.k.head_dim / 2,
            None => 0,
        };
        let lease = self.lease([
            records.words.len().max(1),
            partial_words.max(1),
            stage_words.max(1),
        ])?;
        let open = OpenRecords {
            open_slots: records.open_slots.0,
            seals: records.seals.0,
            stage: records.stage.0,
            seal_count: step.seals.len() as u32,
            seal_grid,
        };
        Ok(Prepared::new(
            step,
            CudaStep {
                lease,
                uploaded: Mutex::new(None),
                slots: records.slots.0,
                work: records.work.0,
                tables: records.tables.0,
                meta: records.words,
                append_grid,
                attention: attention.map(|a| a.0),
                open,
            },
        ))
    }

    fn record_append(
        &self,
        enc: &mut Encoder<'_>,
        step: &Prepared,
        pools: (&Pool, &Pool),
        k: &Tensor<'_>,
        v: &Tensor<'_>,
    ) -> Result<()> {
        let stream = self.stream_of(enc)?;
        let st = step.inner::<CudaStep>(NAME)?;
        step.check_pools(pools)?;
        let l = &pools.0.layout;
        let n = step.tokens * l.kv_heads * l.head_dim;
        let srcs = [Self::tensor_ptr(k, "k", n)?, Self::tensor_ptr(v, "v", n)?];
        if step.tokens == 0 {
            return Ok(());
        }
        self.upload_step(st, stream)?;
        let slots = Self::ptr(&st.lease.get().meta)? + st.slots;
        let f = self.function(&KernelKey::plain(CudaKernel::Rows), "quantize_append")?;
        let per_channel = l.dtype.per_channel();
        if per_channel {
            self.append_keys(
                stream,
                st,
                (pools.0, step.tokens),
                srcs[0],
                k.elem == Elem::F16,
            )?;
        }
        let pairs = [pools.0, pools.1].into_iter().zip(srcs).zip([k, v]);
        for ((pool, src), t) in pairs.skip(per_channel as usize) {
            let params = RowParams::new(step.tokens, &pool.layout, t.elem == Elem::F16);
            let (data, side) = pool_ptrs(pool)?;
            let mut b = stream.launch_builder(&f);
            b.arg(&params).arg(&src).arg(&slots).arg(&data).arg(&side);
            self.launch(stream, b, st.append_grid)?;
        }
        Ok(())
    }

    fn reopen(&self, pools: &[&Pool], moves: &[[u32; 2]]) -> Result<()> {
        // Everything checked, compiled and allocated before the first launch.
        let Some(l) = Pool::check_reopen_all(pools, moves)? else {
            return Ok(());
        };
        let ptrs = pools
            .iter()
            .map(|p| pool_ptrs(p))
            .collect::<Result<Vec<_>>>()?;
        check_layout(l)?;
        if moves.is_empty() {
            return Ok(());
        }
        let n = moves.len();
        let slots = crate::backend::reopen_slots(moves);
        let slots_buf = self.alloc(slots.len())?;
        self.upload(&slots_buf, 0, &slots)?;
        let scratch = self.alloc(n * l.kv_heads * l.head_dim)?;
        let (srcs, scratch_ptr) = (Self::ptr(&slots_buf)?, Self::ptr(&scratch)?);
        let dsts = srcs + 4 * n as u64;
        let grid = rows_grid(n, l.kv_heads)?;
        // The kept keys in the pool's basis, then stored F16 in the open block.
        let basis = PoolLayout {
            rotated: false,
            ..*l
        };
        let dequantize = self.function(&KernelKey::plain(CudaKernel::Rows), "dequantize")?;
        let store = self.function(&KernelKey::plain(CudaKernel::Rows), "quantize_append")?;
        let (load_params, store_params) = (
            RowParams::new(n, &basis, false),
            RowParams::open_blocks(n, &basis, false),
        );
        for (data, side) in ptrs {
            let mut b = self.stream.launch_builder(&dequantize);
            b.arg(&load_params)
                .arg(&srcs)
                .arg(&data)
                .arg(&side)
                .arg(&scratch_ptr);
            self.launch(&self.stream, b, grid)?;
            let opens = side + 4 * l.open_base() as u64;
            let mut b = self.stream.launch_builder(&store);
            b.arg(&store_params)
                .arg(&scratch_ptr)
                .arg(&dsts)
                .arg(&opens)
                .arg(&data);
            self.launch(&self.stream, b, grid)?;
        }
        self.synchronize()
    }

    fn record_attention(
        &self,
        enc: &mut Encoder<'_>,
        step: &Prepared,
        pools: (&Pool, &Pool),
        q: &Tensor<'_>,
        out: &Tensor<'_>,
    ) -> Result<()> {
        let stream = self.stream_of(enc)?;
        let st = step.inner::<CudaStep>(NAME)?;
        step.check_pools(pools)?;
        let n = step.queries * step.q_heads * pools.0.layout.head_dim;
        let (q_ptr, out_ptr) = (
            Self::tensor_ptr(q, "q", n)?,
            Self::tensor_ptr(out, "out", n)?,
        );
        let Some(a) = &st.attention else {
            return Ok(());
        };
        self.upload_step(st, stream)?;
        let meta = Self::ptr(&st.lease.get().meta)?;
        let (work, tables) = (meta + st.work, meta + st.tables);
        let partial = Self::ptr(&st.lease.get().partial)?;
        let (kd, ks) = pool_ptrs(pools.0)?;
        let (vd, vs) = pool_ptrs(pools.1)?;
        let shape = AttnShape {
            q_f16: (q.elem == Elem::F16) as u32,
            ..a.shape
        };
        let f = self.function(&a.key, "attention")?;
        // Grid z (work items) in chunks within CUDA's limit; each chunk's items
        // start further into the work records.
        let (x, y, items) = a.grid;
        for first in (0..items).step_by(MAX_GRID as usize) {
            let mut params = a.params;
            params.0[7] += 2 * first;
            if pools.0.layout.dtype.per_channel() {
                params.0[10] = pools.0.layout.open_base() as u32;
            }
            let mut b = stream.launch_builder(&f);
            b.arg(&params)
                .arg(&shape)
                .arg(&q_ptr)
                .arg(&work)
                .arg(&tables);
            b.arg(&kd).arg(&ks).arg(&vd).arg(&vs).arg(&partial);
            self.launch(stream, b, (x, y, (items - first).min(MAX_GRID)))?;
        }
        let reduce = ReduceParams {
            out_f16: (out.elem == Elem::F16) as u32,
            ..a.reduce
        };
        let f = self.function(&KernelKey::plain(CudaKernel::Reduce), "attn_reduce")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&reduce).arg(&partial).arg(&out_ptr);
        self.launch(stream, b, a.reduce_grid)
    }

    fn run(&self, record: &mut dyn FnMut(&mut Encoder<'_>) -> Result<()>) -> Result<()> {
        record(&mut Encoder::Cuda(&self.stream))
    }

    fn dequantize(
        &self,
        pool: &Pool,
        slots: &DeviceBuffer,
        tokens: usize,
        out: &DeviceBuffer,
    ) -> Result<()> {
        pool.check_dequantize(slots, tokens, out)?;
        let l = &pool.layout;
        check_layout(l)?;
        if tokens == 0 {
            return Ok(());
        }
        let params = RowParams::new(tokens, l, false);
        let (data, side) = pool_ptrs(pool)?;
        let (slots, out) = (Self::ptr(slots)?, Self::ptr(out)?);
        let grid = rows_grid(tokens, l.kv_heads)?;
        let f = self.function(&KernelKey::plain(CudaKernel::Rows), "dequantize")?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&params).arg(&slots).arg(&data).arg(&side).arg(&out);
        self.launch(&self.stream, b, grid)?;
        self.synchronize()
    }

    fn stream(&self, buf: &DeviceBuffer, words: usize) -> Result<()> {
        buf.check_range("stream", 0, words)?;
        let blocks = self.sms * STREAM_BLOCKS_PER_SM;
        let sink = match self.sink.get() {
            Some(s) => s,
            None => {
                let s = self.alloc(blocks * WG as usize)?;
                self.sink.get_or_init(|| s)
            }
        };
        let (src, sink_ptr) = (Self::ptr(buf)?, Self::ptr(sink)?);
        let vectors = (words / 4) as u64;
        let f = self.function(&KernelKey::plain(CudaKernel::Stream), "stream")?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&vectors).arg(&src).arg(&sink_ptr);
        self.launch(&self.stream, b, (blocks as u32, 1, 1))?;
        self.synchronize()
    }

    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_err("synchronize", e))
    }

    fn creations(&self) -> u64 {
        self.created.load(Ordering::Relaxed)
    }

    fn set_timing(&self, on: bool) -> bool {
        // Event times come from cuEventElapsedTime_v2, which drivers before 12.8 lack.
        let on = on && self.driver >= 12080;
        *lock(&self.timing) = on.then(Vec::new);
        on
    }

    fn take_device_time(&self) -> Result<Option<std::time::Duration>> {
        let Some(list) = lock(&self.timing).as_mut().map(std::mem::take) else {
            return Ok(None);
        };
        if list.is_empty() {
            return Ok(None);
        }
        let mut ms = 0.0f64;
        for (start, end) in &list {
            end.synchronize().map_err(|e| driver_err("event", e))?;
            ms += start.elapsed_ms(end).map_err(|e| driver_err("event", e))? as f64;
        }
        Ok(Some(std::time::Duration::from_secs_f64(ms / 1e3)))
    }
}

impl CudaBackend {
    /// The step's attention: kernel, parameters and grids, its work words, and the
    /// words of its partials.
    fn partition(
        &self,
        step: &Step<'_>,
        params: crate::attn::Resolved,
    ) -> Result<(Attention, Vec<u32>, usize)> {
        let (kl, vl) = (step.k, step.v);
        let work = Work::new(step, params);
        let rows = work.qh * work.qb;
        let shape = lane_shape(kl, vl, rows, LANE_FLOATS);
        if shape.lanes > 32 {
            return Err(Error::Unsupported(format!(
                "head_dim {} on CUDA: a key's lanes must fit a warp",
                kl.head_dim
            )));
        }
        let target = self.sms * BLOCKS_PER_SM;
        let tile = TILE.max(shape.keys_per_step() as usize);
        let (splits, split_len) = work.split(target, tile, MIN_SPLIT, MAX_GRID as usize);
        let d = kl.head_dim;
        let out_rows = work.rows as u32;
        let x = out_rows.clamp(1, MAX_GRID);
        let attention = Attention {
            key: KernelKey::attention(kl.dtype, vl.dtype, shape.dims, rows, shape.keys),
            params: AttnParams(work.params_words(kl, splits, split_len)),
            shape: AttnShape {
                head_dim: d as u32,
                k_group: kl.dtype.group().max(8),
                v_group: vl.dtype.group().max(8),
                qh: work.qh,
                kt: shape.lanes,
                rotate_q: kl.rotated as u32,
                q_f16: 0,
                norm: hadamard_norm(d),
            },
            grid: (work.head_blocks, splits as u32, work.items),
            reduce: ReduceParams {
                rows: out_rows,
                splits: splits as u32,
                head_dim: d as u32,
                rotate_out: vl.rotated as u32,
                norm: hadamard_norm(d),
                out_f16: 0,
                pad: [0; 2],
            },
            reduce_grid: (x, out_rows.div_ceil(x), 1),
        };
        let partial = work.partial_words(d, splits);
        Ok((attention, work.words, partial))
    }
}
