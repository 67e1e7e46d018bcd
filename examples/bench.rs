//! Decode attention speed per dtype and context, against a streaming-read roofline
//! measured in the same run on the same device (DESIGN §5).
//!
//!     cargo run --release --example bench -- --backend wgpu --context 1024,4096,16384 \
//!         --batch 1,16 --q-heads 32 --kv-heads 8 --head-dim 128 --dtypes f16,int8,int4 \
//!         [--json] [--plot FILE.svg] [--iters N] [--prefill N] [--append] [--generic]
//!         [--no-subgroups] [--lane-floats N] [--wall]
//!
//! `--prefill N` times causal prefill of the last N tokens of each sequence instead
//! of decode; `--append` times quantize-append of `context` tokens. `--generic`
//! runs wgpu's GPU-shaped attention kernel even on a CPU adapter, where
//! `attention_lanes.wgsl` is otherwise chosen; `--no-subgroups` makes it sum over a
//! key's lanes through workgroup memory, and `--lane-floats N` sets its register
//! budget per lane (see `kvq::attn::work::lane_shape`).
//!
//! A dtype is `K` or `K/V` (e.g. `int8/int4`). Times are medians after warm-up of
//! the device time of the call's kernels, from timestamp queries where the device
//! has them (DESIGN §5), otherwise (or with `--wall`) of wall-clock time from submit
//! to completion. Every dtype's call and its roofline are timed in the same
//! interleaved rounds, and "vs f16" is the median over rounds of the call's time
//! over F16's in that round, so that ratios hold on a shared, noisy machine.

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;

use kvq::backend::{BackendKind, DeviceBuffer, Step, Tensor};
use kvq::cache::Plan;
use kvq::{AttnParams, Backend, CacheConfig, Error, KvCache, KvDtype, Preference, Result};

/// Decode attention speed per dtype and context, against a streaming-read roofline
/// measured in the same run on the same device.
///
/// Times are medians after warm-up of the device time of the call's kernels, from
/// timestamp queries where the device has them, otherwise (or with `--wall`) of
/// wall-clock time from submit to completion. Every dtype's call and its roofline
/// are timed in the same interleaved rounds; "vs f16" is the median over rounds of
/// the call's time over F16's in that round.
#[derive(clap::Parser)]
#[command(name = "bench")]
struct Opts {
    /// Backend to time (cpu, wgpu or cuda); without it, the best one found.
    #[arg(long)]
    backend: Option<BackendKind>,
    /// Run wgpu's GPU-shaped attention kernel even on a CPU adapter.
    #[arg(long)]
    generic: bool,
    /// Make the generic kernel sum over a key's lanes through workgroup memory.
    #[arg(long)]
    no_subgroups: bool,
    /// Register budget per lane of the generic kernel.
    #[arg(long, value_name = "N")]
    lane_floats: Option<u32>,
    /// Time wall-clock from submit to completion, not the device's timestamps.
    #[arg(long)]
    wall: bool,
    /// Context lengths (tokens per sequence), comma-separated.
    #[arg(long = "context", value_name = "N,..", value_delimiter = ',', value_parser = count,
          default_value = "1024,4096,16384")]
    contexts: Vec<usize>,
    /// Batch sizes (sequences per call), comma-separated.
    #[arg(long = "batch", value_name = "N,..", value_delimiter = ',', value_parser = count,
          default_value = "1")]
    batches: Vec<usize>,
    /// Query heads.
    #[arg(long, default_value_t = 32)]
    q_heads: usize,
    /// KV heads.
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    /// Head dimension.
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    #[arg(long, value_name = "K[/V],..", value_delimiter = ',',
          default_value = "f16,int8,int4", value_parser = KvDtype::parse_pair,
          help = format!("K/V dtype pairs, comma-separated: `K` or `K/V` (e.g. int8/int4), \
                          each one of {}", KvDtype::NAMES))]
    dtypes: Vec<(KvDtype, KvDtype)>,
    /// One line of JSON per row instead of the table.
    #[arg(long)]
    json: bool,
    /// Also plot time against context to this SVG file.
    #[arg(long, value_name = "FILE")]
    plot: Option<String>,
    /// Timed rounds (after two warm-up rounds); at least 1.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Time causal prefill of the last N tokens of each sequence instead of decode.
    #[arg(long, value_name = "N", default_value_t = 0)]
    prefill: usize,
    /// Time quantize-append of the first context's tokens instead.
    #[arg(long)]
    append: bool,
}

