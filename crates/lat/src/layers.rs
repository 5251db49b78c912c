//! The layer pairs of the transformer stack. Every depth contributes a main pair
//! (attention, feed-forward), then optionally an axial pair and a cross-attention pair; each half
//! of a pair is a pre-norm [`Block`]. Reversible and sequential stacks run the same blocks.

use candle_core::Tensor;

use crate::attention::linformer::Linformer;
use crate::attention::{AttentionInputs, AttentionSpec, AttentionState, SelfAttention, SITE_ATTN, SITE_OUT};
use crate::kernels::rotary::RotaryTable;
use crate::config::TransformerConfig;
use crate::error::{Error, Result};
use crate::nn::feed_forward::FeedForward;
use crate::nn::pkm::ProductKeyMemory;
use crate::nn::shift::Shift;
use crate::nn::LayerNorm;
use crate::params::Builder;
use crate::pass::Pass;

/// Dropout site of the feed-forward layer inside a pair.
pub(crate) const SITE_FF: u64 = 2;

/// Which of the stack's inputs a block reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// Main self-attention: the mask and the rotary positions.
    Main,
    /// Cross-attention: the context and its mask.
    Context,
    /// Strided (axial) self-attention over positions `c, c + W, c + 2W, …`: the mask.
    Axial(usize),
    /// Feed-forward: nothing (the mask only for token shifting).
    Channel,
}

#[derive(Clone, Debug)]
pub(crate) enum Body {
    Attention(SelfAttention),
    Linformer(Linformer),
    FeedForward(FeedForward),
    Pkm(ProductKeyMemory),
}

/// `PreNorm(dim, [PreShiftTokens](body))`.
#[derive(Clone, Debug)]
pub(crate) struct Block {
    pub norm: LayerNorm,
    pub shift: Option<Shift>,
    pub body: Body,
    pub route: Route,
    /// The trainable tensors of this block, for the reversible backward pass.
    pub params: Vec<Tensor>,
}

impl Block {
    /// `pair` numbers the block's pair (dropout seeds depend on it).
    pub fn forward(&self, x: &Tensor, inputs: &AttentionInputs, pass: &Pass, pair: usize) -> Result<Tensor> {
        let mut h = self.norm.forward(x)?;
        if let Some(shift) = &self.shift {
            h = shift.forward(&h, inputs.mask.as_ref())?;
        }
        match &self.body {
            Body::Attention(a) => {
                let seeds = (pass.dropout(pair, SITE_ATTN), pass.dropout(pair, SITE_OUT));
                match self.route {
                    Route::Main => a.forward(&h, inputs, seeds),
                    Route::Context => a.forward(&h, &AttentionInputs { mask: None, rotary: None, ..inputs.clone() }, seeds),
                    Route::Axial(ax) => unfold(&a.forward(&fold(&h, ax)?, &folded(inputs, ax)?, seeds)?, ax),
                    Route::Channel => unreachable!("attention blocks are not routed as Channel"),
                }
            }
            Body::Linformer(l) => {
                let seed = pass.dropout(pair, SITE_ATTN);
                match self.route {
                    Route::Context => l.forward(&h, inputs.context.as_ref(), inputs.context_mask.as_ref(), seed),
                    _ => l.forward(&h, None, inputs.mask.as_ref(), seed),
                }
            }
            Body::FeedForward(ff) => ff.forward(&h, pass.dropout(pair, SITE_FF)),
            Body::Pkm(p) => p.forward(&h, pass.is_training()),
        }
    }

    /// Whether the block has a hand-written backward pass (else candle's autograd runs).
    pub fn hand_written(&self) -> bool {
        matches!(self.body, Body::Attention(_) | Body::FeedForward(_))
    }
}

/// Folds [b, n, d] into [b · ax, n / ax, d]: sequence c holds positions c, c + ax, c + 2ax, …
pub(crate) fn fold(x: &Tensor, ax: usize) -> Result<Tensor> {
    let (b, n, d) = x.dims3()?;
    Ok(x.reshape((b, n / ax, ax, d))?.transpose(1, 2)?.contiguous()?.reshape((b * ax, n / ax, d))?)
}

/// The inverse of [`fold`].
pub(crate) fn unfold(x: &Tensor, ax: usize) -> Result<Tensor> {
    let (bax, m, d) = x.dims3()?;
    Ok(x.reshape((bax / ax, ax, m, d))?.transpose(1, 2)?.contiguous()?.reshape((bax / ax, m * ax, d))?)
}

