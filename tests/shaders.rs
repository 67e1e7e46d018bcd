//! Every WGSL kernel, and every specialisation kvq dispatches, validated by naga;
//! then built into pipelines on the adapter (where there is one).

mod common;

use kvq::wgpu::attention::{decode_heads_per_group, lanes_fit, prefill_heads_per_group};
use kvq::wgpu::pipelines::PipelineKey;
use kvq::wgpu::shaders::{Kernel, validate};
use kvq::{CacheConfig, KvDtype};

/// Storage buffers + the uniform each kernel binds in `src/wgpu/`.
fn bindings(kernel: Kernel) -> usize {
    match kernel {
        Kernel::QuantizeAppend | Kernel::Dequantize => 5,
        Kernel::Attention | Kernel::AttentionLanes => 9,
        Kernel::AttnReduce | Kernel::Stream => 3,
    }
}

fn dtypes(head_dim: usize) -> Vec<KvDtype> {
    let mut v = vec![KvDtype::F16, KvDtype::Int8];
    for g in [8, 16, 32, 64, 128] {
        if head_dim % g == 0 {
            v.push(KvDtype::Int4 { group: g as u32 });
        }
    }
    v
}

/// Every specialisation the backend can dispatch for the head dims we support.
fn keys() -> Vec<PipelineKey> {
    let mut keys = Vec::new();
    for d in [64usize, 80, 96, 128, 256] {
        let rotations: &[bool] = if d.is_power_of_two() {
            &[false, true]
        } else {
            &[false]
        };
        for &rotate in rotations {
            let cfg = CacheConfig::new(1, 2, d, 64).with_rotation(rotate);
            keys.push(PipelineKey::reduce(&cfg.layout(KvDtype::F16)));
            for k in dtypes(d) {
                let kl = cfg.layout(k);
                for kernel in [Kernel::QuantizeAppend, Kernel::Dequantize] {
                    keys.push(PipelineKey::rows(kernel, &kl));
                }
                for v in [KvDtype::F16, KvDtype::Int8, KvDtype::int4_default(d)] {
                    let vl = cfg.layout(v);
                    for ratio in 1u32..=8 {
                        let prefill = prefill_heads_per_group(ratio);
                        for (qh, qb) in [(decode_heads_per_group(ratio), 1), (prefill, 8 / prefill)]
                        {
                            keys.push(PipelineKey::attention(&kl, &vl, qh, qb));
                            if lanes_fit(&kl, &vl) {
                                keys.push(PipelineKey::attention_lanes(&kl, &vl, qh, qb));
                            }
                        }
                    }
                }
            }
        }
    }
    keys
}

#[test]
fn every_kernel_parses_and_validates() {
    let errors: Vec<String> = Kernel::ALL
        .iter()
        .filter_map(|k| {
            validate(k.file(), &k.source(), k.capabilities())
                .err()
                .map(|e| e.to_string())
        })
        .collect();
    assert!(errors.is_empty(), "naga rejected:\n{}", errors.join("\n"));
}

/// Naga checks every kernel but the lanes one without subgroups (they are the
/// fallback on every adapter, DESIGN §4); the lanes kernel does need them.
#[test]
fn lanes_kernel_is_rejected_without_subgroups() {
    let k = Kernel::AttentionLanes;
    let without = k.capabilities() - naga::valid::Capabilities::SUBGROUP;
    assert!(validate(k.file(), &k.source(), without).is_err());
}

#[test]
fn every_file_in_shaders_is_a_kernel_or_a_prelude() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".wgsl") && name != "common.wgsl" && name != "attn_common.wgsl" {
            assert!(
                Kernel::ALL.iter().any(|k| k.file() == name),
                "{name} is not registered in Kernel::ALL"
            );
        }
    }
}

#[test]
fn every_specialisation_validates_with_the_bindings_we_bind() {
    let keys = keys();
    let mut errors = Vec::new();
    for key in &keys {
        match key.validate() {
            Ok(n) if n == bindings(key.kernel) => {}
            Ok(n) => errors.push(format!(
                "{key:?}: {n} bindings, we bind {}",
                bindings(key.kernel)
            )),
            Err(e) => errors.push(e.to_string()),
        }
    }
    assert!(
        errors.is_empty(),
        "{} of {} failed:\n{}",
        errors.len(),
        keys.len(),
        errors.join("\n")
    );
}
