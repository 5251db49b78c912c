//! Hand-written backward passes of the blocks (llm.c style): a forward pass that keeps what the
//! backward pass needs, the backward pass, which returns `dx` (and the context gradient of
//! cross-attention) and defers the parameter gradients to the [`Pass`], and `vjp`, both at once
//! for reversible stacks, which recompute blocks (feed-forward layers chunk by chunk, so that
//! the hidden activations of only one chunk are alive at a time). They run the fused kernels'
//! forward and backward directly, with no autograd graph: one allocation per intermediate
//! instead of a graph node with its gradient bookkeeping.
//!
//! Where no fused kernels run (other devices, `LAT_KERNELS=reference`) the same contract is
//! met by candle's autograd on a local graph. Tests check that the two agree.

use candle_core::{Tensor, Var};

use crate::attention::{AttentionInputs, SelfAttention, SITE_ATTN, SITE_OUT};
use crate::error::Result;
use crate::kernels::local::Dropout;
use crate::kernels::{self, gelu, layer_norm, linear as linear_kernel, self_attention};
use crate::layers::{fold, folded, unfold, Block, Body, Route, SITE_FF};
use crate::nn::feed_forward::FeedForward;
use crate::nn::{dropout_mask, rows2};
use crate::pass::Pass;

/// What a block's backward pass returns: its output (recomputed), the input gradient and, when
/// the block reads a context, the context gradient.
pub(crate) struct Vjp {
    pub y: Tensor,
    pub dx: Tensor,
    pub dcontext: Option<Tensor>,
}

/// What a block's backward pass needs from its forward pass.
pub(crate) struct Saved {
    x: Tensor,
    hs: Tensor,
    body: BodySaved,
}

enum BodySaved {
    /// Axial attention: the self-attention of the folded sequences.
    Axial(usize, Box<BodySaved>),
    SelfAttention { qkv: Tensor, flat: Tensor, att: Tensor, out_mask: Option<Tensor>, attn_drop: Option<Dropout> },
    Cross { context: Tensor, q: Tensor, k: Tensor, v: Tensor, att: Tensor, out_mask: Option<Tensor> },
    FeedForward(Vec<FfChunk>),
}

/// One chunk of a feed-forward layer's forward pass.
struct FfChunk {
    start: usize,
    len: usize,
    /// Input rows [b·len, dim] and pre-activations [b·len, hidden (x2 with GLU)].
    x: Tensor,
    pre: Tensor,
    /// With GLU: the gate's pre-activation, the gate and the value.
    glu: Option<(Tensor, Tensor, Tensor)>,
    /// Activations after dropout, and the dropout factors.
    act: Tensor,
    mask: Option<Tensor>,
}

impl Block {
    /// The block's backward pass at `x` for output gradient `dy`. `context`, when given, is
    /// the variable standing for the context in the caller's local computation.
    pub(crate) fn vjp(&self, x: &Tensor, dy: &Tensor, inputs: &AttentionInputs, pass: &Pass, pair: usize, context: Option<&Var>) -> Result<Vjp> {
        if !kernels::use_fused(x) || !self.hand_written() {
            return self.autograd_vjp(x, dy, inputs, pass, pair, context);
        }
        if let Body::FeedForward(ff) = &self.body {
            // Chunk by chunk, so that only one chunk's hidden activations are alive.
            let (x, hs) = self.normed(x, inputs)?;
            let (b, n, d) = hs.dims3()?;
            let seed = pass.dropout(pair, SITE_FF);
            let (mut ys, mut dxs) = (vec![], vec![]);
            for (start, len) in ff.chunk_ranges(b, n) {
                let (y, chunk) = ff_chunk_forward(ff, &hs, start, len, seed)?;
                ys.push(y.reshape((b, len, d))?);
                dxs.push(ff_chunk_backward(ff, chunk, dy, pass)?.reshape((b, len, d))?);
            }
            let dx = self.norm_backward(&x, &Tensor::cat(&dxs, 1)?, inputs, pass)?;
            return Ok(Vjp { y: Tensor::cat(&ys, 1)?, dx, dcontext: None });
        }
        let (y, saved) = self.forward_saved(x, inputs, pass, pair, context.map(|c| c.as_tensor()))?;
        let (dx, dcontext) = self.backward_saved(saved, dy, inputs, pass)?;
        Ok(Vjp { y, dx, dcontext })
    }

