//! Pools larger than one storage binding (DESIGN §2): the wgpu backend binds them
//! in windows of whole blocks and runs each kernel once per window. Checked twice:
//! small pools under a small forced window (many windows, every kernel and dtype),
//! and a cache of more than 512 MiB per pool under the device's own binding limit.

mod common;

use std::sync::Arc;

use common::{Rng, filled, gpu};
use kvq::cpu::CpuBackend;
use kvq::wgpu::WgpuBackend;
use kvq::{AttnParams, Backend, CacheConfig, KvCache, KvDtype, SeqId};

/// Largest difference between a backend's attention and the CPU reference's (both
/// f32; outputs are O(1)), as `tests/attention.rs` allows against f64.
const MAX_ABS: f32 = 2e-4;

/// Wgpu backends of their own binding pools in windows of at most `bytes`, one for
/// each attention kernel the adapter may run: as chosen (`attention_lanes.wgsl` on
/// llvmpipe), `attention.wgsl` with subgroup sums, and without.
fn windowed(bytes: u64) -> Vec<Arc<dyn Backend>> {
    let Some(gpu) = gpu() else {
        return Vec::new();
    };
    let open = || {
        WgpuBackend::open_named(&gpu.info().name)
            .unwrap()
            .with_pool_binding_limit(bytes)
    };
    vec![
        Arc::new(open()),
        Arc::new(open().without_lanes()),
        Arc::new(open().without_lanes().without_subgroups()),
    ]
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Every word of every pool of `cache`.
fn pool_words(cache: &KvCache) -> Vec<Vec<u32>> {
    let b = cache.backend();
    let (k, v) = cache.pools(0).unwrap();
    [&k.data, &k.side, &v.data, &v.side]
        .into_iter()
        .map(|buf| b.download(buf, 0, buf.words()).unwrap())
        .collect()
}

/// Windows a sequence's blocks fall in, for `blocks_per_window`.
fn windows_of(cache: &KvCache, seq: SeqId, blocks_per_window: usize) -> Vec<usize> {
    let mut w: Vec<usize> = cache
        .blocks()
        .block_table(seq)
        .unwrap()
        .iter()
        .map(|&b| b as usize / blocks_per_window)
        .collect();
    w.dedup();
    w
}

#[test]
fn pools_in_many_small_windows_match_one_binding_and_the_cpu() {
    // 2 kv heads x D 64 x 16 tokens: 4 KiB of F16 a block, so 12 KiB windows hold
    // 3 F16 blocks (6 Int8, 12 Int4) and the 1024-token pools span 6-22 windows.
    let kernels = windowed(12 << 10);
    let Some(whole) = common::gpu() else {
        return;
    };
    let cpu: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let pairs = [
        (KvDtype::F16, KvDtype::F16),
        (KvDtype::Int8, KvDtype::Int4 { group: 32 }),
        (KvDtype::Int4 { group: 64 }, KvDtype::Int8),
    ];
    let lens = [1, 15, 16, 17, 100, 333];
    let (d, kv_heads, q_heads) = (64, 2, 8);
    let cases = pairs.iter().flat_map(|&p| [(p, false), (p, true)]);
    for (i, ((kd, vd), rotate)) in cases.enumerate() {
        let gpu = &kernels[i % kernels.len()];
        let cfg = CacheConfig::new(1, kv_heads, d, 1024)
            .with_dtypes(kd, vd)
            .with_rotation(rotate);
        let case = format!("K {kd} V {vd} rotated {rotate}, kernel variant {}", i % 3);
        let (cache, seqs, ..) = filled(gpu.clone(), cfg, &lens, 5);
        let (one, ..) = filled(whole.clone(), cfg, &lens, 5);
        let (reference, ..) = filled(cpu.clone(), cfg, &lens, 5);
        assert!(
            windows_of(&cache, seqs[5], 3).len() > 3,
            "{case}: the longest sequence spans several windows"
        );

        // Appends write the same words as into a pool in one binding.
        assert!(
            pool_words(&cache) == pool_words(&one),
            "{case}: pool words differ from the pool bound whole"
        );

        // Dequantize reads them back through the windows.
        let slots: Vec<u32> = (0..1024).step_by(37).collect();
        let dq = |c: &KvCache| {
            let b = c.backend();
            let s = b.alloc(slots.len()).unwrap();
            b.upload(&s, 0, &slots).unwrap();
            let out = b.alloc(slots.len() * kv_heads * d).unwrap();
            b.dequantize(c.pools(0).unwrap().0, &s, slots.len(), &out)
                .unwrap();
            b.download(&out, 0, out.words()).unwrap()
        };
        assert!(dq(&cache) == dq(&one), "{case}: dequantize differs");

        // Decode and prefill against the CPU reference.
        let params = AttnParams::new(q_heads);
        let q = Rng::new(9).normals(seqs.len() * q_heads * d);
        let got = cache.decode(0, &seqs, &q, &params).unwrap();
        let want = reference.decode(0, &seqs, &q, &params).unwrap();
        let diff = max_diff(&got, &want);
        assert!(diff <= MAX_ABS, "{case}: decode off by {diff}");

        let chunks: Vec<(SeqId, usize)> =
            seqs.iter().zip(lens).map(|(&s, n)| (s, n.min(9))).collect();
        let rows: usize = chunks.iter().map(|c| c.1).sum();
        let q = Rng::new(10).normals(rows * q_heads * d);
        let got = cache.prefill(0, &chunks, &q, &params).unwrap();
        let want = reference.prefill(0, &chunks, &q, &params).unwrap();
        let diff = max_diff(&got, &want);
        assert!(diff <= MAX_ABS, "{case}: prefill off by {diff}");
    }
}

/// Sequences laid out across the windows of a pool of `tokens` slots: a reserved
/// filler pushes one sequence across the first window's end and another into a
/// later window; freeing it lets a third reuse the first window's blocks.
fn spread(cache: &mut KvCache, filler_len: usize, lens: [usize; 3], seed: u64) -> Vec<SeqId> {
    let c = *cache.config();
    let row = c.kv_heads * c.head_dim;
    let mut rng = Rng::new(seed);
    let mut append = |cache: &mut KvCache, n: usize| {
        let s = cache.add_sequence();
        let (k, v) = (rng.normals(n * row), rng.normals(n * row));
        cache.append(&[(s, n)], &k, &v).unwrap();
        s
    };
    let filler = cache.add_sequence();
    cache.extend(&[(filler, filler_len)]).unwrap();
    let a = append(cache, lens[0]);
    let filler2 = cache.add_sequence();
    cache.extend(&[(filler2, filler_len)]).unwrap();
    let b = append(cache, lens[1]);
    cache.free_sequence(filler).unwrap();
    let c3 = append(cache, lens[2]);
    cache.free_sequence(filler2).unwrap();
    vec![a, b, c3]
}

#[test]
fn a_cache_past_the_binding_limit_matches_the_cpu() {
    let Some(gpu) = gpu() else {
        return;
    };
    // F16, 8 kv heads x D 128: 2 KiB a token per pool, so 278528 tokens are 544 MiB
    // per pool: past llvmpipe's 128 MiB binding (4 windows and a bit), and past
    // most adapters' 128 MiB - 2 GiB.
    let tokens = 278_528;
    let cfg = CacheConfig::new(1, 8, 128, tokens);
    let pool_bytes = tokens as u64 * 8 * 256;
    assert!(pool_bytes >= 512 << 20);
    let limit = gpu.info().limits.max_binding_bytes;
    if pool_bytes <= limit || pool_bytes > gpu.info().limits.max_buffer_bytes {
        eprintln!("skipped: pools of {pool_bytes} bytes are not past one binding ({limit}) here");
        return;
    }
    let block_bytes = 8 * 16 * 256;
    let per_window = (limit - 16) as usize / block_bytes;
    let lens = [20_000, 3_000, 5_000];
    let filler = 120_000;
    let mut cache = KvCache::new(gpu.clone(), cfg).unwrap();
    let mut reference = KvCache::new(Arc::new(CpuBackend::new()), cfg).unwrap();
    let seqs = spread(&mut cache, filler, lens, 3);
    let ref_seqs = spread(&mut reference, filler, lens, 3);
    let spans: Vec<_> = seqs
        .iter()
        .map(|&s| windows_of(&cache, s, per_window))
        .collect();
    eprintln!("pool {pool_bytes} bytes; windows of each sequence: {spans:?}");
    assert!(spans[0].len() >= 2, "sequence A crosses a window boundary");
    assert!(spans[1][0] >= 1, "sequence B lies past the first window");

    let params = AttnParams::new(32);
    let q = Rng::new(4).normals(3 * 32 * 128);
    let got = cache.decode(0, &seqs, &q, &params).unwrap();
    let want = reference.decode(0, &ref_seqs, &q, &params).unwrap();
    let diff = max_diff(&got, &want);
    assert!(diff <= MAX_ABS, "decode off by {diff}");

    let chunks: Vec<(SeqId, usize)> = seqs.iter().map(|&s| (s, 5)).collect();
    let ref_chunks: Vec<(SeqId, usize)> = ref_seqs.iter().map(|&s| (s, 5)).collect();
    let q = Rng::new(5).normals(15 * 32 * 128);
    let got = cache.prefill(0, &chunks, &q, &params).unwrap();
    let want = reference.prefill(0, &ref_chunks, &q, &params).unwrap();
    let diff = max_diff(&got, &want);
    assert!(diff <= MAX_ABS, "prefill off by {diff}");

    // Slots in every window read back as the CPU reference stores them.
    let slots: Vec<u32> = (0..tokens as u32).step_by(4099).collect();
    let dq = |c: &KvCache| {
        let b = c.backend();
        let s = b.alloc(slots.len()).unwrap();
        b.upload(&s, 0, &slots).unwrap();
        let out = b.alloc(slots.len() * 8 * 128).unwrap();
        b.dequantize(c.pools(0).unwrap().1, &s, slots.len(), &out)
            .unwrap();
        b.download(&out, 0, out.words()).unwrap()
    };
    assert!(dq(&cache) == dq(&reference), "dequantized V differs");
}
