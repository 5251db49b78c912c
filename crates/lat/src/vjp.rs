//! Hand-written backward passes of the blocks (llm.c style): for an input `x` and an output
//! gradient `dy`, recompute the block's forward pass and return its output, `dx`, the context
//! gradient (cross-attention) and the parameter gradients, deferred to the [`Pass`]. They run
//! the fused kernels' forward and backward directly, with no autograd graph: one allocation per
//! intermediate instead of a graph node, and feed-forward layers processed chunk by chunk, so
//! that the hidden activations of only one chunk are alive at a time.
//!
//! Where no fused kernels run (other devices, `LAT_KERNELS=reference`) the same contract is
//! met by candle's autograd on a local graph. Tests check that the two agree.

use candle_core::{Tensor, Var, D};

use crate::attention::{AttentionInputs, SelfAttention, SITE_ATTN, SITE_OUT};
use crate::error::Result;
use crate::kernels::local::Dropout;
use crate::kernels::{self, gelu, layer_norm, linear as linear_kernel, self_attention};
use crate::layers::{Block, Body, Route, SITE_FF};
use crate::nn::feed_forward::FeedForward;
use crate::nn::{dropout_mask, Linear};
use crate::pass::Pass;

/// What a block's backward pass returns: its output (recomputed), the input gradient and, when
/// the block reads a context, the context gradient.
pub(crate) struct Vjp {
    pub y: Tensor,
    pub dx: Tensor,
    pub dcontext: Option<Tensor>,
}

/// `[rows, cols]` view of a [.., cols] tensor.
fn rows2(t: &Tensor) -> Result<Tensor> {
    let cols = t.dim(D::Minus1)?;
    Ok(t.reshape((t.elem_count() / cols, cols))?)
}

/// `x Wᵀ (+ b)` on detached tensors, shaped like `x` with the last dimension replaced.
fn affine(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("rank >= 1") = w.dim(0)?;
    let y = rows2(x)?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    Ok(y.reshape(shape)?)
}

/// Gradients of `y = x Wᵀ (+ b)`: returns dx and defers dW (and db).
fn affine_backward(x: &Tensor, dy: &Tensor, layer: &Linear, pass: &Pass) -> Result<Tensor> {
    let (x2, dy2) = (rows2(x)?, rows2(dy)?);
    pass.defer(&layer.weight, dy2.t()?.matmul(&x2)?)?;
    if let Some(b) = &layer.bias {
        pass.defer(b, dy2.sum(0)?)?;
    }
    let w = layer.weight.detach();
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("rank >= 1") = w.dim(1)?;
    Ok(dy2.matmul(&w)?.reshape(shape)?)
}

impl Block {
    /// The block's backward pass at `x` for output gradient `dy`. `context`, when given, is
    /// the variable standing for the context in the caller's local computation.
    pub(crate) fn vjp(&self, x: &Tensor, dy: &Tensor, inputs: &AttentionInputs, pass: &Pass, pair: usize, context: Option<&Var>) -> Result<Vjp> {
        if !kernels::use_fused(x.device()) {
            return self.autograd_vjp(x, dy, inputs, pass, pair, context);
        }
        let x = x.detach();
        let h = layer_norm::forward_detached(&x, &self.norm.weight.detach(), &self.norm.bias.detach(), 1e-5)?;
        let hs = match &self.shift {
            Some(s) => s.forward(&h, inputs.mask.as_ref())?,
            None => h,
        };
        let (y, dhs, dcontext) = match (&self.body, self.route) {
            (Body::Attention(a), Route::Main) => {
                let (y, dhs) = self_attention_vjp(a, &hs, dy, inputs, pass, pair)?;
                (y, dhs, None)
            }
            (Body::Attention(a), Route::Context) => cross_attention_vjp(a, &hs, dy, inputs, pass, pair, context)?,
            (Body::FeedForward(ff), _) => {
                let (y, dhs) = feed_forward_vjp(ff, &hs, dy, pass.dropout(pair, SITE_FF), pass)?;
                (y, dhs, None)
            }
            (Body::Attention(_), Route::Channel) => unreachable!("attention blocks are routed as Main or Context"),
        };
        let dh = match &self.shift {
            Some(s) => s.backward(&dhs, inputs.mask.as_ref())?,
            None => dhs,
        };
        let (dx, dw, db) = layer_norm::backward(&x, &self.norm.weight.detach(), &dh, 1e-5)?;
        pass.defer(&self.norm.weight, dw)?;
        pass.defer(&self.norm.bias, db)?;
        Ok(Vjp { y, dx, dcontext })
    }

