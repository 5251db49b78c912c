//! Multi-head attention of the reference (`SelfAttention`): the first `local_heads` heads attend
//! with windowed softmax attention, the others with global linear attention (causal or not);
//! in cross-attention mode keys and values come from a context.

use std::sync::Arc;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::kernels::causal_linear::{causal_linear_attention, LinearState};
use crate::kernels::linear::linear_attention;
use crate::kernels::local::{local_attention, Dropout, LocalCache, Windows};
use crate::kernels::rotary::{rotary, RotaryTable};
use crate::nn::{dropout, Linear};
use crate::params::Builder;

/// Geometry and options of one attention layer.
#[derive(Clone, Debug)]
pub struct AttentionSpec {
    pub dim: usize,
    pub heads: usize,
    pub dim_head: usize,
    pub local_heads: usize,
    pub causal: bool,
    pub bucket: usize,
    pub window: usize,
    pub receives_context: bool,
    /// Dropout after the output projection (`attn_layer_dropout`).
    pub dropout: f64,
    /// Dropout on the local heads' attention probabilities (`attn_dropout`).
    pub attn_dropout: f64,
}

/// What an attention layer reads besides its input.
#[derive(Clone, Debug, Default)]
pub struct AttentionInputs {
    /// [batch, n], nonzero = keep.
    pub mask: Option<Tensor>,
    /// Rotary table and the position of the first row.
    pub rotary: Option<(Arc<RotaryTable>, usize)>,
    /// [batch, m, dim] keys/values source of cross-attention, and its mask.
    pub context: Option<Tensor>,
    pub context_mask: Option<Tensor>,
}

#[derive(Clone, Debug)]
pub struct SelfAttention {
    pub spec: AttentionSpec,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
}

/// Dropout site numbers inside a layer pair.
pub(crate) const SITE_ATTN: u64 = 0;
pub(crate) const SITE_OUT: u64 = 1;

impl SelfAttention {
    pub(crate) fn new(b: &Builder, spec: AttentionSpec) -> Result<Self> {
        let inner = spec.heads * spec.dim_head;
        Ok(Self {
            to_q: Linear::new(&b.pp("to_q"), spec.dim, inner, false)?,
            to_k: Linear::new(&b.pp("to_k"), spec.dim, inner, false)?,
            to_v: Linear::new(&b.pp("to_v"), spec.dim, inner, false)?,
            to_out: Linear::new(&b.pp("to_out"), inner, spec.dim, true)?,
            spec,
        })
    }

    /// Projects `x` with rows [first, first + count) of `layer`'s heads, as [b, n, count, dh].
    fn project(&self, layer: &Linear, x: &Tensor, first: usize, count: usize) -> Result<Tensor> {
        let dh = self.spec.dim_head;
        let (b, n, _) = x.dims3()?;
        let w = layer.weight.narrow(0, first * dh, count * dh)?;
        let y = x.reshape((b * n, x.dim(2)?))?.matmul(&w.t()?)?;
        Ok(y.reshape((b, n, count, dh))?)
    }

    /// Queries, keys and values of the local and the global heads, rotated where rotary
    /// positions are given: each [batch, n, heads, dim_head].
    fn heads(&self, x: &Tensor, inputs: &AttentionInputs) -> Result<HeadGroups> {
        let s = &self.spec;
        let source = if s.receives_context {
            inputs.context.as_ref().ok_or_else(|| Error::input("this model receives context: pass a context tensor"))?
        } else {
            x
        };
        let rotate = |t: Tensor| -> Result<Tensor> {
            match (&inputs.rotary, s.receives_context) {
                (Some((table, offset)), false) => Ok(rotary(&t, table, *offset)?),
                _ => Ok(t),
            }
        };
        let group = |first: usize, count: usize| -> Result<Option<Qkv>> {
            if count == 0 {
                return Ok(None);
            }
            Ok(Some(Qkv {
                q: rotate(self.project(&self.to_q, x, first, count)?)?,
                k: rotate(self.project(&self.to_k, source, first, count)?)?,
                v: self.project(&self.to_v, source, first, count)?,
            }))
        };
        Ok(HeadGroups { local: group(0, s.local_heads)?, global: group(s.local_heads, s.heads - s.local_heads)? })
    }

    /// `x`: [batch, n, dim]. `seeds`: dropout seeds for (attention probabilities, output).
    pub fn forward(&self, x: &Tensor, inputs: &AttentionInputs, seeds: (Option<u64>, Option<u64>)) -> Result<Tensor> {
        let heads = self.heads(x, inputs)?;
        self.attend(&heads, inputs, seeds)
    }

