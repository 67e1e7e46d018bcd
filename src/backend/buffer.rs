//! `DeviceBuffer`: an opaque handle to memory owned by one backend.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use crate::{Error, Result};

/// A buffer of u32 words on some backend's device. Cheap to clone (shared handle).
/// f32 tensors are stored as their bit patterns.
#[derive(Clone)]
pub struct DeviceBuffer {
    words: usize,
    inner: Arc<dyn Any + Send + Sync>,
}

impl DeviceBuffer {
    /// Wraps a backend's own buffer object; used by backend implementations.
    pub fn new<T: Any + Send + Sync>(words: usize, inner: T) -> Self {
        DeviceBuffer {
            words,
            inner: Arc::new(inner),
        }
    }

    /// Length in u32 words.
    pub fn words(&self) -> usize {
        self.words
    }

    /// The backend's own buffer object, or `ForeignBuffer` if another backend made it.
    pub fn downcast<T: Any>(&self, backend: &'static str) -> Result<&T> {
        // Deref first: `Arc<dyn Any>` is itself `Any`.
        (*self.inner)
            .downcast_ref::<T>()
            .ok_or(Error::ForeignBuffer { expected: backend })
    }

    /// Checks that `[offset, offset + len)` lies inside the buffer.
    pub fn check_range(&self, what: &'static str, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.words => Ok(()),
            _ => Err(Error::OutOfRange {
                what,
                value: offset.saturating_add(len),
                limit: self.words + 1,
            }),
        }
    }
}

impl fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceBuffer({} words)", self.words)
    }
}
