//! The position-wise feed-forward layer (the reference's `Chunk(ff_chunks, FeedForward)`):
//! `w2(dropout(gelu(w1 x)))`, or with GLU `w2(dropout(gelu(a) * v))` where `[a, v] = w1 x`. Its
//! block runs it on pieces of the sequence (`ff_chunks`, and at most [`CHUNK_ROWS`] positions
//! of the batch at a time), which bounds the hidden activations alive at once.

use candle_core::Tensor;

use super::{masked, Call, Layer, Mode, Step, SITE_FF};
use crate::config::TransformerConfig;
use crate::error::Result;
use crate::graph::Grads;
use crate::kernels::gelu;
use crate::kernels::matmul::matmul;
use crate::nn::{positional_mask, rows2, Linear};
use crate::params::Builder;
use crate::rng::derive;

/// At most this many positions (over the batch) per piece of hidden activations.
pub const CHUNK_ROWS: usize = 2048;

/// Hidden width: 4 · dim (8 · dim with GLU).
const MULT: usize = 4;

#[derive(Clone, Debug)]
pub(crate) struct FeedForward {
    pub w1: Linear,
    pub w2: Linear,
    /// Gated linear unit: `gelu(a) * v` of the two halves of w1's output.
    pub glu: bool,
    /// Dropout on the hidden activations.
    pub dropout: f64,
}

pub(crate) struct Saved {
    /// Input rows [rows, dim] and pre-activations [rows, hidden (x2 with GLU)].
    x: Tensor,
    pre: Tensor,
    /// With GLU: the gate's pre-activation, the gate and the value.
    glu: Option<(Tensor, Tensor, Tensor)>,
    /// Activations after dropout, and the dropout factors.
    act: Tensor,
    mask: Option<Tensor>,
}

impl FeedForward {
    pub fn new(b: &Builder, c: &TransformerConfig) -> Result<Self> {
        // `Chunk` adds one `fn.` level.
        let b = b.pp("fn");
        let hidden = c.dim * MULT;
        // The reference builds its main feed-forward layers without GLU whatever ff_glu says;
        // its checkpoints are recognised by the shape of w1 and keep that layout. Unlike the
        // reference, ff_glu applies to the main layers of fresh models too.
        let glu = c.ff_glu && b.pp("w1").loaded_shape("weight") != Some(vec![hidden, c.dim]);
        Ok(Self { w1: Linear::new(&b.pp("w1"), c.dim, hidden * if glu { 2 } else { 1 }, true)?, w2: Linear::new(&b.pp("w2"), hidden, c.dim, true)?, glu, dropout: c.ff_dropout })
    }

    /// The pieces (start, length) of a sequence of `n` in a batch of `b`: `torch.chunk`'s pieces
    /// (ceil(n / chunks), possibly fewer of them), cut further so that a piece holds at most
    /// [`CHUNK_ROWS`] positions of the batch. The result does not depend on the pieces.
    pub fn pieces(chunks: usize, b: usize, n: usize) -> Vec<(usize, usize)> {
        let by_rows = (b * n).div_ceil(CHUNK_ROWS);
        let size = n.div_ceil(chunks.max(by_rows).max(1)).max(1);
        (0..n).step_by(size).map(|s| (s, size.min(n - s))).collect()
    }

    /// The dropout factors of the hidden activations `act` [b · len, hidden] of the call's
    /// span: drawn by position, so the same whatever the pieces.
    fn dropout_mask(&self, act: &Tensor, b: usize, call: &Call) -> Result<Option<Tensor>> {
        let Some(seed) = call.dropout_seed(SITE_FF).filter(|_| self.dropout > 0.0) else { return Ok(None) };
        let (span, width) = (call.span, act.dim(1)?);
        let stream = |bi: usize, t: usize| derive(seed, ((bi * span.total + span.start + t) * width) as u64);
        Ok(Some(rows2(&positional_mask(b, span.len, width, self.dropout, &stream, act)?)?))
    }
}

