//! The model: a Llama-architecture GGUF's shape and weights, and what a forward
//! pass over it promises (`Forward`), on the CPU or the GPU.

use std::path::Path;

use half::f16;

use crate::gguf::{Gguf, GgufError};

/// The shape of a Llama-architecture model, from its GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub context: usize,
    pub rope_base: f32,
    pub norm_eps: f32,
}

impl Config {
    /// Reads `llama.*` metadata; any other architecture is an error.
    pub fn from_gguf(g: &Gguf) -> Result<Config, GgufError> {
        let arch = g.str("general.architecture")?;
        if arch != "llama" {
            return Err(GgufError::new(format!(
                "architecture {arch:?} is not supported (only llama)"
            )));
        }
        let n = |k: &str| g.u32(&format!("llama.{k}")).map(|v| v as usize);
        let hidden = n("embedding_length")?;
        let q_heads = n("attention.head_count")?;
        let kv_heads = n("attention.head_count_kv")?;
        if q_heads == 0 || kv_heads == 0 || hidden % q_heads != 0 || q_heads % kv_heads != 0 {
            return Err(GgufError::new(format!(
                "bad head counts: {q_heads} q heads, {kv_heads} kv heads, hidden {hidden}"
            )));
        }
        let head_dim = hidden / q_heads;
        let rope_dims = n("rope.dimension_count").unwrap_or(head_dim);
        if rope_dims != head_dim {
            return Err(GgufError::new(format!(
                "partial RoPE ({rope_dims} of {head_dim} dims) is not supported"
            )));
        }
        let vocab = g
            .tensor("token_embd.weight")?
            .dims
            .get(1)
            .copied()
            .unwrap_or(0) as usize;
        Ok(Config {
            layers: n("block_count")?,
            hidden,
            ffn: n("feed_forward_length")?,
            q_heads,
            kv_heads,
            head_dim,
            vocab,
            context: n("context_length")?,
            rope_base: g.f32("llama.rope.freq_base").unwrap_or(10000.0),
            norm_eps: g.f32("llama.attention.layer_norm_rms_epsilon")?,
        })
    }

    /// SmolLM2-135M's shape, for `--model synthetic`.
    pub fn smollm2_135m() -> Config {
        Config {
            layers: 30,
            hidden: 576,
            ffn: 1536,
            q_heads: 9,
            kv_heads: 3,
            head_dim: 64,
            vocab: 49152,
            context: 8192,
            rope_base: 100000.0,
            norm_eps: 1e-5,
        }
    }

    /// Widths of q, and of k (= v), per token.
    pub fn qk_widths(&self) -> (usize, usize) {
        (self.q_heads * self.head_dim, self.kv_heads * self.head_dim)
    }
}

/// A matrix `[rows, cols]`, row-major (a GGUF tensor of dims `[cols, rows]`), its
/// values rounded to f16: the GPU stores them so, and the CPU twin uses the same.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f16>,
}

/// One transformer block's weights.
#[derive(Debug, Clone)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub wq: Matrix,
    pub wk: Matrix,
    pub wv: Matrix,
    pub wo: Matrix,
    pub ffn_norm: Vec<f32>,
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
}

/// Every weight of the model; the token embedding doubles as the output matrix
/// when the GGUF has no `output.weight` (tied embeddings).
#[derive(Debug, Clone)]
pub struct Weights {
    pub embed: Matrix,
    pub layers: Vec<Layer>,
    pub out_norm: Vec<f32>,
    pub output: Option<Matrix>,
}

impl Weights {
    /// The output (logits) matrix.
    pub fn output(&self) -> &Matrix {
        self.output.as_ref().unwrap_or(&self.embed)
    }
}

/// A model read from a GGUF file.
#[derive(Debug, Clone)]
pub struct Model {
    pub config: Config,
    pub weights: Weights,
}

impl Model {
    /// Reads and dequantizes `path` (f32, f16, bf16, q4_0, q4_1 and q8_0 tensors).
    pub fn load(path: &Path) -> Result<(Model, Gguf), GgufError> {
        let g = Gguf::open(path)?;
        let config = Config::from_gguf(&g)?;
        let c = &config;
        let (qw, kw) = c.qk_widths();
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<Matrix, GgufError> {
            let t = g.tensor(name)?;
            if t.dims != [cols as u64, rows as u64] {
                return Err(GgufError::new(format!(
                    "{name}: dims {:?}, expected [{cols}, {rows}]",
                    t.dims
                )));
            }
            let data = g.dequantize(name)?.into_iter().map(f16::from_f32).collect();
            Ok(Matrix { rows, cols, data })
        };
        let vector = |name: &str, n: usize| -> Result<Vec<f32>, GgufError> {
            let v = g.dequantize(name)?;
            if v.len() != n {
                return Err(GgufError::new(format!(
                    "{name}: {} values, expected {n}",
                    v.len()
                )));
            }
            Ok(v)
        };
        let layers = (0..c.layers)
            .map(|l| {
                let p = |s: &str| format!("blk.{l}.{s}.weight");
                Ok(Layer {
                    attn_norm: vector(&p("attn_norm"), c.hidden)?,
                    wq: matrix(&p("attn_q"), qw, c.hidden)?,
                    wk: matrix(&p("attn_k"), kw, c.hidden)?,
                    wv: matrix(&p("attn_v"), kw, c.hidden)?,
                    wo: matrix(&p("attn_output"), c.hidden, qw)?,
                    ffn_norm: vector(&p("ffn_norm"), c.hidden)?,
                    gate: matrix(&p("ffn_gate"), c.ffn, c.hidden)?,
                    up: matrix(&p("ffn_up"), c.ffn, c.hidden)?,
                    down: matrix(&p("ffn_down"), c.hidden, c.ffn)?,
                })
            })
            .collect::<Result<Vec<_>, GgufError>>()?;
        let output = match g.tensor("output.weight") {
            Ok(_) => Some(matrix("output.weight", c.vocab, c.hidden)?),
            Err(_) => None,
        };
        let weights = Weights {
            embed: matrix("token_embd.weight", c.vocab, c.hidden)?,
            layers,
            out_norm: vector("output_norm.weight", c.hidden)?,
            output,
        };
        Ok((Model { config, weights }, g))
    }