    /// The norm (and token shift) before the body, without graph: (x, its normalised form).
    fn normed(&self, x: &Tensor, inputs: &AttentionInputs) -> Result<(Tensor, Tensor)> {
        let x = x.detach();
        let h = layer_norm::forward_detached(&x, &self.norm.weight.detach(), &self.norm.bias.detach(), 1e-5)?;
        let hs = match &self.shift {
            Some(s) => s.forward(&h, inputs.mask.as_ref())?,
            None => h,
        };
        Ok((x, hs))
    }

    /// Back through the shift and the norm: dx for the gradient of the body's input.
    fn norm_backward(&self, x: &Tensor, dhs: &Tensor, inputs: &AttentionInputs, pass: &Pass) -> Result<Tensor> {
        let dh = match &self.shift {
            Some(s) => s.backward(dhs, inputs.mask.as_ref())?,
            None => dhs.clone(),
        };
        let (dx, dw, db) = layer_norm::backward(x, &self.norm.weight.detach(), &dh, 1e-5)?;
        pass.defer(&self.norm.weight, dw)?;
        pass.defer(&self.norm.bias, db)?;
        Ok(dx)
    }

    /// The forward pass with the fused kernels, keeping what [`Block::backward_saved`] needs.
    pub(crate) fn forward_saved(&self, x: &Tensor, inputs: &AttentionInputs, pass: &Pass, pair: usize, context: Option<&Tensor>) -> Result<(Tensor, Saved)> {
        let (x, hs) = self.normed(x, inputs)?;
        let (y, body) = match (&self.body, self.route) {
            (Body::Attention(a), Route::Main) => self_attention_forward(a, &hs, inputs, pass, pair)?,
            (Body::Attention(a), Route::Axial(ax)) => {
                let (y, saved) = self_attention_forward(a, &fold(&hs, ax)?, &folded(inputs, ax)?, pass, pair)?;
                (unfold(&y, ax)?, BodySaved::Axial(ax, Box::new(saved)))
            }
            (Body::Attention(a), Route::Context) => cross_attention_forward(a, &hs, inputs, pass, pair, context)?,
            (Body::FeedForward(ff), _) => {
                let (b, n, d) = hs.dims3()?;
                let seed = pass.dropout(pair, SITE_FF);
                let (mut ys, mut chunks) = (vec![], vec![]);
                for (start, len) in ff.chunk_ranges(b, n) {
                    let (y, chunk) = ff_chunk_forward(ff, &hs, start, len, seed)?;
                    ys.push(y.reshape((b, len, d))?);
                    chunks.push(chunk);
                }
                (Tensor::cat(&ys, 1)?, BodySaved::FeedForward(chunks))
            }
            _ => return Err(crate::Error::input("this block has no hand-written backward pass")),
        };
        Ok((y, Saved { x, hs, body }))
    }

    /// The backward pass from saved activations: (dx, d context); parameter gradients are
    /// deferred to the pass.
    pub(crate) fn backward_saved(&self, saved: Saved, dy: &Tensor, inputs: &AttentionInputs, pass: &Pass) -> Result<(Tensor, Option<Tensor>)> {
        let Saved { x, hs, body } = saved;
        let (dhs, dcontext) = match (&self.body, body) {
            (Body::Attention(a), BodySaved::SelfAttention { qkv, flat, att, out_mask, attn_drop }) => {
                (self_attention_backward(a, &hs, qkv, flat, att, out_mask, attn_drop, dy, inputs, pass)?, None)
            }
            (Body::Attention(a), BodySaved::Axial(ax, saved)) => {
                let BodySaved::SelfAttention { qkv, flat, att, out_mask, attn_drop } = *saved else { unreachable!("axial layers hold self-attention") };
                let d = self_attention_backward(a, &fold(&hs, ax)?, qkv, flat, att, out_mask, attn_drop, &fold(dy, ax)?, &folded(inputs, ax)?, pass)?;
                (unfold(&d, ax)?, None)
            }
            (Body::Attention(a), BodySaved::Cross { context, q, k, v, att, out_mask }) => {
                let dyo = masked(dy, out_mask.as_ref())?;
                let datt = a.to_out.backward(&att, &dyo, pass)?;
                let heads = |t: &Tensor| -> Result<Tensor> {
                    let (b, m, _) = t.dims3()?;
                    Ok(t.reshape((b, m, a.spec.heads, a.spec.dim_head))?)
                };
                let (dq, dk, dv) = linear_kernel::backward(&q, &k, &v, &heads(&datt)?, inputs.context_mask.as_ref())?;
                let dhs = a.to_q.backward(&hs, &dq.flatten_from(2)?, pass)?;
                let dctx = (a.to_k.backward(&context, &a.reduce_kv(&dk)?, pass)? + a.to_v.backward(&context, &a.reduce_kv(&dv)?, pass)?)?;
                (dhs, Some(dctx))
            }
            (Body::FeedForward(ff), BodySaved::FeedForward(chunks)) => {
                let (b, _, d) = hs.dims3()?;
                let mut dxs = vec![];
                for chunk in chunks {
                    let len = chunk.len;
                    dxs.push(ff_chunk_backward(ff, chunk, dy, pass)?.reshape((b, len, d))?);
                }
                (Tensor::cat(&dxs, 1)?, None)
            }
            _ => unreachable!("saved activations come from the same block"),
        };
        Ok((self.norm_backward(&x, &dhs, inputs, pass)?, dcontext))
    }

