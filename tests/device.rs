//! The device path (DESIGN §7) on every backend: a plan per step, then appends and
//! attention recorded on tensors in device memory (f32 and f16, at offsets),
//! against the host API on a twin cache; stale plans and bad tensors refused
//! before anything is recorded; nothing created by warm steps.

mod common;

use std::sync::Arc;

use common::{Rng, backends};
use kvq::reference::error_stats;
use kvq::{
    AttnParams, Backend, CacheConfig, DeviceBuffer, Elem, Encoder, Error, KvCache, KvDtype, Plan,
    SeqId, Tensor,
};

/// Tensor offsets in these tests: a multiple of every device's storage alignment.
const ALIGN: usize = 256;
const LAYERS: usize = 2;
const KV_HEADS: usize = 2;
const Q_HEADS: usize = 6;
const D: usize = 64;

fn name(b: &Arc<dyn Backend>) -> String {
    format!("{}:{}", b.info().kind, b.info().name)
}

fn config() -> CacheConfig {
    CacheConfig::new(LAYERS, KV_HEADS, D, 2048)
        .with_dtypes(KvDtype::Int8, KvDtype::Int4 { group: 32 })
}

/// f16 bits of each value (round to nearest even), two per word.
fn pack(x: &[f32], elem: Elem) -> Vec<u32> {
    match elem {
        Elem::F32 => bytemuck::cast_slice(x).to_vec(),
        Elem::F16 => x
            .chunks(2)
            .map(|p| {
                let h = |i: usize| {
                    p.get(i)
                        .map_or(0, |&v| half::f16::from_f32(v).to_bits() as u32)
                };
                h(0) | h(1) << 16
            })
            .collect(),
    }
}

fn unpack(w: &[u32], n: usize, elem: Elem) -> Vec<f32> {
    match elem {
        Elem::F32 => bytemuck::cast_slice(&w[..n]).to_vec(),
        Elem::F16 => (0..n)
            .map(|i| half::f16::from_bits((w[i / 2] >> (16 * (i % 2))) as u16).to_f32())
            .collect(),
    }
}

/// One buffer holding `parts` one after another as `elem`, each at a multiple of
/// ALIGN bytes (the first at ALIGN, so that no offset is 0); their byte offsets.
fn upload_parts(b: &Arc<dyn Backend>, parts: &[Vec<f32>], elem: Elem) -> (DeviceBuffer, Vec<u64>) {
    let mut words = vec![0u32; ALIGN / 4];
    let mut offsets = Vec::new();
    for p in parts {
        offsets.push(words.len() as u64 * 4);
        words.extend(pack(p, elem));
        words.resize(words.len().next_multiple_of(ALIGN / 4), 0);
    }
    let buf = b.alloc(words.len()).unwrap();
    b.upload(&buf, 0, &words).unwrap();
    (buf, offsets)
}

/// `n` values as f16 holds them, when `elem` is f16.
fn held(x: Vec<f32>, elem: Elem) -> Vec<f32> {
    unpack(&pack(&x, elem), x.len(), elem)
}

