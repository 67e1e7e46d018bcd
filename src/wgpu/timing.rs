//! Device time of kvq's compute passes from timestamp queries (DESIGN §5: time with
//! timestamps where the adapter has them), for benchmarks: every pass recorded
//! while timing is on writes a begin and an end timestamp; each submission resolves
//! them; [`Timer::take`] sums the passes since the last take.

use std::time::Duration;

use super::bindings::Created;
use crate::{Error, Result};

/// Timestamps one timer holds between takes: two per pass.
const QUERIES: u32 = 2048;

/// Timestamp queries of one device and the buffers that read them back.
#[derive(Debug)]
pub struct Timer {
    queries: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    readback: wgpu::Buffer,
    /// Timestamps written since the last take.
    used: u32,
    /// Passes that found no free query since the last take.
    missed: u32,
    period_ns: f32,
}

impl Timer {
    /// A timer on `device`, or `None` without the TIMESTAMP_QUERY feature.
    pub fn new(device: &wgpu::Device, queue: &wgpu::Queue, created: &Created) -> Option<Self> {
        if !device.features().contains(wgpu::Features::TIMESTAMP_QUERY) {
            return None;
        }
        let bytes = QUERIES as u64 * 8;
        let buffer = |label, usage| {
            created.count();
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage,
                mapped_at_creation: false,
            })
        };
        created.count();
        Some(Timer {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("kvq timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: QUERIES,
            }),
            resolved: buffer(
                "kvq timestamps resolved",
                wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            ),
            readback: buffer(
                "kvq timestamps readback",
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            ),
            used: 0,
            missed: 0,
            period_ns: queue.get_timestamp_period(),
        })
    }

    /// Where the next pass writes its timestamps, while queries are left.
    pub fn next_pass(&mut self) -> Option<wgpu::ComputePassTimestampWrites<'_>> {
        if self.used + 2 > QUERIES {
            self.missed += 1;
            return None;
        }
        let begin = self.used;
        self.used += 2;
        Some(wgpu::ComputePassTimestampWrites {
            query_set: &self.queries,
            beginning_of_pass_write_index: Some(begin),
            end_of_pass_write_index: Some(begin + 1),
        })
    }

    /// Resolves the timestamps written so far into the readback buffer, at the end
    /// of a submission's encoder.
    pub fn resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        if self.used > 0 {
            encoder.resolve_query_set(&self.queries, 0..self.used, &self.resolved, 0);
            encoder.copy_buffer_to_buffer(
                &self.resolved,
                0,
                &self.readback,
                0,
                self.used as u64 * 8,
            );
        }
    }

    /// Device time of the passes since the last take (`None` if there were none),
    /// once their submissions are done; waits for them.
    pub fn take(&mut self, device: &wgpu::Device) -> Result<Option<Duration>> {
        let (used, missed) = (self.used, self.missed);
        self.used = 0;
        self.missed = 0;
        if missed > 0 {
            return Err(Error::Device(format!(
                "{missed} passes were not timed: more than {} between reads of the device time",
                QUERIES / 2
            )));
        }
        if used == 0 {
            return Ok(None);
        }
        let slice = self.readback.slice(..used as u64 * 8);
        let (tx, rx) = futures::channel::oneshot::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        super::wait(device, None)?;
        pollster::block_on(rx)
            .map_err(|_| Error::Device("timestamp readback cancelled".into()))?
            .map_err(|e| Error::Device(format!("timestamp readback: {e}")))?;
        let ticks: u64 = {
            let view = slice
                .get_mapped_range()
                .map_err(|e| Error::Device(format!("timestamp readback: {e}")))?;
            let stamps: &[u64] = bytemuck::cast_slice(&view);
            stamps
                .chunks_exact(2)
                .map(|pass| pass[1].saturating_sub(pass[0]))
                .sum()
        };
        self.readback.unmap();
        Ok(Some(Duration::from_nanos(
            (ticks as f64 * self.period_ns as f64) as u64,
        )))
    }
}
