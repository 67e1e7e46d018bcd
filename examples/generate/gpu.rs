//! The forward pass on a wgpu device: the model's own WGSL kernels (`shaders/`)
//! for everything but attention, kvq's cache for K/V and attention through the
//! device path. A step is one encoder and one submit: each layer's kernels, its
//! `record_append` and `record_attention`, then the logits, read back once.

use std::sync::Arc;

use kvq::wgpu::WgpuBackend;
use kvq::{Backend, Encoder, KvDtype, Result, Tensor};
use wgpu::util::DeviceExt;

use crate::model::{Forward, Matrix, Model, Sequence};
use crate::profile::Profile;

/// Most tokens one forward call takes (prefill runs in chunks of it).
pub const MAX_ROWS: usize = 256;

const MATMUL: &str = include_str!("shaders/matmul.wgsl");
const RMSNORM: &str = include_str!("shaders/rmsnorm.wgsl");
const ROPE: &str = include_str!("shaders/rope.wgsl");
const SWIGLU: &str = include_str!("shaders/swiglu.wgsl");
const EMBED: &str = include_str!("shaders/embed.wgsl");

/// Rows of an invocation of the matmul kernel (its `ROWS`) when a step has more
/// than one; a decode step's kernel takes one.
const MATMUL_ROWS: usize = 8;

/// A kernel and the bind group of one use of it: the pipeline for a one-row
/// step and for a longer one (the same but for the matmul).
struct Call {
    /// The kernel, for profiles.
    name: &'static str,
    one: wgpu::ComputePipeline,
    many: wgpu::ComputePipeline,
    group: wgpu::BindGroup,
}

impl Call {
    /// The pipeline and bind group for a step of `rows` rows.
    fn at(&self, rows: usize) -> (&wgpu::ComputePipeline, &wgpu::BindGroup) {
        let p = if rows == 1 { &self.one } else { &self.many };
        (p, &self.group)
    }
}

/// The bind groups of one layer's kernels.
struct LayerCalls {
    attn_norm: Call,
    q: Call,
    k: Call,
    v: Call,
    rope: Call,
    o: Call,
    ffn_norm: Call,
    gate: Call,
    up: Call,
    swiglu: Call,
    down: Call,
}

/// The model's weights, activations and kernels on one device, shared by every
/// cache that runs on it.
pub struct Gpu {
    pub kvq: Arc<WgpuBackend>,
    device: wgpu::Device,
    queue: wgpu::Queue,
    /// `(count, first)` of the step's rows; of the rows that get logits, in the
    /// hidden state (`tail_rows`) and once normed into the start of `h`.
    all_rows: wgpu::Buffer,
    tail_rows: wgpu::Buffer,
    head_rows: wgpu::Buffer,
    tokens: wgpu::Buffer,
    rope_table: wgpu::Buffer,
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    att: wgpu::Buffer,
    logits: wgpu::Buffer,
    embed: Call,
    layers: Vec<LayerCalls>,
    out_norm: Call,
    output: Call,
    /// Keeps the weights' buffers alive with the bind groups.
    _weights: Vec<wgpu::Buffer>,
}

fn storage(device: &wgpu::Device, label: &str, floats: usize) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: (floats.max(1) * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

fn upload(device: &wgpu::Device, label: &str, bytes: &[u8]) -> wgpu::Buffer {
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: bytes,
        usage: wgpu::BufferUsages::STORAGE,
    })
}

/// `m` as stored, `[rows][cols]` f16 (the embedding table's layout).
fn matrix(device: &wgpu::Device, m: &Matrix) -> wgpu::Buffer {
    let bits: Vec<u16> = m.data.iter().map(|h| h.to_bits()).collect();
    upload(device, "weights", bytemuck::cast_slice(&bits))
}

/// `m` transposed, `[cols][rows]` f16: the matmul kernel's layout.
fn transposed(device: &wgpu::Device, m: &Matrix) -> wgpu::Buffer {
    let mut bits = vec![0u16; m.data.len()];
    for (o, row) in m.data.chunks_exact(m.cols).enumerate() {
        for (k, h) in row.iter().enumerate() {
            bits[k * m.rows + o] = h.to_bits();
        }
    }
    upload(device, "weights", bytemuck::cast_slice(&bits))
}

