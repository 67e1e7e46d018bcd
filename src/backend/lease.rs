//! Workspaces of prepared steps, reused: a step leases one and hands it back when
//! it is dropped, so that warm steps create no device memory. A backend builds a
//! workspace that is too small anew, each short buffer [`grow`]n.

use crate::Result;
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
    pub(crate) fn lease(
        &self,
        fits: impl Fn(&W) -> bool,
        build: impl FnOnce(Option<W>) -> Result<W>,
    ) -> Result<Lease<W>> {
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

/// `have` if it holds `need` units (`units` measures a buffer), else a buffer
/// `make` creates of the next power of two, at least twice `have` and at least
/// `min`, so that a growing workspace is rebuilt a logarithmic number of times.
pub(crate) fn grow<B: Clone>(
    have: Option<&B>,
    units: impl Fn(&B) -> u64,
    need: u64,
    min: u64,
    make: impl FnOnce(u64) -> Result<B>,
) -> Result<B> {
    match have {
        Some(b) if units(b) >= need => Ok(b.clone()),
        _ => make(
            need.next_power_of_two()
                .max(have.map_or(0, |b| 2 * units(b)))
                .max(min),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grown(have: Option<u64>, need: u64) -> u64 {
        grow(have.as_ref(), |&b| b, need, 16, Ok).unwrap()
    }

    #[test]
    fn buffers_are_kept_while_they_fit_and_at_least_double_otherwise() {
        assert_eq!(grown(Some(100), 100), 100);
        assert_eq!(grown(None, 3), 16);
        assert_eq!(grown(None, 100), 128);
        assert_eq!(grown(Some(100), 101), 200);
        assert_eq!(grown(Some(100), 300), 512);
    }

    #[test]
    fn leases_come_back_when_dropped_and_are_reused_if_they_fit() {
        let free = FreeList::<u64>::default();
        let build = |old: Option<u64>| Ok(old.map_or(1, |o| o * 10));
        let a = free.lease(|&w| w >= 5, build).unwrap();
        assert_eq!(*a.get(), 1);
        drop(a);
        let b = free.lease(|&w| w >= 5, build).unwrap();
        assert_eq!(*b.get(), 10, "a short free workspace is rebuilt from");
        drop(b);
        let c = free.lease(|&w| w >= 5, |_| Ok(99)).unwrap();
        assert_eq!(*c.get(), 10, "a free workspace that fits is lent as is");
        let d = free.lease(|&w| w >= 5, |_| Ok(99)).unwrap();
        assert_eq!(*d.get(), 99, "a lent workspace is not lent twice");
    }
}
