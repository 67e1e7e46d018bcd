//! Where a step's device time goes, from timestamp queries: the app's kernels
//! (one pass each while profiling, timed here) against kvq's append and
//! attention passes (timed by kvq: `Backend::set_timing`, resolved into the
//! app's encoder by `WgpuBackend::resolve_timing`).

use std::collections::BTreeMap;
use std::time::Duration;

use kvq::Backend;
use kvq::wgpu::WgpuBackend;

/// Timestamps one step may write: two per app kernel.
const QUERIES: u32 = 1024;

/// Device time per kernel name, summed over steps.
pub struct Profile {
    queries: wgpu::QuerySet,
    /// Read back through kvq's download.
    resolved: wgpu::Buffer,
    period_ns: f64,
    /// The kernel of each pass timed in this step.
    names: Vec<&'static str>,
    /// App kernels' device time by name, and kvq's, over every step taken.
    pub app: BTreeMap<&'static str, Duration>,
    pub kvq: Duration,
    /// Steps taken.
    pub steps: usize,
}

impl Profile {
    /// A profile on `kvq`'s device, or why not (no timestamp queries).
    pub fn new(kvq: &WgpuBackend) -> Result<Profile, String> {
        let device = kvq.device();
        if !device.features().contains(wgpu::Features::TIMESTAMP_QUERY) || !kvq.set_timing(true) {
            return Err(format!(
                "{} has no timestamp queries to profile with",
                kvq.info().name
            ));
        }
        Ok(Profile {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("profile"),
                ty: wgpu::QueryType::Timestamp,
                count: QUERIES,
            }),
            resolved: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile"),
                size: QUERIES as u64 * 8,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            period_ns: kvq.queue().get_timestamp_period() as f64,
            names: Vec::new(),
            app: BTreeMap::new(),
            kvq: Duration::ZERO,
            steps: 0,
        })
    }

    /// Where the pass of kernel `name` writes its timestamps.
    pub fn writes(
        &mut self,
        name: &'static str,
    ) -> kvq::Result<wgpu::ComputePassTimestampWrites<'_>> {
        let begin = 2 * self.names.len() as u32;
        if begin + 2 > QUERIES {
            return Err(kvq::Error::Device(format!(
                "a profiled step has more than {} kernels",
                QUERIES / 2
            )));
        }
        self.names.push(name);
        Ok(wgpu::ComputePassTimestampWrites {
            query_set: &self.queries,
            beginning_of_pass_write_index: Some(begin),
            end_of_pass_write_index: Some(begin + 1),
        })
    }

    /// Resolves this step's timestamps (the app's and kvq's) at the end of `enc`.
    pub fn resolve(&self, kvq: &WgpuBackend, enc: &mut wgpu::CommandEncoder) {
        let used = 2 * self.names.len() as u32;
        if used > 0 {
            enc.resolve_query_set(&self.queries, 0..used, &self.resolved, 0);
        }
        kvq.resolve_timing(enc);
    }

    /// Adds the submitted step's times; waits for it.
    pub fn take(&mut self, kvq: &WgpuBackend) -> kvq::Result<()> {
        self.kvq += kvq.take_device_time()?.unwrap_or_default();
        let names = std::mem::take(&mut self.names);
        self.steps += 1;
        if names.is_empty() {
            return Ok(());
        }
        let words = kvq.download(&WgpuBackend::buffer(&self.resolved), 0, names.len() * 4)?;
        let stamps: &[u64] = bytemuck::cast_slice(&words);
        for (name, pass) in names.iter().zip(stamps.chunks_exact(2)) {
            let ns = pass[1].saturating_sub(pass[0]) as f64 * self.period_ns;
            *self.app.entry(name).or_default() += Duration::from_nanos(ns as u64);
        }
        Ok(())
    }

    /// Milliseconds per step of each app kernel and of kvq, and their shares.
    pub fn table(&self) -> String {
        let steps = self.steps.max(1) as f64;
        let app: Duration = self.app.values().sum();
        let total = (app + self.kvq).as_secs_f64().max(1e-12);
        let mut rows: Vec<(String, Duration)> =
            self.app.iter().map(|(n, d)| (n.to_string(), *d)).collect();
        rows.push(("kvq append + attention".into(), self.kvq));
        let mut out = format!("{:<24} {:>10} {:>7}\n", "device time", "ms/step", "share");
        for (name, d) in rows {
            out += &format!(
                "{name:<24} {:>10.3} {:>6.1}%\n",
                d.as_secs_f64() * 1e3 / steps,
                100.0 * d.as_secs_f64() / total
            );
        }
        out += &format!(
            "{:<24} {:>10.3} {:>6.1}%\n",
            "total",
            total * 1e3 / steps,
            100.0
        );
        out
    }

    /// kvq's share of the device time.
    pub fn kvq_share(&self) -> f64 {
        let app: Duration = self.app.values().sum();
        self.kvq.as_secs_f64() / (app + self.kvq).as_secs_f64().max(1e-12)
    }
}
