//! The small modules the layers are made of: linear, layer norm, embedding, dropout, the
//! positional embeddings and token shifting.

pub(crate) mod positional;
pub(crate) mod shift;

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::graph::Grads;
use crate::kernels;
use crate::kernels::decode::Panels;
use crate::kernels::matmul::{matmul, matmul_bias};
use crate::layers::Mode;
use crate::params::{fan_in_bound, Builder, Init};
use crate::rng::uniform_at;

/// `nn.Linear`: `weight` is [out, in]. In a quantized model the weight is kept small
/// (`packed`) and `weight` only has its shape.
#[derive(Clone, Debug)]
pub struct Linear {
    /// [out, in].
    pub weight: Tensor,
    /// [out], when the layer has one.
    pub bias: Option<Tensor>,
    /// The weight in bf16 or int8, laid out for the decoding products.
    pub packed: Option<Arc<Panels>>,
}

impl Linear {
    pub(crate) fn new(b: &Builder, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        let bound = fan_in_bound(d_in);
        let (weight, packed) = b.matrix("weight", &[d_out, d_in], Init::Uniform(bound))?;
        let bias = if bias { Some(b.get("bias", &[d_out], Init::Uniform(bound))?) } else { None };
        Ok(Self { weight, bias, packed: packed.map(|p| Arc::new(Panels::new(&p, d_out))) })
    }

    /// Applies the layer to the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, Mode::Graph)
    }

    /// `x Wᵀ` without the bias (for layers that fuse the bias into what follows).
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        self.product(x, Mode::Graph, false)
    }
}

/// `[rows, cols]` view of a [.., cols] tensor.
pub(crate) fn rows2(t: &Tensor) -> Result<Tensor> {
    let cols = t.dim(candle_core::D::Minus1)?;
    Ok(t.reshape((t.elem_count() / cols, cols))?)
}

impl Linear {
    /// The weight as a forward pass in `mode` reads it: outside the graph when recording.
    pub(crate) fn weight_for(&self, mode: Mode) -> Tensor {
        match mode {
            Mode::Record => self.weight.detach(),
            Mode::Graph | Mode::Decode => self.weight.clone(),
        }
    }

    /// The bias as a forward pass in `mode` reads it.
    pub(crate) fn bias_for(&self, mode: Mode) -> Option<Tensor> {
        self.bias.as_ref().map(|b| match mode {
            Mode::Record => b.detach(),
            Mode::Graph | Mode::Decode => b.clone(),
        })
    }

    /// The layer on the last dimension of `x` in a forward pass of `mode`.
    pub(crate) fn apply(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.product(x, mode, true)
    }

    /// `x Wᵀ`, plus the bias when `with_bias`, on the last dimension of `x`. Decoding steps and
    /// packed weights go through the decoding products; the rest through [`matmul`] and
    /// [`matmul_bias`].
    pub(crate) fn product(&self, x: &Tensor, mode: Mode, with_bias: bool) -> Result<Tensor> {
        if self.takes_decode_products(x, mode) {
            return Ok(Self::decode_products(&[self], x, mode, with_bias, false)?.remove(0));
        }
        let (x2, w) = (rows2(x)?, self.weight_for(mode).t()?);
        let y = match self.bias_for(mode).filter(|_| with_bias) {
            Some(b) => matmul_bias(&x2, &w, &b)?,
            None => matmul(&x2, &w)?,
        };
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("rank >= 1") = self.weight.dim(0)?;
        Ok(y.reshape(shape)?)
    }

    /// Several layers on the same `x`, each as [`Linear::apply`]; in a decoding step their
    /// products run together, as one parallel loop.
    pub(crate) fn apply_all(layers: &[&Linear], x: &Tensor, mode: Mode) -> Result<Vec<Tensor>> {
        if layers.iter().all(|l| l.takes_decode_products(x, mode)) {
            return Self::decode_products(layers, x, mode, true, false);
        }
        layers.iter().map(|l| l.apply(x, mode)).collect()
    }

    /// `gelu(x Wᵀ + b)` where the product is a decoding product (the GELU rides in it), else
    /// None.
    pub(crate) fn decode_gelu(&self, x: &Tensor, mode: Mode) -> Result<Option<Tensor>> {
        if !self.takes_decode_products(x, mode) || self.bias.is_none() {
            return Ok(None);
        }
        Ok(Some(Self::decode_products(&[self], x, mode, true, true)?.remove(0)))
    }

    /// Whether the product on `x` in `mode` is a decoding product: a decoding step in f32 on the
    /// CPU, or a packed weight.
    fn takes_decode_products(&self, x: &Tensor, mode: Mode) -> bool {
        let step = mode == Mode::Decode && kernels::use_fused(x) && x.dtype() == DType::F32 && self.weight.dtype() == DType::F32;
        step || self.packed.is_some()
    }

