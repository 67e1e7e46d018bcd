//! kvq inside a wgpu app: the app owns its device and queue and makes q, k and v
//! in its own WGSL kernel (three projections of a hidden state per layer); kvq
//! appends and attends on the app's buffers, recorded into the app's encoder. A
//! toy 8-layer model (hidden size = q heads x head_dim, each layer's attention
//! output is the next layer's hidden state, the last layer's feeds the next token)
//! prefills 4 prompts of different lengths and generates 64 tokens for each, with
//! **one submit per token** for all layers. The same run through kvq's host API
//! (q, k, v downloaded, outputs uploaded, per layer) must give the same outputs.
//!
//!     cargo run --release --example interop

use std::sync::Arc;
use std::time::Instant;

use kvq::wgpu::WgpuBackend;
use kvq::{AttnParams, Backend, CacheConfig, Encoder, KvCache, KvDtype, Result, SeqId, Tensor};
use wgpu::util::DeviceExt;

const LAYERS: usize = 8;
const Q_HEADS: usize = 8;
const KV_HEADS: usize = 2;
const D: usize = 64;
const HIDDEN: usize = Q_HEADS * D;
const PROMPTS: [usize; 4] = [3, 9, 17, 30];
const TOKENS: usize = 64;
/// Largest difference allowed between the device path's outputs and the host API's:
/// both run the same kernels on the same values, so they agree to the bit.
const TOLERANCE: f32 = 0.0;

/// The app's kernel: y = W x for each row of x (W is `[outputs, inputs]`).
const PROJECT: &str = r#"
struct Dims { rows: u32, inputs: u32, outputs: u32, pad: u32 }
@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if (i >= dims.rows * dims.outputs) {
        return;
    }
    let r = i / dims.outputs;
    let o = i % dims.outputs;
    var s = 0.0;
    for (var k = 0u; k < dims.inputs; k++) {
        s += w[o * dims.inputs + k] * x[r * dims.inputs + k];
    }
    y[i] = s;
}
"#;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// What the app owns on its device.
struct App {
    info: wgpu::AdapterInfo,
    device: wgpu::Device,
    queue: wgpu::Queue,
    pipeline: wgpu::ComputePipeline,
    /// Wq, Wk, Wv of each layer.
    weights: Vec<[wgpu::Buffer; 3]>,
}

/// The app's activations for `rows` rows: two hidden states (a layer reads one and
/// its attention writes the other) and q, k, v.
struct Activations {
    rows: usize,
    hidden: [wgpu::Buffer; 2],
    qkv: [wgpu::Buffer; 3],
    /// (layer, projection, input hidden) -> bind group, made once.
    groups: Vec<wgpu::BindGroup>,
}

