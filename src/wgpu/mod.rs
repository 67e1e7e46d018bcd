//! The wgpu backend: WGSL compute kernels on Vulkan, Metal, DX12 or GL.
//!
//! Built by [`select`](crate::select) from a probed adapter, or from an application's
//! own device and queue ([`WgpuBackend::from_device`]). Pipelines are built once per
//! specialisation; pools are plain storage buffers of u32 in DESIGN §2's layout.

mod append;
pub mod attention;
mod bindings;
mod gate;
mod health;
pub mod pipelines;
mod probe;
pub mod shaders;
mod step;
mod timing;
mod windows;
mod workspace;

pub use gate::Entered;
pub(crate) use probe::probe;
pub use probe::{adapters, check_limits, describe, instance};

use std::sync::{Mutex, MutexGuard};

use self::bindings::{BindGroups, Created, Range};
use self::gate::{Gate, Gated};
use self::health::{Faults, Health};
use self::pipelines::{PipelineKey, Pipelines};
use self::timing::Timer;
use self::workspace::Workspaces;
use crate::attn::work::LANE_FLOATS;
use crate::backend::{Backend, BackendInfo, DeviceBuffer, Encoder, Pool, Prepared, Step, Tensor};
use crate::{Error, Result};

const NAME: &str = "wgpu";
/// Invocations per workgroup of the per-row kernels (append, dequantize).
const ROW_WG: u32 = 64;

/// kvq on one wgpu device.
#[derive(Debug)]
pub struct WgpuBackend {
    device: Gated<wgpu::Device>,
    queue: Gated<wgpu::Queue>,
    /// Serialises kvq's work on GL devices (see `gate.rs`); every field holding
    /// device objects drops inside it.
    gate: Gate,
    info: BackendInfo,
    pipelines: Gated<Pipelines>,
    /// Attention uses `attention_lanes.wgsl` (see [`attention::suits_lanes`]).
    lanes: bool,
    /// The adapter's smallest subgroup, when the device has subgroups and
    /// `attention.wgsl` may sum over a key's lanes with them.
    subgroup_size: Option<u32>,
    /// `attention.wgsl`'s register budget per lane ([`crate::attn::work::lane_shape`]).
    lane_floats: u32,
    /// Largest binding of a pool: pools past it are bound in windows.
    pool_binding: u64,
    /// Timestamps around every pass, while timing is on.
    timer: Gated<Mutex<Option<Timer>>>,
    /// Bind groups of recorded dispatches.
    bind_groups: Gated<BindGroups>,
    /// Workspaces of prepared steps.
    workspaces: Gated<Workspaces>,
    /// Device objects created.
    created: Created,
    /// Loss and errors the device reported.
    health: Health,
    /// Failures injected by fault tests.
    faults: Faults,
}