    /// The decoding products of `layers` on `x` (see [`Linear::product`]), with GELU after the
    /// bias when `gelu`.
    fn decode_products(layers: &[&Linear], x: &Tensor, mode: Mode, with_bias: bool, gelu: bool) -> Result<Vec<Tensor>> {
        if mode == Mode::Record {
            return Err(crate::Error::input("a quantized model cannot be trained: train the f32 model it was quantized from"));
        }
        let k = *x.dims().last().expect("rank >= 1");
        let rows = x.elem_count() / k.max(1);
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let outs = layers.iter().map(|l| l.weight.dim(0)).collect::<candle_core::Result<Vec<_>>>()?;
        // The tensors to read: x, then each layer's f32 weight (unless packed) and bias.
        let biases: Vec<Option<Tensor>> = layers.iter().map(|l| l.bias_for(mode).filter(|_| with_bias)).collect();
        let mut parts = vec![&x];
        for (l, b) in layers.iter().zip(&biases) {
            parts.extend(l.packed.is_none().then_some(&l.weight));
            parts.extend(b.as_ref());
        }
        let ys = kernels::read::<f32, _>(&parts, |s| {
            let mut next = s[1..].iter();
            let mut products = Vec::with_capacity(layers.len());
            for ((l, b), &out) in layers.iter().zip(&biases).zip(&outs) {
                let w = match &l.packed {
                    Some(p) => kernels::decode::Weight::Panels(p),
                    None => kernels::decode::Weight::F32(next.next().expect("a weight per f32 layer")),
                };
                let bias = b.as_ref().map(|_| *next.next().expect("a bias per layer with one"));
                products.push(kernels::decode::Product { w, out, bias, gelu });
            }
            kernels::decode::matmul_all(s[0], rows, &products)
        })?;
        let mut shape = x.dims().to_vec();
        ys.into_iter()
            .zip(outs)
            .map(|(y, out)| {
                *shape.last_mut().expect("rank >= 1") = out;
                Ok(Tensor::from_vec(y, shape.as_slice(), x.device())?)
            })
            .collect()
    }

    /// The backward pass at input `x` for output gradient `dy`: dx, with the weight (and bias)
    /// gradients into `grads`.
    pub(crate) fn backward(&self, x: &Tensor, dy: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        let (x2, dy2) = (rows2(x)?, rows2(dy)?);
        grads.param(&self.weight, matmul(&dy2.t()?, &x2)?)?;
        if let Some(b) = &self.bias {
            grads.param(b, dy2.sum(0)?)?;
        }
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("rank >= 1") = self.weight.dim(1)?;
        Ok(matmul(&dy2, &self.weight.detach())?.reshape(shape)?)
    }
}

/// `nn.LayerNorm(dim)` with eps 1e-5.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// Scale, [dim].
    pub weight: Tensor,
    /// Shift, [dim].
    pub bias: Tensor,
}

impl LayerNorm {
    pub(crate) fn new(b: &Builder, dim: usize) -> Result<Self> {
        Ok(Self { weight: b.get("weight", &[dim], Init::Ones)?, bias: b.get("bias", &[dim], Init::Zeros)? })
    }

    /// Normalises the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(kernels::layer_norm::layer_norm(x, &self.weight, &self.bias, 1e-5)?)
    }
}

/// `nn.Embedding`.
#[derive(Clone, Debug)]
pub struct Embedding {
    /// The table, [entries, dim].
    pub weight: Tensor,
}

impl Embedding {
    pub(crate) fn new(b: &Builder, n: usize, dim: usize) -> Result<Self> {
        Ok(Self { weight: b.get("weight", &[n, dim], Init::Normal(1.0))? })
    }

    /// Rows of the table for integer `ids` of any shape; the result has one more dimension.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut shape = ids.dims().to_vec();
        shape.push(self.weight.dim(1)?);
        let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
        Ok(self.weight.index_select(&flat, 0)?.reshape(shape)?)
    }
}

/// Inverted dropout with probability `p`; `seed` None (evaluation) or p = 0 is the identity.
pub fn dropout(x: &Tensor, p: f64, seed: Option<u64>) -> Result<Tensor> {
    match dropout_mask(x, p, seed)? {
        Some(mask) => Ok((x * mask)?),
        None => Ok(x.clone()),
    }
}

/// Dropout factors for a [b, len, w] tensor (like `like`) whose row (bi, t) draws from the
/// stream `row_seed(bi, t)`.
pub(crate) fn positional_mask(b: usize, len: usize, w: usize, p: f64, row_seed: &dyn Fn(usize, usize) -> u64, like: &Tensor) -> Result<Tensor> {
    let scale = (1.0 / (1.0 - p)) as f32;
    let mut mask = Vec::with_capacity(b * len * w);
    for bi in 0..b {
        for t in 0..len {
            let seed = row_seed(bi, t);
            mask.extend((0..w as u64).map(|c| if (uniform_at(seed, c) as f64) < p { 0.0 } else { scale }));
        }
    }
    Ok(Tensor::from_vec(mask, (b, len, w), like.device())?.to_dtype(like.dtype())?)
}

/// The factors (0 or 1 / (1 - p)) that [`dropout`] multiplies `x` by, or None when it is the
/// identity. The same seed gives the same mask.
pub fn dropout_mask(x: &Tensor, p: f64, seed: Option<u64>) -> Result<Option<Tensor>> {
    let Some(seed) = seed.filter(|_| p > 0.0) else {
        return Ok(None);
    };
    let scale = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..x.elem_count() as u64).map(|i| if (uniform_at(seed, i) as f64) < p { 0.0 } else { scale }).collect();
    Ok(Some(Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?))
}