/// A count in a comma list (spaces around it allowed).
fn count(s: &str) -> std::result::Result<usize, String> {
    s.trim().parse().map_err(|e| format!("{e}"))
}

/// The command line (clap prints help, or a bad flag and exits 2), checked.
fn parse() -> Result<Opts> {
    let mut o = Opts::parse();
    o.iters = o.iters.max(1);
    if o.contexts.iter().any(|&c| c < o.prefill) {
        return Err(Error::InvalidConfig(
            "--prefill is longer than a context".into(),
        ));
    }
    if o.batches.is_empty() || o.batches.contains(&0) || o.contexts.contains(&0) {
        return Err(Error::InvalidConfig(
            "batch and contexts must be positive".into(),
        ));
    }
    Ok(o)
}

impl Opts {
    /// The kernel options given, for the JSON rows: "default" or e.g.
    /// "generic no-subgroups lane-floats=32".
    fn variant(&self) -> String {
        let mut v = Vec::new();
        if self.generic {
            v.push("generic".to_string());
        }
        if self.no_subgroups {
            v.push("no-subgroups".to_string());
        }
        if let Some(n) = self.lane_floats {
            v.push(format!("lane-floats={n}"));
        }
        if v.is_empty() {
            "default".into()
        } else {
            v.join(" ")
        }
    }
}