fn storage(device: &wgpu::Device, floats: usize) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("app activations"),
        size: (floats * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

fn noise(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            ((x.wrapping_mul(0x2545F4914F6CDD1D) >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
        })
        .collect()
}

impl App {
    fn new() -> Result<App> {
        // kvq's adapter list, not a second enumeration: on GL two enumerations of
        // one instance share an EGL context under two locks (see kvq::wgpu::adapters).
        let want = std::env::var("WGPU_ADAPTER_NAME")
            .unwrap_or_default()
            .to_lowercase();
        let adapter = pollster::block_on(kvq::wgpu::adapters())
            .into_iter()
            .find(|a| a.get_info().name.to_lowercase().contains(&want))
            .ok_or_else(|| kvq::Error::NoBackend(format!("no wgpu adapter named like {want:?}")))?;
        let features =
            adapter.features() & (wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY);
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("app"),
            required_features: features,
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .map_err(|e| kvq::Error::Device(format!("request_device: {e}")))?;
        println!(
            "app device: {} ({:?})",
            adapter.get_info().name,
            adapter.get_info().backend
        );
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("project"),
            source: wgpu::ShaderSource::Wgsl(PROJECT.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("project"),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        let scale = 1.0 / (HIDDEN as f32).sqrt();
        let weights = (0..LAYERS)
            .map(|l| {
                [HIDDEN, KV_HEADS * D, KV_HEADS * D].map(|out| {
                    let w = noise(out * HIDDEN, (l * 3 + out) as u64, 1.7 * scale);
                    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: Some("app weights"),
                        contents: bytemuck::cast_slice(&w),
                        usage: wgpu::BufferUsages::STORAGE,
                    })
                })
            })
            .collect();
        Ok(App {
            info: adapter.get_info(),
            device,
            queue,
            pipeline,
            weights,
        })
    }

    fn activations(&self, rows: usize) -> Activations {
        let d = &self.device;
        let hidden = [storage(d, rows * HIDDEN), storage(d, rows * HIDDEN)];
        let qkv = [HIDDEN, KV_HEADS * D, KV_HEADS * D].map(|n| storage(d, rows * n));
        let mut groups = Vec::new();
        for w in &self.weights {
            for (p, y) in w.iter().zip(&qkv) {
                let outputs = (y.size() / 4) as u32 / rows as u32;
                let dims = d.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("app dims"),
                    contents: bytemuck::cast_slice(&[rows as u32, HIDDEN as u32, outputs, 0]),
                    usage: wgpu::BufferUsages::UNIFORM,
                });
                for x in &hidden {
                    groups.push(
                        d.create_bind_group(&wgpu::BindGroupDescriptor {
                            label: Some("app project"),
                            layout: &self.pipeline.get_bind_group_layout(0),
                            entries: &[
                                dims.as_entire_binding(),
                                p.as_entire_binding(),
                                x.as_entire_binding(),
                                y.as_entire_binding(),
                            ]
                            .into_iter()
                            .enumerate()
                            .map(|(i, resource)| wgpu::BindGroupEntry {
                                binding: i as u32,
                                resource,
                            })
                            .collect::<Vec<_>>(),
                        }),
                    );
                }
            }
        }
        Activations {
            rows,
            hidden,
            qkv,
            groups,
        }
    }

    /// Records layer `l`'s three projections of hidden state `h` (0 or 1).
    fn project(&self, enc: &mut wgpu::CommandEncoder, a: &Activations, l: usize, h: usize) {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&self.pipeline);
        for (p, outputs) in [HIDDEN, KV_HEADS * D, KV_HEADS * D].into_iter().enumerate() {
            pass.set_bind_group(0, &a.groups[(l * 3 + p) * 2 + h], &[]);
            pass.dispatch_workgroups((a.rows * outputs).div_ceil(64) as u32, 1, 1);
        }
    }
}

/// A step's batch: the prompts, then one token per sequence.
fn batch(seqs: &[SeqId], step: usize) -> Vec<(SeqId, usize)> {
    seqs.iter()
        .zip(PROMPTS)
        .map(|(&s, p)| (s, if step == 0 { p } else { 1 }))
        .collect()
}

