//! Every CUDA kernel specialisation the backend can dispatch compiles with NVRTC
//! for sm_80 and sm_90, through the backend's own compile path: no GPU or driver
//! needed, only NVRTC (PyPI's `nvidia-cuda-nvrtc`, its lib folder on
//! LD_LIBRARY_PATH). Without NVRTC the test says why it did not run; with
//! `CI=true` that is a failure.
#![cfg(feature = "cuda")]

use kvq::cuda::kernels::{KernelKey, compile, nvrtc_missing, nvrtc_present};

const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

#[test]
fn every_cuda_specialisation_compiles_for_sm80_and_sm90() {
    if !nvrtc_present() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "CI=true needs NVRTC to compile the CUDA kernels: {}",
                nvrtc_missing()
            );
        }
        eprintln!("NOT RUN: {}", nvrtc_missing());
        return;
    }
    let keys = KernelKey::all();
    let jobs: Vec<(&KernelKey, &'static str)> = keys
        .iter()
        .flat_map(|k| ARCHS.iter().map(move |&a| (k, a)))
        .collect();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .chunks(jobs.len().div_ceil(threads))
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .filter_map(|(k, a)| compile(k, a).err().map(|e| format!("{a}: {e}")))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    eprintln!(
        "compiled {} kernels x {} architectures = {} NVRTC compiles",
        keys.len(),
        ARCHS.len(),
        jobs.len()
    );
    assert!(
        errors.is_empty(),
        "{} of {} failed:\n{}",
        errors.len(),
        jobs.len(),
        errors.join("\n")
    );
}
