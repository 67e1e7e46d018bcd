//! Attention parameters (DESIGN §3): scale, softcap, sliding window, GQA ratio;
//! and how GPU kernels cut attention into work ([`work`]).

pub mod work;

use crate::{Error, Result};

/// What a caller asks of one attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnParams {
    /// Query heads; a multiple of the cache's kv_heads (q head `h` reads kv head `h / ratio`).
    pub q_heads: usize,
    /// Score scale; `None` means `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Logit softcap `c`: scores become `c * tanh(score / c)`.
    pub softcap: Option<f32>,
    /// Sliding window: a query at position p sees keys in `(p - window, p]`.
    pub window: Option<usize>,
}

impl AttnParams {
    /// Plain attention with `q_heads` query heads and the default scale.
    pub fn new(q_heads: usize) -> Self {
        AttnParams {
            q_heads,
            scale: None,
            softcap: None,
            window: None,
        }
    }

    /// Sets the score scale.
    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Sets the logit softcap.
    pub fn with_softcap(mut self, cap: f32) -> Self {
        self.softcap = Some(cap);
        self
    }

    /// Sets the sliding window.
    pub fn with_window(mut self, window: usize) -> Self {
        self.window = Some(window);
        self
    }

    /// Checks the parameters against a cache shape and fills in defaults.
    pub fn resolve(&self, kv_heads: usize, head_dim: usize) -> Result<Resolved> {
        if self.q_heads == 0 || kv_heads == 0 || self.q_heads % kv_heads != 0 {
            return Err(Error::InvalidConfig(format!(
                "q_heads {} must be a positive multiple of kv_heads {kv_heads}",
                self.q_heads
            )));
        }
        // Kernels read q_heads as u32: a larger count must not be cut silently.
        let q_heads = u32::try_from(self.q_heads).map_err(|_| {
            Error::InvalidConfig(format!(
                "q_heads {} is more than kernels can index ({})",
                self.q_heads,
                u32::MAX
            ))
        })?;
        let scale = self.scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
        if !scale.is_finite() {
            return Err(Error::InvalidConfig(format!("scale {scale} is not finite")));
        }
        let softcap = self.softcap.unwrap_or(0.0);
        if self.softcap.is_some() && !(softcap.is_finite() && softcap > 0.0) {
            return Err(Error::InvalidConfig(format!(
                "softcap {softcap} must be finite and positive"
            )));
        }
        let window = match self.window {
            Some(0) => {
                return Err(Error::InvalidConfig("window 0: must be at least 1".into()));
            }
            Some(w) => u32::try_from(w).unwrap_or(u32::MAX),
            None => 0,
        };
        Ok(Resolved {
            q_heads,
            group_ratio: (self.q_heads / kv_heads) as u32,
            scale,
            softcap,
            window,
        })
    }
}

/// Parameters after checking, as kernels read them (0 means "off").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resolved {
    /// Query heads.
    pub q_heads: u32,
    /// q heads per kv head.
    pub group_ratio: u32,
    /// Score scale.
    pub scale: f32,
    /// Softcap, 0 when off.
    pub softcap: f32,
    /// Window, 0 when off.
    pub window: u32,
}

impl Resolved {
    /// Applies the softcap to a raw scaled score.
    pub fn cap(&self, s: f32) -> f32 {
        if self.softcap > 0.0 {
            self.softcap * (s / self.softcap).tanh()
        } else {
            s
        }
    }

    /// First key position a query at `pos` sees.
    pub fn first_key(&self, pos: usize) -> usize {
        if self.window > 0 {
            (pos + 1).saturating_sub(self.window as usize)
        } else {
            0
        }
    }
}