    /// The same contract as [`Block::vjp`] through candle's autograd on a local graph.
    pub(crate) fn autograd_vjp(&self, x: &Tensor, dy: &Tensor, inputs: &AttentionInputs, pass: &Pass, pair: usize, context: Option<&Var>) -> Result<Vjp> {
        let xv = Var::from_tensor(&x.detach())?;
        let local = AttentionInputs {
            context: context.map(|c| c.as_tensor().clone()).or_else(|| inputs.context.as_ref().map(|c| c.detach())),
            ..inputs.clone()
        };
        let y = self.forward(xv.as_tensor(), &local, pass, pair)?;
        let grads = (&y * dy)?.sum_all()?.backward()?;
        for p in &self.params {
            if let Some(g) = grads.get(p) {
                pass.defer(p, g.clone())?;
            }
        }
        let dx = grads.get(xv.as_tensor()).cloned().map_or_else(|| xv.zeros_like(), Ok)?;
        let dcontext = context.and_then(|c| grads.get(c.as_tensor()).cloned());
        Ok(Vjp { y: y.detach(), dx, dcontext })
    }
}

fn masked(t: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    Ok(match mask {
        Some(m) => (t * m)?,
        None => t.clone(),
    })
}

/// The output projection and its dropout: (output, dropout factors).
fn project_out(a: &SelfAttention, att: &Tensor, pass: &Pass, pair: usize) -> Result<(Tensor, Option<Tensor>)> {
    let o = a.to_out.forward_detached(att)?;
    let mask = dropout_mask(&o, a.spec.dropout, pass.dropout(pair, SITE_OUT))?;
    Ok((masked(&o, mask.as_ref())?, mask))
}

fn self_attention_forward(a: &SelfAttention, hs: &Tensor, inputs: &AttentionInputs, pass: &Pass, pair: usize) -> Result<(Tensor, BodySaved)> {
    let s = &a.spec;
    let qkv = a.qkv(hs, true)?;
    let attn_drop = pass.dropout(pair, SITE_ATTN).filter(|_| s.attn_dropout > 0.0 && s.local_heads > 0).map(|seed| Dropout { p: s.attn_dropout, seed });
    let rotary = inputs.rotary.as_ref().map(|(t, o)| (t, *o));
    let (att, flat) = self_attention::forward_saved(&qkv, a.head_spec(), inputs.mask.as_ref(), rotary, attn_drop)?;
    let (y, out_mask) = project_out(a, &att, pass, pair)?;
    Ok((y, BodySaved::SelfAttention { qkv, flat, att, out_mask, attn_drop }))
}

#[allow(clippy::too_many_arguments)]
fn self_attention_backward(a: &SelfAttention, hs: &Tensor, qkv: Tensor, flat: Tensor, att: Tensor, out_mask: Option<Tensor>, attn_drop: Option<Dropout>, dy: &Tensor, inputs: &AttentionInputs, pass: &Pass) -> Result<Tensor> {
    let dyo = masked(dy, out_mask.as_ref())?;
    let datt = a.to_out.backward(&att, &dyo, pass)?;
    drop((att, dyo));
    let rotary = inputs.rotary.as_ref().map(|(t, o)| (t, *o));
    let dqkv = self_attention::backward(&qkv, &flat, &datt, a.head_spec(), inputs.mask.as_ref(), rotary, attn_drop)?;
    // Long sequences make these the largest tensors: free them before the next ones.
    drop((qkv, flat, datt));
    a.qkv_backward(hs, &dqkv, pass)
}