    /// The same contract through candle's autograd on a local graph.
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

/// Self-attention body on the normalised (and shifted) input `hs`: (output, d hs).
fn self_attention_vjp(a: &SelfAttention, hs: &Tensor, dy: &Tensor, inputs: &AttentionInputs, pass: &Pass, pair: usize) -> Result<(Tensor, Tensor)> {
    let s = &a.spec;
    let spec = a.head_spec();
    let (b, n, _) = hs.dims3()?;
    let he = s.heads * s.dim_head;
    let w = Tensor::cat(&[&a.to_q.weight.detach(), &a.to_k.weight.detach(), &a.to_v.weight.detach()], 0)?;
    let qkv = affine(hs, &w, None)?;
    let attn_drop = pass.dropout(pair, SITE_ATTN).filter(|_| s.attn_dropout > 0.0 && s.local_heads > 0).map(|seed| Dropout { p: s.attn_dropout, seed });
    let rotary = inputs.rotary.as_ref().map(|(t, o)| (t, *o));
    let (att, flat) = self_attention::forward_saved(&qkv, spec, inputs.mask.as_ref(), rotary, attn_drop)?;
    let o = affine(&att, &a.to_out.weight.detach(), a.to_out.bias.as_ref().map(|b| b.detach()).as_ref())?;
    let (y, dyo) = match dropout_mask(&o, s.dropout, pass.dropout(pair, SITE_OUT))? {
        Some(m) => ((&o * &m)?, (dy * &m)?),
        None => (o, dy.clone()),
    };
    let datt = affine_backward(&att, &dyo, &a.to_out, pass)?;
    drop((att, dyo));
    let dqkv = self_attention::backward(&qkv, &flat, &datt.reshape((b, n, he))?, spec, inputs.mask.as_ref(), rotary, attn_drop)?;
    // Long sequences make these the largest tensors: free them before the next ones.
    drop((qkv, flat, datt));
    let (hs2, dqkv2) = (rows2(hs)?, rows2(&dqkv)?);
    let dw = dqkv2.t()?.matmul(&hs2)?;
    for (i, layer) in [&a.to_q, &a.to_k, &a.to_v].into_iter().enumerate() {
        pass.defer(&layer.weight, dw.narrow(0, i * he, he)?)?;
    }
    Ok((y, dqkv2.matmul(&w)?.reshape(hs.dims())?))
}

/// Cross-attention body: (output, d hs, d context).
fn cross_attention_vjp(a: &SelfAttention, hs: &Tensor, dy: &Tensor, inputs: &AttentionInputs, pass: &Pass, pair: usize, context: Option<&Var>) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let s = &a.spec;
    let ctx = match (context, &inputs.context) {
        (Some(c), _) => c.as_tensor().detach(),
        (None, Some(c)) => c.detach(),
        (None, None) => return Err(crate::Error::input("this model receives context: pass a context tensor")),
    };
    let heads = |t: &Tensor| -> Result<Tensor> {
        let (b, m, _) = t.dims3()?;
        Ok(t.reshape((b, m, s.heads, s.dim_head))?)
    };
    let q = heads(&affine(hs, &a.to_q.weight.detach(), None)?)?;
    let k = heads(&affine(&ctx, &a.to_k.weight.detach(), None)?)?;
    let v = heads(&affine(&ctx, &a.to_v.weight.detach(), None)?)?;
    let att = linear_kernel::forward_detached(&q, &k, &v, inputs.context_mask.as_ref())?.flatten_from(2)?;
    let o = affine(&att, &a.to_out.weight.detach(), a.to_out.bias.as_ref().map(|b| b.detach()).as_ref())?;
    let (y, dyo) = match dropout_mask(&o, s.dropout, pass.dropout(pair, SITE_OUT))? {
        Some(m) => ((&o * &m)?, (dy * &m)?),
        None => (o, dy.clone()),
    };
    let datt = affine_backward(&att, &dyo, &a.to_out, pass)?;
    let (dq, dk, dv) = linear_kernel::backward(&q, &k, &v, &heads(&datt)?, inputs.context_mask.as_ref())?;
    let dhs = affine_backward(hs, &dq.flatten_from(2)?, &a.to_q, pass)?;
    let dctx = (affine_backward(&ctx, &dk.flatten_from(2)?, &a.to_k, pass)? + affine_backward(&ctx, &dv.flatten_from(2)?, &a.to_v, pass)?)?;
    Ok((y, dhs, Some(dctx)))
}

