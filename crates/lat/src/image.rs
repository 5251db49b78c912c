//! `ImageLinearAttention` of the reference (SPEC §19): non-causal linear attention over the
//! positions of a feature map, with convolutional projections.
//!
//! ```text
//! q, k, v = conv(x)              [b, heads, key_dim | value_dim, N]     N = positions of the map
//! q, k = q · key_dim^-1/4, k · key_dim^-1/4
//! (context [b, chan, m]: its keys (unscaled) and values are appended to k and v)
//! k = softmax over positions;  q = softmax over key_dim (norm_queries)
//! out = q (k vᵀ)  →  [b, heads · value_dim, h', w']  →  to_out conv
//! ```
//!
//! Where the reference breaks, this works: with `stride > 1` (or padding that changes the map's
//! size) the attention runs on the projected map's own size, and a context's values have
//! `value_dim` channels (the reference reshapes them with `key_dim`). A context that the kernel
//! cannot slide over is refused with an error that says which padding it needs.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::params::{fan_in_bound, Builder, Init, Param};

fn one() -> usize {
    1
}
fn sixty_four() -> usize {
    64
}
fn eight() -> usize {
    8
}
fn yes() -> bool {
    true
}

/// The reference's constructor arguments, with its defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageAttentionConfig {
    /// Input channels.
    pub chan: usize,
    /// Output channels (default: `chan`).
    #[serde(default)]
    pub chan_out: Option<usize>,
    #[serde(default = "one")]
    /// Convolution kernel size of every projection.
    pub kernel_size: usize,
    #[serde(default)]
    /// Padding of every projection.
    pub padding: usize,
    #[serde(default = "one")]
    /// Stride of the query, key and value projections.
    pub stride: usize,
    #[serde(default = "sixty_four")]
    /// Width of each head's queries and keys.
    pub key_dim: usize,
    #[serde(default = "sixty_four")]
    /// Width of each head's values.
    pub value_dim: usize,
    #[serde(default = "eight")]
    /// Attention heads.
    pub heads: usize,
    /// Softmax over each query's features.
    #[serde(default = "yes")]
    pub norm_queries: bool,
}

impl ImageAttentionConfig {
    /// The reference's defaults for `chan` input channels.
    pub fn new(chan: usize) -> Self {
        Self { chan, chan_out: None, kernel_size: 1, padding: 0, stride: 1, key_dim: 64, value_dim: 64, heads: 8, norm_queries: true }
    }

    /// Checks that every size is positive.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [("chan", self.chan), ("kernel_size", self.kernel_size), ("stride", self.stride), ("key_dim", self.key_dim), ("value_dim", self.value_dim), ("heads", self.heads)] {
            if v == 0 {
                return Err(Error::config(field, "must be at least 1"));
            }
        }
        if self.chan_out == Some(0) {
            return Err(Error::config("chan_out", "must be at least 1 (or unset for chan)"));
        }
        Ok(())
    }
}

/// A 2-D convolution with bias (`nn.Conv2d`).
#[derive(Clone, Debug)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
    padding: usize,
    stride: usize,
}

impl Conv {
    fn new(b: &Builder, c_in: usize, c_out: usize, k: usize, padding: usize, stride: usize) -> Result<Self> {
        let bound = fan_in_bound(c_in * k * k);
        Ok(Self { weight: b.get("weight", &[c_out, c_in, k, k], Init::Uniform(bound))?, bias: b.get("bias", &[c_out], Init::Uniform(bound))?, padding, stride })
    }

    /// Output size of a side of `size`, if the kernel fits.
    fn out_size(&self, size: usize) -> Option<usize> {
        let k = self.weight.dim(2).ok()?;
        (size + 2 * self.padding).checked_sub(k).map(|s| s / self.stride + 1)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        Ok(y.broadcast_add(&self.bias.reshape((1, self.bias.dim(0)?, 1, 1))?)?)
    }
}

/// `ImageLinearAttention`.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use linear_attention_transformer::image::{ImageAttentionConfig, ImageLinearAttention};
///
/// let mut config = ImageAttentionConfig::new(16); // chan
/// config.heads = 2;
/// config.key_dim = 8;
/// config.value_dim = 8;
/// let attn = ImageLinearAttention::new(&config, 0, &Device::Cpu, DType::F32)?;
/// let x = Tensor::randn(0f32, 1.0, (1, 16, 8, 8), &Device::Cpu)?;
/// assert_eq!(attn.forward(&x, None)?.dims(), &[1, 16, 8, 8]);
/// # Ok::<(), linear_attention_transformer::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ImageLinearAttention {
    config: ImageAttentionConfig,
    to_q: Conv,
    to_k: Conv,
    to_v: Conv,
    to_out: Conv,
    params: Vec<Param>,
}

