//! The layer kinds of the transformer stack, one file each. A file owns its layer's forward
//! pass (one function, which in [`Mode::Record`] also keeps what the backward pass needs), the
//! backward pass beside it, and the decoding step:
//!
//! | file | the reference's | backward pass |
//! |---|---|---|
//! | `self_attention.rs` | `SelfAttention`: local windowed and global linear heads | hand-written |
//! | `cross_attention.rs` | `SelfAttention(receives_context = True)` | hand-written |
//! | `axial_attention.rs` | `FoldAxially(SelfAttention)`: strided self-attention | hand-written |
//! | `feed_forward.rs` | `Chunk(FeedForward)` | hand-written |
//! | `product_key_memory.rs` | `PKM` | candle's autograd |
//! | `linformer.rs` | `LinformerSelfAttention` | candle's autograd |
//!
//! A [`Block`] wraps each layer with its pre-norm and token shift; the stack
//! (`crate::stack`) couples blocks into residual pairs. [`pairs`] is the list: which layers a
//! configuration stacks, in the reference's order and with its weight names. A new layer kind
//! is one file implementing [`Layer`] and one line there.

pub(crate) mod axial_attention;
pub(crate) mod cross_attention;
pub(crate) mod feed_forward;
pub(crate) mod heads;
pub(crate) mod linformer;
pub(crate) mod product_key_memory;
pub(crate) mod self_attention;

use std::fmt;
use std::sync::Arc;

use candle_core::Tensor;

use crate::block::{AnyBlock, Block};
use crate::config::TransformerConfig;
use crate::error::{Error, Result};
use crate::graph::Grads;
use crate::kernels::rotary::RotaryTable;
use crate::nn::shift::Shift;
use crate::nn::{dropout_mask, Linear};
use crate::params::Builder;
use crate::pass::Pass;

use axial_attention::AxialAttention;
use cross_attention::CrossAttention;
use feed_forward::FeedForward;
use linformer::Linformer;
use product_key_memory::ProductKeyMemory;
use self_attention::SelfAttention;

/// How a forward pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Through candle's graph: candle's autograd can differentiate the output.
    Graph,
    /// Outside the graph, on the fused kernels, keeping what the hand-written backward pass
    /// needs.
    Record,
    /// A decoding step: inference whose products go through [`crate::kernels::decode`], so
    /// that a stream's results do not depend on the other streams in its batch.
    Decode,
}

/// What every layer of the stack reads besides its input.
#[derive(Clone, Debug, Default)]
pub(crate) struct StackInputs {
    /// [batch, n], nonzero = keep.
    pub mask: Option<Tensor>,
    /// Rotary table and the position of row 0.
    pub rotary: Option<(Arc<RotaryTable>, usize)>,
    /// [batch, m, dim]: what cross-attention attends to.
    pub context: Option<Tensor>,
    /// [batch, m], nonzero = a real context position.
    pub context_mask: Option<Tensor>,
}

/// The positions `start .. start + len` of a sequence of `total` that one call covers (a
/// feed-forward chunk, or the whole sequence).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub start: usize,
    pub len: usize,
    pub total: usize,
}

/// One call of a layer: its inputs besides the activations, and where it sits.
#[derive(Clone, Debug)]
pub(crate) struct Call {
    pub inputs: StackInputs,
    pub pass: Pass,
    /// The layer's pair in the stack: dropout streams depend on it.
    pub pair: usize,
    pub span: Span,
}

impl Call {
    pub fn mask(&self) -> Option<&Tensor> {
        self.inputs.mask.as_ref()
    }

    pub fn rotary(&self) -> Option<(&Arc<RotaryTable>, usize)> {
        self.inputs.rotary.as_ref().map(|(t, o)| (t, *o))
    }

    /// The context of a layer that reads one.
    pub fn context(&self) -> Result<&Tensor> {
        self.inputs.context.as_ref().ok_or_else(|| Error::input("this model receives context: pass a context tensor"))
    }

