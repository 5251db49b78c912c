//! The two models of the reference: [`LinearAttentionTransformer`], the stack of layer pairs on
//! [batch, n, dim] inputs, and [`LinearAttentionTransformerLM`], the token-level language model
//! around it (embeddings, positions, final norm, logits).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use crate::config::{Config, TransformerConfig};
use crate::error::{Error, Result};
use crate::kernels::awake::with_workers_awake;
use crate::kernels::rotary::RotaryTable;
use crate::layers::{self, Mode, StackInputs, Step};
use crate::nn::positional::{rotary_table, PositionalEmbedding};
use crate::nn::{Embedding, LayerNorm, Linear};
use crate::params::{Builder, Param};
use crate::pass::Pass;
use crate::quantize::Quantization;
use crate::stack::{RowStates, Stack};

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
    /// Just an input mask.
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
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use linear_attention_transformer::{Inputs, LinearAttentionTransformer, Pass, TransformerConfig};
///
/// let mut config = TransformerConfig::new(32, 2, 64); // dim, depth, max_seq_len
/// config.heads = 4;
/// config.reversible = true;
/// let stack = LinearAttentionTransformer::new(&config, 0, &Device::Cpu, DType::F32)?;
/// let x = Tensor::randn(0f32, 1.0, (2, 10, 32), &Device::Cpu)?;
/// assert_eq!(stack.forward(&x, &Inputs::default(), &Pass::eval())?.dims(), &[2, 10, 32]);
/// # Ok::<(), linear_attention_transformer::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct LinearAttentionTransformer {
    config: TransformerConfig,
    pub(crate) stack: Stack,
    trainable: bool,
    params: Vec<Param>,
}

impl LinearAttentionTransformer {
    pub(crate) fn build(b: &Builder, config: &TransformerConfig) -> Result<Self> {
        config.validate()?;
        let stack = Stack::new(layers::pairs(b, config)?, config.reversible);
        Ok(Self { config: config.clone(), stack, trainable: b.trainable(), params: vec![] })
    }

    /// A freshly initialised stack (trainable), parameters drawn from `seed`.
    pub fn new(config: &TransformerConfig, seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        let (m, params) = Builder::init(seed, device, dtype).build(|b| Self::build(b, config))?;
        Ok(Self { params, ..m })
    }

    /// A stack with the given tensors, named as the reference's `state_dict` (`layers.…`).
    pub fn from_tensors(config: &TransformerConfig, tensors: HashMap<String, Tensor>, device: &Device, dtype: DType, trainable: bool) -> Result<Self> {
        let (m, params) = Builder::load(tensors, device, dtype, trainable).build(|b| Self::build(b, config))?;
        Ok(Self { params, ..m })
    }

    /// The stack's configuration.
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
        let stack_inputs = self.stack_inputs(mask, inputs, b, None)?;
        self.forward_padded(&x, &stack_inputs, pass)?.narrow(1, 0, n).map_err(Into::into)
    }

    pub(crate) fn stack_inputs(&self, mask: Option<Tensor>, inputs: &Inputs, b: usize, rotary: Option<(Arc<RotaryTable>, usize)>) -> Result<StackInputs> {
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
        Ok(StackInputs { mask, rotary, context, context_mask })
    }

    /// The stack on an already padded input.
    pub(crate) fn forward_padded(&self, x: &Tensor, inputs: &StackInputs, pass: &Pass) -> Result<Tensor> {
        self.stack.forward(x, inputs, pass, self.trainable)
    }
}

/// How many prompt tokens [`LinearAttentionTransformerLM::read_prompt`] reads at a time: small
/// enough that a server reading a long prompt between decoding steps does not stall the streams
/// already decoding.
pub const PROMPT_CHUNK: usize = 128;

/// What a causal language model carries from one decoding step to the next, per row (stream):
/// its position, and per layer the global heads' running sums, the local heads' key/value
/// windows, the cross-attention's context summaries and the previous position's features for
/// token shifting. Its size does not grow with the sequence. Cloning it snapshots a
/// generation, which can later continue from there.
#[derive(Clone, Debug)]
pub struct DecodeState {
    rows: Vec<Stream>,
}