impl WgpuBackend {
    /// Opens `adapter` with its own limits and the optional features kvq can use.
    pub async fn from_adapter_async(adapter: &wgpu::Adapter) -> Result<Self> {
        probe::check(adapter).map_err(Error::Unsupported)?;
        let features =
            adapter.features() & (wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::SUBGROUP);
        let _entered = Gate::of(adapter.get_info().backend).enter();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("kvq"),
                required_features: features,
                required_limits: adapter.limits(),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Device(format!("request_device: {e}")))?;
        let backend = Self::new(device, queue, &adapter.get_info());
        backend.health.watch(&backend.device);
        Ok(backend)
    }

    /// [`Self::from_adapter_async`], blocking.
    pub fn from_adapter(adapter: &wgpu::Adapter) -> Result<Self> {
        pollster::block_on(Self::from_adapter_async(adapter))
    }

    /// Wraps an application's own device and queue (interop); `adapter_info` names it.
    pub fn from_device(
        device: wgpu::Device,
        queue: wgpu::Queue,
        adapter_info: &wgpu::AdapterInfo,
    ) -> Result<Self> {
        check_limits(&device.limits()).map_err(Error::Unsupported)?;
        Ok(Self::new(device, queue, adapter_info))
    }

    /// Opens the first adapter whose name contains `name` (e.g. "llvmpipe").
    pub async fn open_named_async(name: &str) -> Result<Self> {
        let adapters = adapters().await;
        let lower = name.to_lowercase();
        let adapter = adapters
            .iter()
            .find(|a| a.get_info().name.to_lowercase().contains(&lower))
            .ok_or_else(|| Error::NoBackend(format!("no wgpu adapter named like {name:?}")))?;
        Self::from_adapter_async(adapter).await
    }

    /// [`Self::open_named_async`], blocking.
    pub fn open_named(name: &str) -> Result<Self> {
        pollster::block_on(Self::open_named_async(name))
    }

    /// Copies `len` words of `buf` at `offset` back to the host once the work
    /// before it is done. On native targets wgpu finishes work only when polled:
    /// this future polls the device (blocking its thread meanwhile); on the web the
    /// browser does.
    pub async fn download_async(
        &self,
        buf: &DeviceBuffer,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u32>> {
        buf.check_range("download end", offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let src = Self::raw(buf)?;
        // The gate is held only between awaits, so the future stays `Send`.
        let (staging, rx) = {
            let _entered = self.gate.enter();
            self.created.count();
            let staging = Gated::new(
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("kvq readback"),
                    size: len as u64 * 4,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }),
                self.gate,
            );
            let index = self.submit(|enc| {
                enc.copy_buffer_to_buffer(src, offset as u64 * 4, &staging, 0, len as u64 * 4);
                Ok(())
            })?;
            let (tx, rx) = futures::channel::oneshot::channel();
            staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
            self.wait(Some(index))?;
            (staging, rx)
        };
        rx.await
            .map_err(|_| Error::Device("readback cancelled".into()))?
            .map_err(|e| Error::Device(format!("map_async: {e}")))?;
        let _entered = self.gate.enter();
        let view = staging
            .slice(..)
            .get_mapped_range()
            .map_err(|e| Error::Device(format!("get_mapped_range: {e}")))?;
        let words = bytemuck::cast_slice(&view).to_vec();
        drop(view);
        staging.unmap();
        Ok(words)
    }

    /// Resolves once all work submitted so far is done (polling the device on
    /// native targets, as [`Self::download_async`]).
    pub async fn synchronize_async(&self) -> Result<()> {
        let (tx, rx) = futures::channel::oneshot::channel();
        {
            let _entered = self.gate.enter();
            self.queue.on_submitted_work_done(move || {
                let _ = tx.send(());
            });
            self.wait(None)?;
        }
        rx.await
            .map_err(|_| Error::Device("device lost while waiting".into()))
    }

    fn new(device: wgpu::Device, queue: wgpu::Queue, adapter: &wgpu::AdapterInfo) -> Self {
        let info = describe(adapter, &device.limits(), device.features());
        let pool_binding = info.limits.max_binding_bytes;
        let lanes = attention::suits_lanes(adapter, device.features());
        let subgroup_size = device
            .features()
            .contains(wgpu::Features::SUBGROUP)
            .then_some(adapter.subgroup_min_size)
            .filter(|&s| s > 0);
        let gate = Gate::of(adapter.backend);
        WgpuBackend {
            device: Gated::new(device, gate),
            queue: Gated::new(queue, gate),
            gate,
            info,
            pipelines: Gated::new(Pipelines::default(), gate),
            lanes,
            subgroup_size,
            lane_floats: LANE_FLOATS,
            pool_binding,
            timer: Gated::new(Mutex::new(None), gate),
            bind_groups: Gated::new(BindGroups::default(), gate),
            workspaces: Gated::new(Workspaces::default(), gate),
            created: Created::default(),
            health: Health::default(),
            faults: Faults::default(),
        }
    }

    /// Runs attention with `attention.wgsl` even where `attention_lanes.wgsl` would
    /// be chosen, to compare the two kernels on one adapter.
    pub fn without_lanes(mut self) -> Self {
        self.lanes = false;
        self
    }

    /// Runs `attention.wgsl`'s sums over a key's lanes through workgroup memory even
    /// where the adapter's subgroups could take them: the fallback, on any adapter.
    pub fn without_subgroups(mut self) -> Self {
        self.subgroup_size = None;
        self
    }

    /// Sets `attention.wgsl`'s register budget per lane, clamped to 8..=
    /// [`LANE_FLOATS`] (the size of the kernel's register arrays): fewer
    /// dims per lane below the default, for tuning on a GPU.
    pub fn with_lane_floats(mut self, floats: u32) -> Self {
        self.lane_floats = floats.clamp(8, LANE_FLOATS);
        self
    }

    /// Binds pools in windows of at most `bytes` (within the device's binding limit),
    /// as it does pools larger than one binding: to test and measure windows on
    /// small pools.
    pub fn with_pool_binding_limit(mut self, bytes: u64) -> Self {
        self.pool_binding = bytes.min(self.info.limits.max_binding_bytes);
        self
    }

    /// The smallest subgroup `attention.wgsl` may sum over with shuffles, if any.
    pub fn subgroup_size(&self) -> Option<u32> {
        self.subgroup_size
    }

    /// Whether attention uses `attention_lanes.wgsl` where the pools fit it.
    pub fn uses_lanes(&self) -> bool {
        self.lanes
    }

    /// Holds kvq's lock on a GL device (nothing elsewhere) until dropped. An app
    /// that uses kvq's GL device from several threads, or beside kvq on other
    /// threads, should hold it around its own device work (creating buffers,
    /// submitting, waiting): wgpu's GL backend panics in a thread that waits over
    /// 6 s for its context, which a kernel's first dispatch can hold longer
    /// (`src/wgpu/gate.rs`). kvq's own calls inside it are fine.
    pub fn hold(&self) -> Entered {
        self.gate.enter()
    }

    /// The device.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// The wgpu buffer behind a [`DeviceBuffer`] of this backend.
    pub fn raw(buf: &DeviceBuffer) -> Result<&wgpu::Buffer> {
        buf.downcast::<Gated<wgpu::Buffer>>(NAME).map(|b| &**b)
    }

    /// An application's buffer as a [`DeviceBuffer`], for the device path's
    /// [`Tensor`]s (a handle: cheap, and the application keeps its buffer). It must
    /// come from this backend's device and have `BufferUsages::STORAGE`, which
    /// recording checks.
    pub fn buffer(buffer: &wgpu::Buffer) -> DeviceBuffer {
        DeviceBuffer::new(
            (buffer.size() / 4) as usize,
            Gated::new(buffer.clone(), Gate::ANY),
        )
    }

    /// The device path's end of timing: while timing is on
    /// ([`Backend::set_timing`]), resolves the timestamps of kvq's passes recorded
    /// into the application's encoders since the last take at the end of
    /// `encoder`, so that [`Backend::take_device_time`] reads them once it is
    /// submitted. Does nothing while timing is off.
    pub fn resolve_timing(&self, encoder: &mut wgpu::CommandEncoder) {
        let _entered = self.gate.enter();
        if let Some(timer) = self.timer().as_ref() {
            timer.resolve(encoder);
        }
    }

    /// For fault-injection tests: the `n`-th allocation or submission of this
    /// backend from now (1: the next) fails with `Error::Device`, once; 0 clears
    /// it. A failed submission submits nothing.
    #[doc(hidden)]
    pub fn inject_fault(&self, n: u64) {
        self.faults.set(n);
    }

    /// Runs `encode` on a fresh encoder, submits it, and turns validation and
    /// out-of-memory errors raised meanwhile into `kvq::Error`.
    pub(crate) fn submit(
        &self,
        encode: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>,
    ) -> Result<wgpu::SubmissionIndex> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let valid = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("kvq") });
        // A failed recording, or an injected fault, submits nothing: what was
        // recorded before it never runs (DESIGN §6, all or nothing).
        let encoded = encode(&mut encoder).and_then(|()| self.faults.check("submission"));
        if let Some(timer) = self.timer().as_ref() {
            timer.resolve(&mut encoder);
        }
        let submitted = encoded.map(|()| self.queue.submit([encoder.finish()]));
        let valid = pollster::block_on(valid.pop());
        let oom = pollster::block_on(oom.pop());
        let index = submitted?;
        if let Some(e) = valid {
            return Err(Error::Device(e.to_string()));
        }
        if let Some(e) = oom {
            return Err(Error::OutOfMemory(e.to_string()));
        }
        Ok(index)
    }

    /// Checks that `bytes` fit one storage binding.
    pub(crate) fn check_binding(&self, bytes: u64) -> Result<()> {
        check_limit(
            "max_storage_buffer_binding_size",
            bytes,
            self.info.limits.max_binding_bytes,
        )
    }

    /// The grid of `invocations` threads in workgroups of `wg_size`, folded into 2-D
    /// past the per-dimension limit.
    pub(crate) fn rows_grid(&self, invocations: u32, wg_size: u32) -> Result<[u32; 3]> {
        let groups = invocations.div_ceil(wg_size).max(1);
        let max = self.info.limits.max_workgroups_per_dimension.max(1);
        let x = groups.min(max);
        let y = groups.div_ceil(x);
        if y > max {
            return Err(Error::DeviceLimit {
                limit: "max_compute_workgroups_per_dimension",
                requested: groups as u64,
                max: max as u64 * max as u64,
            });
        }
        Ok([x, y, 1])
    }

    /// Records one dispatch of `key` with a uniform buffer made for it from
    /// `uniform` at binding 0 and `buffers` after it: for one-off work (dequantize,
    /// stream), not the device path.
    pub(crate) fn dispatch(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        key: &PipelineKey,
        uniform: &[u32],
        buffers: &[Range],
        grid: [u32; 3],
    ) -> Result<()> {
        let pipeline = self.pipelines.get(&self.device, key, &self.created);
        self.created.count();
        let params = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kvq params"),
            size: (uniform.len() as u64 * 4).max(16),
            usage: wgpu::BufferUsages::UNIFORM,
            mapped_at_creation: true,
        });
        params
            .slice(..uniform.len() as u64 * 4)
            .get_mapped_range_mut()
            .map_err(|e| Error::Device(format!("uniform: {e}")))?
            .copy_from_slice(bytemuck::cast_slice(uniform));
        params.unmap();
        let mut ranges = vec![Range::whole(&params)];
        ranges.extend_from_slice(buffers);
        let group = bindings::create(&self.device, &pipeline.layout, &ranges, &self.created);
        self.pass(encoder, key, &pipeline.pipeline, &group, grid);
        Ok(())
    }

    /// Records one dispatch of `key` over `ranges` (bindings 0, 1, …), its pipeline
    /// and bind group cached: the device path, which creates nothing once warm.
    pub(crate) fn record(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        key: &PipelineKey,
        ranges: &[Range],
        grid: [u32; 3],
    ) {
        let pipeline = self.pipelines.get(&self.device, key, &self.created);
        let group = self
            .bind_groups
            .get(&self.device, &pipeline.layout, ranges, &self.created);
        self.pass(encoder, key, &pipeline.pipeline, &group, grid);
    }

    /// One compute pass of one dispatch, timed while timing is on.
    fn pass(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        key: &PipelineKey,
        pipeline: &wgpu::ComputePipeline,
        group: &wgpu::BindGroup,
        grid: [u32; 3],
    ) {
        let mut timer = self.timer();
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(key.kernel.file()),
            timestamp_writes: timer.as_mut().and_then(Timer::next_pass),
        });
        drop(timer);
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, group, &[]);
        pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
    }

    /// Runs a call of the [`Backend`] API: none once the device is lost; an error
    /// the device raised outside error scopes meanwhile fails it; a failure is
    /// explained by the loss if the device was lost meanwhile. Polls first, so that
    /// wgpu reports a loss (a lost device is otherwise silent until waited on).
    fn guarded<T>(&self, call: impl FnOnce() -> Result<T>) -> Result<T> {
        let _entered = self.gate.enter();
        let _ = self.device.poll(wgpu::PollType::Poll);
        self.recorded(call)
    }

    /// [`Self::guarded`] without the poll: for the per-layer records of the device
    /// path, whose encoder the application submits and waits on.
    fn recorded<T>(&self, call: impl FnOnce() -> Result<T>) -> Result<T> {
        let _entered = self.gate.enter();
        self.health.check()?;
        call()
            .and_then(|v| self.health.check().map(|()| v))
            .map_err(|e| self.health.explain(&self.device, e))
    }

    fn timer(&self) -> MutexGuard<'_, Option<Timer>> {
        self.timer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait(&self, index: Option<wgpu::SubmissionIndex>) -> Result<()> {
        wait(&self.device, index)
    }
}