    /// The context of `rows` decoding streams: one row of it for each.
    pub fn context_for(&self, rows: usize) -> Result<&Tensor> {
        let context = self.context()?;
        match context.dim(0)? {
            r if r == rows => Ok(context),
            r => Err(Error::input(format!("the context has {r} rows for {rows} streams"))),
        }
    }

    /// The seed of dropout site `site` of this layer's pair, when training.
    pub fn dropout_seed(&self, site: u64) -> Option<u64> {
        self.pass.dropout(self.pair, site)
    }
}

impl Call {
    /// A call while decoding: no dropout, the new positions alone.
    pub fn decoding(h: &Tensor) -> Result<Self> {
        let len = h.dim(1)?;
        Ok(Self { inputs: StackInputs::default(), pass: Pass::eval(), pair: 0, span: Span { start: 0, len, total: len } })
    }
}

/// What a decoding step reads besides the activations.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Step<'a> {
    /// The rotary table of rotary models.
    pub rotary: Option<&'a RotaryTable>,
    /// Each row's position of its first new token.
    pub positions: &'a [usize],
}

/// One kind of layer. `h` is always the block's normalised (and shifted) input
/// [batch, n, dim], and every method returns [batch, n, dim].
pub(crate) trait Layer: Clone + fmt::Debug + Send + Sync + 'static {
    /// What the hand-written backward pass needs from the forward pass
    /// ([`std::convert::Infallible`] for layers that candle's autograd differentiates).
    type Saved: Send + 'static;
    /// One decoding stream's state (`()` for layers that keep none).
    type State: Clone + fmt::Debug + Send + Sync + 'static;
    /// Whether [`Layer::backward`] is written by hand; otherwise only [`Mode::Graph`] runs.
    const HAND_WRITTEN: bool;
    /// Whether the layer acts on each position alone, so that its block may run it on pieces
    /// of the sequence (`ff_chunks`).
    const POSITION_WISE: bool = false;

    /// The forward pass; in [`Mode::Record`] it also returns what [`Layer::backward`] needs.
    fn forward(&self, h: &Tensor, call: &Call, mode: Mode) -> Result<(Tensor, Option<Self::Saved>)>;

    /// The input gradient for the output gradient `dy`; parameter (and context) gradients go
    /// to `grads`.
    fn backward(&self, saved: Self::Saved, h: &Tensor, dy: &Tensor, call: &Call, grads: &mut Grads) -> Result<Tensor>;

    /// The forward pass over a prompt whose first `n` positions are real, and each row's
    /// decoding state after them.
    fn prefill(&self, h: &Tensor, call: &Call, n: usize) -> Result<(Tensor, Vec<Self::State>)>;

    /// Each of `rows` rows' decoding state before its first position (what a prompt read by
    /// [`Layer::step`] alone starts from).
    fn start(&self, call: &Call, rows: usize) -> Result<Vec<Self::State>>;

    /// Advances each row's state by the new positions of `h` [rows, t, dim].
    fn step(&self, h: &Tensor, states: &mut [&mut Self::State], step: &Step) -> Result<Tensor>;

    /// Bytes of one stream's state.
    fn state_bytes(_state: &Self::State) -> usize {
        0
    }
}

/// Dropout sites inside a layer pair.
pub(crate) const SITE_ATTN: u64 = 0;
pub(crate) const SITE_OUT: u64 = 1;
pub(crate) const SITE_FF: u64 = 2;

/// The output projection of an attention layer and its dropout: (output, dropout factors).
pub(crate) fn project_out(to_out: &Linear, att: &Tensor, p: f64, seed: Option<u64>, mode: Mode) -> Result<(Tensor, Option<Tensor>)> {
    let o = to_out.apply(att, mode)?;
    let mask = dropout_mask(&o, p, seed)?;
    Ok((masked(&o, mask.as_ref())?, mask))
}