impl Gpu {
    /// Opens the first adapter whose name contains `WGPU_ADAPTER_NAME` (any
    /// adapter if unset) that kvq can run on, and uploads `model`.
    pub fn open(model: &Model) -> Result<Gpu> {
        let want = std::env::var("WGPU_ADAPTER_NAME")
            .unwrap_or_default()
            .to_lowercase();
        let mut why = Vec::new();
        for adapter in pollster::block_on(kvq::wgpu::adapters()) {
            let name = adapter.get_info().name;
            if !name.to_lowercase().contains(&want) {
                continue;
            }
            match WgpuBackend::from_adapter(&adapter) {
                Ok(b) => return Gpu::new(Arc::new(b), model),
                Err(e) => why.push(format!("{name}: {e}")),
            }
        }
        Err(kvq::Error::NoBackend(format!(
            "no wgpu adapter named like {want:?} runs kvq{}{}",
            if why.is_empty() { "" } else { ": " },
            why.join("; ")
        )))
    }

    /// `model` on `kvq`'s device.
    pub fn new(kvq: Arc<WgpuBackend>, model: &Model) -> Result<Gpu> {
        let device = kvq.device().clone();
        let queue = kvq.queue().clone();
        let c = &model.config;
        let w = &model.weights;
        let (qw, kw) = c.qk_widths();
        // The matmul reads x four columns at a time and writes y two at a time.
        if [c.hidden, qw, c.ffn].iter().any(|n| n % 4 != 0)
            || [kw, c.vocab].iter().any(|n| n % 2 != 0)
        {
            return Err(kvq::Error::InvalidConfig(format!(
                "the GPU forward pass needs hidden, q and FFN widths that are multiples of 4 and even K/V widths and vocabulary, not {}, {qw}, {}, {kw} and {}",
                c.hidden, c.ffn, c.vocab
            )));
        }
        let d = &device;
        let rows_buffer = |label| {
            d.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 16,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        let all_rows = rows_buffer("rows");
        let tail_rows = rows_buffer("logit rows");
        let head_rows = rows_buffer("normed logit rows");
        let tokens = storage(d, "tokens", MAX_ROWS);
        let rope_table = storage(d, "rope table", MAX_ROWS * c.head_dim);
        let x = storage(d, "hidden", MAX_ROWS * c.hidden);
        let h = storage(d, "normed", MAX_ROWS * c.hidden);
        let q = storage(d, "q", MAX_ROWS * qw);
        let k = storage(d, "k", MAX_ROWS * kw);
        let v = storage(d, "v", MAX_ROWS * kw);
        let att = storage(d, "attention", MAX_ROWS * qw);
        let g = storage(d, "gate", MAX_ROWS * c.ffn);
        let u = storage(d, "up", MAX_ROWS * c.ffn);
        let logits = storage(d, "logits", MAX_ROWS * c.vocab);

        let module = |label, src: &str| {
            d.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(src.into()),
            })
        };
        let (matmul_m, norm_m, rope_m, swiglu_m, embed_m) = (
            module("matmul", MATMUL),
            module("rmsnorm", RMSNORM),
            module("rope", ROPE),
            module("swiglu", SWIGLU),
            module("embed", EMBED),
        );
        // The matmul's two pipelines share one bind group, so its layout is
        // explicit (an automatic layout belongs to one pipeline).
        let entry = |binding, ty| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let storage_ty = |read_only| wgpu::BufferBindingType::Storage { read_only };
        let matmul_group = d.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("matmul"),
            entries: &[
                entry(0, wgpu::BufferBindingType::Uniform),
                entry(1, storage_ty(true)),
                entry(2, storage_ty(true)),
                entry(3, storage_ty(false)),
            ],
        });
        let matmul_layout = d.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("matmul"),
            bind_group_layouts: &[Some(&matmul_group)],
            immediate_size: 0,
        });
        let compile = |m: &wgpu::ShaderModule,
                       layout: Option<&wgpu::PipelineLayout>,
                       constants: &[(&str, f64)]| {
            d.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: None,
                layout,
                module: m,
                entry_point: Some("main"),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            })
        };
        let pipeline = |name, m: &wgpu::ShaderModule, constants: &[(&str, f64)]| {
            let p = compile(m, None, constants);
            (name, p.clone(), p)
        };
        let matmul = |name, inputs: usize, outputs: usize, acc: bool| {
            let rows = |r: usize| {
                compile(
                    &matmul_m,
                    Some(&matmul_layout),
                    &[
                        ("IN", inputs as f64),
                        ("OUT", outputs as f64),
                        ("ACCUMULATE", acc as u8 as f64),
                        ("ROWS", r as f64),
                    ],
                )
            };
            (name, rows(1), rows(MATMUL_ROWS))
        };
        type Pipelines = (&'static str, wgpu::ComputePipeline, wgpu::ComputePipeline);
        let call = |(name, one, many): &Pipelines, buffers: &[&wgpu::Buffer]| {
            let entries: Vec<_> = buffers
                .iter()
                .enumerate()
                .map(|(i, b)| wgpu::BindGroupEntry {
                    binding: i as u32,
                    resource: b.as_entire_binding(),
                })
                .collect();
            Call {
                name,
                one: one.clone(),
                many: many.clone(),
                group: d.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &one.get_bind_group_layout(0),
                    entries: &entries,
                }),
            }
        };
        let norm_p = pipeline(
            "rmsnorm",
            &norm_m,
            &[("N", c.hidden as f64), ("EPS", c.norm_eps as f64)],
        );
        let rope_p = pipeline(
            "rope",
            &rope_m,
            &[
                ("Q_HEADS", c.q_heads as f64),
                ("KV_HEADS", c.kv_heads as f64),
                ("D", c.head_dim as f64),
            ],
        );
        let swiglu_p = pipeline("swiglu", &swiglu_m, &[("N", c.ffn as f64)]);
        let embed_p = pipeline("embed", &embed_m, &[("N", c.hidden as f64)]);
        let (q_p, kv_p, o_p) = (
            matmul("matmul qkvo", c.hidden, qw, false),
            matmul("matmul qkvo", c.hidden, kw, false),
            matmul("matmul qkvo", qw, c.hidden, true),
        );
        let (ffn_p, down_p) = (
            matmul("matmul ffn", c.hidden, c.ffn, false),
            matmul("matmul ffn", c.ffn, c.hidden, true),
        );

        let mut weights = Vec::new();
        let mut keep = |b: wgpu::Buffer| {
            weights.push(b.clone());
            b
        };
        let embed_w = keep(matrix(d, &w.embed));
        let embed = call(&embed_p, &[&all_rows, &embed_w, &tokens, &x]);
        let layers = w
            .layers
            .iter()
            .map(|lw| {
                let attn_norm = keep(upload(d, "norm", bytemuck::cast_slice(&lw.attn_norm)));
                let ffn_norm = keep(upload(d, "norm", bytemuck::cast_slice(&lw.ffn_norm)));
                let [wq, wk, wv, wo, wg, wu, wd] =
                    [&lw.wq, &lw.wk, &lw.wv, &lw.wo, &lw.gate, &lw.up, &lw.down]
                        .map(|m| keep(transposed(d, m)));
                LayerCalls {
                    attn_norm: call(&norm_p, &[&all_rows, &attn_norm, &x, &h]),
                    q: call(&q_p, &[&all_rows, &wq, &h, &q]),
                    k: call(&kv_p, &[&all_rows, &wk, &h, &k]),
                    v: call(&kv_p, &[&all_rows, &wv, &h, &v]),
                    rope: call(&rope_p, &[&all_rows, &rope_table, &q, &k]),
                    o: call(&o_p, &[&all_rows, &wo, &att, &x]),
                    ffn_norm: call(&norm_p, &[&all_rows, &ffn_norm, &x, &h]),
                    gate: call(&ffn_p, &[&all_rows, &wg, &h, &g]),
                    up: call(&ffn_p, &[&all_rows, &wu, &h, &u]),
                    swiglu: call(&swiglu_p, &[&all_rows, &u, &g]),
                    down: call(&down_p, &[&all_rows, &wd, &g, &x]),
                }
            })
            .collect();
        let out_norm_w = keep(upload(d, "norm", bytemuck::cast_slice(&w.out_norm)));
        let out_norm = call(&norm_p, &[&tail_rows, &out_norm_w, &x, &h]);
        let output_w = keep(transposed(d, w.output()));
        // The logits read the normed tail rows from h's start.
        let output_p = matmul("matmul logits", c.hidden, c.vocab, false);
        let output = call(&output_p, &[&head_rows, &output_w, &h, &logits]);
        Ok(Gpu {
            kvq,
            device,
            queue,
            all_rows,
            tail_rows,
            head_rows,
            tokens,
            rope_table,
            q,
            k,
            v,
            att,
            logits,
            embed,
            layers,
            out_norm,
            output,
            _weights: weights,
        })
    }
}