/// Feed-forward body, chunk by chunk along the sequence as its forward pass chunks:
/// (output, d hs).
fn feed_forward_vjp(ff: &FeedForward, hs: &Tensor, dy: &Tensor, seed: Option<u64>, pass: &Pass) -> Result<(Tensor, Tensor)> {
    let (b, n, d) = hs.dims3()?;
    let (w1, w2) = (ff.w1.weight.detach(), ff.w2.weight.detach());
    let b1 = ff.w1.bias.as_ref().expect("w1 has a bias").detach();
    let b2 = ff.w2.bias.as_ref().expect("w2 has a bias").detach();
    let (mut ys, mut dxs) = (vec![], vec![]);
    let mut grads: Option<[Tensor; 4]> = None;
    for (start, len) in ff.chunk_ranges(b, n) {
        let x = rows2(&hs.narrow(1, start, len)?)?;
        let g = rows2(&dy.narrow(1, start, len)?)?;
        let pre = x.matmul(&w1.t()?)?;
        let (act, gate_value) = if ff.glu {
            let half = pre.dim(1)? / 2;
            let gate_pre = pre.narrow(1, 0, half)?.contiguous()?;
            let gate = gelu::forward_detached(&gate_pre, &b1.narrow(0, 0, half)?)?;
            let value = pre.narrow(1, half, half)?.broadcast_add(&b1.narrow(0, half, half)?)?;
            ((&gate * &value)?, Some((gate_pre, gate, value)))
        } else {
            (gelu::forward_detached(&pre, &b1)?, None)
        };
        let mask = ff.chunk_mask(&act.reshape((b, len, act.dim(1)?))?, start, n, seed)?.map(|m| rows2(&m)).transpose()?;
        let act = match &mask {
            Some(m) => (&act * m)?,
            None => act,
        };
        ys.push(act.matmul(&w2.t()?)?.broadcast_add(&b2)?);
        let dw2 = g.t()?.matmul(&act)?;
        let db2 = g.sum(0)?;
        let mut dact = g.matmul(&w2)?;
        if let Some(m) = &mask {
            dact = (dact * m)?;
        }
        let (dpre, db1) = match &gate_value {
            None => gelu::backward(&pre, &b1, &dact)?,
            Some((gate_pre, gate, value)) => {
                let half = gate.dim(1)?;
                let (dgate_pre, db1a) = gelu::backward(gate_pre, &b1.narrow(0, 0, half)?, &(&dact * value)?)?;
                let dvalue = (&dact * gate)?;
                let db1b = dvalue.sum(0)?;
                (Tensor::cat(&[&dgate_pre, &dvalue], 1)?, Tensor::cat(&[&db1a, &db1b], 0)?)
            }
        };
        let dw1 = dpre.t()?.matmul(&x)?;
        dxs.push(dpre.matmul(&w1)?);
        grads = Some(match grads {
            None => [dw1, db1, dw2, db2],
            Some([a, b, c, d]) => [(a + dw1)?, (b + db1)?, (c + dw2)?, (d + db2)?],
        });
    }
    if let Some([dw1, db1, dw2, db2]) = grads {
        pass.defer(&ff.w1.weight, dw1)?;
        pass.defer(ff.w1.bias.as_ref().expect("w1 has a bias"), db1)?;
        pass.defer(&ff.w2.weight, dw2)?;
        pass.defer(ff.w2.bias.as_ref().expect("w2 has a bias"), db2)?;
    }
    let unchunk = |parts: Vec<Tensor>| -> Result<Tensor> {
        let shaped: Vec<Tensor> = parts.iter().map(|p| p.reshape((b, p.dim(0)? / b, d))).collect::<candle_core::Result<_>>()?;
        Ok(Tensor::cat(&shaped, 1)?)
    };
    Ok((unchunk(ys)?, unchunk(dxs)?))
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