/// Steps through the device path on one cache and the host API on a twin: a
/// prefill of prompts of different lengths, then decode steps, every layer each
/// step; q, k, v and the output in `elem`. Returns the largest difference between
/// the two paths' outputs, and the device path's outputs.
fn device_and_host(b: &Arc<dyn Backend>, cfg: CacheConfig, elem: Elem) -> (f64, Vec<Vec<f32>>) {
    let p = AttnParams::new(Q_HEADS);
    let (mut dev, mut host) = (
        KvCache::new(b.clone(), cfg).unwrap(),
        KvCache::new(b.clone(), cfg).unwrap(),
    );
    let seqs: Vec<SeqId> = (0..4).map(|_| dev.add_sequence()).collect();
    assert_eq!(
        seqs,
        (0..4).map(|_| host.add_sequence()).collect::<Vec<_>>()
    );
    let mut rng = Rng::new(9);
    let mut worst = 0f64;
    let mut outputs = Vec::new();
    // Int4Channel keys (32-token blocks): 30 fills its block in the second decode
    // step, 33 seals one in the prompt, 64 two.
    let prompts = [5usize, 30, 33, 64];
    for step in 0..5 {
        let batch: Vec<(SeqId, usize)> = if step == 0 {
            seqs.iter().copied().zip(prompts).collect()
        } else {
            seqs.iter().map(|&s| (s, 1)).collect()
        };
        let tokens: usize = batch.iter().map(|b| b.1).sum();
        let kv: Vec<Vec<f32>> = (0..2 * LAYERS)
            .map(|_| held(rng.normals(tokens * KV_HEADS * D), elem))
            .collect();
        let qs: Vec<Vec<f32>> = (0..LAYERS)
            .map(|_| held(rng.normals(tokens * Q_HEADS * D), elem))
            .collect();
        // Host API: extend, then per layer write and attend.
        let r = host.extend(&batch).unwrap();
        let mut want = Vec::new();
        for l in 0..LAYERS {
            host.write(l, &r, &kv[2 * l], &kv[2 * l + 1]).unwrap();
            want.push(host.prefill(l, &batch, &qs[l], &p).unwrap());
        }
        // Device path: one plan, every layer recorded in one submission.
        let plan = if step == 0 {
            dev.plan_prefill(&batch, &p).unwrap()
        } else {
            dev.plan_decode(&seqs, &p).unwrap()
        };
        assert_eq!((plan.tokens(), plan.queries()), (tokens, tokens));
        let (kvb, kvo) = upload_parts(b, &kv, elem);
        let (qb, qo) = upload_parts(b, &qs, elem);
        let zeros = vec![vec![f32::NAN; tokens * Q_HEADS * D]; LAYERS];
        let (ob, oo) = upload_parts(b, &zeros, elem);
        b.run(&mut |enc| {
            for l in 0..LAYERS {
                let t = |buf, off: u64| Tensor {
                    buffer: buf,
                    offset: off,
                    elem,
                };
                dev.record_append(
                    enc,
                    &plan,
                    l,
                    &t(&kvb, kvo[2 * l]),
                    &t(&kvb, kvo[2 * l + 1]),
                )?;
                dev.record_attention(enc, &plan, l, &t(&qb, qo[l]), &t(&ob, oo[l]))?;
            }
            Ok(())
        })
        .unwrap();
        let words = b.download(&ob, 0, ob.words()).unwrap();
        for l in 0..LAYERS {
            let n = tokens * Q_HEADS * D;
            let got = unpack(&words[oo[l] as usize / 4..], n, elem);
            let e = error_stats(&got, &want[l], D);
            assert!(
                e.max_abs.is_finite(),
                "{} {elem:?} step {step} layer {l}: {e:?}",
                name(b)
            );
            worst = worst.max(e.max_abs);
            outputs.push(got);
        }
    }
    assert_eq!(dev.blocks(), host.blocks());
    (worst, outputs)
}

#[test]
fn device_path_matches_host_api_and_the_cpu_in_f32_and_f16() {
    // (elem, largest difference from the CPU reference's device path: f32 rounding
    // of the kernels; the same plus an f16 ulp of O(1) outputs.)
    let int4c = config().with_dtypes(KvDtype::Int4Channel, KvDtype::Int4 { group: 32 });
    for (cfg, (elem, vs_cpu)) in [config(), int4c]
        .into_iter()
        .flat_map(|c| [(c, (Elem::F32, 2e-4)), (c, (Elem::F16, 2e-3))])
    {
        let mut cpu: Option<Vec<Vec<f32>>> = None;
        for b in backends() {
            let (diff, outputs) = device_and_host(&b, cfg, elem);
            // The same kernels on the same data: f32 agrees exactly; f16 outputs
            // are the f32 ones rounded, within half an f16 ulp of O(1) values.
            let same = if elem == Elem::F32 { 1e-6 } else { 1e-3 };
            assert!(diff <= same, "{} {elem:?}: device vs host {diff}", name(&b));
            match &cpu {
                None => cpu = Some(outputs),
                Some(want) => {
                    for (i, (got, want)) in outputs.iter().zip(want).enumerate() {
                        let e = error_stats(got, want, D);
                        assert!(
                            e.max_abs <= vs_cpu,
                            "{} {elem:?} output {i} vs CPU: {e:?}",
                            name(&b)
                        );
                    }
                }
            }
        }
    }
}

/// A decode plan for the cache's sequences and the tensors of one step.
struct Step1 {
    kv: DeviceBuffer,
    q: DeviceBuffer,
    out: DeviceBuffer,
}

fn step_buffers(b: &Arc<dyn Backend>, seqs: usize) -> Step1 {
    let n = |h: usize| (seqs * h * D).next_multiple_of(ALIGN / 4);
    let fill = |words: usize| {
        let buf = b.alloc(words).unwrap();
        let x: Vec<f32> = Rng::new(words as u64).normals(words);
        b.upload(&buf, 0, bytemuck::cast_slice(&x)).unwrap();
        buf
    };
    Step1 {
        kv: fill(n(KV_HEADS)),
        q: fill(n(Q_HEADS)),
        out: b.alloc(n(Q_HEADS)).unwrap(),
    }
}