impl Gpu {
    /// The adapter and API, for reports.
    pub fn kvq_name(&self) -> String {
        let info = self.kvq.info();
        format!("{} ({})", info.name, info.api)
    }
}

/// `calls`, each a kernel for a step of `rows` rows and its grid: one compute
/// pass, or while profiling one timed pass per call.
fn pass(
    enc: &mut wgpu::CommandEncoder,
    profile: &mut Option<Profile>,
    rows: usize,
    calls: &[(&Call, [u32; 2])],
) -> Result<()> {
    let dispatch = |pass: &mut wgpu::ComputePass<'_>, call: &Call, [x, y]: [u32; 2]| {
        let (pipeline, group) = call.at(rows);
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, group, &[]);
        pass.dispatch_workgroups(x, y, 1);
    };
    match profile {
        None => {
            let mut pass = enc.begin_compute_pass(&Default::default());
            for &(call, grid) in calls {
                dispatch(&mut pass, call, grid);
            }
        }
        Some(p) => {
            for &(call, grid) in calls {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(call.name),
                    timestamp_writes: Some(p.writes(call.name)?),
                });
                dispatch(&mut pass, call, grid);
            }
        }
    }
    Ok(())
}

/// Workgroups of 64 invocations for `n` of them.
fn groups(n: usize) -> [u32; 2] {
    [n.div_ceil(64) as u32, 1]
}

