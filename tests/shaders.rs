//! Every WGSL kernel, and every specialisation kvq dispatches, validated by naga;
//! then built into pipelines on the adapter (where there is one).

mod common;

use common::dtypes;
use kvq::attn::work::{LANE_FLOATS, decode_heads_per_group, lane_shape, prefill_heads_per_group};
use kvq::wgpu::attention::lanes_fit;
use kvq::wgpu::pipelines::PipelineKey;
use kvq::wgpu::shaders::{Kernel, PRELUDES, validate};
use kvq::{CacheConfig, KvDtype};

/// Storage buffers + the uniform each kernel binds in `src/wgpu/`.
fn bindings(kernel: Kernel) -> usize {
    match kernel {
        Kernel::QuantizeAppend | Kernel::Dequantize | Kernel::Seal => 5,
        Kernel::Attention | Kernel::AttentionSubgroup | Kernel::AttentionLanes => 9,
        Kernel::AttnReduce | Kernel::Stream => 3,
    }
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
            for k in dtypes(d).into_iter().chain([KvDtype::Int4Channel]) {
                let cfg = cfg.with_dtypes(k, KvDtype::F16);
                let kl = cfg.layout(k);
                if k.per_channel() {
                    // Staging and open blocks are written by the F16 kernel.
                    keys.push(PipelineKey::rows(Kernel::Dequantize, &kl));
                    keys.push(PipelineKey::seal(&kl));
                } else {
                    for kernel in [Kernel::QuantizeAppend, Kernel::Dequantize] {
                        keys.push(PipelineKey::rows(kernel, &kl));
                    }
                }
                for v in [KvDtype::F16, KvDtype::Int8, KvDtype::int4_default(d)] {
                    let vl = cfg.layout(v);
                    for ratio in 1u32..=8 {
                        let prefill = prefill_heads_per_group(ratio);
                        for (qh, qb) in [(decode_heads_per_group(ratio), 1), (prefill, 8 / prefill)]
                        {
                            // The default register budget and the smallest lanes.
                            let mut shapes = [LANE_FLOATS, 8]
                                .map(|floats| lane_shape(&kl, &vl, qh * qb, floats))
                                .to_vec();
                            shapes.dedup();
                            for shape in shapes {
                                for subgroup in [false, true] {
                                    keys.push(PipelineKey::attention(
                                        &kl, &vl, qh, qb, shape, subgroup,
                                    ));
                                }
                            }
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

/// Fails listing every error, if there are any, out of `total` specialisations.
fn assert_none_failed(errors: &[String], total: usize) {
    assert!(
        errors.is_empty(),
        "{} of {total} failed:\n{}",
        errors.len(),
        errors.join("\n")
    );
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

/// Naga checks every kernel but the subgroup ones without subgroups (they are the
/// fallback on every adapter, DESIGN §4); the subgroup ones do need them.
#[test]
fn subgroup_kernels_are_rejected_without_subgroups() {
    for k in [Kernel::AttentionLanes, Kernel::AttentionSubgroup] {
        let without = k.capabilities() - naga::valid::Capabilities::SUBGROUP;
        assert!(validate(k.file(), &k.source(), without).is_err(), "{k:?}");
    }
}

#[test]
fn every_file_in_shaders_is_a_kernel_or_a_prelude() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".wgsl") && !PRELUDES.contains(&name.as_str()) {
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
    assert_none_failed(&errors, keys.len());
}

/// naga's writers for the platforms wgpu runs on, with the options it gives them at
/// the lowest versions it supports (subgroup kernels at the first versions that have
/// subgroups): a Metal or DX12 user never meets a shader only Vulkan has compiled.
fn translate(key: &PipelineKey) -> Result<(), String> {
    use naga::back::{hlsl, msl, spv};
    let (module, info) = key.module().map_err(|e| e.to_string())?;
    let subgroups = key
        .kernel
        .capabilities()
        .contains(naga::valid::Capabilities::SUBGROUP);
    let entry = (naga::ShaderStage::Compute, "main".to_string());
    let name = key.name();

    // The capabilities wgpu grants every Vulkan device, and those it adds with SUBGROUP.
    use spv::Capability as C;
    let mut caps = vec![C::Shader, C::Matrix, C::ImageQuery, C::DerivativeControl];
    if subgroups {
        caps.extend([
            C::GroupNonUniform,
            C::GroupNonUniformVote,
            C::GroupNonUniformArithmetic,
            C::GroupNonUniformBallot,
            C::GroupNonUniformShuffle,
            C::GroupNonUniformShuffleRelative,
            C::GroupNonUniformQuad,
        ]);
    }
    let options = spv::Options {
        lang_version: (1, 3),
        capabilities: Some(caps.into_iter().collect()),
        ..Default::default()
    };
    let pipeline = spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: entry.1.clone(),
    };
    spv::write_vec(&module, &info, &options, Some(&pipeline))
        .map_err(|e| format!("SPIR-V, {name}: {e}"))?;

    let options = msl::Options {
        lang_version: if subgroups { (2, 1) } else { (1, 2) },
        zero_initialize_workgroup_memory: false,
        ..Default::default()
    };
    let pipeline = msl::PipelineOptions {
        entry_point: Some(entry.clone()),
        ..Default::default()
    };
    msl::write_string(&module, &info, &options, &pipeline)
        .map_err(|e| format!("MSL, {name}: {e}"))?;

    let options = hlsl::Options {
        shader_model: if subgroups {
            hlsl::ShaderModel::V6_0
        } else {
            hlsl::ShaderModel::V5_1
        },
        zero_initialize_workgroup_memory: false,
        ..Default::default()
    };
    let pipeline = hlsl::PipelineOptions {
        entry_point: Some(entry),
    };
    let mut out = String::new();
    hlsl::Writer::new(&mut out, &options, &pipeline)
        .write(&module, &info, None)
        .map_err(|e| format!("HLSL, {name}: {e}"))?;
    Ok(())
}

#[test]
fn every_specialisation_translates_to_spirv_msl_and_hlsl() {
    let keys = keys();
    let errors: Vec<String> = keys.iter().filter_map(|k| translate(k).err()).collect();
    assert_none_failed(&errors, keys.len());
}