/// Longest one poll of [`wait`] holds the device.
const WAIT_SLICE: std::time::Duration = std::time::Duration::from_millis(20);

/// Waits for submission `index` (every submission if `None`) in slices of
/// [`WAIT_SLICE`]: wgpu's GL backend holds its adapter's one context lock through a
/// wait, and a thread that cannot take that lock within 6 s panics, so one long
/// wait would bring down every other thread using the adapter.
fn wait(device: &wgpu::Device, index: Option<wgpu::SubmissionIndex>) -> Result<()> {
    loop {
        let poll = device.poll(wgpu::PollType::Wait {
            submission_index: index.clone(),
            timeout: Some(WAIT_SLICE),
        });
        match poll {
            Ok(_) => return Ok(()),
            Err(wgpu::PollError::Timeout) => std::thread::yield_now(),
            Err(e) => return Err(Error::Device(format!("poll: {e}"))),
        }
    }
}

impl Backend for WgpuBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn alloc(&self, words: usize) -> Result<DeviceBuffer> {
        self.guarded(|| {
            let bytes = (words.max(1) as u64).saturating_mul(4);
            check_limit("max_buffer_size", bytes, self.info.limits.max_buffer_bytes)?;
            self.faults.check("allocation")?;
            let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
            self.created.count();
            let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("kvq"),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            if let Some(e) = pollster::block_on(oom.pop()) {
                return Err(Error::OutOfMemory(format!("{bytes} bytes: {e}")));
            }
            Ok(DeviceBuffer::new(words, Gated::new(buffer, self.gate)))
        })
    }

    fn upload(&self, buf: &DeviceBuffer, offset: usize, data: &[u32]) -> Result<()> {
        self.guarded(|| {
            buf.check_range("upload end", offset, data.len())?;
            if !data.is_empty() {
                self.queue.write_buffer(
                    Self::raw(buf)?,
                    offset as u64 * 4,
                    bytemuck::cast_slice(data),
                );
            }
            Ok(())
        })
    }

    fn download(&self, buf: &DeviceBuffer, offset: usize, len: usize) -> Result<Vec<u32>> {
        self.guarded(|| pollster::block_on(self.download_async(buf, offset, len)))
    }

    fn prepare(&self, step: &Step<'_>) -> Result<Prepared> {
        self.guarded(|| step::prepare(self, step))
    }

    fn record_append(
        &self,
        enc: &mut Encoder<'_>,
        step: &Prepared,
        pools: (&Pool, &Pool),
        k: &Tensor<'_>,
        v: &Tensor<'_>,
    ) -> Result<()> {
        self.recorded(|| step::record_append(self, enc, step, pools, k, v))
    }

    fn record_attention(
        &self,
        enc: &mut Encoder<'_>,
        step: &Prepared,
        pools: (&Pool, &Pool),
        q: &Tensor<'_>,
        out: &Tensor<'_>,
    ) -> Result<()> {
        self.recorded(|| step::record_attention(self, enc, step, pools, q, out))
    }

    fn run(&self, record: &mut dyn FnMut(&mut Encoder<'_>) -> Result<()>) -> Result<()> {
        self.guarded(|| {
            self.submit(|enc| record(&mut Encoder::Wgpu(enc)))?;
            Ok(())
        })
    }

    fn dequantize(
        &self,
        pool: &Pool,
        slots: &DeviceBuffer,
        tokens: usize,
        out: &DeviceBuffer,
    ) -> Result<()> {
        self.guarded(|| append::dequantize(self, pool, slots, tokens, out))
    }

    fn reopen(&self, pools: &[&Pool], moves: &[[u32; 2]]) -> Result<()> {
        self.guarded(|| append::reopen(self, pools, moves))?;
        self.synchronize()
    }

    fn stream(&self, src: &DeviceBuffer, words: usize) -> Result<()> {
        self.guarded(|| {
            src.check_range("stream", 0, words)?;
            let groups = (self.info.limits.max_workgroups_per_dimension).min(1024);
            let sink = self.alloc(groups as usize * 64)?;
            let key = PipelineKey {
                kernel: shaders::Kernel::Stream,
                constants: Vec::new(),
            };
            // Past one binding, in windows of whole 256-byte lines (aligned offsets).
            let window = (self.info.limits.max_binding_bytes / 256 * 64) as usize;
            let (src, sink) = (Self::raw(src)?, Self::raw(&sink)?);
            let index = self.submit(|enc| {
                for start in (0..words.max(1)).step_by(window.max(64)) {
                    let n = (words - start).min(window);
                    let offset = start as u64 * 4;
                    let bytes = (n as u64 * 4).max(16).min(src.size() - offset);
                    let range = Range::new(src, offset, bytes);
                    self.dispatch(
                        enc,
                        &key,
                        &[n as u32, 0, 0, 0],
                        &[range, Range::whole(sink)],
                        [groups, 1, 1],
                    )?;
                }
                Ok(())
            })?;
            self.wait(Some(index))
        })
    }

    fn synchronize(&self) -> Result<()> {
        self.guarded(|| pollster::block_on(self.synchronize_async()))
    }

    fn creations(&self) -> u64 {
        self.created.get()
    }

    fn set_timing(&self, on: bool) -> bool {
        let _entered = self.gate.enter();
        let mut timer = self.timer();
        *timer = on
            .then(|| Timer::new(&self.device, &self.queue, &self.created))
            .flatten();
        timer.is_some()
    }

    fn take_device_time(&self) -> Result<Option<std::time::Duration>> {
        self.guarded(|| match self.timer().as_mut() {
            Some(timer) => timer.take(&self.device),
            None => Ok(None),
        })
    }
}

/// `DeviceLimit` naming `limit` if `bytes` pass `max`.
fn check_limit(limit: &'static str, bytes: u64, max: u64) -> Result<()> {
    if bytes > max {
        return Err(Error::DeviceLimit {
            limit,
            requested: bytes,
            max,
        });
    }
    Ok(())
}
