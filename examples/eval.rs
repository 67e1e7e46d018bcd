//! Accuracy of attention over a quantized cache on real Q/K/V, against f64
//! attention over the unquantized inputs.
//!
//!     cargo run --release --example eval -- --q Q.npy --k K.npy --v V.npy \
//!         --k-dtype DTYPE --v-dtype DTYPE --mode decode|prefill \
//!         [--backend cpu|wgpu|cuda] [--rotate] [--out OUT.npy]
//!
//! Inputs are little-endian f32 `.npy` in C order: `q` is `[T, Hq, D]`, `k` and `v`
//! are `[T, Hkv, D]`. `decode` appends all T tokens and attends with `q[T-1]`
//! (output `[1, Hq, D]`); `prefill` appends and attends causally in chunks of at
//! most 512 tokens (output `[T, Hq, D]`). Scale 1/sqrt(D). Prints one line,
//! `nmse=<x> min_cos=<y> max_abs=<z>`; the backend used goes to stderr. Bad input
//! exits with status 2 and a one-line error, leaving no `--out` file.

use std::fs::File;
use std::process::ExitCode;

use clap::Parser;
use kvq::backend::BackendKind;
use kvq::reference::{attention_f64, error_stats};
use kvq::{AttnParams, CacheConfig, KvCache, KvDtype, Preference};
use npyz::WriterBuilder;

/// Longest prefill chunk.
const CHUNK: usize = 512;

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Mode {
    /// Append all T tokens, attend with the last query.
    Decode,
    /// Append and attend causally in chunks of at most 512 tokens.
    Prefill,
}

/// Accuracy of attention over a quantized cache on real Q/K/V, against f64
/// attention over the unquantized inputs. Prints `nmse=<x> min_cos=<y>
/// max_abs=<z>`; bad input exits with status 2 and a one-line error.
#[derive(clap::Parser)]
#[command(name = "eval", args_override_self = true)]
struct Opts {
    /// Queries: little-endian f32 `.npy`, C order, `[T, Hq, D]`.
    #[arg(long)]
    q: String,
    /// Keys: f32 `.npy`, `[T, Hkv, D]`.
    #[arg(long)]
    k: String,
    /// Values: f32 `.npy`, `[T, Hkv, D]`.
    #[arg(long)]
    v: String,
    #[arg(long, value_name = "DTYPE", help = dtype_help("keys"))]
    k_dtype: KvDtype,
    #[arg(long, value_name = "DTYPE", help = dtype_help("values"))]
    v_dtype: KvDtype,
    /// What to run.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Backend to run on (cpu, wgpu or cuda); without it, the best one found
    /// (`KVQ_BACKEND` and `KVQ_ADAPTER` apply).
    #[arg(long)]
    backend: Option<BackendKind>,
    /// Store K and V Walsh–Hadamard rotated (head_dim a power of two).
    #[arg(long)]
    rotate: bool,
    /// Writes the output here (f32 `.npy`); removed again if the run fails.
    #[arg(long)]
    out: Option<String>,
}

fn dtype_help(what: &str) -> String {
    format!("Dtype of the cached {what}: {}", KvDtype::NAMES)
}

/// A `[T, H, D]` f32 tensor.
struct Tensor {
    data: Vec<f32>,
    t: usize,
    h: usize,
    d: usize,
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Some messages (npyz's header parser) span several lines.
            let msg = e.to_string();
            let lines: Vec<&str> = msg
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("error: {}", lines.join(" "));
            ExitCode::from(2)
        }
    }
}

fn run() -> Res<()> {
    let o = parse()?;
    let (q, k, v) = (read(&o.q, "--q")?, read(&o.k, "--k")?, read(&o.v, "--v")?);
    check_shapes(&q, &k, &v)?;
    let Some(path) = &o.out else {
        return evaluate(&o, &q, &k, &v, None);
    };
    // Created first so that an unwritable path fails before any work; removed
    // again if anything fails later.
    let file = File::create(path).map_err(|e| format!("--out {path}: {e}"))?;
    let res = evaluate(&o, &q, &k, &v, Some((path, file)));
    if res.is_err() {
        let _ = std::fs::remove_file(path);
    }
    res
}