/// One sequence of the model on a [`Gpu`], its K/V in a kvq cache there.
pub struct GpuForward<'g> {
    model: &'g Model,
    gpu: &'g Gpu,
    s: Sequence,
    profile: Option<Profile>,
}

impl<'g> GpuForward<'g> {
    /// A cache of `capacity` tokens of `(k, v)` dtypes on `gpu`.
    pub fn new(
        model: &'g Model,
        gpu: &'g Gpu,
        kv: (KvDtype, KvDtype),
        rotate: bool,
        capacity: usize,
    ) -> Result<Self> {
        let s = Sequence::new(model, gpu.kvq.clone(), kv, rotate, capacity)?;
        Ok(GpuForward {
            model,
            gpu,
            s,
            profile: None,
        })
    }

    /// Times every step's kernels from now on (see [`Profile`]).
    pub fn profile(&mut self) -> std::result::Result<(), String> {
        self.profile = Some(Profile::new(&self.gpu.kvq)?);
        Ok(())
    }

    /// The device time of the steps since [`Self::profile`], and resets it.
    pub fn take_profile(&mut self) -> Option<Profile> {
        let p = self.profile.take()?;
        self.profile = Profile::new(&self.gpu.kvq).ok();
        Some(p)
    }
}

impl Forward for GpuForward<'_> {
    fn forward(&mut self, tokens: &[u32], logit_rows: usize) -> Result<Vec<f32>> {
        let c = &self.model.config;
        let g = self.gpu;
        let n = tokens.len();
        if n == 0 || n > MAX_ROWS || logit_rows > n {
            return Err(kvq::Error::InvalidConfig(format!(
                "a forward call takes 1..={MAX_ROWS} tokens and at most as many logit rows, not {n} and {logit_rows}"
            )));
        }
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(kvq::Error::InvalidConfig(format!(
                "token {t} is past the vocabulary"
            )));
        }
        // On GL, kvq's lock around the app's device work too (WgpuBackend::hold).
        let _gl = g.kvq.hold();
        let start = self.s.cache.seq_len(self.s.seq)?;
        let plan = if n == 1 {
            self.s.cache.plan_decode(&[self.s.seq], &self.s.params)?
        } else {
            self.s
                .cache
                .plan_prefill(&[(self.s.seq, n)], &self.s.params)?
        };
        let l = logit_rows;
        let q = &g.queue;
        q.write_buffer(&g.all_rows, 0, bytemuck::cast_slice(&[n as u32, 0]));
        q.write_buffer(
            &g.tail_rows,
            0,
            bytemuck::cast_slice(&[l as u32, (n - l) as u32]),
        );
        q.write_buffer(&g.head_rows, 0, bytemuck::cast_slice(&[l as u32, 0]));
        q.write_buffer(&g.tokens, 0, bytemuck::cast_slice(tokens));
        let table = self.model.rope_table(start..start + n);
        q.write_buffer(&g.rope_table, 0, bytemuck::cast_slice(&table));

        let (qw, kw) = c.qk_widths();
        // An invocation per output pair and (for more than one row) per
        // MATMUL_ROWS rows.
        let mm = |outputs: usize, rows: usize| {
            let per = if rows == 1 { 1 } else { MATMUL_ROWS };
            [(outputs / 2).div_ceil(64) as u32, rows.div_ceil(per) as u32]
        };
        let rows = [n as u32, 1];
        let rope = groups(n * (c.q_heads + c.kv_heads) * c.head_dim / 2);
        let mut enc = g.device.create_command_encoder(&Default::default());
        let prof = &mut self.profile;
        pass(&mut enc, prof, n, &[(&g.embed, groups(n * c.hidden / 2))])?;
        let t = WgpuBackend::buffer;
        let (qb, kb, vb, ab) = (t(&g.q), t(&g.k), t(&g.v), t(&g.att));
        for (layer, lc) in g.layers.iter().enumerate() {
            pass(
                &mut enc,
                prof,
                n,
                &[
                    (&lc.attn_norm, rows),
                    (&lc.q, mm(qw, n)),
                    (&lc.k, mm(kw, n)),
                    (&lc.v, mm(kw, n)),
                    (&lc.rope, rope),
                ],
            )?;
            let mut e = Encoder::Wgpu(&mut enc);
            self.s.cache.record_append(
                &mut e,
                &plan,
                layer,
                &Tensor::f32(&kb),
                &Tensor::f32(&vb),
            )?;
            self.s.cache.record_attention(
                &mut e,
                &plan,
                layer,
                &Tensor::f32(&qb),
                &Tensor::f32(&ab),
            )?;
            pass(
                &mut enc,
                prof,
                n,
                &[
                    (&lc.o, mm(c.hidden, n)),
                    (&lc.ffn_norm, rows),
                    (&lc.gate, mm(c.ffn, n)),
                    (&lc.up, mm(c.ffn, n)),
                    (&lc.swiglu, groups(n * c.ffn)),
                    (&lc.down, mm(c.hidden, n)),
                ],
            )?;
        }
        if l > 0 {
            pass(
                &mut enc,
                prof,
                l,
                &[(&g.out_norm, [l as u32, 1]), (&g.output, mm(c.vocab, l))],
            )?;
        }
        if let Some(p) = prof {
            p.resolve(&g.kvq, &mut enc);
        }
        g.queue.submit([enc.finish()]);
        if let Some(p) = prof {
            p.take(&g.kvq)?;
        }
        if l == 0 {
            g.kvq.synchronize()?;
            return Ok(Vec::new());
        }
        let words = g.kvq.download(&t(&g.logits), 0, l * c.vocab)?;
        Ok(bytemuck::cast_slice(&words).to_vec())
    }

    fn sequence(&self) -> &Sequence {
        &self.s
    }

    fn sequence_mut(&mut self) -> &mut Sequence {
        &mut self.s
    }
}