impl ImageLinearAttention {
    fn build(b: &Builder, c: &ImageAttentionConfig) -> Result<Self> {
        c.validate()?;
        let (k, p, s) = (c.kernel_size, c.padding, c.stride);
        Ok(Self {
            to_q: Conv::new(&b.pp("to_q"), c.chan, c.key_dim * c.heads, k, p, s)?,
            to_k: Conv::new(&b.pp("to_k"), c.chan, c.key_dim * c.heads, k, p, s)?,
            to_v: Conv::new(&b.pp("to_v"), c.chan, c.value_dim * c.heads, k, p, s)?,
            to_out: Conv::new(&b.pp("to_out"), c.value_dim * c.heads, c.chan_out.unwrap_or(c.chan), k, p, 1)?,
            config: c.clone(),
            params: vec![],
        })
    }

    /// Fresh, trainable weights drawn from `seed` as PyTorch initialises them.
    pub fn new(config: &ImageAttentionConfig, seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        let (m, params) = Builder::init(seed, device, dtype).build(|b| Self::build(b, config))?;
        Ok(Self { params, ..m })
    }

    /// Weights named as the reference's `state_dict` (`to_q.weight`, …).
    pub fn from_tensors(config: &ImageAttentionConfig, tensors: HashMap<String, Tensor>, device: &Device, dtype: DType, trainable: bool) -> Result<Self> {
        let (m, params) = Builder::load(tensors, device, dtype, trainable).build(|b| Self::build(b, config))?;
        Ok(Self { params, ..m })
    }

    /// The configuration.
    pub fn config(&self) -> &ImageAttentionConfig {
        &self.config
    }

    /// Every named tensor, in `state_dict` order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// `x` [batch, chan, height, width], optional `context` [batch, chan, m] → [batch, chan_out,
    /// height', width'] (the input's size unless stride or padding change it).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let c = &self.config;
        let (b, chan, h, w) = x.dims4().map_err(|_| Error::input(format!("expected [batch, chan, height, width], got {:?}", x.dims())))?;
        if chan != c.chan || b == 0 {
            return Err(Error::input(format!("expected [batch >= 1, {}, height, width], got {:?}", c.chan, x.dims())));
        }
        let (Some(oh), Some(ow)) = (self.to_q.out_size(h), self.to_q.out_size(w)) else {
            return Err(Error::input(format!("a {h}x{w} map is smaller than the {0}x{0} kernel with padding {1}", c.kernel_size, c.padding)));
        };
        let n = oh * ow;
        let heads = |t: Tensor, d: usize, len: usize| -> Result<Tensor> { Ok(t.reshape((b, c.heads, d, len))?) };
        let scale = (c.key_dim as f64).powf(-0.25);
        let q = (heads(self.to_q.forward(x)?, c.key_dim, n)? * scale)?;
        let mut k = (heads(self.to_k.forward(x)?, c.key_dim, n)? * scale)?;
        let mut v = heads(self.to_v.forward(x)?, c.value_dim, n)?;
        if let Some(ctx) = context {
            let (cb, cc, m) = ctx.dims3().map_err(|_| Error::input(format!("context must be [batch, chan, m], got {:?}", ctx.dims())))?;
            if cb != b || cc != c.chan || m == 0 {
                return Err(Error::input(format!("context has shape {:?}, expected [{b}, {}, m >= 1]", ctx.dims(), c.chan)));
            }
            let (Some(1), Some(mm)) = (self.to_k.out_size(1), self.to_k.out_size(m)) else {
                return Err(Error::input(format!(
                    "the context is a 1 x {m} map, which a {0}x{0} kernel with stride {1} cannot slide over to one row; use padding = (kernel_size - 1) / 2 and stride 1",
                    c.kernel_size, c.stride
                )));
            };
            let ctx = ctx.reshape((b, c.chan, 1, m))?;
            // As in the reference, the context's keys are not scaled.
            let ck = heads(self.to_k.forward(&ctx)?, c.key_dim, mm)?;
            let cv = heads(self.to_v.forward(&ctx)?, c.value_dim, mm)?;
            k = Tensor::cat(&[&k, &ck], 3)?;
            v = Tensor::cat(&[&v, &cv], 3)?;
        }
        let k = candle_nn::ops::softmax(&k, D::Minus1)?;
        let q = if c.norm_queries { candle_nn::ops::softmax(&q, 2)? } else { q };
        let context = k.matmul(&v.t()?)?;
        let out = context.t()?.matmul(&q)?;
        self.to_out.forward(&out.reshape((b, c.heads * c.value_dim, oh, ow))?)
    }
}