struct Row {
    k: KvDtype,
    v: KvDtype,
    batch: usize,
    context: usize,
    median_us: f64,
    bytes: usize,
    roofline_gbps: f64,
    /// Median over rounds of this call's time over F16's in the same round.
    vs_f16: Option<f64>,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// A timed call: it waits for its work and returns the device time of its kernels
/// in µs, if the backend recorded it.
type Call<'a> = Box<dyn FnMut() -> Result<Option<f64>> + 'a>;

/// The device time (µs) of the kernels since the last read, if timing is on.
fn device_us(b: &Arc<dyn Backend>) -> Result<Option<f64>> {
    Ok(b.take_device_time()?.map(|d| d.as_secs_f64() * 1e6))
}

fn time(b: &Arc<dyn Backend>, iters: usize, f: impl FnMut() -> Result<Option<f64>>) -> Result<f64> {
    let mut calls: [Call<'_>; 1] = [Box::new(f)];
    Ok(median(time_rounds(b, iters, &mut calls)?.remove(0)))
}

/// Times (µs) of each call in `iters` rounds after two warm-up rounds: its device
/// time where it returns one, else wall-clock time. A round runs every call once,
/// starting from a different one each time, so that load from other tenants of a
/// shared machine falls on every call alike and the times of one round can be
/// compared with each other.
fn time_rounds(
    b: &Arc<dyn Backend>,
    iters: usize,
    calls: &mut [Call<'_>],
) -> Result<Vec<Vec<f64>>> {
    // Setup (filling the caches) is not timed: drop what the timer holds of it,
    // whether or not it overflowed.
    let _ = b.take_device_time();
    let n = calls.len();
    for _ in 0..2.min(iters) {
        for f in calls.iter_mut() {
            f()?;
        }
    }
    let mut t = vec![Vec::with_capacity(iters); n];
    for round in 0..iters {
        for i in (0..n).map(|j| (round + j) % n) {
            let start = Instant::now();
            let device = calls[i]()?;
            t[i].push(device.unwrap_or_else(|| start.elapsed().as_secs_f64() * 1e6));
        }
    }
    Ok(t)
}

/// One dtype's decode (or prefill) call over `batch` sequences of `context` tokens,
/// with everything it needs already on the device, and a buffer of the same bytes
/// for the streaming-read roofline.
struct Case {
    k: KvDtype,
    v: KvDtype,
    cache: KvCache,
    /// Attention of the last `--prefill` (or one) positions of every sequence,
    /// planned once.
    plan: Plan,
    q: DeviceBuffer,
    out: DeviceBuffer,
    bytes: usize,
    stream: DeviceBuffer,
}

impl Case {
    fn new(
        b: &Arc<dyn Backend>,
        o: &Opts,
        (k, v): (KvDtype, KvDtype),
        batch: usize,
        context: usize,
    ) -> Result<Case> {
        let cfg = CacheConfig::new(1, o.kv_heads, o.head_dim, batch * context).with_dtypes(k, v);
        let mut cache = KvCache::new(b.clone(), cfg)?;
        let row = o.kv_heads * o.head_dim;
        let mut ids = Vec::new();
        let chunk = 4096;
        let mut x = 0x9E3779B9u32;
        let mut noise = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x >> 8) as f32 / (1 << 24) as f32 - 0.5
                })
                .collect()
        };
        for _ in 0..batch {
            let s = cache.add_sequence();
            let mut done = 0;
            while done < context {
                let n = chunk.min(context - done);
                let (kk, vv) = (noise(n * row), noise(n * row));
                cache.append(&[(s, n)], &kk, &vv)?;
                done += n;
            }
            ids.push(s);
        }
        let q_len = o.prefill.max(1);
        let batch_q: Vec<_> = ids.iter().map(|&s| (s, q_len)).collect();
        let plan = cache.plan_attention(&batch_q, &AttnParams::new(o.q_heads))?;
        let rows = batch * q_len * o.q_heads * o.head_dim;
        let q = b.alloc(rows)?;
        b.upload(&q, 0, bytemuck::cast_slice(&noise(rows)))?;
        let bytes = batch
            * context
            * o.kv_heads
            * (k.bytes_per_token_head(o.head_dim) + v.bytes_per_token_head(o.head_dim));
        Ok(Case {
            k,
            v,
            plan,
            q,
            out: b.alloc(rows)?,
            bytes,
            // The roofline reads as many bytes from a buffer of its own, no larger than
            // one buffer may be.
            stream: b.alloc(bytes.min(b.info().limits.max_buffer_bytes as usize) / 4)?,
            cache,
        })
    }

    /// One device-synchronised decode (or prefill) call, planned beforehand.
    fn attend(&self, b: &Arc<dyn Backend>) -> Result<Option<f64>> {
        let (q, out) = (Tensor::f32(&self.q), Tensor::f32(&self.out));
        b.run(&mut |enc| self.cache.record_attention(enc, &self.plan, 0, &q, &out))?;
        b.synchronize()?;
        device_us(b)
    }

    /// Streaming reads of as many bytes as the call reads, in passes over the buffer.
    fn stream(&self, b: &Arc<dyn Backend>) -> Result<Option<f64>> {
        let mut left = self.bytes / 4;
        while left > 0 {
            let n = left.min(self.stream.words());
            b.stream(&self.stream, n)?;
            left -= n;
        }
        device_us(b)
    }
}

/// Every dtype at one batch and context: attention and roofline calls timed in the
/// same rounds.
fn bench_context(b: &Arc<dyn Backend>, o: &Opts, batch: usize, context: usize) -> Result<Vec<Row>> {
    // A pair the backend cannot store (int4c on CUDA, say) is skipped, said so.
    let mut cases = Vec::new();
    for &kv in &o.dtypes {
        match Case::new(b, o, kv, batch, context) {
            Ok(c) => cases.push(c),
            Err(Error::Unsupported(why)) => eprintln!("skipped K {} V {}: {why}", kv.0, kv.1),
            Err(e) => return Err(e),
        }
    }
    let mut calls: Vec<Call<'_>> = Vec::new();
    for c in &cases {
        calls.push(Box::new(move || c.attend(b)));
        calls.push(Box::new(move || c.stream(b)));
    }
    let times = time_rounds(b, o.iters, &mut calls)?;
    let f16 = cases
        .iter()
        .position(|c| (c.k, c.v) == (KvDtype::F16, KvDtype::F16))
        .map(|i| &times[2 * i]);
    Ok(cases
        .iter()
        .zip(times.chunks(2))
        .map(|(c, t)| Row {
            k: c.k,
            v: c.v,
            batch,
            context,
            median_us: median(t[0].clone()),
            bytes: c.bytes,
            roofline_gbps: c.bytes as f64 / median(t[1].clone()) / 1e3,
            // Paired by round, so that a slow spell of the machine cancels out.
            vs_f16: f16.map(|f| median(t[0].iter().zip(f).map(|(x, y)| x / y).collect())),
        })
        .collect())
}

