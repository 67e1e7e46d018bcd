//! The GPU forward pass against its CPU twin on the real model.

use std::path::PathBuf;
use std::sync::OnceLock;

use clap::Parser;

use kvq::KvDtype;

use crate::cpu::CpuForward;
use crate::gpu::{Gpu, GpuForward};
use crate::model::{Forward, Model};
use crate::perplexity::log_softmax;
use crate::sample::argmax;
use crate::tokenizer::Tokenizer;

/// Where the model is: `KVQ_MODEL`, else the README's place for it.
fn model_path() -> PathBuf {
    std::env::var_os("KVQ_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(crate::DEFAULT_MODEL))
}

/// The model at [`model_path`], loaded once. With `CI=true` a missing model fails
/// the test.
pub fn model() -> Option<&'static (Model, Tokenizer)> {
    static MODEL: OnceLock<Option<(Model, Tokenizer)>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = model_path();
            if !path.exists() {
                let msg = format!("no model at {} (see the README)", path.display());
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("CI=true requires the model: {msg}");
                }
                eprintln!("WARNING: {msg}; the model tests run nothing");
                return None;
            }
            let (m, g) = Model::load(&path).expect("model loads");
            let t = Tokenizer::from_gguf(&g).expect("tokenizer loads");
            Some((m, t))
        })
        .as_ref()
}

/// The GPU, opened once. With `CI=true` a missing adapter fails the test.
fn gpu(model: &'static Model) -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| match Gpu::open(model) {
        Ok(g) => Some(g),
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true requires a GPU adapter: {e}")
        }
        Err(e) => {
            eprintln!("WARNING: no GPU adapter ({e}); the GPU model tests run nothing");
            None
        }
    })
    .as_ref()
}

const PROMPT: &str = "The history of the printing press begins in the fifteenth century, when \
    Johannes Gutenberg of Mainz combined movable metal type, oil-based ink and a wooden press \
    adapted from those used for wine. Within fifty years, presses had spread to more than two \
    hundred cities across Europe, and the cost of a book fell so far that pamphlets, \
    broadsides and almanacs reached readers who had never owned one before.";

/// Tokens decoded one by one after the prompt.
const CONTINUATION: &str = " The first printed books, called incunabula,";

/// What one run gives: the logits of every prompt row, then of each decode step,
/// from an empty cache; and layer 0's stored K and V, dequantized.
struct Run {
    logits: Vec<Vec<f32>>,
    layer0: (Vec<f32>, Vec<f32>),
}

fn run<'a>(
    m: &'a Model,
    g: Option<&'a Gpu>,
    tok: &Tokenizer,
    kv: (KvDtype, KvDtype),
    rotate: bool,
) -> Run {
    let prompt = tok.encode(PROMPT);
    let decode = tok.encode(CONTINUATION);
    assert!(prompt.len() >= 64, "prompt of {} tokens", prompt.len());
    let cap = prompt.len() + decode.len();
    let positions: Vec<usize> = (0..cap).collect();
    let drive = |fwd: &mut dyn Forward| {
        let mut logits: Vec<Vec<f32>> = fwd
            .forward(&prompt, prompt.len())
            .unwrap()
            .chunks(m.config.vocab)
            .map(<[f32]>::to_vec)
            .collect();
        for &t in &decode {
            logits.push(fwd.forward(&[t], 1).unwrap());
        }
        assert!(logits.iter().flatten().all(|x| x.is_finite()));
        logits
    };
    let (logits, layer0) = match g {
        Some(g) => {
            let mut f = GpuForward::new(m, g, kv, rotate, cap).unwrap();
            let logits = drive(&mut f);
            let s = f.sequence();
            (logits, s.cache.read_kv(0, s.seq, &positions).unwrap())
        }
        None => {
            let mut f = CpuForward::new(m, kv, rotate, cap).unwrap();
            let logits = drive(&mut f);
            let s = f.sequence();
            (logits, s.cache.read_kv(0, s.seq, &positions).unwrap())
        }
    };
    Run { logits, layer0 }
}

/// Fraction of `a` and `b` that differ by more than 1e-3.
fn differing(a: &[f32], b: &[f32]) -> f64 {
    let n = a
        .iter()
        .zip(b)
        .filter(|(x, y)| (*x - *y).abs() > 1e-3)
        .count();
    n as f64 / a.len() as f64
}

fn top1_agreement(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let same = a
        .iter()
        .zip(b)
        .filter(|(x, y)| argmax(x) == argmax(y))
        .count();
    same as f64 / a.len() as f64
}

