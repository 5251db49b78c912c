//! Multi-head attention of the reference (`SelfAttention`): the first `local_heads` heads attend
//! with windowed softmax attention, the others with global linear attention (causal or not);
//! in cross-attention mode keys and values come from a context.

pub mod linformer;

use std::sync::Arc;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::kernels::causal_linear::LinearState;
use crate::kernels::linear::linear_attention;
use crate::kernels::local::{Dropout, LocalCache};
use crate::kernels::rotary::RotaryTable;
use crate::kernels::self_attention::{self_attention, HeadSpec};
use crate::nn::{dropout, rows2, Linear};
use crate::params::Builder;
use crate::pass::Pass;

/// Geometry and options of one attention layer.
#[derive(Clone, Debug)]
pub struct AttentionSpec {
    /// Width of the input.
    pub dim: usize,
    /// Attention heads.
    pub heads: usize,
    /// Width of each head.
    pub dim_head: usize,
    /// How many of the heads (the first ones) are local.
    pub local_heads: usize,
    /// Whether position i sees only positions up to i.
    pub causal: bool,
    /// Blind-spot bucket of causal global heads (`blindspot_size`).
    pub bucket: usize,
    /// Window of the local heads (`local_attn_window_size`).
    pub window: usize,
    /// Keys and values come from a context (cross-attention).
    pub receives_context: bool,
    /// Dropout after the output projection (`attn_layer_dropout`).
    pub dropout: f64,
    /// Dropout on the local heads' attention probabilities (`attn_dropout`).
    pub attn_dropout: f64,
    /// One key/value head shared by the local heads and one by the global heads (the
    /// reference's `one_kv_head`, before 0.17).
    pub one_kv_head: bool,
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
    /// [batch, m], nonzero = a real context position.
    pub context_mask: Option<Tensor>,
}

#[derive(Clone, Debug)]
/// The reference's `SelfAttention`: projections, local and global heads, output projection.
pub struct SelfAttention {
    /// Geometry and options.
    pub spec: AttentionSpec,
    /// Query projection, no bias.
    pub to_q: Linear,
    /// Key projection, no bias (one head per key/value head).
    pub to_k: Linear,
    /// Value projection, no bias.
    pub to_v: Linear,
    /// Output projection, with bias.
    pub to_out: Linear,
}

/// Dropout site numbers inside a layer pair.
pub(crate) const SITE_ATTN: u64 = 0;
pub(crate) const SITE_OUT: u64 = 1;

impl SelfAttention {
    pub(crate) fn new(b: &Builder, spec: AttentionSpec) -> Result<Self> {
        let inner = spec.heads * spec.dim_head;
        let kv = spec.kv_heads() * spec.dim_head;
        Ok(Self {
            to_q: Linear::new(&b.pp("to_q"), spec.dim, inner, false)?,
            to_k: Linear::new(&b.pp("to_k"), spec.dim, kv, false)?,
            to_v: Linear::new(&b.pp("to_v"), spec.dim, kv, false)?,
            to_out: Linear::new(&b.pp("to_out"), inner, spec.dim, true)?,
            spec,
        })
    }

    /// The fused projection [batch, n, 3 · heads · dim_head] of queries, keys and values (shared
    /// key/value heads repeated for every head that reads them). `detached` leaves the weights
    /// out of the graph.
    pub(crate) fn qkv(&self, x: &Tensor, detached: bool) -> Result<Tensor> {
        let s = &self.spec;
        let w = |l: &Linear| if detached { l.weight.detach() } else { l.weight.clone() };
        let (b, n, d) = x.dims3()?;
        let x2 = x.reshape((b * n, d))?;
        if !s.one_kv_head {
            let all = Tensor::cat(&[&w(&self.to_q), &w(&self.to_k), &w(&self.to_v)], 0)?;
            return Ok(x2.matmul(&all.t()?)?.reshape((b, n, all.dim(0)?))?);
        }
        let q = x2.matmul(&w(&self.to_q).t()?)?;
        let kv = x2.matmul(&Tensor::cat(&[&w(&self.to_k), &w(&self.to_v)], 0)?.t()?)?;
        let kve = s.kv_heads() * s.dim_head;
        let (k, v) = (self.expand_kv(&kv.narrow(1, 0, kve)?)?, self.expand_kv(&kv.narrow(1, kve, kve)?)?);
        Ok(Tensor::cat(&[&q, &k.flatten_from(1)?, &v.flatten_from(1)?], 1)?.reshape((b, n, 3 * s.heads * s.dim_head))?)
    }

    /// Keys or values [.., kv_heads · dim_head] as [.., heads, dim_head]: each query head's own
    /// (a view), or with shared heads each query head's shared one.
    pub(crate) fn expand_kv(&self, t: &Tensor) -> Result<Tensor> {
        let s = &self.spec;
        let mut shape = t.dims().to_vec();
        shape.pop();
        let rank = shape.len();
        let heads = t.reshape([shape.clone(), vec![s.kv_heads(), s.dim_head]].concat())?;
        if !s.one_kv_head {
            return Ok(heads);
        }
        let of: Vec<u32> = (0..s.heads).map(|h| s.kv_of(h) as u32).collect();
        Ok(heads.index_select(&Tensor::from_vec(of, s.heads, t.device())?, rank)?)
    }