impl Layer for FeedForward {
    type Saved = Saved;
    type State = ();
    const HAND_WRITTEN: bool = true;
    const POSITION_WISE: bool = true;

    fn forward(&self, h: &Tensor, call: &Call, mode: Mode) -> Result<(Tensor, Option<Saved>)> {
        let (b, len, dim) = h.dims3()?;
        let x = rows2(h)?;
        if !self.glu && call.dropout_seed(SITE_FF).is_none() {
            // Decoding products (a decoding step, or quantized weights, which are never trained)
            // keep nothing for a backward pass: the GELU rides in w1's product.
            if let Some(act) = self.w1.decode_gelu(&x, mode)? {
                return Ok((self.w2.apply(&act, mode)?.reshape((b, len, dim))?, None));
            }
        }
        // The bias rides in the GELU.
        let pre = self.w1.product(&x, mode, false)?;
        let b1 = self.w1.bias_for(mode).expect("w1 has a bias");
        let gelu = |t: &Tensor, bias: &Tensor| match mode {
            Mode::Graph | Mode::Decode => gelu::bias_gelu(t, bias),
            Mode::Record => gelu::forward_detached(t, bias),
        };
        let (act, glu) = if self.glu {
            let half = pre.dim(1)? / 2;
            let gate_pre = pre.narrow(1, 0, half)?.contiguous()?;
            let gate = gelu(&gate_pre, &b1.narrow(0, 0, half)?)?;
            let value = pre.narrow(1, half, half)?.broadcast_add(&b1.narrow(0, half, half)?)?;
            ((&gate * &value)?, Some((gate_pre, gate, value)))
        } else {
            (gelu(&pre, &b1)?, None)
        };
        let mask = self.dropout_mask(&act, b, call)?;
        let act = masked(&act, mask.as_ref())?;
        let y = self.w2.apply(&act, mode)?.reshape((b, len, dim))?;
        let saved = (mode == Mode::Record).then(|| Saved { x, pre, glu, act, mask });
        Ok((y, saved))
    }

    fn backward(&self, s: Saved, h: &Tensor, dy: &Tensor, _call: &Call, grads: &mut Grads) -> Result<Tensor> {
        let b1 = self.w1.bias.as_ref().expect("w1 has a bias").detach();
        let dact = masked(&self.w2.backward(&s.act, &rows2(dy)?, grads)?, s.mask.as_ref())?;
        let (dpre, db1) = match &s.glu {
            None => gelu::backward(&s.pre, &b1, &dact)?,
            Some((gate_pre, gate, value)) => {
                let half = gate.dim(1)?;
                let (dgate_pre, db1a) = gelu::backward(gate_pre, &b1.narrow(0, 0, half)?, &(&dact * value)?)?;
                let dvalue = (&dact * gate)?;
                let db1b = dvalue.sum(0)?;
                (Tensor::cat(&[&dgate_pre, &dvalue], 1)?, Tensor::cat(&[&db1a, &db1b], 0)?)
            }
        };
        grads.param(&self.w1.weight, matmul(&dpre.t()?, &s.x)?)?;
        grads.param(self.w1.bias.as_ref().expect("w1 has a bias"), db1)?;
        Ok(matmul(&dpre, &self.w1.weight.detach())?.reshape(h.dims())?)
    }

    fn prefill(&self, h: &Tensor, call: &Call, _n: usize) -> Result<(Tensor, Vec<()>)> {
        Ok((self.forward(h, call, Mode::Graph)?.0, vec![(); h.dim(0)?]))
    }

    fn start(&self, _call: &Call, rows: usize) -> Result<Vec<()>> {
        Ok(vec![(); rows])
    }

    fn step(&self, h: &Tensor, _states: &mut [&mut ()], _step: &Step) -> Result<Tensor> {
        Ok(self.forward(h, &Call::decoding(h)?, Mode::Decode)?.0)
    }
}
