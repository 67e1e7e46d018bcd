//! kvq's own lock around everything it does on wgpu's GL backend.
//!
//! wgpu-hal runs every GL adapter of an instance on one EGL context behind one
//! lock. It holds that lock through each submission, where a kernel's first
//! dispatch compiles it (llvmpipe: up to 40 s with a cold shader cache), and a
//! thread that waits for the lock more than 6 s panics ("Could not lock adapter
//! context"). kvq's threads queue here instead, without a limit, so that at most
//! one of them is inside the GL backend at a time: GL runs one context's work in
//! order anyway, so nothing is lost. Re-entrant on one thread.

use std::cell::Cell;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, MutexGuard};

static GL: Mutex<()> = Mutex::new(());

thread_local! {
    /// How many entries into the gate this thread holds.
    static HELD: Cell<u32> = const { Cell::new(0) };
}

/// Whether one device's work passes the gate: GL devices' only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gate(bool);

impl Gate {
    /// Objects whose device is unknown (an application's buffers): entering costs
    /// one uncontended lock where no GL device is busy.
    pub const ANY: Gate = Gate(true);

    /// The gate for a device of `backend`.
    pub fn of(backend: wgpu::Backend) -> Self {
        Gate(backend == wgpu::Backend::Gl)
    }

    /// Holds the gate (for GL devices) until the returned value drops.
    pub fn enter(self) -> Entered {
        if !self.0 {
            return Entered { _entry: None };
        }
        let outer = HELD.get() == 0;
        let guard = outer.then(|| GL.lock().unwrap_or_else(|e| e.into_inner()));
        HELD.set(HELD.get() + 1);
        Entered {
            _entry: Some(Entry { _guard: guard }),
        }
    }
}

/// An entry into kvq's GL lock ([`WgpuBackend::hold`](super::WgpuBackend::hold));
/// leaves it when dropped. `None` off GL.
#[must_use]
pub struct Entered {
    _entry: Option<Entry>,
}

/// One counted entry of this thread; the outermost holds the lock.
struct Entry {
    _guard: Option<MutexGuard<'static, ()>>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        HELD.set(HELD.get() - 1);
    }
}

/// A value whose drop, which may free GL objects, passes the gate.
#[derive(Debug)]
pub struct Gated<T> {
    value: ManuallyDrop<T>,
    gate: Gate,
}

impl<T> Gated<T> {
    /// `value`, dropped inside `gate`.
    pub fn new(value: T, gate: Gate) -> Self {
        Gated {
            value: ManuallyDrop::new(value),
            gate,
        }
    }
}

impl<T> Deref for Gated<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> DerefMut for Gated<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.value
    }
}

impl<T> Drop for Gated<T> {
    fn drop(&mut self) {
        let _entered = self.gate.enter();
        // SAFETY: `value` is dropped once, here, and never touched after.
        unsafe { ManuallyDrop::drop(&mut self.value) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_is_reentrant_and_released() {
        let gate = Gate::ANY;
        {
            let _outer = gate.enter();
            let _inner = gate.enter();
            assert_eq!(HELD.get(), 2);
            assert!(GL.try_lock().is_err(), "held while entered");
        }
        assert_eq!(HELD.get(), 0);
        assert!(GL.try_lock().is_ok(), "released on leaving");
        let _off = Gate::of(wgpu::Backend::Vulkan).enter();
        assert_eq!(HELD.get(), 0, "only GL devices pass the gate");
    }
}
