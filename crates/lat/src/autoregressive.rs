//! The reference's `AutoregressiveWrapper(net, ignore_index=-100, pad_value=0)`, under the same
//! names: the next-token loss of a language model and its `generate`, with the reference's
//! arguments, defaults and semantics. Generation decodes from the recurrent state (the prompt
//! read into it, then one batched step per token) wherever the reference's result allows it, and otherwise re-runs
//! the window as the reference does.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};
use crate::generate::{Continuation, Extras, Sampling};
use crate::kernels::cross_entropy::{cross_entropy_rows, IGNORE};
use crate::model::{Inputs, LinearAttentionTransformerLM};
use crate::pass::Pass;
use crate::rng::{derive, Rng};

/// The reference's `filter_logits_fn`: which tokens sampling keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Filter {
    /// `top_k(logits, thres)`: the `int((1 - thres) · num_tokens)` most likely tokens.
    #[default]
    TopK,
    /// `top_p(logits, thres)`: the nucleus of mass `1 - thres` (the reference's threshold is
    /// inverted).
    TopP,
}

/// The arguments of the reference's `generate` besides the start tokens and the length.
#[derive(Clone, Debug)]
pub struct GenerateArgs<'a> {
    /// Stop once every row emits it at the same step (the reference's rule; rows continue after
    /// emitting it otherwise).
    pub eos_token: Option<u32>,
    /// Divides the filtered logits.
    pub temperature: f64,
    /// Which filter (`filter_logits_fn`).
    pub filter_logits_fn: Filter,
    /// Its threshold (`filter_thres`, default 0.9).
    pub filter_thres: f64,
    /// [batch, t] of the start tokens, nonzero = real; the new tokens are real.
    pub input_mask: Option<&'a Tensor>,
    /// A decoder's context [batch, m, dim] (and its mask [batch, m]), fixed for the whole
    /// generation.
    pub context: Option<&'a Tensor>,
    /// Which context positions are real.
    pub context_mask: Option<&'a Tensor>,
    /// Seed of the sampling (each row its own stream); not an argument of the reference, whose
    /// sampling uses torch's global generator.
    pub seed: u64,
    /// Decode from the recurrent state (the default) or re-run the window for every token as
    /// the reference does; the tokens are the same.
    pub use_cache: bool,
}

impl GenerateArgs<'_> {
    /// Greedy decoding as a reference user writes it: top-k keeping one token of `num_tokens`
    /// (`filter_thres = 1 - 1.5 / num_tokens`).
    pub fn greedy(num_tokens: usize) -> Self {
        Self { filter_thres: 1.0 - 1.5 / num_tokens as f64, ..Self::default() }
    }
}

impl Default for GenerateArgs<'_> {
    fn default() -> Self {
        Self { eos_token: None, temperature: 1.0, filter_logits_fn: Filter::TopK, filter_thres: 0.9, input_mask: None, context: None, context_mask: None, seed: 0, use_cache: true }
    }
}

/// `AutoregressiveWrapper`: a language model trained and sampled as the reference's wrapper does.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use linear_attention_transformer::{AutoregressiveWrapper, Config, GenerateArgs, LinearAttentionTransformerLM, Pass};
///
/// let mut config = Config::new(64, 32, 2, 64);
/// config.causal = true;
/// let wrapper = AutoregressiveWrapper::new(LinearAttentionTransformerLM::new(&config, 0, &Device::Cpu, DType::F32)?);
/// let x = Tensor::arange(0i64, 33, &Device::Cpu)?.reshape((1, 33))?;
/// let loss = wrapper.loss(&x, None, None, None, &Pass::train(0))?; // inputs x[:, :-1], targets x[:, 1:]
/// let out = wrapper.generate(&[vec![1, 2, 3]], 10, &GenerateArgs::default())?;
/// assert_eq!(out[0].len(), 10);
/// # Ok::<(), linear_attention_transformer::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct AutoregressiveWrapper {
    /// The wrapped language model.
    pub net: LinearAttentionTransformerLM,
    /// Targets with this id are not scored (-100).
    pub ignore_index: i64,
    /// What pads sequences of a list to one length (0). Padded targets are scored unless it
    /// equals `ignore_index`, as in the reference.
    pub pad_value: i64,
}

impl AutoregressiveWrapper {
    /// The reference's defaults: `ignore_index = -100`, `pad_value = 0`.
    pub fn new(net: LinearAttentionTransformerLM) -> Self {
        Self { net, ignore_index: -100, pad_value: 0 }
    }

    /// The longest sequence the model sees (`max_seq_len`).
    pub fn max_seq_len(&self) -> usize {
        self.net.config().max_seq_len
    }

