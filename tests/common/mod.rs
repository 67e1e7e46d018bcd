//! Shared test support: every backend the machine has, seeded data, tolerances.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use kvq::backend::BackendKind;
use kvq::cpu::CpuBackend;
use kvq::{Backend, Preference};

/// The CPU reference and every GPU backend the machine has ([`gpus`]).
pub fn backends() -> Vec<Arc<dyn Backend>> {
    let mut v: Vec<Arc<dyn Backend>> = vec![Arc::new(CpuBackend::new())];
    v.extend(gpus());
    v
}

/// The wgpu backend on the best adapter (with `CI=true` a missing adapter fails the
/// test), and the CUDA backend where there is one.
pub fn gpus() -> Vec<Arc<dyn Backend>> {
    gpu().into_iter().chain(cuda()).collect()
}

/// The CUDA backend, opened once per test binary, where kvq is built with the
/// `cuda` feature and a device and NVRTC are found. With `KVQ_REQUIRE_CUDA=1` its
/// absence fails the test.
pub fn cuda() -> Option<Arc<dyn Backend>> {
    static CUDA: OnceLock<Option<Arc<dyn Backend>>> = OnceLock::new();
    CUDA.get_or_init(|| match kvq::select(&Preference::only(BackendKind::Cuda)) {
        Ok(s) => {
            eprintln!("CUDA backend: {}", s.reason);
            Some(s.backend)
        }
        Err(e) if std::env::var("KVQ_REQUIRE_CUDA").is_ok_and(|v| v == "1") => {
            panic!("KVQ_REQUIRE_CUDA=1 requires a CUDA device: {e}")
        }
        Err(_) => None,
    })
    .clone()
}

/// The GPU backend (wgpu), opened once per test binary.
pub fn gpu() -> Option<Arc<dyn Backend>> {
    static GPU: OnceLock<Option<Arc<dyn Backend>>> = OnceLock::new();
    GPU.get_or_init(|| match kvq::select(&Preference::only(BackendKind::Wgpu)) {
        Ok(s) => {
            eprintln!("GPU backend: {}", s.reason);
            Some(s.backend)
        }
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true requires a GPU adapter (install mesa-vulkan-drivers): {e}")
        }
        Err(e) => {
            eprintln!("WARNING: no GPU adapter, GPU tests run on nothing: {e}");
            None
        }
    })
    .clone()
}

/// The CPU reference and wgpu and CUDA backends of the caller's own (not shared
/// with other tests of the binary), where the machine has them: for tests that
/// count what a backend creates or times.
pub fn own_backends() -> Vec<Arc<dyn Backend>> {
    let mut v: Vec<Arc<dyn Backend>> = vec![Arc::new(CpuBackend::new())];
    if let Some(gpu) = gpu() {
        v.push(Arc::new(
            kvq::wgpu::WgpuBackend::open_named(&gpu.info().name).unwrap(),
        ));
    }
    if cuda().is_some() {
        v.push(
            kvq::select(&Preference::only(BackendKind::Cuda))
                .unwrap()
                .backend,
        );
    }
    v
}

/// Small deterministic generator (xorshift64*), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }

    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

use kvq::{CacheConfig, KvCache, SeqId};

/// A filled cache, its sequences and their K and V.
pub type Filled = (KvCache, Vec<SeqId>, Vec<Vec<f32>>, Vec<Vec<f32>>);

/// A cache on `backend` holding `lens[i]` random tokens for sequence i (one layer),
/// appended in interleaved chunks so that block tables are scattered. Returns the
/// cache, the sequences and each sequence's K and V (`[T, kv_heads, D]`).
pub fn filled(backend: Arc<dyn Backend>, cfg: CacheConfig, lens: &[usize], seed: u64) -> Filled {
    let row = cfg.kv_heads * cfg.head_dim;
    let mut cache = KvCache::new(backend, cfg).unwrap();
    let seqs: Vec<SeqId> = lens.iter().map(|_| cache.add_sequence()).collect();
    let mut rng = Rng::new(seed);
    let ks: Vec<Vec<f32>> = lens.iter().map(|&n| rng.normals(n * row)).collect();
    let vs: Vec<Vec<f32>> = lens.iter().map(|&n| rng.normals(n * row)).collect();
    let mut done = vec![0usize; lens.len()];
    let chunk = 7;
    while done.iter().zip(lens).any(|(d, l)| d < l) {
        for i in 0..lens.len() {
            let n = chunk.min(lens[i] - done[i]);
            if n == 0 {
                continue;
            }
            let span = done[i] * row..(done[i] + n) * row;
            cache
                .append(&[(seqs[i], n)], &ks[i][span.clone()], &vs[i][span])
                .unwrap();
            done[i] += n;
        }
    }
    (cache, seqs, ks, vs)
}

/// Each head vector of `x` (`[.., D]`) passed through the storage format.
pub fn round_trip(dtype: kvq::KvDtype, x: &[f32], head_dim: usize) -> Vec<f32> {
    stored(dtype, false, x, head_dim)
}

/// Each head vector of `x` as a pool of `dtype`, rotated or not, gives it back.
pub fn stored(dtype: kvq::KvDtype, rotated: bool, x: &[f32], head_dim: usize) -> Vec<f32> {
    x.chunks(head_dim)
        .flat_map(|v| kvq::quant::stored(dtype, rotated, v))
        .collect()
}

/// Every storage format for `head_dim`: each dtype, Int4 with every group of 8 to
/// 128 that divides it.
pub fn dtypes(head_dim: usize) -> Vec<kvq::KvDtype> {
    let mut v: Vec<kvq::KvDtype> = kvq::KvDtype::ALL
        .into_iter()
        .filter(|d| !matches!(d, kvq::KvDtype::Int4 { .. }))
        .collect();
    for g in [8u32, 16, 32, 64, 128] {
        if head_dim % g as usize == 0 {
            v.push(kvq::KvDtype::Int4 { group: g });
        }
    }
    v
}