/// Median time of one quantize-append of `context` tokens (first context) per dtype,
/// sources already on the device.
fn bench_append(b: &Arc<dyn Backend>, o: &Opts) -> Result<()> {
    let tokens = o.contexts[0];
    println!(
        "quantize-append of {tokens} tokens x {} kv heads x {} dims (K and V)",
        o.kv_heads, o.head_dim
    );
    for &(k, v) in &o.dtypes {
        let cfg = CacheConfig::new(1, o.kv_heads, o.head_dim, tokens).with_dtypes(k, v);
        let mut cache = KvCache::new(b.clone(), cfg)?;
        let n = tokens * o.kv_heads * o.head_dim;
        let src: Vec<u32> = (0..n)
            .map(|i| ((i % 1000) as f32 / 500.0 - 1.0).to_bits())
            .collect();
        let buf = b.alloc(n)?;
        b.upload(&buf, 0, &src)?;
        // Where one sequence's tokens go (Int4Channel keys: the blocks they fill).
        let s = cache.add_sequence();
        let ext = cache.extend(&[(s, tokens)])?.extension().clone();
        let (kp, vp) = cache.pools(0)?;
        let step = match b.prepare(&Step {
            k: &kp.layout,
            v: &vp.layout,
            slots: &ext.slots,
            open_slots: &ext.open_slots,
            seals: &ext.seals,
            seqs: &[],
            tables: &[],
            params: None,
            decode: false,
        }) {
            Err(Error::Unsupported(why)) => {
                eprintln!("skipped K {k} V {v}: {why}");
                continue;
            }
            step => step?,
        };
        let src = Tensor::f32(&buf);
        let us = time(b, o.iters, || {
            b.run(&mut |enc| b.record_append(enc, &step, (kp, vp), &src, &src))?;
            b.synchronize()?;
            device_us(b)
        })?;
        println!(
            "K {k:<9} V {v:<9} {us:>10.0} us  ({:.2} GB/s of f32 input)",
            2.0 * n as f64 * 4.0 / us / 1e3
        );
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let o = parse()?;
    let pref = match o.backend {
        Some(kind) => Preference::only(kind),
        None => Preference::default(),
    };
    let chosen = kvq::select(&pref)?;
    let mut b = chosen.backend;
    let tuned = o.generic || o.no_subgroups || o.lane_floats.is_some();
    if tuned && b.info().kind == BackendKind::Wgpu {
        let mut w = kvq::wgpu::WgpuBackend::open_named(&b.info().name)?;
        // Reopened by name, which llvmpipe's Vulkan and GL adapters share.
        if w.info().api != b.info().api {
            return Err(Error::NoBackend(format!(
                "reopened {:?} on {}, not {}",
                b.info().name,
                w.info().api,
                b.info().api
            )));
        }
        if o.generic {
            w = w.without_lanes();
        }
        if o.no_subgroups {
            w = w.without_subgroups();
        }
        if let Some(n) = o.lane_floats {
            w = w.with_lane_floats(n);
        }
        b = Arc::new(w);
    }
    let clock = if !o.wall && b.set_timing(true) {
        "device"
    } else {
        "wall"
    };
    if o.append {
        println!("backend: {}; {clock} time", chosen.reason);
        return bench_append(&b, &o);
    }
    if !o.json {
        println!("backend: {}", chosen.reason);
        println!(
            "{}q_heads {} kv_heads {} head_dim {}; medians of {} rounds of {clock} time\n",
            match o.prefill {
                0 => "decode, ".to_string(),
                n => format!("prefill of the last {n} tokens, "),
            },
            o.q_heads,
            o.kv_heads,
            o.head_dim,
            o.iters
        );
        println!(
            "{:<9} {:<9} {:>5} {:>7} {:>11} {:>10} {:>8} {:>10} {:>6} {:>8}",
            "K", "V", "batch", "context", "median_us", "MB", "GB/s", "roof GB/s", "roof%", "vs f16"
        );
    }
    let mut rows = Vec::new();
    for &batch in &o.batches {
        for &context in &o.contexts {
            for r in bench_context(&b, &o, batch, context)? {
                print_row(&o, b.info(), clock, &r);
                rows.push(r);
            }
        }
    }
    if let Some(path) = &o.plot {
        plot(path, &rows).map_err(|e| Error::InvalidConfig(format!("plot {path}: {e}")))?;
        if !o.json {
            println!("\nplot written to {path}");
        }
    }
    Ok(())
}

/// One line of `--json`: one row, keys in this order (tools/gpu-check reads them).
#[derive(serde::Serialize)]
struct Record<'a> {
    backend: String,
    adapter: &'a str,
    k_dtype: String,
    v_dtype: String,
    context: usize,
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    prefill: usize,
    median_us: f64,
    bytes: usize,
    gbps: f64,
    roofline_gbps: f64,
    /// `null` without an F16 row to compare with.
    vs_f16: Option<f64>,
    clock: &'a str,
    variant: String,
}

