//! Run-time backend selection by probing the machine (DESIGN §4).
//!
//! Candidates: CUDA devices (feature `cuda`), every wgpu adapter on every platform
//! backend, and the CPU reference. Rejected ones carry their reason; the rest are
//! ranked discrete > integrated > virtual > CPU-type adapter. The CPU reference is
//! chosen only when the caller (or `KVQ_BACKEND=cpu`) allows it.

use std::fmt;
use std::sync::Arc;

use super::{Backend, BackendInfo, BackendKind, DeviceType};
use crate::{Error, Result};

/// What the caller wants; `KVQ_BACKEND` and `KVQ_ADAPTER` override the fields they name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Preference {
    /// Only this kind of backend.
    pub kind: Option<BackendKind>,
    /// Only adapters whose name contains this (case-insensitive).
    pub adapter: Option<String>,
    /// Whether the CPU reference may be chosen when no GPU qualifies.
    pub allow_cpu: bool,
}

impl Preference {
    /// Any GPU, CPU reference allowed as a last resort.
    pub fn allow_cpu() -> Self {
        Preference {
            allow_cpu: true,
            ..Self::default()
        }
    }

    /// Only this kind of backend.
    pub fn only(kind: BackendKind) -> Self {
        Preference {
            kind: Some(kind),
            allow_cpu: kind == BackendKind::Cpu,
            ..Self::default()
        }
    }

    /// This preference with `KVQ_BACKEND` / `KVQ_ADAPTER` applied.
    pub fn with_env(&self) -> Result<Self> {
        let mut p = self.clone();
        if let Some(kind) = env("KVQ_BACKEND") {
            p.kind = Some(kind.parse()?);
            p.allow_cpu |= p.kind == Some(BackendKind::Cpu);
        }
        if let Some(name) = env("KVQ_ADAPTER") {
            p.adapter = Some(name);
        }
        Ok(p)
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// How to open a candidate.
#[derive(Debug, Clone)]
pub(crate) enum Opener {
    Cpu,
    #[cfg(feature = "wgpu")]
    Wgpu(Box<::wgpu::Adapter>),
    // Built by the CUDA probe for each device it lists (never without `cuda`).
    #[allow(dead_code)]
    Cuda(usize),
}

/// One device that could run kvq, with the verdict of the probe.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// What it is.
    pub info: BackendInfo,
    /// Rank among accepted candidates (0 is best); `None` when rejected.
    pub rank: Option<usize>,
    /// Why it was rejected, or why it ranks where it does.
    pub reason: String,
    pub(crate) opener: Opener,
}

/// Every candidate, ranked, and the choice.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Candidates in discovery order.
    pub candidates: Vec<Candidate>,
    /// Index of the chosen candidate.
    pub chosen: Option<usize>,
    /// The preference after environment overrides.
    pub preference: Preference,
}

/// The opened backend and why it was chosen.
#[derive(Debug, Clone)]
pub struct Selected {
    /// The backend.
    pub backend: Arc<dyn Backend>,
    /// One line: what was chosen and why.
    pub reason: String,
}

/// Lists every candidate with its rank and verdict.
pub async fn probe_async(pref: &Preference) -> Result<Probe> {
    let pref = pref.with_env()?;
    let mut candidates = Vec::new();
    candidates.extend(crate::cuda::probe());
    #[cfg(feature = "wgpu")]
    candidates.extend(crate::wgpu::probe().await);
    candidates.push(Candidate {
        info: crate::cpu::CpuBackend::new().info().clone(),
        rank: None,
        reason: String::new(),
        opener: Opener::Cpu,
    });
    for c in &mut candidates {
        if let Some(why) = filter(&pref, c) {
            c.reason = why;
        } else if c.reason.is_empty() {
            c.reason = "accepted".into();
        }
    }
    let mut accepted: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].reason == "accepted")
        .collect();
    accepted.sort_by_key(|&i| order(&candidates[i].info));
    for (rank, &i) in accepted.iter().enumerate() {
        let c = &mut candidates[i];
        c.rank = Some(rank);
        c.reason = format!("accepted: {}", describe_rank(&c.info));
    }
    Ok(Probe {
        chosen: accepted.first().copied(),
        candidates,
        preference: pref,
    })
}

/// [`probe_async`], blocking.
pub fn probe(pref: &Preference) -> Result<Probe> {
    pollster::block_on(probe_async(pref))
}

/// [`select_async`], blocking.
pub fn select(pref: &Preference) -> Result<Selected> {
    pollster::block_on(select_async(pref))
}