fn cross_attention_forward(a: &SelfAttention, hs: &Tensor, inputs: &AttentionInputs, pass: &Pass, pair: usize, context: Option<&Tensor>) -> Result<(Tensor, BodySaved)> {
    let s = &a.spec;
    let context = match (context, &inputs.context) {
        (Some(c), _) | (None, Some(c)) => c.detach(),
        (None, None) => return Err(crate::Error::input("this model receives context: pass a context tensor")),
    };
    let heads = |t: &Tensor| -> Result<Tensor> {
        let (b, m, _) = t.dims3()?;
        Ok(t.reshape((b, m, s.heads, s.dim_head))?)
    };
    let q = heads(&a.to_q.forward_detached(hs)?)?;
    let k = a.expand_kv(&a.to_k.forward_detached(&context)?)?;
    let v = a.expand_kv(&a.to_v.forward_detached(&context)?)?;
    let att = linear_kernel::forward_detached(&q, &k, &v, inputs.context_mask.as_ref())?.flatten_from(2)?;
    let (y, out_mask) = project_out(a, &att, pass, pair)?;
    Ok((y, BodySaved::Cross { context, q, k, v, att, out_mask }))
}

/// Forward pass of the feed-forward chunk of positions [start, start + len): its output rows
/// [b·len, dim] and what its backward pass needs.
fn ff_chunk_forward(ff: &FeedForward, hs: &Tensor, start: usize, len: usize, seed: Option<u64>) -> Result<(Tensor, FfChunk)> {
    let (b, n, _) = hs.dims3()?;
    let (w1, w2) = (ff.w1.weight.detach(), ff.w2.weight.detach());
    let b1 = ff.w1.bias.as_ref().expect("w1 has a bias").detach();
    let b2 = ff.w2.bias.as_ref().expect("w2 has a bias").detach();
    let x = rows2(&hs.narrow(1, start, len)?)?;
    let pre = x.matmul(&w1.t()?)?;
    let (act, glu) = if ff.glu {
        let half = pre.dim(1)? / 2;
        let gate_pre = pre.narrow(1, 0, half)?.contiguous()?;
        let gate = gelu::forward_detached(&gate_pre, &b1.narrow(0, 0, half)?)?;
        let value = pre.narrow(1, half, half)?.broadcast_add(&b1.narrow(0, half, half)?)?;
        ((&gate * &value)?, Some((gate_pre, gate, value)))
    } else {
        (gelu::forward_detached(&pre, &b1)?, None)
    };
    let mask = ff.chunk_mask(&act.reshape((b, len, act.dim(1)?))?, start, n, seed)?.map(|m| rows2(&m)).transpose()?;
    let act = masked(&act, mask.as_ref())?;
    let y = act.matmul(&w2.t()?)?.broadcast_add(&b2)?;
    Ok((y, FfChunk { start, len, x, pre, glu, act, mask }))
}

