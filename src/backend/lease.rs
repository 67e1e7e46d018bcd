//! Workspaces of prepared steps, reused: a step leases one and hands it back when
//! it is dropped, so that warm steps create no device memory. A backend builds a
//! workspace that is too small anew, each short buffer [`grown`].

use std::sync::{Arc, Mutex, MutexGuard};

/// Free workspaces of one device (`W` clones are handles to the same memory).
#[derive(Debug)]
pub(crate) struct FreeList<W>(Arc<Mutex<Vec<W>>>);

impl<W> Default for FreeList<W> {
    fn default() -> Self {
        FreeList(Arc::default())
    }
}

/// A workspace lent to a step, back to its free list when dropped.
#[derive(Debug)]
pub(crate) struct Lease<W: Clone> {
    workspace: W,
    home: Arc<Mutex<Vec<W>>>,
}

impl<W: Clone> Lease<W> {
    /// The workspace.
    pub(crate) fn get(&self) -> &W {
        &self.workspace
    }
}

impl<W: Clone> Drop for Lease<W> {
    fn drop(&mut self) {
        lock(&self.home).push(self.workspace.clone());
    }
}

fn lock<W>(m: &Mutex<Vec<W>>) -> MutexGuard<'_, Vec<W>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<W: Clone> FreeList<W> {
    /// A free workspace that `fits`, else one `build` makes from a free one (or
    /// from none), outside the list's lock.
    pub(crate) fn lease<E>(
        &self,
        fits: impl Fn(&W) -> bool,
        build: impl FnOnce(Option<W>) -> Result<W, E>,
    ) -> Result<Lease<W>, E> {
        let (found, old) = {
            let mut free = lock(&self.0);
            match free.iter().position(&fits) {
                Some(i) => (Some(free.swap_remove(i)), None),
                None => (None, free.pop()),
            }
        };
        let workspace = match found {
            Some(w) => w,
            None => build(old)?,
        };
        Ok(Lease {
            workspace,
            home: self.0.clone(),
        })
    }
}

/// The size a buffer of `have` units replaces itself with to hold `need`: the
/// next power of two, at least twice as large and at least `min`; `None` when it
/// holds `need` already.
pub(crate) fn grown(have: Option<u64>, need: u64, min: u64) -> Option<u64> {
    match have {
        Some(h) if h >= need => None,
        _ => Some(
            need.next_power_of_two()
                .max(have.map_or(0, |h| 2 * h))
                .max(min),
        ),
    }
}
