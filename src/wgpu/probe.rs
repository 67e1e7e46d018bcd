//! Adapter enumeration and the limits kvq needs.

use std::sync::OnceLock;

use futures::lock::Mutex;

use crate::backend::{BackendInfo, BackendKind, Candidate, DeviceLimits, DeviceType, Opener};

/// Storage buffers one attention kernel binds.
pub const NEEDED_STORAGE_BUFFERS: u32 = 8;
/// Invocations per workgroup kvq's kernels use at most.
pub const NEEDED_INVOCATIONS: u32 = 256;
/// Workgroup memory kvq's kernels use at most, in bytes.
pub const NEEDED_WORKGROUP_STORAGE: u32 = 16 * 1024;

/// The process-wide wgpu instance over every platform backend (honours `WGPU_BACKEND`).
pub fn instance() -> &'static wgpu::Instance {
    static INSTANCE: OnceLock<wgpu::Instance> = OnceLock::new();
    INSTANCE.get_or_init(|| {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle().with_env();
        desc.backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all());
        wgpu::Instance::new(desc)
    })
}

/// Every adapter of [`instance`], enumerated once per process; open devices from
/// these (an application sharing kvq's instance too).
///
/// wgpu's GL backend hands every adapter it enumerates the instance's one EGL
/// context, each with a lock of its own, and makes that context current while it
/// enumerates. Devices of two enumerations used on two threads, or an enumeration
/// while a device is busy, make one context current on two threads: EGL_BAD_ACCESS,
/// a panic inside wgpu-hal. One list keeps one lock per context. (Adapters added
/// after the first call are not seen.)
pub async fn adapters() -> Vec<wgpu::Adapter> {
    static ADAPTERS: Mutex<Option<Vec<wgpu::Adapter>>> = Mutex::new(None);
    let mut list = ADAPTERS.lock().await;
    if list.is_none() {
        *list = Some(instance().enumerate_adapters(wgpu::Backends::all()).await);
    }
    list.clone().unwrap_or_default()
}

/// Every adapter, described and checked against kvq's needs.
pub async fn probe() -> Vec<Candidate> {
    adapters()
        .await
        .into_iter()
        .map(|adapter| {
            let info = describe(&adapter.get_info(), &adapter.limits(), adapter.features());
            let reason = check(&adapter).err().unwrap_or_default();
            Candidate {
                info,
                rank: None,
                reason,
                opener: Opener::Wgpu(Box::new(adapter)),
            }
        })
        .collect()
}

/// Why an adapter cannot run kvq, if it cannot.
pub fn check(adapter: &wgpu::Adapter) -> Result<(), String> {
    let caps = adapter.get_downlevel_capabilities();
    if !caps.flags.contains(wgpu::DownlevelFlags::COMPUTE_SHADERS) {
        return Err("rejected: no compute shaders".into());
    }
    if !caps.flags.contains(wgpu::DownlevelFlags::SHADER_F16_IN_F32) {
        return Err("rejected: no unpack2x16float (downlevel flag SHADER_F16_IN_F32)".into());
    }
    check_limits(&adapter.limits())
}

/// Checks limits against what the kernels need.
pub fn check_limits(l: &wgpu::Limits) -> Result<(), String> {
    let needs = [
        (
            "max_storage_buffers_per_shader_stage",
            l.max_storage_buffers_per_shader_stage,
            NEEDED_STORAGE_BUFFERS,
        ),
        (
            "max_compute_invocations_per_workgroup",
            l.max_compute_invocations_per_workgroup,
            NEEDED_INVOCATIONS,
        ),
        (
            "max_compute_workgroup_storage_size",
            l.max_compute_workgroup_storage_size,
            NEEDED_WORKGROUP_STORAGE,
        ),
    ];
    for (name, have, need) in needs {
        if have < need {
            return Err(format!("rejected: {name} is {have}, kvq needs {need}"));
        }
    }
    Ok(())
}

/// kvq's description of an adapter.
pub fn describe(info: &wgpu::AdapterInfo, l: &wgpu::Limits, f: wgpu::Features) -> BackendInfo {
    let device_type = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => DeviceType::Discrete,
        wgpu::DeviceType::IntegratedGpu => DeviceType::Integrated,
        wgpu::DeviceType::VirtualGpu => DeviceType::Virtual,
        wgpu::DeviceType::Cpu => DeviceType::Cpu,
        wgpu::DeviceType::Other => DeviceType::Other,
    };
    let mut features = Vec::new();
    for (flag, name) in [
        (wgpu::Features::SHADER_F16, "shader-f16".to_string()),
        (
            wgpu::Features::SUBGROUP,
            format!(
                "subgroups {}-{}",
                info.subgroup_min_size, info.subgroup_max_size
            ),
        ),
        (
            wgpu::Features::TIMESTAMP_QUERY,
            "timestamp-query".to_string(),
        ),
    ] {
        if f.contains(flag) {
            features.push(name);
        }
    }
    BackendInfo {
        kind: BackendKind::Wgpu,
        name: info.name.clone(),
        device_type,
        api: format!("{:?}", info.backend),
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string(),
        limits: DeviceLimits {
            max_buffer_bytes: l.max_buffer_size,
            max_binding_bytes: l.max_storage_buffer_binding_size.min(l.max_buffer_size),
            max_workgroup_storage_bytes: l.max_compute_workgroup_storage_size,
            max_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
            max_workgroups_per_dimension: l.max_compute_workgroups_per_dimension,
        },
        features,
    }
}
