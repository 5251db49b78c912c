//! Multi-head attention of the reference (`SelfAttention`): the first `local_heads` heads attend
//! with windowed softmax attention, the others with global linear attention (causal or not);
//! in cross-attention mode keys and values come from a context.

use std::sync::Arc;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::kernels::causal_linear::LinearState;
use crate::kernels::linear::linear_attention;
use crate::kernels::local::{Dropout, LocalCache};
use crate::kernels::rotary::RotaryTable;
use crate::kernels::self_attention::{self_attention, HeadSpec};
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

    /// The fused projection [batch, n, 3 · heads · dim_head] of queries, keys and values.
    fn qkv(&self, x: &Tensor) -> Result<Tensor> {
        let w = Tensor::cat(&[&self.to_q.weight, &self.to_k.weight, &self.to_v.weight], 0)?;
        let (b, n, d) = x.dims3()?;
        Ok(x.reshape((b * n, d))?.matmul(&w.t()?)?.reshape((b, n, w.dim(0)?))?)
    }

    pub(crate) fn head_spec(&self) -> HeadSpec {
        let s = &self.spec;
        HeadSpec { heads: s.heads, local_heads: s.local_heads, dim_head: s.dim_head, causal: s.causal, bucket: s.bucket, window: s.window }
    }

    /// The merged head outputs of self-attention on `qkv`.
    fn attend(&self, qkv: &Tensor, inputs: &AttentionInputs, seed: Option<u64>) -> Result<Tensor> {
        let s = &self.spec;
        let drop = seed.filter(|_| s.attn_dropout > 0.0 && s.local_heads > 0).map(|seed| Dropout { p: s.attn_dropout, seed });
        let rotary = inputs.rotary.as_ref().map(|(t, o)| (t, *o));
        Ok(self_attention(qkv, self.head_spec(), inputs.mask.as_ref(), rotary, drop)?)
    }

    /// `x`: [batch, n, dim]. `seeds`: dropout seeds for (attention probabilities, output).
    pub fn forward(&self, x: &Tensor, inputs: &AttentionInputs, seeds: (Option<u64>, Option<u64>)) -> Result<Tensor> {
        let s = &self.spec;
        let merged = if s.receives_context {
            // Cross-attention: global, non-causal heads over the context, no positions.
            let context = inputs.context.as_ref().ok_or_else(|| Error::input("this model receives context: pass a context tensor"))?;
            let split = |l: &Linear, t: &Tensor| -> Result<Tensor> {
                let (b, m, _) = t.dims3()?;
                Ok(l.matmul(t)?.reshape((b, m, s.heads, s.dim_head))?)
            };
            let out = linear_attention(&split(&self.to_q, x)?, &split(&self.to_k, context)?, &split(&self.to_v, context)?, inputs.context_mask.as_ref())?;
            out.flatten_from(2)?
        } else {
            self.attend(&self.qkv(x)?, inputs, seeds.0)?
        };
        dropout(&self.to_out.forward(&merged)?, s.dropout, seeds.1)
    }

    /// The forward pass over a prompt whose first `n` positions are real, and the decoding
    /// state it leaves (causal self-attention only).
    pub fn prefill(&self, x: &Tensor, inputs: &AttentionInputs, n: usize) -> Result<(Tensor, AttentionState)> {
        let s = &self.spec;
        if !s.causal || s.receives_context {
            return Err(Error::input("generation needs causal self-attention"));
        }
        let qkv = self.qkv(x)?;
        let out = self.to_out.forward(&self.attend(&qkv, inputs, None)?)?;
        let (b, dh, he) = (x.dim(0)?, s.dim_head, s.heads * s.dim_head);
        let rows = qkv.narrow(1, 0, n)?.to_dtype(candle_core::DType::F32)?.to_vec3::<f32>()?;
        // One head's first n keys (rotated) or values, as host rows.
        let head = |r: usize, part: usize, h: usize| -> Vec<f32> {
            let mut v: Vec<f32> = rows[r].iter().flat_map(|row| row[part * he + h * dh..part * he + (h + 1) * dh].iter().copied()).collect();
            if let (1, Some((table, offset))) = (part, &inputs.rotary) {
                table.rotate_rows(&mut v, dh, *offset, false);
            }
            v
        };
        let (mut local, mut global) = (vec![], vec![]);
        for r in 0..b {
            for h in 0..s.heads {
                if h < s.local_heads {
                    local.push(LocalCache::from_prefix(&head(r, 1, h), &head(r, 2, h), dh, s.window));
                } else {
                    global.push(LinearState::from_prefix(&head(r, 1, h), &head(r, 2, h), dh, dh, s.bucket));
                }
            }
        }
        Ok((out, AttentionState { local, global }))
    }

    /// One decoding step: `x` [batch, 1, dim] at `positions` (one per row).
    pub fn step(&self, x: &Tensor, state: &mut AttentionState, rotary_table: Option<&RotaryTable>, positions: &[usize]) -> Result<Tensor> {
        let s = &self.spec;
        let (b, dh) = (x.dim(0)?, s.dim_head);
        let width = s.heads * dh;
        let qkv = self.qkv(x)?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let part = |i: usize| -> Vec<f32> { (0..b).flat_map(|r| qkv[(3 * r + i) * width..(3 * r + i + 1) * width].iter().copied()).collect() };
        let (mut q, mut k, v) = (part(0), part(1), part(2));
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

/// The decoding state of one attention layer: per (row, head), the local heads' key/value
/// window and the global heads' running sums.
#[derive(Clone, Debug)]
pub struct AttentionState {
    pub local: Vec<LocalCache>,
    pub global: Vec<LinearState>,
}
