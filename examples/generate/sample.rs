//! Picking the next token from logits: greedy, or temperature and nucleus (top-p)
//! sampling from a seeded generator.

/// Uniform draws in [0, 1) from a seed (xorshift64*): the sampler's, and the
/// random weights and K/V of speed runs.
pub struct Uniform(u64);

impl Uniform {
    pub fn new(seed: u64) -> Self {
        Uniform(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The sampler of one generation.
pub struct Sampler {
    temperature: f32,
    top_p: f32,
    uniform: Uniform,
}

impl Sampler {
    /// Greedy when `temperature` is 0.
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Self {
        Sampler {
            temperature,
            top_p,
            uniform: Uniform::new(seed),
        }
    }

    /// The next token.
    pub fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let t = self.temperature as f64;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l as f64 - max) / t).exp()))
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut kept = 0.0;
        let mut n = 0;
        for p in &probs {
            kept += p.1 / total;
            n += 1;
            if kept >= self.top_p as f64 {
                break;
            }
        }
        let mut draw = self.uniform.next() * probs[..n].iter().map(|p| p.1).sum::<f64>();
        for &(id, p) in &probs[..n] {
            draw -= p;
            if draw < 0.0 {
                return id;
            }
        }
        probs[n - 1].0
    }
}

/// The index of the largest value (the first of ties).
pub fn argmax<T: PartialOrd>(values: &[T]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}