/// `x` to `digits` decimals, as the JSON rows give it.
fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// One row: a line of JSON with `--json`, of the table otherwise.
fn print_row(o: &Opts, info: &kvq::BackendInfo, clock: &str, r: &Row) {
    let gbps = r.bytes as f64 / r.median_us / 1e3;
    if o.json {
        let record = Record {
            backend: info.kind.to_string(),
            adapter: &info.name,
            k_dtype: r.k.to_string(),
            v_dtype: r.v.to_string(),
            context: r.context,
            batch: r.batch,
            q_heads: o.q_heads,
            kv_heads: o.kv_heads,
            head_dim: o.head_dim,
            prefill: o.prefill,
            median_us: round(r.median_us, 1),
            bytes: r.bytes,
            gbps: round(gbps, 3),
            roofline_gbps: round(r.roofline_gbps, 3),
            vs_f16: r.vs_f16.map(|x| round(x, 4)),
            clock,
            variant: o.variant(),
        };
        let line = serde_json::to_string(&record).expect("a record serializes");
        println!("{line}");
    } else {
        let roof = format!("{:.2}", r.roofline_gbps);
        let frac = format!("{:.0}%", 100.0 * gbps / r.roofline_gbps);
        let ratio = r.vs_f16.map_or("-".into(), |x| format!("{x:.2}x"));
        println!(
            "{:<9} {:<9} {:>5} {:>7} {:>11.0} {:>10.2} {:>8.2} {:>10} {:>6} {:>8}",
            r.k.to_string(),
            r.v.to_string(),
            r.batch,
            r.context,
            r.median_us,
            r.bytes as f64 / 1e6,
            gbps,
            roof,
            frac,
            ratio
        );
    }
}

fn plot(path: &str, rows: &[Row]) -> std::result::Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_ctx = rows.iter().map(|r| r.context).max().unwrap_or(1) as f64;
    let max_us = rows.iter().map(|r| r.median_us).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption("kvq decode: time per call vs context", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_ctx * 1.05, 0.0..max_us * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("context (tokens)")
        .y_desc("median time (us)")
        .draw()?;
    let mut keys: Vec<(KvDtype, KvDtype)> = Vec::new();
    for r in rows {
        if !keys.contains(&(r.k, r.v)) {
            keys.push((r.k, r.v));
        }
    }
    for (i, &(k, v)) in keys.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| (r.k, r.v) == (k, v))
            .map(|r| (r.context as f64, r.median_us))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(format!("K {k} / V {v}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}