fn run() -> Result<()> {
    let app = App::new()?;
    // kvq on the app's own device and queue.
    let kvq: Arc<dyn Backend> = Arc::new(WgpuBackend::from_device(
        app.device.clone(),
        app.queue.clone(),
        &app.info,
    )?);
    let cfg = CacheConfig::new(LAYERS, KV_HEADS, D, 4 * 256)
        .with_dtypes(KvDtype::Int8, KvDtype::Int4 { group: 32 });
    let params = AttnParams::new(Q_HEADS);
    let prompt_rows: usize = PROMPTS.iter().sum();
    let prefill = app.activations(prompt_rows);
    let decode = app.activations(PROMPTS.len());
    let embeddings = noise(prompt_rows * HIDDEN, 99, 1.0);
    // Where each sequence's last prompt row is in the prefill batch.
    let last_rows: Vec<usize> = PROMPTS
        .iter()
        .scan(0, |end, p| {
            *end += p;
            Some(*end - 1)
        })
        .collect();
    let row_bytes = (HIDDEN * 4) as u64;
    // Hidden states that leave the last layer (LAYERS is even: they land in hidden[0]).
    assert_eq!(LAYERS % 2, 0);

    // Device path: one plan and one submit per token.
    let mut cache = KvCache::new(kvq.clone(), cfg)?;
    let seqs: Vec<SeqId> = PROMPTS.iter().map(|_| cache.add_sequence()).collect();
    let history = storage(&app.device, TOKENS * PROMPTS.len() * HIDDEN);
    app.queue
        .write_buffer(&prefill.hidden[0], 0, bytemuck::cast_slice(&embeddings));
    let mut device_ms = Vec::new();
    for step in 0..=TOKENS {
        let start = Instant::now();
        let a = if step == 0 { &prefill } else { &decode };
        let plan = if step == 0 {
            cache.plan_prefill(&batch(&seqs, 0), &params)?
        } else {
            cache.plan_decode(&seqs, &params)?
        };
        let mut encoder = app.device.create_command_encoder(&Default::default());
        for l in 0..LAYERS {
            app.project(&mut encoder, a, l, l % 2);
            let t = |b: &wgpu::Buffer| WgpuBackend::buffer(b);
            let (q, k, v, out) = (
                t(&a.qkv[0]),
                t(&a.qkv[1]),
                t(&a.qkv[2]),
                t(&a.hidden[(l + 1) % 2]),
            );
            let mut enc = Encoder::Wgpu(&mut encoder);
            cache.record_append(&mut enc, &plan, l, &Tensor::f32(&k), &Tensor::f32(&v))?;
            cache.record_attention(&mut enc, &plan, l, &Tensor::f32(&q), &Tensor::f32(&out))?;
        }
        if step == 0 {
            // Each prompt's last hidden state is its sequence's first decode input.
            for (i, &r) in last_rows.iter().enumerate() {
                encoder.copy_buffer_to_buffer(
                    &prefill.hidden[0],
                    r as u64 * row_bytes,
                    &decode.hidden[0],
                    i as u64 * row_bytes,
                    row_bytes,
                );
            }
        } else {
            let bytes = decode.rows as u64 * row_bytes;
            encoder.copy_buffer_to_buffer(
                &decode.hidden[0],
                0,
                &history,
                (step - 1) as u64 * bytes,
                bytes,
            );
        }
        app.queue.submit([encoder.finish()]);
        kvq.synchronize()?;
        if step > 0 {
            device_ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let device_out: Vec<f32> = bytemuck::cast_slice(&kvq.download(
        &WgpuBackend::buffer(&history),
        0,
        (history.size() / 4) as usize,
    )?)
    .to_vec();

    // Host API: the same model, q/k/v downloaded and outputs uploaded per layer.
    let mut cache = KvCache::new(kvq.clone(), cfg)?;
    let seqs: Vec<SeqId> = PROMPTS.iter().map(|_| cache.add_sequence()).collect();
    app.queue
        .write_buffer(&prefill.hidden[0], 0, bytemuck::cast_slice(&embeddings));
    let mut host_out = Vec::new();
    let mut host_ms = Vec::new();
    let download = |b: &wgpu::Buffer| -> Result<Vec<f32>> {
        let w = kvq.download(&WgpuBackend::buffer(b), 0, (b.size() / 4) as usize)?;
        Ok(bytemuck::cast_slice(&w).to_vec())
    };
    for step in 0..=TOKENS {
        let start = Instant::now();
        let a = if step == 0 { &prefill } else { &decode };
        let chunks = batch(&seqs, step);
        let r = cache.extend(&chunks)?;
        for l in 0..LAYERS {
            let mut encoder = app.device.create_command_encoder(&Default::default());
            app.project(&mut encoder, a, l, l % 2);
            app.queue.submit([encoder.finish()]);
            let (q, k, v) = (
                download(&a.qkv[0])?,
                download(&a.qkv[1])?,
                download(&a.qkv[2])?,
            );
            cache.write(l, &r, &k, &v)?;
            let out = cache.prefill(l, &chunks, &q, &params)?;
            app.queue
                .write_buffer(&a.hidden[(l + 1) % 2], 0, bytemuck::cast_slice(&out));
        }
        if step == 0 {
            let h = download(&prefill.hidden[0])?;
            let first: Vec<f32> = last_rows
                .iter()
                .flat_map(|&r| h[r * HIDDEN..(r + 1) * HIDDEN].to_vec())
                .collect();
            app.queue
                .write_buffer(&decode.hidden[0], 0, bytemuck::cast_slice(&first));
        } else {
            host_out.extend(download(&decode.hidden[0])?);
        }
        kvq.synchronize()?;
        if step > 0 {
            host_ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }

    let diff = device_out
        .iter()
        .zip(&host_out)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let rms = (host_out.iter().map(|x| x * x).sum::<f32>() / host_out.len() as f32).sqrt();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{} sequences (prompts {:?}), {TOKENS} tokens each, {LAYERS} layers, {Q_HEADS} q / {KV_HEADS} kv heads, head_dim {D}, K int8 V int4",
        PROMPTS.len(),
        PROMPTS
    );
    println!(
        "per token: device path {:.2} ms (one submit), host API {:.2} ms",
        median(device_ms),
        median(host_ms)
    );
    println!("outputs: max |device - host| = {diff:e} (tolerance {TOLERANCE:e}), rms {rms:.3}");
    if diff > TOLERANCE || !diff.is_finite() || host_out.len() != device_out.len() {
        return Err(kvq::Error::Device(format!(
            "device path and host API differ by {diff}"
        )));
    }
    Ok(())
}