fn record_step(b: &Arc<dyn Backend>, cache: &KvCache, plan: &Plan, t: &Step1) -> kvq::Result<()> {
    b.run(&mut |enc| {
        for l in 0..LAYERS {
            let kv = Tensor::f32(&t.kv);
            cache.record_append(enc, plan, l, &kv, &kv)?;
            cache.record_attention(enc, plan, l, &Tensor::f32(&t.q), &Tensor::f32(&t.out))?;
        }
        Ok(())
    })
}

/// Each backend is its own, so that no other test's objects are counted.
#[test]
fn warm_decode_steps_create_nothing() {
    for b in common::own_backends() {
        let mut cache = KvCache::new(b.clone(), config()).unwrap();
        let seqs: Vec<SeqId> = (0..4).map(|_| cache.add_sequence()).collect();
        let p = AttnParams::new(Q_HEADS);
        let t = step_buffers(&b, seqs.len());
        let mut before = 0;
        for step in 0..110 {
            if step == 10 {
                before = b.creations();
            }
            let plan = cache.plan_decode(&seqs, &p).unwrap();
            record_step(&b, &cache, &plan, &t).unwrap();
        }
        b.synchronize().unwrap();
        let created = b.creations() - before;
        assert_eq!(
            created,
            0,
            "{}: {created} objects created in 100 warm steps",
            name(&b)
        );
        assert!(before > 0, "{}: nothing counted in warm-up", name(&b));
    }
}

#[test]
fn stale_plans_are_refused() {
    for b in backends() {
        let mut cache = KvCache::new(b.clone(), config()).unwrap();
        let seqs: Vec<SeqId> = (0..2).map(|_| cache.add_sequence()).collect();
        let p = AttnParams::new(Q_HEADS);
        let t = step_buffers(&b, seqs.len());
        let stale = |cache: &KvCache, plan: &Plan| {
            matches!(record_step(&b, cache, plan, &t), Err(Error::StalePlan))
        };
        let first = cache.plan_decode(&seqs, &p).unwrap();
        record_step(&b, &cache, &first, &t).unwrap();
        let attend = cache.plan_attention(&[(seqs[0], 1)], &p).unwrap();
        let second = cache.plan_decode(&seqs, &p).unwrap();
        assert!(stale(&cache, &first), "{}: a later plan", name(&b));
        assert!(
            stale(&cache, &attend),
            "{}: an attention plan before a step",
            name(&b)
        );
        let mut other = KvCache::new(b.clone(), config()).unwrap();
        other.add_sequence();
        other.add_sequence();
        assert!(stale(&other, &second), "{}: another cache", name(&b));
        cache.extend(&[(seqs[0], 1)]).unwrap();
        assert!(stale(&cache, &second), "{}: extend", name(&b));
        let third = cache.plan_decode(&seqs, &p).unwrap();
        cache.truncate(seqs[0], 1).unwrap();
        assert!(stale(&cache, &third), "{}: truncate", name(&b));
        let fourth = cache.plan_decode(&seqs, &p).unwrap();
        cache.free_sequence(seqs[1]).unwrap();
        assert!(stale(&cache, &fourth), "{}: free", name(&b));
    }
}