/// Opens the best candidate; an error lists every candidate and why it was rejected.
pub async fn select_async(pref: &Preference) -> Result<Selected> {
    // Answered before probing: opening adapters cannot help a CUDA request here.
    let kind = pref.with_env()?.kind;
    if kind == Some(BackendKind::Cuda) && !cfg!(feature = "cuda") {
        return Err(Error::CudaNotCompiled);
    }
    if kind == Some(BackendKind::Wgpu) && !cfg!(feature = "wgpu") {
        return Err(Error::Unsupported(
            "kvq was built without the `wgpu` feature (a default one): rebuild with it".into(),
        ));
    }
    let p = probe_async(pref).await?;
    let Some(i) = p.chosen else {
        return Err(Error::NoBackend(no_backend_message(&p)));
    };
    let c = &p.candidates[i];
    let backend: Arc<dyn Backend> = match &c.opener {
        Opener::Cpu => Arc::new(crate::cpu::CpuBackend::new()),
        #[cfg(feature = "wgpu")]
        Opener::Wgpu(adapter) => {
            Arc::new(crate::wgpu::WgpuBackend::from_adapter_async(adapter).await?)
        }
        Opener::Cuda(ordinal) => crate::cuda::open(*ordinal)?,
    };
    let others = p.candidates.len() - 1;
    Ok(Selected {
        reason: format!(
            "{} \"{}\" ({:?}, {}): {} (best of {} candidates)",
            c.info.kind,
            c.info.name,
            c.info.device_type,
            c.info.api,
            describe_rank(&c.info),
            others + 1
        ),
        backend,
    })
}

/// Rejection reason under `pref`, or `None` if the candidate qualifies.
fn filter(pref: &Preference, c: &Candidate) -> Option<String> {
    if !c.reason.is_empty() {
        return Some(c.reason.clone());
    }
    if let Some(kind) = pref.kind
        && kind != c.info.kind
    {
        return Some(format!("rejected: backend {} was asked for", kind));
    }
    if c.info.kind == BackendKind::Cpu && !pref.allow_cpu {
        return Some(
            "rejected: the CPU reference is only used when allowed (Preference::allow_cpu or KVQ_BACKEND=cpu)"
                .into(),
        );
    }
    if let Some(name) = &pref.adapter
        && c.info.kind != BackendKind::Cpu
        && !c.info.name.to_lowercase().contains(&name.to_lowercase())
    {
        return Some(format!(
            "rejected: name does not contain {name:?} (KVQ_ADAPTER)"
        ));
    }
    None
}

/// Sort key: device type first, then CUDA over wgpu, then the CPU reference last.
fn order(info: &BackendInfo) -> (u8, DeviceType, u8) {
    let kind = match info.kind {
        BackendKind::Cuda => 0,
        BackendKind::Wgpu => 1,
        BackendKind::Cpu => 2,
    };
    (
        u8::from(info.kind == BackendKind::Cpu),
        info.device_type,
        kind,
    )
}

fn describe_rank(info: &BackendInfo) -> &'static str {
    match (info.kind, info.device_type) {
        (BackendKind::Cpu, _) => "CPU reference, allowed by the caller",
        (_, DeviceType::Discrete) => "discrete GPU ranks first",
        (_, DeviceType::Integrated) => "integrated GPU ranks after discrete",
        (_, DeviceType::Virtual) => "virtual GPU ranks after integrated",
        (_, DeviceType::Cpu) => "software adapter ranks after every GPU",
        (_, DeviceType::Other) => "unclassified adapter ranks last among GPUs",
    }
}

fn no_backend_message(p: &Probe) -> String {
    let mut s = String::from("no candidate qualified");
    for c in &p.candidates {
        s.push_str(&format!(
            "; {} \"{}\": {}",
            c.info.kind, c.info.name, c.reason
        ));
    }
    if !p
        .candidates
        .iter()
        .any(|c| c.info.kind == BackendKind::Wgpu)
    {
        s.push_str(
            ". No GPU adapter was found: install a Vulkan driver (on Debian/Ubuntu: \
             apt-get install mesa-vulkan-drivers for llvmpipe) or allow the CPU reference",
        );
    }
    s
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.candidates.iter().enumerate() {
            let mark = if Some(i) == self.chosen { "*" } else { " " };
            let rank = c.rank.map_or("-".to_string(), |r| r.to_string());
            let l = &c.info.limits;
            writeln!(
                f,
                "{mark} [{rank}] {} \"{}\" type={:?} api={} driver=\"{}\"",
                c.info.kind, c.info.name, c.info.device_type, c.info.api, c.info.driver
            )?;
            writeln!(
                f,
                "      max_buffer={} MiB max_binding={} MiB workgroup_storage={} KiB invocations={} features=[{}]",
                l.max_buffer_bytes >> 20,
                l.max_binding_bytes >> 20,
                l.max_workgroup_storage_bytes >> 10,
                l.max_invocations_per_workgroup,
                c.info.features.join(", ")
            )?;
            writeln!(f, "      {}", c.reason)?;
        }
        match self.chosen {
            Some(i) => write!(
                f,
                "chosen: {} \"{}\"",
                self.candidates[i].info.kind, self.candidates[i].info.name
            ),
            None => write!(f, "chosen: none"),
        }
    }
}