/// Mean KL divergence of `q`'s next-token distributions from `p`'s.
fn mean_kl(p: &[Vec<f32>], q: &[Vec<f32>]) -> f64 {
    let kl = |a: &[f32], b: &[f32]| -> f64 {
        let (a, b) = (log_softmax(a), log_softmax(b));
        a.iter().zip(&b).map(|(x, y)| x.exp() * (x - y)).sum()
    };
    p.iter().zip(q).map(|(a, b)| kl(a, b)).sum::<f64>() / p.len() as f64
}

fn max_gap(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// With an F16 cache the GPU and the CPU twin differ only by f32 rounding (sums
/// in another order, GPU exp and sqrt): the logits agree within 0.05 (measured
/// 8e-3 on llvmpipe). A quantized cache is a step function of its input: an ulp
/// of difference moves a value across a code's rounding boundary now and then,
/// the changed attention output moves later layers' K and V by far more than an
/// ulp, and their codes flip in cascade. So the two runs end as far apart as two
/// draws of the format's own noise, and what is checked is that the kernels store
/// what the twin stores where their inputs agree (layer 0: under 1% of K and V
/// elements off by more than 1e-3) and that the GPU is no further from the twin
/// than the format is from the F16 cache (KL), with the same top-1 in 90% of rows.
#[test]
fn gpu_forward_matches_cpu_twin() {
    let Some((m, tok)) = model() else { return };
    let Some(g) = gpu(m) else { return };
    let f16 = (KvDtype::F16, KvDtype::F16);
    let (cpu16, gpu16) = (
        run(m, None, tok, f16, false),
        run(m, Some(g), tok, f16, false),
    );
    let gap = max_gap(&cpu16.logits, &gpu16.logits);
    eprintln!(
        "f16: max |GPU - CPU| logit {gap:.2e} over {} rows",
        cpu16.logits.len()
    );
    assert!(gap <= 0.05, "f16 cache: logits differ by {gap}");
    for (kv, rotate) in [
        ((KvDtype::Int8, KvDtype::Int8), false),
        ((KvDtype::Int8, KvDtype::Int4 { group: 32 }), true),
    ] {
        let (cpu, gpu) = (
            run(m, None, tok, kv, rotate),
            run(m, Some(g), tok, kv, rotate),
        );
        let (twin, format) = (
            mean_kl(&cpu.logits, &gpu.logits),
            mean_kl(&cpu16.logits, &cpu.logits),
        );
        let top1 = top1_agreement(&cpu.logits, &gpu.logits);
        let (dk, dv) = (
            differing(&cpu.layer0.0, &gpu.layer0.0),
            differing(&cpu.layer0.1, &gpu.layer0.1),
        );
        eprintln!(
            "{kv:?} rotate {rotate}: layer 0 K/V off in {:.3}%/{:.3}%; KL(CPU || GPU) {twin:.2e}, KL(F16 || CPU) {format:.2e}, top-1 same {:.1}%",
            100.0 * dk,
            100.0 * dv,
            100.0 * top1
        );
        assert!(
            dk < 0.01 && dv < 0.01,
            "{kv:?}: layer 0 K/V differ in {dk}/{dv}"
        );
        assert!(
            twin <= format,
            "{kv:?}: KL {twin} to the twin, {format} for the format"
        );
        assert!(top1 >= 0.9, "{kv:?}: top-1 agrees in {top1}");
    }
}

/// `run`'s error for a command line, which must be one.
fn error_of(args: &[&str]) -> String {
    let args = crate::Args::try_parse_from(["generate"].iter().chain(args)).unwrap();
    crate::run(&args).expect_err("bad input must be an error")
}

#[test]
fn bad_input_is_one_clear_error() {
    let missing = error_of(&["--model", "/no/such/model.gguf"]);
    assert!(missing.contains("/no/such/model.gguf"), "{missing}");
    let not_gguf = error_of(&["--model", concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")]);
    assert!(not_gguf.contains("GGUF"), "{not_gguf}");
    assert!(error_of(&["--kv", "int3"]).contains("--kv \"int3\""));
    assert!(error_of(&["--rotate", "maybe"]).contains("--rotate"));
    assert!(error_of(&["--top-p", "0"]).contains("--top-p"));
    let Some(_) = model() else { return };
    let dir = std::env::temp_dir().join(format!("kvq-generate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = model_path();
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.join("truncated.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let truncated = error_of(&["--model", cut.to_str().unwrap()]);
    assert!(truncated.contains("truncated"), "{truncated}");
    let model = path.to_str().unwrap();
    let long = error_of(&["--model", model, "--tokens", "9000", "--cpu"]);
    assert!(long.contains("context"), "{long}");
    let ctx = error_of(&[
        "--model",
        model,
        "--perplexity",
        concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"),
        "--ctx",
        "2",
        "--cpu",
    ]);
    assert!(ctx.contains("--ctx"), "{ctx}");
    std::fs::remove_dir_all(&dir).unwrap();
}