/// The backward pass of [`project_out`]: the gradient of `att`.
pub(crate) fn project_out_backward(to_out: &Linear, att: &Tensor, mask: Option<&Tensor>, dy: &Tensor, grads: &mut Grads) -> Result<Tensor> {
    to_out.backward(att, &masked(dy, mask)?, grads)
}

pub(crate) fn masked(t: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    Ok(match mask {
        Some(m) => (t * m)?,
        None => t.clone(),
    })
}

/// The (f, g) halves of one residual pair.
#[derive(Debug)]
pub(crate) struct Pair {
    pub f: Box<dyn AnyBlock>,
    pub g: Box<dyn AnyBlock>,
}

/// Every pair of the stack, in the reference's order and with its names: per depth a main
/// pair (self-attention or Linformer; feed-forward or product-key memory), then an axial pair
/// with `attend_axially` and a cross-attention pair with `receives_context`.
pub(crate) fn pairs(b: &Builder, c: &TransformerConfig) -> Result<Vec<Pair>> {
    let mut pairs: Vec<Pair> = Vec::new();
    let ff = |b: &Builder| FeedForward::new(b, c);
    for layer in 0..c.depth {
        let shift = c.shift_tokens.then(|| Shift::new(c.causal));
        let (j, f, g) = next_pair(b, c, &pairs);
        pairs.push(Pair {
            f: match c.linformer_settings {
                Some(_) => Block::boxed(&f, c, j, shift.clone(), |b| Linformer::new_self(b, c))?,
                None => Block::boxed(&f, c, j, shift.clone(), |b| SelfAttention::new(b, c, layer))?,
            },
            g: match c.pkm_layers.contains(&(layer + 1)) {
                true => Block::boxed(&g, c, j, shift, |b| ProductKeyMemory::new(b, c.dim))?,
                false => Block::boxed(&g, c, j, shift, ff)?,
            },
        });
        if c.attend_axially {
            let (j, f, g) = next_pair(b, c, &pairs);
            pairs.push(Pair { f: Block::boxed(&f, c, j, None, |b| AxialAttention::new(b, c))?, g: Block::boxed(&g, c, j, None, ff)? });
        }
        if c.receives_context {
            let (j, f, g) = next_pair(b, c, &pairs);
            pairs.push(Pair {
                f: match c.context_linformer_settings {
                    Some(_) => Block::boxed(&f, c, j, None, |b| Linformer::new_context(b, c))?,
                    None => Block::boxed(&f, c, j, None, |b| CrossAttention::new(b, c))?,
                },
                g: Block::boxed(&g, c, j, None, ff)?,
            });
        }
    }
    Ok(pairs)
}

/// The most bytes one stream's decoding state holds for a stack of configuration `c`: what each
/// layer of [`pairs`] keeps (token shifting keeps each block's previous position besides).
pub(crate) fn max_state_bytes(c: &TransformerConfig) -> usize {
    let shift = if c.shift_tokens { 2 * c.dim * 4 } else { 0 };
    let mut total = 0;
    for layer in 0..c.depth {
        total += shift + if c.linformer_settings.is_some() { 0 } else { SelfAttention::max_state_bytes(SelfAttention::layout(c, layer), c.local_attn_window_size, c.blindspot_size) };
        if c.attend_axially {
            total += AxialAttention::max_state_bytes(c);
        }
        if c.receives_context {
            total += if c.context_linformer_settings.is_some() { Linformer::max_state_bytes(c) } else { CrossAttention::max_state_bytes(c) };
        }
    }
    total
}

/// The index of the next pair and the names of its two halves in the reference's state dict.
fn next_pair(b: &Builder, c: &TransformerConfig, pairs: &[Pair]) -> (usize, Builder, Builder) {
    let j = pairs.len();
    if c.reversible {
        let p = b.pp("layers.blocks").pp(j);
        (j, p.pp("f.net"), p.pp("g.net"))
    } else {
        let p = b.pp("layers.layers").pp(j);
        (j, p.pp(0), p.pp(1))
    }
}