/// The inputs of an axial block: the mask folded like the sequence, no rotary positions.
pub(crate) fn folded(inputs: &AttentionInputs, ax: usize) -> Result<AttentionInputs> {
    let mask = match &inputs.mask {
        Some(m) => {
            let (b, n) = m.dims2()?;
            Some(m.reshape((b, n / ax, ax))?.transpose(1, 2)?.contiguous()?.reshape((b * ax, n / ax))?)
        }
        None => None,
    };
    Ok(AttentionInputs { mask, rotary: None, context: None, context_mask: None })
}

/// The decoding state of one block.
#[derive(Clone, Debug)]
pub struct BlockState {
    /// The previous position's normalised input [batch, 1, dim], for token shifting.
    shift_prev: Option<Tensor>,
    attention: Option<AttentionState>,
}

impl BlockState {
    /// Stacks the states of single rows into one batch state.
    pub(crate) fn concat(rows: &[BlockState]) -> Result<Self> {
        let shift_prev = match rows.first().and_then(|r| r.shift_prev.as_ref()) {
            Some(_) => Some(Tensor::cat(&rows.iter().map(|r| r.shift_prev.clone().expect("same layout")).collect::<Vec<_>>(), 0)?),
            None => None,
        };
        let attention = match rows.first().and_then(|r| r.attention.as_ref()) {
            Some(_) => {
                let parts: Vec<&AttentionState> = rows.iter().map(|r| r.attention.as_ref().expect("same layout")).collect();
                Some(AttentionState {
                    local: parts.iter().flat_map(|p| p.local.iter().cloned()).collect(),
                    global: parts.iter().flat_map(|p| p.global.iter().cloned()).collect(),
                })
            }
            None => None,
        };
        Ok(Self { shift_prev, attention })
    }
}

impl Block {
    /// The forward pass over a prompt with `n` real positions, and the state it leaves.
    pub fn prefill(&self, x: &Tensor, inputs: &AttentionInputs, n: usize) -> Result<(Tensor, BlockState)> {
        let mut h = self.norm.forward(x)?;
        let mut shift_prev = None;
        if let Some(shift) = &self.shift {
            shift_prev = Some(h.narrow(1, n - 1, 1)?);
            h = shift.forward(&h, inputs.mask.as_ref())?;
        }
        match &self.body {
            Body::Attention(a) => {
                if self.route != Route::Main {
                    return Err(Error::input("recurrent decoding does not support cross-attention or axial layers"));
                }
                let (out, st) = a.prefill(&h, inputs, n)?;
                Ok((out, BlockState { shift_prev, attention: Some(st) }))
            }
            Body::FeedForward(ff) => Ok((ff.forward(&h, None)?, BlockState { shift_prev, attention: None })),
            Body::Pkm(p) => Ok((p.forward(&h, false)?, BlockState { shift_prev, attention: None })),
            Body::Linformer(_) => Err(Error::input("Linformer layers have no recurrent form")),
        }
    }

    /// One decoding step on `x` [batch, 1, dim].
    pub fn step(&self, x: &Tensor, state: &mut BlockState, rotary: Option<&RotaryTable>, positions: &[usize]) -> Result<Tensor> {
        let mut h = self.norm.forward(x)?;
        if let Some(shift) = &self.shift {
            let prev = state.shift_prev.replace(h.clone()).ok_or_else(|| Error::input("decoding state lacks the previous position"))?;
            h = shift.step(&h, &prev)?;
        }
        match &self.body {
            Body::Attention(a) => {
                let st = state.attention.as_mut().ok_or_else(|| Error::input("decoding state lacks an attention state"))?;
                a.step(&h, st, rotary, positions)
            }
            Body::FeedForward(ff) => ff.forward(&h, None),
            Body::Pkm(p) => p.forward(&h, false),
            Body::Linformer(_) => Err(Error::input("Linformer layers have no recurrent form")),
        }
    }
}

/// The (f, g) halves of one residual pair.
#[derive(Clone, Debug)]
pub(crate) struct Pair {
    pub f: Block,
    pub g: Block,
}

/// Names of the two halves of pair `j` in the reference's state dict.
fn pair_names(b: &Builder, reversible: bool, j: usize) -> (Builder, Builder) {
    if reversible {
        let p = b.pp("layers.blocks").pp(j);
        (p.pp("f.net"), p.pp("g.net"))
    } else {
        let p = b.pp("layers.layers").pp(j);
        (p.pp(0), p.pp(1))
    }
}