    /// The backward pass of [`SelfAttention::expand_kv`]: a shared head's gradient is the sum
    /// over the heads that read it. `dt` is [.., heads, dim_head]; returns [.., kv_heads · dim_head].
    pub(crate) fn reduce_kv(&self, dt: &Tensor) -> Result<Tensor> {
        let s = &self.spec;
        let rank = dt.rank() - 2;
        if !s.one_kv_head {
            return Ok(dt.flatten_from(rank)?);
        }
        let groups: Vec<Tensor> = s.kv_groups().into_iter().map(|(first, count)| dt.narrow(rank, first, count)?.sum_keepdim(rank)).collect::<candle_core::Result<_>>()?;
        Ok(Tensor::cat(&groups, rank)?.flatten_from(rank)?)
    }

    /// The backward pass of [`SelfAttention::qkv`] (detached): dx, with the weight gradients
    /// deferred to `pass`.
    pub(crate) fn qkv_backward(&self, x: &Tensor, dqkv: &Tensor, pass: &Pass) -> Result<Tensor> {
        let s = &self.spec;
        let (he, e) = (s.heads * s.dim_head, s.dim_head);
        if !s.one_kv_head {
            let (x2, dqkv2) = (rows2(x)?, rows2(dqkv)?);
            let dw = dqkv2.t()?.matmul(&x2)?;
            for (i, layer) in [&self.to_q, &self.to_k, &self.to_v].into_iter().enumerate() {
                pass.defer(&layer.weight, dw.narrow(0, i * he, he)?)?;
            }
            let w = Tensor::cat(&[&self.to_q.weight.detach(), &self.to_k.weight.detach(), &self.to_v.weight.detach()], 0)?;
            return Ok(dqkv2.matmul(&w)?.reshape(x.dims())?);
        }
        let (b, n, _) = dqkv.dims3()?;
        let shared = |part: usize| self.reduce_kv(&dqkv.narrow(2, part * he, he)?.reshape((b, n, s.heads, e))?);
        let dx = self.to_q.backward(x, &dqkv.narrow(2, 0, he)?, pass)?;
        let dx = (dx + self.to_k.backward(x, &shared(1)?, pass)?)?;
        Ok((dx + self.to_v.backward(x, &shared(2)?, pass)?)?)
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
            let (b, n, _) = x.dims3()?;
            let q = self.to_q.matmul(x)?.reshape((b, n, s.heads, s.dim_head))?;
            let (k, v) = (self.expand_kv(&self.to_k.matmul(context)?)?, self.expand_kv(&self.to_v.matmul(context)?)?);
            let out = linear_attention(&q, &k, &v, inputs.context_mask.as_ref())?;
            out.flatten_from(2)?
        } else {
            self.attend(&self.qkv(x, false)?, inputs, seeds.0)?
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
        let qkv = self.qkv(x, false)?;
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
            for (first, _) in s.kv_groups() {
                if first < s.local_heads {
                    local.push(LocalCache::from_prefix(&head(r, 1, first), &head(r, 2, first), dh, s.window));
                } else {
                    global.push(LinearState::from_prefix(&head(r, 1, first), &head(r, 2, first), dh, dh, s.bucket));
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
        let qkv = self.qkv(x, false)?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let part = |i: usize| -> Vec<f32> { (0..b).flat_map(|r| qkv[(3 * r + i) * width..(3 * r + i + 1) * width].iter().copied()).collect() };
        let (mut q, mut k, v) = (part(0), part(1), part(2));
        if let Some(table) = rotary_table {
            for r in 0..b {
                table.rotate(&mut q[r * width..(r + 1) * width], dh, positions[r]);
                table.rotate(&mut k[r * width..(r + 1) * width], dh, positions[r]);
            }
        }
        let mut out = vec![0f32; b * width];
        let groups = s.kv_groups();
        let local_groups = groups.iter().filter(|g| g.0 < s.local_heads).count();
        let global_groups = groups.len() - local_groups;
        for r in 0..b {
            let (mut li, mut gi) = (0, 0);
            for &(first, count) in &groups {
                // Heads first .. first + count read the same keys and values (those of `first`).
                let at = r * width + first * dh;
                let (qs, kh, vh) = (&q[at..at + count * dh], &k[at..at + dh], &v[at..at + dh]);
                let o = &mut out[at..at + count * dh];
                if first < s.local_heads {
                    state.local[r * local_groups + li].step(qs, kh, vh, o);
                    li += 1;
                } else {
                    state.global[r * global_groups + gi].step(qs, kh, vh, o);
                    gi += 1;
                }
            }
        }
        let merged = Tensor::from_vec(out, (b, 1, width), x.device())?.to_dtype(x.dtype())?;
        self.to_out.forward(&merged)
    }
}

impl AttentionSpec {
    /// How many key/value heads the layer has.
    pub fn kv_heads(&self) -> usize {
        if self.one_kv_head { (self.local_heads > 0) as usize + (self.local_heads < self.heads) as usize } else { self.heads }
    }

    /// The key/value head query head `h` reads.
    pub fn kv_of(&self, h: usize) -> usize {
        match self.one_kv_head {
            true => (self.local_heads > 0 && h >= self.local_heads) as usize,
            false => h,
        }
    }

    /// The query heads of each key/value head, as (first, count), in order.
    pub fn kv_groups(&self) -> Vec<(usize, usize)> {
        (0..self.kv_heads()).map(|g| {
            let heads: Vec<usize> = (0..self.heads).filter(|&h| self.kv_of(h) == g).collect();
            (heads[0], heads.len())
        }).collect()
    }
}

/// The decoding state of one attention layer: per (row, key/value head), the local heads' key
/// and value window and the global heads' running sums.
#[derive(Clone, Debug)]
pub struct AttentionState {
    /// Per (row, key/value head) of the local heads: their key and value windows.
    pub local: Vec<LocalCache>,
    /// Per (row, key/value head) of the global heads: their running sums.
    pub global: Vec<LinearState>,
}
