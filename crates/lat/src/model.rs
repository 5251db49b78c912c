//! The two models of the reference: [`LinearAttentionTransformer`], the stack of layer pairs on
//! [batch, n, dim] inputs, and [`LinearAttentionTransformerLM`], the token-level language model
//! around it (embeddings, positions, final norm, logits).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use crate::attention::AttentionInputs;
use crate::config::{Config, TransformerConfig};
use crate::error::{Error, Result};
use crate::kernels::rotary::RotaryTable;
use crate::layers::{build_pairs, Pair};
use crate::nn::positional::{rotary_table, PositionalEmbedding};
use crate::nn::{Embedding, LayerNorm, Linear};
use crate::params::{Builder, Param};
use crate::pass::Pass;
use crate::reversible;

/// Optional inputs of a forward pass besides the tokens (or embeddings).
#[derive(Clone, Debug, Default)]
pub struct Inputs<'a> {
    /// [batch, n], nonzero (or true) = a real position, zero = padding.
    pub input_mask: Option<&'a Tensor>,
    /// [batch, m, dim]: what cross-attention layers attend to (`receives_context`).
    pub context: Option<&'a Tensor>,
    /// [batch, m]: which context positions are real.
    pub context_mask: Option<&'a Tensor>,
}

impl<'a> Inputs<'a> {
    pub fn masked(input_mask: Option<&'a Tensor>) -> Self {
        Self { input_mask, ..Self::default() }
    }
}

/// Checks a mask against [batch, n] and converts it to u8 on `device`.
fn check_mask(mask: Option<&Tensor>, b: usize, n: usize, what: &str, device: &Device) -> Result<Option<Tensor>> {
    let Some(m) = mask else { return Ok(None) };
    if m.dims() != [b, n] {
        return Err(Error::input(format!("{what} has shape {:?}, expected [{b}, {n}]", m.dims())));
    }
    let m = if m.dtype() == DType::U8 { m.clone() } else { m.ne(0f64)? };
    Ok(Some(m.to_device(device)?))
}

/// Pads dimension 1 of `x` to a multiple of `unit` with zeros (token id 0 or zero vectors), and
/// the mask with zeros, as the reference's `Autopadder`: a mask is created when padding is
/// added. Returns the padded tensor and mask.
fn autopad(x: &Tensor, mask: Option<Tensor>, unit: usize) -> Result<(Tensor, Option<Tensor>)> {
    let (b, n) = (x.dim(0)?, x.dim(1)?);
    let padding = n.div_ceil(unit) * unit - n;
    if padding == 0 {
        return Ok((x.clone(), mask));
    }
    let mask = match mask {
        Some(m) => m,
        None => Tensor::ones((b, n), DType::U8, x.device())?,
    };
    Ok((x.pad_with_zeros(1, 0, padding)?, Some(mask.pad_with_zeros(1, 0, padding)?)))
}

/// `LinearAttentionTransformer`: the stack of (attention, feed-forward) pairs.
#[derive(Clone, Debug)]
pub struct LinearAttentionTransformer {
    config: TransformerConfig,
    pairs: Arc<Vec<Pair>>,
    trainable: bool,
    params: Vec<Param>,
}

impl LinearAttentionTransformer {
    pub(crate) fn build(b: &Builder, config: &TransformerConfig) -> Result<Self> {
        config.validate()?;
        let pairs = build_pairs(b, config)?;
        Ok(Self { config: config.clone(), pairs: Arc::new(pairs), trainable: b.trainable(), params: vec![] })
    }

    /// A freshly initialised stack (trainable), parameters drawn from `seed`.
    pub fn new(config: &TransformerConfig, seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        let b = Builder::init(seed, device, dtype);
        let mut m = Self::build(&b, config)?;
        m.params = b.finish()?;
        Ok(m)
    }

    /// A stack with the given tensors, named as the reference's `state_dict` (`layers.…`).
    pub fn from_tensors(config: &TransformerConfig, tensors: HashMap<String, Tensor>, device: &Device, dtype: DType, trainable: bool) -> Result<Self> {
        let b = Builder::load(tensors, device, dtype, trainable);
        let mut m = Self::build(&b, config)?;
        m.params = b.finish()?;
        Ok(m)
    }

    pub fn config(&self) -> &TransformerConfig {
        &self.config
    }