/// Runs the cache, writes `out` if given, then prints the stats and the backend.
fn evaluate(o: &Opts, q: &Tensor, k: &Tensor, v: &Tensor, out: Option<(&str, File)>) -> Res<()> {
    let (t, hq, hkv, d) = (q.t, q.h, k.h, q.d);
    let pref = match o.backend {
        Some(kind) => Preference::only(kind),
        None => Preference::default().with_env()?,
    };
    let chosen = kvq::select(&pref)?;
    let cfg = CacheConfig::new(1, hkv, d, t)
        .with_dtypes(o.k_dtype, o.v_dtype)
        .with_rotation(o.rotate);
    let mut cache = KvCache::new(chosen.backend, cfg)?;
    let seq = cache.add_sequence();
    let params = AttnParams::new(hq);
    let resolved = params.resolve(hkv, d)?;
    let (qrow, kvrow) = (hq * d, hkv * d);

    let (got, want) = match o.mode {
        Mode::Decode => {
            cache.append(&[(seq, t)], &k.data, &v.data)?;
            let last = &q.data[(t - 1) * qrow..];
            let out = cache.decode(0, &[seq], last, &params)?;
            (
                out,
                attention_f64(last, &k.data, &v.data, hkv, d, &resolved),
            )
        }
        Mode::Prefill => {
            let mut out = Vec::with_capacity(t * qrow);
            for a in (0..t).step_by(CHUNK) {
                let z = (a + CHUNK).min(t);
                let batch = [(seq, z - a)];
                cache.append(
                    &batch,
                    &k.data[a * kvrow..z * kvrow],
                    &v.data[a * kvrow..z * kvrow],
                )?;
                let chunk = cache.prefill(0, &batch, &q.data[a * qrow..z * qrow], &params)?;
                out.extend(chunk);
            }
            (
                out,
                attention_f64(&q.data, &k.data, &v.data, hkv, d, &resolved),
            )
        }
    };
    if let Some((path, file)) = out {
        write(path, file, &got, [got.len() / qrow, hq, d])?;
    }
    let e = error_stats(&got, &want, d);
    println!(
        "nmse={:.6e} min_cos={:.8} max_abs={:.6e}",
        e.nmse, e.min_cos, e.max_abs
    );
    eprintln!("backend: {}", chosen.reason);
    Ok(())
}

/// The command line; `--help` prints help and exits 0. A bad command line is one
/// line of clap's message (up to its first blank line, folded), naming the flag.
fn parse() -> Result<Opts, String> {
    match Opts::try_parse() {
        Ok(o) => Ok(o),
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.render().to_string();
            let head: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let msg = head.join(" ");
            Err(msg.strip_prefix("error: ").unwrap_or(&msg).to_string())
        }
    }
}

/// Reads a `[T, H, D]` little-endian f32 C-order `.npy`, every value finite.
fn read(path: &str, flag: &str) -> Result<Tensor, String> {
    let what = format!("{flag} {path}");
    let bytes = std::fs::read(path).map_err(|e| format!("{what}: {e}"))?;
    if !count_fits(&bytes) {
        return Err(format!("{what}: shape has more than 2^64 elements"));
    }
    let npy =
        npyz::NpyFile::new(&bytes[..]).map_err(|e| format!("{what}: not a .npy file: {e}"))?;
    let dtype = npy.dtype();
    if !matches!(&dtype, npyz::DType::Plain(t) if t.to_string() == "<f4") {
        return Err(format!(
            "{what}: dtype {}, expected little-endian float32 ('<f4')",
            dtype.descr()
        ));
    }
    if npy.order() != npyz::Order::C {
        return Err(format!("{what}: Fortran order, expected C order"));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&s| s as usize).collect();
    let [t, h, d] = shape[..] else {
        return Err(format!("{what}: shape {shape:?}, expected [T, H, D]"));
    };
    if t == 0 || h == 0 || d == 0 {
        return Err(format!("{what}: empty shape {shape:?}"));
    }
    let data: Vec<f32> = npy.into_vec().map_err(|e| format!("{what}: {e}"))?;
    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
        let (ti, hi, di) = (i / (h * d), i / d % h, i % d);
        return Err(format!("{what}: element [{ti}, {hi}, {di}] is {}", data[i]));
    }
    Ok(Tensor { data, t, h, d })
}

/// False if an npy header's shape multiplies out past u64, which npyz does not
/// check (it panics in debug builds).
fn count_fits(bytes: &[u8]) -> bool {
    if !bytes.starts_with(b"\x93NUMPY") {
        return true; // npyz reports it
    }
    let head = String::from_utf8_lossy(&bytes[..bytes.len().min(1 << 16)]);
    let dims = head
        .split_once("shape")
        .and_then(|(_, s)| s.split_once('('))
        .and_then(|(_, s)| s.split_once(')'));
    let Some((dims, _)) = dims else {
        return true; // npyz reports it
    };
    dims.split(',')
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .try_fold(1u64, |a, n| a.checked_mul(n))
        .is_some()
}

fn check_shapes(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(), String> {
    let shape = |x: &Tensor| [x.t, x.h, x.d];
    if shape(k) != shape(v) {
        return Err(format!(
            "k {:?} and v {:?} differ in shape",
            shape(k),
            shape(v)
        ));
    }
    if q.t != k.t {
        return Err(format!("q has {} tokens, k and v {}", q.t, k.t));
    }
    if q.d != k.d {
        return Err(format!("q has head_dim {}, k and v {}", q.d, k.d));
    }
    if q.h % k.h != 0 {
        return Err(format!(
            "q heads {} are not a multiple of kv heads {}",
            q.h, k.h
        ));
    }
    Ok(())
}

fn write(path: &str, file: File, data: &[f32], shape: [usize; 3]) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("--out {path}: {e}");
    let file = std::io::BufWriter::new(file);
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&shape.map(|s| s as u64))
        .writer(file)
        .begin_nd()
        .map_err(fail)?;
    w.extend(data.iter().copied()).map_err(fail)?;
    w.finish().map_err(fail)
}