    fn attend(&self, heads: &HeadGroups, inputs: &AttentionInputs, seeds: (Option<u64>, Option<u64>)) -> Result<Tensor> {
        let s = &self.spec;
        let mut outs = Vec::with_capacity(2);
        if let Some(Qkv { q, k, v }) = &heads.local {
            let windows = Windows { size: s.window, causal: s.causal };
            let drop = seeds.0.filter(|_| s.attn_dropout > 0.0).map(|seed| Dropout { p: s.attn_dropout, seed });
            outs.push(local_attention(q, k, v, inputs.mask.as_ref(), windows, drop)?.flatten_from(2)?);
        }
        if let Some(Qkv { q, k, v }) = &heads.global {
            let out = if s.receives_context {
                linear_attention(q, k, v, inputs.context_mask.as_ref())?
            } else if s.causal {
                causal_linear_attention(q, k, v, inputs.mask.as_ref(), s.bucket)?
            } else {
                linear_attention(q, k, v, inputs.mask.as_ref())?
            };
            outs.push(out.flatten_from(2)?);
        }
        let merged = if outs.len() == 1 { outs.pop().expect("one part") } else { Tensor::cat(&outs, 2)? };
        dropout(&self.to_out.forward(&merged)?, s.dropout, seeds.1)
    }

    /// The forward pass over a prompt whose first `n` positions are real, and the decoding
    /// state it leaves (causal self-attention only).
    pub fn prefill(&self, x: &Tensor, inputs: &AttentionInputs, n: usize) -> Result<(Tensor, AttentionState)> {
        let s = &self.spec;
        if !s.causal || s.receives_context {
            return Err(Error::input("generation needs causal self-attention"));
        }
        let heads = self.heads(x, inputs)?;
        let out = self.attend(&heads, inputs, (None, None))?;
        let b = x.dim(0)?;
        let dh = s.dim_head;
        // Per (row, head): the first n rows of k and v as host vectors.
        let rows = |t: &Tensor, r: usize, h: usize| -> Result<Vec<f32>> {
            Ok(t.narrow(0, r, 1)?.narrow(1, 0, n)?.narrow(2, h, 1)?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let mut local = vec![];
        if let Some(Qkv { k, v, .. }) = &heads.local {
            for r in 0..b {
                for h in 0..s.local_heads {
                    local.push(LocalCache::from_prefix(&rows(k, r, h)?, &rows(v, r, h)?, dh, s.window));
                }
            }
        }
        let mut global = vec![];
        if let Some(Qkv { k, v, .. }) = &heads.global {
            for r in 0..b {
                for h in 0..s.heads - s.local_heads {
                    global.push(LinearState::from_prefix(&rows(k, r, h)?, &rows(v, r, h)?, dh, dh, s.bucket));
                }
            }
        }
        Ok((out, AttentionState { local, global }))
    }

    /// One decoding step: `x` [batch, 1, dim] at `positions` (one per row).
    pub fn step(&self, x: &Tensor, state: &mut AttentionState, rotary_table: Option<&RotaryTable>, positions: &[usize]) -> Result<Tensor> {
        let s = &self.spec;
        let (b, dh) = (x.dim(0)?, s.dim_head);
        let host = |l: &Linear| -> Result<Vec<f32>> { Ok(l.matmul(x)?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
        let (mut q, mut k, v) = (host(&self.to_q)?, host(&self.to_k)?, host(&self.to_v)?);
        let width = s.heads * dh;
        if let Some(table) = rotary_table {
            for r in 0..b {
                table.rotate(&mut q[r * width..(r + 1) * width], dh, positions[r]);
                table.rotate(&mut k[r * width..(r + 1) * width], dh, positions[r]);
            }
        }
        let mut out = vec![0f32; b * width];
        let l = s.local_heads;
        for r in 0..b {
            for h in 0..s.heads {
                let at = r * width + h * dh;
                let (qh, kh, vh) = (&q[at..at + dh], &k[at..at + dh], &v[at..at + dh]);
                let o = &mut out[at..at + dh];
                if h < l {
                    state.local[r * l + h].step(qh, kh, vh, o);
                } else {
                    state.global[r * (s.heads - l) + h - l].step(qh, kh, vh, o);
                }
            }
        }
        let merged = Tensor::from_vec(out, (b, 1, width), x.device())?.to_dtype(x.dtype())?;
        self.to_out.forward(&merged)
    }
}

/// Queries, keys and values of a group of heads.
struct Qkv {
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

struct HeadGroups {
    local: Option<Qkv>,
    global: Option<Qkv>,
}

/// The decoding state of one attention layer: per (row, head), the local heads' key/value
/// window and the global heads' running sums.
#[derive(Clone, Debug)]
pub struct AttentionState {
    pub local: Vec<LocalCache>,
    pub global: Vec<LinearState>,
}