/// One row of a [`DecodeState`].
#[derive(Clone, Debug)]
struct Stream {
    position: usize,
    blocks: RowStates,
}

impl DecodeState {
    /// Rows in the batch.
    pub fn batch(&self) -> usize {
        self.rows.len()
    }

    /// The position of each row's next token (its length so far).
    pub fn positions(&self) -> Vec<usize> {
        self.rows.iter().map(|r| r.position).collect()
    }

    /// One batch state from several (each of any batch size), rows in order. The rows move:
    /// a copy would leave the originals' windows resident in the heap beside the copies'.
    pub fn concat(states: Vec<DecodeState>) -> Result<Self> {
        if states.is_empty() {
            return Err(Error::input("no states to concatenate"));
        }
        Ok(Self { rows: states.into_iter().flat_map(|s| s.rows).collect() })
    }

    /// Bytes of memory the state holds (the same at every position for models without local
    /// heads; with them, at most two windows of keys and values per local head).
    pub fn bytes(&self) -> usize {
        self.rows.iter().flat_map(|r| &r.blocks).map(|b| b.bytes()).sum()
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
    quantization: Option<Quantization>,
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
        let layer_rotary = if config.use_rotary_emb { Some(rotary_table(&b.pp("layer_pos_emb"), config.transformer().dim_head(), config.max_seq_len)?) } else { None };
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
            quantization: b.quantization(),
        })
    }

    /// A freshly initialised model (trainable), parameters drawn from `seed` the way PyTorch
    /// initialises the reference.
    pub fn new(config: &Config, seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        let (m, params) = Builder::init(seed, device, dtype).build(|b| Self::build(b, config))?;
        Ok(Self { params, ..m })
    }

    /// A model with the given tensors, named exactly as the reference's `state_dict` for this
    /// configuration (see [`crate::checkpoint`] for the other accepted spellings). Every tensor
    /// must be present with the right shape, and none may be left over.
    pub fn from_tensors(config: &Config, tensors: HashMap<String, Tensor>, device: &Device, dtype: DType, trainable: bool) -> Result<Self> {
        let (m, params) = Builder::load(tensors, device, dtype, trainable).build(|b| Self::build(b, config))?;
        Ok(Self { params, ..m })
    }

    /// A model from a quantized model file's tensors (see [`crate::quantize`]): on the CPU, for
    /// inference, its linear weights kept packed.
    pub fn from_quantized(config: &Config, tensors: HashMap<String, Tensor>, quantization: Quantization) -> Result<Self> {
        let (m, params) = Builder::load_quantized(tensors, quantization).build(|b| Self::build(b, config))?;
        Ok(Self { params, ..m })
    }

    /// How the linear weights are stored, when the model came from a quantized file.
    pub fn quantization(&self) -> Option<Quantization> {
        self.quantization
    }

    /// The error for what a quantized model cannot do.
    pub(crate) fn refuse_quantized(&self, what: &str) -> Result<()> {
        match self.quantization {
            Some(q) => Err(Error::input(format!("this model is quantized to {q}: it cannot {what}; use the f32 model it was quantized from"))),
            None => Ok(()),
        }
    }

    /// How many trainable parameters a model of `config` has, counted without allocating them.
    pub fn count_parameters(config: &Config) -> Result<u64> {
        let (_, params) = Builder::shapes().build(|b| Self::build(b, config))?;
        Ok(params.iter().filter(|p| p.trainable).map(|p| p.tensor.elem_count() as u64).sum())
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The device the model lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The float type of the parameters.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A copy in `dtype` (for mixed precision: compute in bfloat16 against f32 weights). When
    /// this model is trainable the copy's weights are variables of their own; carry their
    /// gradients back with [`LinearAttentionTransformerLM::grads_from`].
    pub fn cast(&self, dtype: DType) -> Result<Self> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        self.refuse_quantized(&format!("be cast to {dtype:?}"))?;
        let tensors = self.params.iter().map(|p| (p.name.clone(), p.tensor.detach())).collect();
        let trainable = self.params.iter().any(|p| p.tensor.is_variable());
        Self::from_tensors(&self.config, tensors, &self.device, dtype, trainable)
    }

    /// The gradients of this model's variables, from `grads` taken on `copy` (made by
    /// [`LinearAttentionTransformerLM::cast`]), converted to this model's dtype.
    pub fn grads_from(&self, copy: &Self, mut grads: GradStore) -> Result<GradStore> {
        let copies: HashMap<String, Var> = copy.vars().into_iter().collect();
        for (name, var) in self.vars() {
            if let Some(g) = copies.get(&name).and_then(|c| grads.remove(c.as_tensor())) {
                grads.insert(var.as_tensor(), g.to_dtype(self.dtype)?);
            }
        }
        Ok(grads)
    }

    /// Every named tensor (parameters and the rotary buffers), in `state_dict` order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// The trainable parameters as variables, for an optimizer.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.params.iter().filter(|p| p.trainable && p.tensor.is_variable()).map(|p| (p.name.clone(), Var::from_tensor(&p.tensor).expect("a variable converts without copying"))).collect()
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

    /// How many positions a decoding state can reach: the sequence length the model was
    /// built for.
    pub fn decode_limit(&self) -> usize {
        self.config.max_seq_len.min(self.pos_emb.len())
    }

    fn check_generation(&self) -> Result<()> {
        let c = &self.config;
        if !c.causal || c.return_embeddings {
            return Err(Error::input("generation needs a causal language model (causal = true, logits)"));
        }
        Ok(())
    }

    /// Whether [`LinearAttentionTransformerLM::read_prompt`] and [`LinearAttentionTransformerLM::step`]
    /// work without inputs: a causal model with logits that needs no context (decoders with
    /// cross-attention decode from [`LinearAttentionTransformerLM::start_with`] given the context).
    pub fn decodes_recurrently(&self) -> bool {
        let c = &self.config;
        c.causal && !c.return_embeddings && !c.receives_context
    }

    /// The most bytes one stream's [`DecodeState`] can hold, whatever its position: what a
    /// server reserves per stream.
    pub fn max_state_bytes(&self) -> usize {
        layers::max_state_bytes(&self.config.transformer())
    }

    /// [`LinearAttentionTransformerLM::max_state_bytes`] of a model of `config`, before it exists.
    pub fn state_bound(config: &Config) -> Result<u64> {
        config.validate()?;
        Ok(layers::max_state_bytes(&config.transformer()) as u64)
    }

    /// Runs the parallel form over `prompt` (one row) and returns the logits of its last
    /// position [1, num_tokens] and the state to continue from.
    pub fn prefill(&self, prompt: &[u32]) -> Result<(Tensor, DecodeState)> {
        self.prefill_with(prompt, &Inputs::default())
    }

    /// [`LinearAttentionTransformerLM::prefill`] with the inputs besides the tokens: the
    /// context (and its mask) of a decoder with cross-attention, which the state keeps.
    pub fn prefill_with(&self, prompt: &[u32], inputs: &Inputs) -> Result<(Tensor, DecodeState)> {
        self.check_decoding(inputs)?;
        self.check_prompt(prompt)?;
        let n = prompt.len();
        let tokens = self.check_tokens(&Tensor::from_slice(prompt, (1, n), &self.device)?)?;
        let (tokens, mask) = autopad(&tokens, None, self.config.pad_to_multiple())?;
        let padded = tokens.dim(1)?;
        let mut h = self.token_emb.forward(&tokens)?.broadcast_add(&self.pos_emb.forward(0, padded)?)?;
        let stack_inputs = self.transformer.stack_inputs(mask, inputs, 1, self.layer_rotary.clone().map(|t| (t, 0)))?;
        if let Some(p) = &self.project_in {
            h = p.forward(&h)?;
        }
        let (h, mut rows) = self.transformer.stack.prefill(&h, &stack_inputs, n)?;
        let logits = self.head(&h.narrow(1, n - 1, 1)?, Mode::Graph)?.squeeze(1)?;
        let blocks = rows.pop().ok_or_else(|| Error::input("the prompt left no state"))?;
        Ok((logits, DecodeState { rows: vec![Stream { position: n, blocks }] }))
    }

    /// A stream's state before its first token, to read a prompt into with
    /// [`LinearAttentionTransformerLM::extend`]; `inputs` holds the context (and its mask) of
    /// a decoder with cross-attention, which the state keeps.
    pub fn start_with(&self, inputs: &Inputs) -> Result<DecodeState> {
        self.check_decoding(inputs)?;
        self.empty_state(inputs)
    }

    /// The state before the first token, for inputs already checked.
    fn empty_state(&self, inputs: &Inputs) -> Result<DecodeState> {
        let stack_inputs = self.transformer.stack_inputs(None, inputs, 1, None)?;
        let blocks = self.transformer.stack.start(&stack_inputs, 1)?.pop().ok_or_else(|| Error::input("the model left no state"))?;
        Ok(DecodeState { rows: vec![Stream { position: 0, blocks }] })
    }

    /// A prompt the model can read: at least one token, and no more than its positions.
    fn check_prompt(&self, prompt: &[u32]) -> Result<()> {
        let n = prompt.len();
        if n == 0 {
            return Err(Error::input("the prompt is empty: give at least one token"));
        }
        if n > self.decode_limit() {
            return Err(Error::input(format!("the prompt has {n} tokens, more than the model's {} positions", self.decode_limit())));
        }
        Ok(())
    }

    /// A model that generates, and inputs a decoding state can start from.
    fn check_decoding(&self, inputs: &Inputs) -> Result<()> {
        self.check_generation()?;
        if inputs.input_mask.is_some() {
            return Err(Error::input("decoding takes no input mask: every prompt token is real"));
        }
        Ok(())
    }

    /// Reads a whole prompt the way every reader does (generation, the server): from
    /// [`LinearAttentionTransformerLM::start_with`]'s state, [`PROMPT_CHUNK`] tokens at a time
    /// with [`LinearAttentionTransformerLM::extend`]. Returns the logits after the last token
    /// [1, num_tokens] and the state. Reading in the same pieces leaves the same state to the
    /// last bit, wherever the prompt is read. (The recurrent form reads a piece faster than the
    /// parallel form on a CPU: it pads nothing to the window and reuses the decoding products.)
    pub fn read_prompt(&self, prompt: &[u32], inputs: &Inputs) -> Result<(Tensor, DecodeState)> {
        self.check_decoding(inputs)?;
        self.check_prompt(prompt)?;
        let mut state = self.empty_state(inputs)?;
        let mut pieces = prompt.chunks(PROMPT_CHUNK);
        let mut logits = self.extend(pieces.next().expect("a prompt of one token or more"), &mut state)?;
        for piece in pieces {
            logits = self.extend(piece, &mut state)?;
        }
        Ok((logits, state))
    }

    /// Feeds one token per row at the state's positions and returns the next logits
    /// [batch, num_tokens].
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use linear_attention_transformer::{Config, LinearAttentionTransformerLM};
    ///
    /// let mut config = Config::new(100, 32, 2, 256);
    /// config.causal = true;
    /// let model = LinearAttentionTransformerLM::new(&config, 0, &Device::Cpu, DType::F32)?;
    /// let (logits, mut state) = model.read_prompt(&[5, 6, 7], &Default::default())?;
    /// let next = logits.argmax(1)?.to_vec1::<u32>()?;
    /// let logits = model.step(&next, &mut state)?;                // constant time per token
    /// assert_eq!((logits.dims(), state.positions()), (&[1, 100][..], vec![4]));
    /// # Ok::<(), linear_attention_transformer::Error>(())
    /// ```
    pub fn step(&self, tokens: &[u32], state: &mut DecodeState) -> Result<Tensor> {
        self.step_streams(tokens, &mut [state])
    }

    /// One decoding step of several independent states at once, one token per row of each, in
    /// order: the weights are read once for all of them (what a server batching its streams
    /// does). Returns the next logits [rows, num_tokens].
    pub fn step_streams(&self, tokens: &[u32], states: &mut [&mut DecodeState]) -> Result<Tensor> {
        let mut rows: Vec<&mut Stream> = states.iter_mut().flat_map(|s| s.rows.iter_mut()).collect();
        if rows.is_empty() {
            return Err(Error::input("no stream to step: give at least one state"));
        }
        if tokens.len() != rows.len() {
            return Err(Error::input(format!("{} tokens for a batch of {}", tokens.len(), rows.len())));
        }
        self.advance(&mut rows, tokens, 1)
    }

    /// Feeds several tokens to a one-row state at once (a prompt read in pieces) and returns
    /// the logits after the last [1, num_tokens]. The same as stepping token by token, to float
    /// rounding (the local heads attend a window's queries together).
    pub fn extend(&self, tokens: &[u32], state: &mut DecodeState) -> Result<Tensor> {
        if state.batch() != 1 {
            return Err(Error::input(format!("extend takes a state of one row, got {}", state.batch())));
        }
        if tokens.is_empty() {
            return Err(Error::input("nothing to extend the state with: give at least one token"));
        }
        let mut rows: Vec<&mut Stream> = state.rows.iter_mut().collect();
        self.advance(&mut rows, tokens, tokens.len())
    }

    /// Advances every row by `t` tokens (`tokens` holds each row's in turn); the logits after
    /// each row's last token. A step is many short parallel loops: the pool's workers stay
    /// awake through it.
    fn advance(&self, rows: &mut [&mut Stream], tokens: &[u32], t: usize) -> Result<Tensor> {
        with_workers_awake(|| self.advance_awake(rows, tokens, t))
    }

    fn advance_awake(&self, rows: &mut [&mut Stream], tokens: &[u32], t: usize) -> Result<Tensor> {
        self.check_generation()?;
        let b = rows.len();
        if let Some(row) = rows.iter().find(|r| r.position + t > self.decode_limit()) {
            return Err(Error::input(format!("position {} is beyond the model's {} positions", row.position + t - 1, self.decode_limit())));
        }
        let positions: Vec<usize> = rows.iter().map(|r| r.position).collect();
        let ids = self.check_tokens(&Tensor::from_slice(tokens, (b, t), &self.device)?)?;
        let pos = Tensor::stack(&positions.iter().map(|&p| self.pos_emb.forward(p, t)).collect::<Result<Vec<_>>>()?, 0)?;
        let mut h = self.token_emb.forward(&ids)?.broadcast_add(&pos)?;
        if let Some(p) = &self.project_in {
            h = p.apply(&h, Mode::Decode)?;
        }
        // Detached: from trainable weights candle would record every op of the step in a graph
        // kept alive until the step's output is dropped.
        let h = h.detach();
        let mut blocks: Vec<&mut RowStates> = rows.iter_mut().map(|r| &mut r.blocks).collect();
        let step = Step { rotary: self.layer_rotary.as_deref(), positions: &positions };
        let h = self.transformer.stack.step(&h, &mut blocks, &step)?;
        rows.iter_mut().for_each(|r| r.position += t);
        Ok(self.head(&h.narrow(1, t - 1, 1)?, Mode::Decode)?.squeeze(1)?)
    }

    /// project_out, the final norm and the logits layer.
    fn head(&self, h: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut h = h.clone();
        if let Some(p) = &self.project_out {
            h = p.apply(&h, mode)?;
        }
        h = self.norm.forward(&h)?;
        if let Some(out) = &self.out {
            h = out.apply(&h, mode)?;
        }
        Ok(h)
    }

    /// Logits [batch, n, num_tokens] for `tokens` [batch, n] (or embeddings [batch, n, emb_dim]
    /// with `return_embeddings`). Lengths that are not a multiple of the padding unit are padded
    /// and cropped as the reference's `Autopadder` does.
    pub fn forward(&self, tokens: &Tensor, inputs: &Inputs, pass: &Pass) -> Result<Tensor> {
        let tokens = self.check_tokens(tokens)?;
        let (b, n) = tokens.dims2()?;
        let mask = check_mask(inputs.input_mask, b, n, "input_mask", &self.device)?;
        let (tokens, mask) = autopad(&tokens, mask, self.config.pad_to_multiple())?;
        let padded = tokens.dim(1)?;
        let mut h = self.token_emb.forward(&tokens)?.broadcast_add(&self.pos_emb.forward(0, padded)?)?;
        let rotary = self.layer_rotary.clone().map(|t| (t, 0));
        let stack_inputs = self.transformer.stack_inputs(mask, inputs, b, rotary)?;
        if let Some(p) = &self.project_in {
            h = p.forward(&h)?;
        }
        h = self.transformer.forward_padded(&h, &stack_inputs, pass)?;
        Ok(self.head(&h, Mode::Graph)?.narrow(1, 0, n)?)
    }
}