    /// Every named tensor, in the reference's `state_dict` order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// `x`: [batch, n, dim] → [batch, n, dim]. Lengths that are not a multiple of
    /// [`TransformerConfig::pad_to_multiple`] are padded with zero vectors (masked) and cropped.
    pub fn forward(&self, x: &Tensor, inputs: &Inputs, pass: &Pass) -> Result<Tensor> {
        let (b, n, d) = x.dims3().map_err(|_| Error::input(format!("expected [batch, n, dim], got {:?}", x.dims())))?;
        if d != self.config.dim || b == 0 || n == 0 {
            return Err(Error::input(format!("expected [batch >= 1, n >= 1, {}], got {:?}", self.config.dim, x.dims())));
        }
        let mask = check_mask(inputs.input_mask, b, n, "input_mask", x.device())?;
        let (x, mask) = autopad(x, mask, self.config.pad_to_multiple())?;
        let attn = self.attention_inputs(mask, inputs, b, None)?;
        self.forward_padded(&x, &attn, pass)?.narrow(1, 0, n).map_err(Into::into)
    }

    pub(crate) fn attention_inputs(&self, mask: Option<Tensor>, inputs: &Inputs, b: usize, rotary: Option<(Arc<RotaryTable>, usize)>) -> Result<AttentionInputs> {
        let (context, context_mask) = match (self.config.receives_context, inputs.context) {
            (true, Some(c)) => {
                let (cb, m, cd) = c.dims3().map_err(|_| Error::input(format!("context must be [batch, m, dim], got {:?}", c.dims())))?;
                if cb != b || cd != self.config.dim || m == 0 {
                    return Err(Error::input(format!("context has shape {:?}, expected [{b}, m >= 1, {}]", c.dims(), self.config.dim)));
                }
                (Some(c.clone()), check_mask(inputs.context_mask, b, m, "context_mask", c.device())?)
            }
            (true, None) => return Err(Error::input("this model receives context: pass a context tensor")),
            (false, Some(_)) => return Err(Error::input("this model does not receive context (receives_context = false)")),
            (false, None) => (None, None),
        };
        Ok(AttentionInputs { mask, rotary, context, context_mask })
    }

    /// The stack on an already padded input.
    pub(crate) fn forward_padded(&self, x: &Tensor, inputs: &AttentionInputs, pass: &Pass) -> Result<Tensor> {
        if self.config.reversible {
            return reversible::forward(&self.pairs, x, inputs, pass, self.trainable);
        }
        let mut x = x.clone();
        for (j, pair) in self.pairs.iter().enumerate() {
            x = (&x + pair.f.forward(&x, inputs, pass, j)?)?;
            x = (&x + pair.g.forward(&x, inputs, pass, j)?)?;
        }
        Ok(x)
    }
}

/// `LinearAttentionTransformerLM`: a language model over `num_tokens` token ids.
#[derive(Clone, Debug)]
pub struct LinearAttentionTransformerLM {
    config: Config,
    token_emb: Embedding,
    pos_emb: PositionalEmbedding,
    layer_rotary: Option<Arc<RotaryTable>>,
    project_in: Option<Linear>,
    project_out: Option<Linear>,
    transformer: LinearAttentionTransformer,
    norm: LayerNorm,
    out: Option<Linear>,
    params: Vec<Param>,
    device: Device,
    dtype: DType,
}

impl LinearAttentionTransformerLM {
    fn build(b: &Builder, config: &Config) -> Result<Self> {
        config.validate()?;
        let (e, d) = (config.emb_dim(), config.dim);
        let token_emb = Embedding::new(&b.pp("token_emb"), config.num_tokens, e)?;
        let pos_emb = PositionalEmbedding::new(&b.pp("pos_emb"), config)?;
        let tb = if e != d { b.pp("transformer") } else { b.clone() };
        let stack = if e != d { tb.pp("fn") } else { b.pp("transformer") };
        let project_in = if e != d { Some(Linear::new(&tb.pp("project_in"), e, d, true)?) } else { None };
        let transformer = LinearAttentionTransformer::build(&stack, &config.transformer())?;
        // The reference drops project_out with return_embeddings and then crashes in the norm;
        // keeping it returns embeddings of width emb_dim.
        let project_out = if e != d { Some(Linear::new(&tb.pp("project_out"), d, e, true)?) } else { None };
        let layer_rotary = if config.use_rotary_emb {
            Some(rotary_table(&b.pp("layer_pos_emb"), config.transformer().dim_head(), config.max_seq_len)?)
        } else {
            None
        };
        let norm = LayerNorm::new(&b.pp("norm"), e)?;
        let out = if config.return_embeddings { None } else { Some(Linear::new(&b.pp("out"), e, config.num_tokens, true)?) };
        Ok(Self {
            config: config.clone(),
            token_emb,
            pos_emb,
            layer_rotary,
            project_in,
            project_out,
            transformer,
            norm,
            out,
            params: vec![],
            device: b.device(),
            dtype: b.dtype(),
        })
    }