fn block(b: &Builder, dim: usize, shift: Option<Shift>, route: Route, body: impl FnOnce(&Builder) -> Result<Body>) -> Result<Block> {
    let mark = b.mark();
    let norm = LayerNorm::new(&b.pp("norm"), dim)?;
    // PreShiftTokens adds one `fn.` level between the norm and the body.
    let inner = if shift.is_some() { b.pp("fn").pp("fn") } else { b.pp("fn") };
    let body = body(&inner)?;
    Ok(Block { norm, shift, body, route, params: b.since(mark) })
}

/// Builds every pair of the stack, in the reference's order and with its names.
pub(crate) fn build_pairs(b: &Builder, c: &TransformerConfig) -> Result<Vec<Pair>> {
    let mut pairs = Vec::new();
    let ff_chunked = |b: &Builder, glu: bool, dropout: f64| -> Result<Body> {
        // `Chunk` adds one more `fn.` level.
        Ok(Body::FeedForward(FeedForward::new(&b.pp("fn"), c.dim, 4, glu, dropout, c.ff_chunks)?))
    };
    for layer in 0..c.depth {
        let shift = c.shift_tokens.then(|| Shift::new(c.causal));
        let (fb, gb) = pair_names(b, c.reversible, pairs.len());
        let spec = AttentionSpec {
            dim: c.dim,
            heads: c.heads,
            dim_head: c.dim_head(),
            local_heads: c.local_heads(layer),
            causal: c.causal,
            bucket: c.blindspot_size,
            window: c.local_attn_window_size,
            receives_context: false,
            dropout: c.attn_layer_dropout,
            attn_dropout: c.attn_dropout,
            one_kv_head: c.one_kv_head,
        };
        let f = block(&fb, c.dim, shift.clone(), Route::Main, |b| match c.linformer_settings {
            Some(s) => Ok(Body::Linformer(Linformer::new(b, c.dim, c.max_seq_len, s.k, c.heads, c.dim_head, c.one_kv_head, c.attn_dropout)?)),
            None => Ok(Body::Attention(SelfAttention::new(b, spec)?)),
        })?;
        // Unlike the reference, ff_glu and ff_dropout apply to the main layers too.
        let g = block(&gb, c.dim, shift, Route::Channel, |b| match c.pkm_layers.contains(&(layer + 1)) {
            true => Ok(Body::Pkm(ProductKeyMemory::new(b, c.dim)?)),
            false => ff_chunked(b, c.ff_glu, c.ff_dropout),
        })?;
        pairs.push(Pair { f, g });

        if c.attend_axially {
            let (fb, gb) = pair_names(b, c.reversible, pairs.len());
            // Global heads of width dim / heads (the reference passes no dim_head), no blind spot.
            let spec = AttentionSpec {
                dim: c.dim,
                heads: c.heads,
                dim_head: c.dim / c.heads,
                local_heads: 0,
                causal: c.causal,
                bucket: 1,
                window: c.local_attn_window_size,
                receives_context: false,
                dropout: c.attn_layer_dropout,
                attn_dropout: c.attn_dropout,
                one_kv_head: c.one_kv_head,
            };
            // `FoldAxially` adds one `fn.` level.
            let route = Route::Axial(c.local_attn_window_size);
            let f = block(&fb, c.dim, None, route, |b| Ok(Body::Attention(SelfAttention::new(&b.pp("fn"), spec)?)))?;
            let g = block(&gb, c.dim, None, Route::Channel, |b| ff_chunked(b, c.ff_glu, c.ff_dropout))?;
            pairs.push(Pair { f, g });
        }

        if c.receives_context {
            let (fb, gb) = pair_names(b, c.reversible, pairs.len());
            let spec = AttentionSpec {
                dim: c.dim,
                heads: c.heads,
                dim_head: c.dim_head(),
                local_heads: 0,
                causal: false,
                bucket: 1,
                window: c.local_attn_window_size,
                receives_context: true,
                dropout: c.attn_layer_dropout,
                attn_dropout: c.attn_dropout,
                one_kv_head: c.one_kv_head,
            };
            let f = block(&fb, c.dim, None, Route::Context, |b| match c.context_linformer_settings {
                Some(s) => Ok(Body::Linformer(Linformer::new(b, c.dim, s.seq_len, s.k, c.heads, c.dim_head, c.one_kv_head, c.attn_dropout)?)),
                None => Ok(Body::Attention(SelfAttention::new(b, spec)?)),
            })?;
            let g = block(&gb, c.dim, None, Route::Channel, |b| ff_chunked(b, c.ff_glu, c.ff_dropout))?;
            pairs.push(Pair { f, g });
        }
    }
    Ok(pairs)
}