    /// `forward(x, return_loss=True, input_mask=…, context=…)`: the mean cross-entropy of
    /// `x[:, 1:]` given `x[:, :-1]` (integers [batch, t]), over the targets that are not
    /// `ignore_index`. An `input_mask` as long as `x` is cut to `[:, :-1]`.
    pub fn loss(&self, x: &Tensor, input_mask: Option<&Tensor>, context: Option<&Tensor>, context_mask: Option<&Tensor>, pass: &Pass) -> Result<Tensor> {
        let (b, t) = x.dims2().map_err(|_| Error::input(format!("x must be [batch, t], got {:?}", x.dims())))?;
        if t < 2 {
            return Err(Error::input("the loss needs sequences of at least two tokens"));
        }
        let ids = x.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let inputs: Vec<i64> = ids.iter().flat_map(|r| r[..t - 1].iter().copied()).collect();
        let targets: Vec<i64> = ids.iter().flat_map(|r| r[1..].iter().copied()).collect();
        let mask = match input_mask {
            Some(m) if m.dim(1)? == t => Some(m.narrow(1, 0, t - 1)?),
            m => m.cloned(),
        };
        let xi = Tensor::from_vec(inputs, (b, t - 1), self.net.device())?;
        let logits = self.net.forward(&xi, &Inputs { input_mask: mask.as_ref(), context, context_mask }, pass)?;
        self.mean_loss(&logits, &targets)
    }

    /// The loss of a list of sequences (the reference's list input): each split as `s[:-1]`,
    /// `s[1:]`, then padded with `pad_value`.
    pub fn loss_of_sequences(&self, seqs: &[Vec<i64>], pass: &Pass) -> Result<Tensor> {
        if seqs.is_empty() || seqs.iter().any(|s| s.len() < 2) {
            return Err(Error::input("the loss needs sequences of at least two tokens"));
        }
        let t = seqs.iter().map(|s| s.len() - 1).max().expect("nonempty");
        let pad = |part: &[i64]| part.iter().copied().chain(std::iter::repeat(self.pad_value)).take(t).collect::<Vec<_>>();
        let inputs: Vec<i64> = seqs.iter().flat_map(|s| pad(&s[..s.len() - 1])).collect();
        let targets: Vec<i64> = seqs.iter().flat_map(|s| pad(&s[1..])).collect();
        let xi = Tensor::from_vec(inputs, (seqs.len(), t), self.net.device())?;
        let logits = self.net.forward(&xi, &Inputs::default(), pass)?;
        self.mean_loss(&logits, &targets)
    }

    fn mean_loss(&self, logits: &Tensor, targets: &[i64]) -> Result<Tensor> {
        let v = logits.dim(D::Minus1)?;
        let ids: Vec<u32> = targets
            .iter()
            .map(|&t| match t {
                t if t == self.ignore_index => Ok(IGNORE),
                t if t >= 0 && (t as usize) < v => Ok(t as u32),
                t => Err(Error::input(format!("target {t} is neither a token (0..{v}) nor ignore_index {}", self.ignore_index))),
            })
            .collect::<Result<_>>()?;
        let counted = ids.iter().filter(|&&t| t != IGNORE).count();
        if counted == 0 {
            return Err(Error::input("every target is ignore_index: nothing to score"));
        }
        let rows = logits.elem_count() / v;
        Ok((cross_entropy_rows(&logits.reshape((rows, v))?.to_dtype(DType::F32)?, &ids)?.sum_all()? / counted as f64)?)
    }

    /// `generate(start_tokens, seq_len, eos_token, temperature, filter_logits_fn, filter_thres,
    /// input_mask=…, context=…)`: `seq_len` new tokens per row (fewer if every row emits
    /// `eos_token` at the same step), the window sliding past `max_seq_len` as the reference's.
    /// `start` holds the rows (all of one length, like the reference's [batch, t] tensor).
    pub fn generate(&self, start: &[Vec<u32>], seq_len: usize, args: &GenerateArgs) -> Result<Vec<Vec<u32>>> {
        let t = start.first().map_or(0, Vec::len);
        if start.iter().any(|s| s.len() != t) {
            return Err(Error::input("the start tokens must all have one length (a [batch, t] tensor)"));
        }
        let vocab = self.net.config().num_tokens;
        let sampling = match args.filter_logits_fn {
            Filter::TopK => Sampling::reference_top_k(args.filter_thres, vocab),
            Filter::TopP => Sampling::reference_top_p(args.filter_thres),
        };
        let sampling = Sampling { temperature: args.temperature, ..sampling };
        sampling.validate().map_err(|e| Error::input(format!("{e} (filter_thres {} over {vocab} tokens)", args.filter_thres)))?;
        let mask = args.input_mask.map(|m| m.to_dtype(DType::U8)?.to_vec2::<u8>()).transpose()?;
        let extras = Extras { input_mask: mask.as_deref(), context: args.context, context_mask: args.context_mask };
        let mut rngs: Vec<Rng> = (0..start.len()).map(|r| Rng::new(derive(args.seed, r as u64))).collect();
        let (mut run, mut logits) = Continuation::start(&self.net, start, extras, args.use_cache)?;
        let mut out = vec![Vec::with_capacity(seq_len); start.len()];
        for step in 0..seq_len {
            let next: Vec<u32> = logits.iter().zip(&mut rngs).map(|(l, rng)| sampling.sample(l, rng)).collect();
            out.iter_mut().zip(&next).for_each(|(o, &t)| o.push(t));
            if step + 1 == seq_len || args.eos_token.is_some_and(|e| next.iter().all(|&t| t == e)) {
                break;
            }
            logits = run.push(&next.iter().map(|&t| Some(t)).collect::<Vec<_>>())?;
        }
        Ok(out)
    }
}