#[test]
fn bad_steps_and_tensors_are_errors_and_change_nothing() {
    for b in backends() {
        let small = CacheConfig::new(LAYERS, KV_HEADS, D, 64);
        let mut cache = KvCache::new(b.clone(), small).unwrap();
        let seqs: Vec<SeqId> = (0..2).map(|_| cache.add_sequence()).collect();
        let p = AttnParams::new(Q_HEADS);
        let blocks = cache.blocks().clone();
        // Plans that cannot be made leave the bookkeeping as it was.
        assert!(matches!(
            cache.plan_prefill(&[(seqs[0], 65)], &p),
            Err(Error::CapacityExceeded { .. })
        ));
        assert!(matches!(
            cache.plan_prefill(&[(seqs[0], 0)], &p),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            cache.plan_decode(&[seqs[0], seqs[0]], &p),
            Err(Error::DuplicateSequence(_))
        ));
        assert!(matches!(
            cache.plan_decode(&[SeqId(99)], &p),
            Err(Error::UnknownSequence(99))
        ));
        assert!(matches!(
            cache.plan_decode(&seqs, &AttnParams::new(3)),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            cache.plan_attention(&[(seqs[0], 1)], &p),
            Err(Error::OutOfRange { .. })
        ));
        assert_eq!(cache.blocks(), &blocks, "{}", name(&b));

        // Records that cannot be made record nothing.
        let plan = cache.plan_decode(&seqs, &p).unwrap();
        let t = step_buffers(&b, seqs.len());
        let short = b.alloc(4).unwrap();
        let kv = Tensor::f32(&t.kv);
        let (q, out) = (Tensor::f32(&t.q), Tensor::f32(&t.out));
        let before = b.download(&t.out, 0, t.out.words()).unwrap();
        let errors = [
            record(&b, |enc| {
                cache.record_append(enc, &plan, 0, &Tensor::f32(&short), &kv)
            }),
            record(&b, |enc| cache.record_append(enc, &plan, LAYERS, &kv, &kv)),
            record(&b, |enc| cache.record_append(enc, &plan, 0, &kv, &kv.at(2))),
            record(&b, |enc| {
                cache.record_append(enc, &plan, 0, &kv, &kv)?;
                cache.record_attention(enc, &plan, 0, &q, &Tensor::f32(&short))
            }),
            record(&b, |enc| {
                cache.record_append(enc, &plan, 0, &kv, &kv)?;
                cache.record_attention(enc, &plan, 0, &q.at(ALIGN as u64 * 64), &out)
            }),
            // Attention in a step that appends, before the layer's append.
            record(&b, |enc| cache.record_attention(enc, &plan, 1, &q, &out)),
        ];
        for (i, e) in errors.iter().enumerate() {
            let want = match i {
                1 => matches!(e, Err(Error::OutOfRange { what: "layer", .. })),
                2 => matches!(e, Err(Error::InvalidConfig(m)) if m.contains("alignment")),
                5 => {
                    matches!(e, Err(Error::InvalidConfig(m)) if m.contains("before record_append"))
                }
                _ => matches!(e, Err(Error::ShapeMismatch { .. })),
            };
            assert!(want, "{} case {i}: {e:?}", name(&b));
        }
        assert_eq!(
            b.download(&t.out, 0, t.out.words()).unwrap(),
            before,
            "{}",
            name(&b)
        );
        // The plan still works afterwards.
        record_step(&b, &cache, &plan, &t).unwrap();
    }
}

fn record(
    b: &Arc<dyn Backend>,
    mut f: impl FnMut(&mut Encoder<'_>) -> kvq::Result<()>,
) -> kvq::Result<()> {
    b.run(&mut |enc| f(enc))
}

/// On wgpu: tensors in the application's own buffers, which must be usable as
/// storage; recording wants the application's encoder.
#[test]
fn wgpu_records_into_the_apps_encoder_and_checks_its_buffers() {
    let Some(gpu) = common::gpu() else { return };
    let w = kvq::wgpu::WgpuBackend::open_named(&gpu.info().name).unwrap();
    let (device, queue) = (w.device().clone(), w.queue().clone());
    // The app's own device work, while other tests use GL devices (see `hold`).
    let _gl = w.hold();
    let b: Arc<dyn Backend> = Arc::new(w);
    let mut cache = KvCache::new(b.clone(), config()).unwrap();
    let seqs: Vec<SeqId> = (0..2).map(|_| cache.add_sequence()).collect();
    let plan = cache.plan_decode(&seqs, &AttnParams::new(Q_HEADS)).unwrap();
    let app = |usage| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("app"),
            size: 4 * (2 * Q_HEADS * D) as u64,
            usage,
            mapped_at_creation: false,
        })
    };
    let storage = kvq::wgpu::WgpuBackend::buffer(&app(wgpu::BufferUsages::STORAGE));
    let copy_only = kvq::wgpu::WgpuBackend::buffer(&app(wgpu::BufferUsages::COPY_DST));
    let mut encoder = device.create_command_encoder(&Default::default());
    let mut enc = Encoder::Wgpu(&mut encoder);
    let (s, c) = (Tensor::f32(&storage), Tensor::f32(&copy_only));
    cache.record_append(&mut enc, &plan, 0, &s, &s).unwrap();
    let e = cache.record_attention(&mut enc, &plan, 0, &c, &s);
    assert!(
        matches!(&e, Err(Error::InvalidConfig(m)) if m.contains("STORAGE")),
        "{e:?}"
    );
    let e = cache.record_attention(&mut Encoder::Immediate, &plan, 0, &s, &s);
    assert!(
        matches!(&e, Err(Error::InvalidConfig(m)) if m.contains("Encoder::Wgpu")),
        "{e:?}"
    );
    cache.record_attention(&mut enc, &plan, 0, &s, &s).unwrap();
    queue.submit([encoder.finish()]);
    b.synchronize().unwrap();
}
