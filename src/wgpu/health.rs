//! Device loss and errors raised outside error scopes (DESIGN §6): recorded by the
//! device's callbacks and answered by the backend's next call, never a panic.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::{Error, Result};

/// What the device has reported.
#[derive(Debug, Default, Clone)]
pub struct Health(Arc<Mutex<State>>);

#[derive(Debug, Default)]
struct State {
    /// Why the device was lost, once it is.
    lost: Option<String>,
    /// The first error raised outside an error scope since the last call.
    error: Option<String>,
}

impl Health {
    /// Watches `device`: its loss, and its errors outside error scopes (which wgpu
    /// would otherwise answer with a panic). Only on devices kvq opened: an
    /// application's device keeps the application's own handlers.
    pub fn watch(&self, device: &wgpu::Device) {
        let health = self.clone();
        device.set_device_lost_callback(move |reason, message| {
            health.state().lost = Some(format!("{reason:?}: {message}"));
        });
        let health = self.clone();
        device.on_uncaptured_error(Arc::new(move |e| {
            health.state().error.get_or_insert(e.to_string());
        }));
    }

    /// `DeviceLost` once the device is lost; else the error raised outside an error
    /// scope since the last check, if any.
    pub fn check(&self) -> Result<()> {
        let mut state = self.state();
        if let Some(reason) = &state.lost {
            return Err(Error::DeviceLost(reason.clone()));
        }
        match state.error.take() {
            Some(e) => Err(Error::Device(e)),
            None => Ok(()),
        }
    }

    /// `e`, or `DeviceLost` if the device was lost meanwhile: a failed call is how
    /// loss shows first, and wgpu reports it (calls the callback) only when polled.
    pub fn explain(&self, device: &wgpu::Device, e: Error) -> Error {
        let _ = device.poll(wgpu::PollType::Poll);
        match &self.state().lost {
            Some(reason) => Error::DeviceLost(reason.clone()),
            None => e,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Faults injected by tests: the n-th allocation or submission from the moment
/// it was set fails (0: none pending).
#[derive(Debug, Default)]
pub struct Faults(std::sync::atomic::AtomicU64);

impl Faults {
    /// Makes the `n`-th allocation or submission from now fail; 0 clears it.
    pub fn set(&self, n: u64) {
        self.0.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Counts one allocation or submission (`what`): the injected one fails.
    pub fn check(&self, what: &str) -> crate::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let hit = self
            .0
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok_and(|n| n == 1);
        if hit {
            return Err(crate::Error::Device(format!(
                "injected fault at this {what}"
            )));
        }
        Ok(())
    }
}
