//! Multi-head attention of the reference (`SelfAttention`): the first `local_heads` heads attend
//! with windowed softmax attention, the others with global linear attention (causal or not);
//! in cross-attention mode keys and values come from a context.

use std::sync::Arc;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::kernels::causal_linear::causal_linear_attention;
use crate::kernels::linear::linear_attention;
use crate::kernels::local::{local_attention, Dropout, Windows};
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

    /// `x`: [batch, n, dim]. `seeds`: dropout seeds for (attention probabilities, output).
    pub fn forward(&self, x: &Tensor, inputs: &AttentionInputs, seeds: (Option<u64>, Option<u64>)) -> Result<Tensor> {
        let s = &self.spec;
        let (b, n, _) = x.dims3()?;
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
        let (l, g) = (s.local_heads, s.heads - s.local_heads);
        let mut outs = Vec::with_capacity(2);
        if l > 0 {
            let q = rotate(self.project(&self.to_q, x, 0, l)?)?;
            let k = rotate(self.project(&self.to_k, source, 0, l)?)?;
            let v = self.project(&self.to_v, source, 0, l)?;
            let windows = Windows { size: s.window, causal: s.causal };
            let drop = seeds.0.filter(|_| s.attn_dropout > 0.0).map(|seed| Dropout { p: s.attn_dropout, seed });
            let out = local_attention(&q, &k, &v, inputs.mask.as_ref(), windows, drop)?;
            outs.push(out.reshape((b, n, l * s.dim_head))?);
        }
        if g > 0 {
            let q = rotate(self.project(&self.to_q, x, l, g)?)?;
            let k = rotate(self.project(&self.to_k, source, l, g)?)?;
            let v = self.project(&self.to_v, source, l, g)?;
            let out = if s.receives_context {
                linear_attention(&q, &k, &v, inputs.context_mask.as_ref())?
            } else if s.causal {
                causal_linear_attention(&q, &k, &v, inputs.mask.as_ref(), s.bucket)?
            } else {
                linear_attention(&q, &k, &v, inputs.mask.as_ref())?
            };
            outs.push(out.reshape((b, n, g * s.dim_head))?);
        }
        let merged = if outs.len() == 1 { outs.pop().expect("one part") } else { Tensor::cat(&outs, 2)? };
        dropout(&self.to_out.forward(&merged)?, s.dropout, seeds.1)
    }
}