    /// A model of `config`'s shape with random weights (uniform, scaled by
    /// 1/sqrt(fan-in), norms of ones): it times like the real one, for speed
    /// runs where the GGUF is not at hand (the GPU check's bundle).
    pub fn synthetic(config: Config) -> Model {
        let mut uniform = crate::sample::Uniform::new(1);
        let mut matrix = |rows: usize, cols: usize| {
            let scale = (3.0 / cols as f64).sqrt();
            let data = (0..rows * cols)
                .map(|_| f16::from_f64((2.0 * uniform.next() - 1.0) * scale))
                .collect();
            Matrix { rows, cols, data }
        };
        let c = &config;
        let (qw, kw) = c.qk_widths();
        let layers = (0..c.layers)
            .map(|_| Layer {
                attn_norm: vec![1.0; c.hidden],
                wq: matrix(qw, c.hidden),
                wk: matrix(kw, c.hidden),
                wv: matrix(kw, c.hidden),
                wo: matrix(c.hidden, qw),
                ffn_norm: vec![1.0; c.hidden],
                gate: matrix(c.ffn, c.hidden),
                up: matrix(c.ffn, c.hidden),
                down: matrix(c.hidden, c.ffn),
            })
            .collect();
        let weights = Weights {
            embed: matrix(c.vocab, c.hidden),
            layers,
            out_norm: vec![1.0; c.hidden],
            output: None,
        };
        Model { config, weights }
    }

    /// RoPE's cos and sin for `positions`: `[positions, head_dim / 2]` pairs, from
    /// f64 (llama.cpp's "normal" RoPE: dims 2i and 2i+1 rotate together, by
    /// `pos * base^(-2i/d)`; GGUF's Q and K rows are permuted for it).
    pub fn rope_table(&self, positions: impl Iterator<Item = usize>) -> Vec<[f32; 2]> {
        let d = self.config.head_dim;
        let base = self.config.rope_base as f64;
        positions
            .flat_map(|p| {
                (0..d / 2).map(move |i| {
                    let angle = p as f64 * base.powf(-2.0 * i as f64 / d as f64);
                    [angle.cos() as f32, angle.sin() as f32]
                })
            })
            .collect()
    }
}

/// One sequence in a kvq cache of the model's shape: what a forward pass runs.
pub struct Sequence {
    pub cache: kvq::KvCache,
    pub seq: kvq::SeqId,
    pub params: kvq::AttnParams,
}

impl Sequence {
    /// A cache of `capacity` tokens of `(k, v)` dtypes on `backend`, one sequence.
    pub fn new(
        model: &Model,
        backend: std::sync::Arc<dyn kvq::Backend>,
        kv: (kvq::KvDtype, kvq::KvDtype),
        rotate: bool,
        capacity: usize,
    ) -> kvq::Result<Self> {
        let c = &model.config;
        let cfg = kvq::CacheConfig::new(c.layers, c.kv_heads, c.head_dim, capacity)
            .with_dtypes(kv.0, kv.1)
            .with_rotation(rotate);
        let mut cache = kvq::KvCache::new(backend, cfg)?;
        let seq = cache.add_sequence();
        Ok(Sequence {
            cache,
            seq,
            params: kvq::AttnParams::new(c.q_heads),
        })
    }
}

/// A forward pass over one [`Sequence`].
pub trait Forward {
    /// Runs `tokens` at the sequence's next positions (one chunk of a prefill, or
    /// one decode token) and returns the logits of its last `logit_rows` tokens,
    /// `[logit_rows, vocab]`.
    fn forward(&mut self, tokens: &[u32], logit_rows: usize) -> kvq::Result<Vec<f32>>;
    /// The sequence.
    fn sequence(&self) -> &Sequence;
    /// The sequence, to change.
    fn sequence_mut(&mut self) -> &mut Sequence;
    /// Replaces the sequence with a new, empty one.
    fn reset(&mut self) -> kvq::Result<()> {
        let s = self.sequence_mut();
        s.cache.free_sequence(s.seq)?;
        s.seq = s.cache.add_sequence();
        Ok(())
    }
    /// Tokens the sequence holds.
    fn len(&self) -> usize {
        let s = self.sequence();
        s.cache.seq_len(s.seq).unwrap_or(0)
    }
    /// Bytes of K and V the cache stores per token, all layers.
    fn kv_bytes_per_token(&self) -> usize {
        self.sequence().cache.config().bytes_per_token()
    }
}