    /// A freshly initialised model (trainable), parameters drawn from `seed` the way PyTorch
    /// initialises the reference.
    pub fn new(config: &Config, seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        let b = Builder::init(seed, device, dtype);
        let mut m = Self::build(&b, config)?;
        m.params = b.finish()?;
        Ok(m)
    }

    /// A model with the given tensors, named exactly as the reference's `state_dict` for this
    /// configuration (see [`crate::checkpoint`] for the other accepted spellings). Every tensor
    /// must be present with the right shape, and none may be left over.
    pub fn from_tensors(config: &Config, tensors: HashMap<String, Tensor>, device: &Device, dtype: DType, trainable: bool) -> Result<Self> {
        let b = Builder::load(tensors, device, dtype, trainable);
        let mut m = Self::build(&b, config)?;
        m.params = b.finish()?;
        Ok(m)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Every named tensor (parameters and the rotary buffers), in `state_dict` order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// The trainable parameters as variables, for an optimizer.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.params
            .iter()
            .filter(|p| p.trainable && p.tensor.is_variable())
            .map(|p| (p.name.clone(), Var::from_tensor(&p.tensor).expect("a variable converts without copying")))
            .collect()
    }

    /// Number of trainable parameters.
    pub fn num_parameters(&self) -> usize {
        self.params.iter().filter(|p| p.trainable).map(|p| p.tensor.elem_count()).sum()
    }

    /// Checks token ids against the vocabulary and returns them as u32.
    pub(crate) fn check_tokens(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, n) = tokens.dims2().map_err(|_| Error::input(format!("tokens must be [batch, n], got shape {:?}", tokens.dims())))?;
        if b == 0 || n == 0 {
            return Err(Error::input(format!("tokens must be non-empty, got shape [{b}, {n}]")));
        }
        if !tokens.dtype().is_int() {
            return Err(Error::input(format!("tokens must be integers, got {:?}", tokens.dtype())));
        }
        let ids = tokens.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
        if let Some(&bad) = ids.iter().find(|&&t| t < 0 || t as usize >= self.config.num_tokens) {
            return Err(Error::input(format!("token id {bad} is out of range: the vocabulary has {} tokens (0..{})", self.config.num_tokens, self.config.num_tokens - 1)));
        }
        Ok(Tensor::from_vec(ids.into_iter().map(|t| t as u32).collect::<Vec<_>>(), (b, n), &self.device)?)
    }

    /// Logits [batch, n, num_tokens] for `tokens` [batch, n] (or embeddings [batch, n, emb_dim]
    /// with `return_embeddings`). Lengths that are not a multiple of the padding unit are padded
    /// and cropped as the reference's `Autopadder` does.
    pub fn forward(&self, tokens: &Tensor, inputs: &Inputs, pass: &Pass) -> Result<Tensor> {
        let tokens = self.check_tokens(tokens)?;
        let (b, n) = tokens.dims2()?;
        let mask = check_mask(inputs.input_mask, b, n, "input_mask", &self.device)?;
        let (tokens, mask) = autopad(&tokens, mask, self.config.transformer().pad_to_multiple())?;
        let padded = tokens.dim(1)?;
        let mut h = self.token_emb.forward(&tokens)?.broadcast_add(&self.pos_emb.forward(0, padded)?)?;
        let rotary = self.layer_rotary.clone().map(|t| (t, 0));
        let attn = self.transformer.attention_inputs(mask, inputs, b, rotary)?;
        if let Some(p) = &self.project_in {
            h = p.forward(&h)?;
        }
        h = self.transformer.forward_padded(&h, &attn, pass)?;
        if let Some(p) = &self.project_out {
            h = p.forward(&h)?;
        }
        h = self.norm.forward(&h)?;
        if let Some(out) = &self.out {
            h = out.forward(&h)?;
        }
        Ok(h.narrow(1, 0, n)?)
    }
}