/// Backward pass of one feed-forward chunk for the full output gradient `dy` [b, n, dim]:
/// the chunk's input gradient rows; parameter gradients are deferred.
fn ff_chunk_backward(ff: &FeedForward, c: FfChunk, dy: &Tensor, pass: &Pass) -> Result<Tensor> {
    let (w1, w2) = (ff.w1.weight.detach(), ff.w2.weight.detach());
    let b1 = ff.w1.bias.as_ref().expect("w1 has a bias").detach();
    let g = rows2(&dy.narrow(1, c.start, c.len)?)?;
    pass.defer(&ff.w2.weight, g.t()?.matmul(&c.act)?)?;
    pass.defer(ff.w2.bias.as_ref().expect("w2 has a bias"), g.sum(0)?)?;
    let dact = masked(&g.matmul(&w2)?, c.mask.as_ref())?;
    let (dpre, db1) = match &c.glu {
        None => gelu::backward(&c.pre, &b1, &dact)?,
        Some((gate_pre, gate, value)) => {
            let half = gate.dim(1)?;
            let (dgate_pre, db1a) = gelu::backward(gate_pre, &b1.narrow(0, 0, half)?, &(&dact * value)?)?;
            let dvalue = (&dact * gate)?;
            let db1b = dvalue.sum(0)?;
            (Tensor::cat(&[&dgate_pre, &dvalue], 1)?, Tensor::cat(&[&db1a, &db1b], 0)?)
        }
    };
    pass.defer(&ff.w1.weight, dpre.t()?.matmul(&c.x)?)?;
    pass.defer(ff.w1.bias.as_ref().expect("w1 has a bias"), db1)?;
    Ok(dpre.matmul(&w1)?)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::{DType, Device, Tensor, Var};

    use crate::attention::AttentionInputs;
    use crate::config::{LocalHeads, TransformerConfig};
    use crate::kernels::rotary::RotaryTable;
    use crate::kernels::testing::{randn, rel_err};
    use crate::model::LinearAttentionTransformer;
    use crate::pass::Pass;

    /// Hand-written and autograd backward passes agree on every block of the stack.
    fn compare(name: &str, c: &TransformerConfig, rotary: bool) {
        let (b, n, m) = (2, 16, 6);
        let model = LinearAttentionTransformer::new(c, 3, &Device::Cpu, DType::F64).unwrap();
        let x = randn(&[b, n, c.dim], 1.0, DType::F64, 1);
        let dy = randn(&[b, n, c.dim], 1.0, DType::F64, 2);
        let mask = Tensor::from_vec((0..b * n).map(|i| (i % 5 != 3 && i % n < n - 2) as u8).collect::<Vec<_>>(), (b, n), &Device::Cpu).unwrap();
        let context = Var::from_tensor(&randn(&[b, m, c.dim], 1.0, DType::F64, 4)).unwrap();
        let context_mask = Tensor::from_vec((0..b * m).map(|i| (i % 4 != 1) as u8).collect::<Vec<_>>(), (b, m), &Device::Cpu).unwrap();
        let inputs = AttentionInputs {
            mask: Some(mask),
            rotary: rotary.then(|| (Arc::new(RotaryTable::new(c.dim_head(), 64)), 2)),
            context: c.receives_context.then(|| context.as_tensor().clone()),
            context_mask: c.receives_context.then_some(context_mask),
        };
        let ctx = c.receives_context.then_some(&context);
        for (j, pair) in model.pairs.iter().enumerate() {
            for (half, block) in [("f", &pair.f), ("g", &pair.g)] {
                let (p1, p2) = (Pass::train(9), Pass::train(9));
                let manual = block.vjp(&x, &dy, &inputs, &p1, j, ctx).unwrap();
                let auto = block.autograd_vjp(&x, &dy, &inputs, &p2, j, ctx).unwrap();
                let at = format!("{name}: pair {j} {half}");
                assert!(rel_err(&manual.y, &auto.y) < 1e-12, "{at}: output");
                assert!(rel_err(&manual.dx, &auto.dx) < 1e-10, "{at}: dx {}", rel_err(&manual.dx, &auto.dx));
                match (&manual.dcontext, &auto.dcontext) {
                    (Some(a), Some(b)) => assert!(rel_err(a, b) < 1e-10, "{at}: dcontext"),
                    (None, None) => {}
                    _ => panic!("{at}: context gradient present in only one"),
                }
                for p in &block.params {
                    let (g1, g2) = (p1.deferred(p).expect("manual gradient"), p2.deferred(p).expect("autograd gradient"));
                    assert!(rel_err(&g1, &g2) < 1e-10, "{at}: parameter gradient {}", rel_err(&g1, &g2));
                }
            }
        }
    }

    #[test]
    fn hand_written_backward_matches_autograd() {
        let mut c = TransformerConfig::new(24, 2, 64);
        c.heads = 3;
        c.dim_head = Some(8);
        c.local_attn_window_size = 8;
        for causal in [true, false] {
            c.causal = causal;
            c.n_local_attn_heads = LocalHeads::Uniform(1);
            c.blindspot_size = if causal { 4 } else { 1 };
            compare("mixed heads", &c, false);
            compare("mixed heads, rotary", &c, true);
            let mut d = c.clone();
            d.shift_tokens = true;
            d.ff_glu = true;
            d.ff_chunks = 3;
            d.ff_dropout = 0.2;
            d.attn_dropout = 0.3;
            d.attn_layer_dropout = 0.1;
            compare("shift, glu, chunks, dropout", &d, false);
            let mut e = c.clone();
            e.n_local_attn_heads = LocalHeads::Uniform(0);
            e.receives_context = true;
            compare("global heads with cross-attention", &e, false);
        }
    }
}
