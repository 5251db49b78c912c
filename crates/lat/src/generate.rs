//! Sampling and autoregressive generation.
//!
//! [`Sampling`] holds the options: temperature, top-k and top-p (nucleus). The reference
//! expresses both filters through one threshold `thres` with unusual meanings; the conversions
//! are [`Sampling::reference_top_k`] (`k = int((1 - thres) · num_tokens)`, so 25 for 256 tokens at
//! the default 0.9) and [`Sampling::reference_top_p`] (`p = 1 - thres`: the reference's
//! `thres = 0.9` keeps a nucleus of mass 0.1). As in the reference, the filters look at the raw
//! logits and the temperature divides what is left.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::{DecodeState, Inputs, LinearAttentionTransformerLM};
use crate::pass::Pass;
use crate::rng::{derive, Rng};

/// How the next token is chosen from the logits.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// Divides the filtered logits; must be positive.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (1 = greedy).
    pub top_k: Option<usize>,
    /// Keep the most likely tokens while the probability mass before each is at most `p`.
    pub top_p: Option<f64>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { temperature: 1.0, top_k: None, top_p: None }
    }
}

impl Sampling {
    /// Always the most likely token (`top_k = 1`).
    pub fn greedy() -> Self {
        Self { top_k: Some(1), ..Self::default() }
    }

    /// The reference's `top_k(logits, thres)`: `k = int((1 - thres) · num_tokens)` in f64.
    pub fn reference_top_k(thres: f64, num_tokens: usize) -> Self {
        Self { top_k: Some(((1.0 - thres) * num_tokens as f64) as usize), ..Self::default() }
    }

    /// The reference's `top_p(logits, thres)`, whose threshold is inverted: nucleus `1 - thres`.
    pub fn reference_top_p(thres: f64) -> Self {
        Self { top_p: Some(1.0 - thres), ..Self::default() }
    }

    /// Checks the options: a positive temperature, k >= 1, p in [0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(Error::input(format!("temperature must be positive, got {}", self.temperature)));
        }
        if self.top_k == Some(0) {
            return Err(Error::input("top-k must be at least 1"));
        }
        if let Some(p) = self.top_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::input(format!("top-p must be in [0, 1], got {p}")));
            }
        }
        Ok(())
    }

    /// Draws a token id from one row of logits.
    pub fn sample(&self, logits: &[f32], rng: &mut Rng) -> u32 {
        // Most likely first; equal logits in index order.
        let cmp = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        if self.top_k.is_some_and(|k| k <= 1) {
            // Greedy: the first in that order, without ordering the rest.
            return (0..logits.len()).min_by(cmp).unwrap_or(0) as u32;
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        match (self.top_k, self.top_p) {
            // Without a nucleus only the top k need ordering.
            (Some(k), None) if k < order.len() => {
                order.select_nth_unstable_by(k.max(1) - 1, cmp);
                order.truncate(k.max(1));
                order.sort_by(cmp);
            }
            _ => order.sort_by(cmp),
        }
        let mut keep = order.len();
        if let Some(k) = self.top_k {
            keep = keep.min(k.max(1));
        }
        if let Some(p) = self.top_p {
            let mx = logits[order[0]] as f64;
            let exps: Vec<f64> = order.iter().map(|&i| (logits[i] as f64 - mx).exp()).collect();
            let total: f64 = exps.iter().sum();
            let mut before = 0.0;
            let mut n = 0;
            for e in &exps {
                if n > 0 && before / total > p {
                    break;
                }
                before += e;
                n += 1;
            }
            keep = keep.min(n.max(1));
        }
        if keep == 1 {
            return order[0] as u32;
        }
        let kept = &order[..keep];
        let mx = logits[kept[0]] as f64;
        let weights: Vec<f64> = kept.iter().map(|&i| ((logits[i] as f64 - mx) / self.temperature).exp()).collect();
        let mut u = rng.uniform() * weights.iter().sum::<f64>();
        for (&i, w) in kept.iter().zip(&weights) {
            if u < *w {
                return i as u32;
            }
            u -= w;
        }
        kept[keep - 1] as u32
    }
}

/// The batch's inputs besides the tokens: the reference's input mask (nonzero = real), and a
/// decoder's context [batch, m, dim] with its mask [batch, m].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Extras<'a> {
    /// Per row, one entry per prompt token; tokens added later are real.
    pub input_mask: Option<&'a [Vec<u8>]>,
    /// What cross-attention attends to, one row per sequence.
    pub context: Option<&'a Tensor>,
    /// Which context positions are real.
    pub context_mask: Option<&'a Tensor>,
}

/// The next-token logits of a batch of growing sequences: from the recurrent state while it
/// holds (the prompts read into it, then one batched step per token), else the reference's way
/// (the last `max_seq_len` tokens re-run for every token, positions restarting at 0 once the
/// window slides). Both give the same logits up to float rounding.
pub(crate) struct Continuation<'a> {
    model: &'a LinearAttentionTransformerLM,
    seqs: Vec<Vec<u32>>,
    masks: Option<Vec<Vec<u8>>>,
    extras: Extras<'a>,
    state: Option<DecodeState>,
}

impl<'a> Continuation<'a> {
    /// Starts from `prompts` and returns the logits after each.
    pub fn start(model: &'a LinearAttentionTransformerLM, prompts: &[Vec<u32>], extras: Extras<'a>, cache: bool) -> Result<(Self, Vec<Vec<f32>>)> {
        if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
            return Err(Error::input("every prompt needs at least one token"));
        }
        if let Some(&t) = prompts.iter().flatten().find(|&&t| t as usize >= model.config().num_tokens) {
            return Err(Error::input(format!("prompt token {t} is out of range: the vocabulary has {} tokens", model.config().num_tokens)));
        }
        let masks = extras.input_mask.map(|m| m.to_vec());
        if let Some(m) = &masks {
            if m.len() != prompts.len() || m.iter().zip(prompts).any(|(m, p)| m.len() != p.len()) {
                return Err(Error::input("the input mask must have one entry per prompt token"));
            }
        }
        let limit = model.decode_limit();
        // A mask with padding in it, or a prompt beyond the model's positions, needs the full
        // forward pass at every step.
        let fits = prompts.iter().all(|p| p.len() <= limit) && masks.as_ref().is_none_or(|m| m.iter().flatten().all(|&k| k != 0));
        let mut c = Self { model, seqs: prompts.to_vec(), masks, extras, state: None };
        let logits = if cache && fits && model.config().causal && !model.config().return_embeddings {
            let mut states = Vec::with_capacity(prompts.len());
            let mut first = Vec::with_capacity(prompts.len());
            for (r, p) in prompts.iter().enumerate() {
                let (context, context_mask) = c.context_row(r)?;
                let (l, st) = model.read_prompt(p, &Inputs { context: context.as_ref(), context_mask: context_mask.as_ref(), ..Inputs::default() })?;
                first.extend(rows(&l)?);
                states.push(st);
            }
            c.state = Some(DecodeState::concat(states)?);
            first
        } else {
            (0..prompts.len()).map(|r| c.uncached(r)).collect::<Result<_>>()?
        };
        Ok((c, logits))
    }

    /// Appends each row's token and returns the next logits; a finished row (`None`) takes no
    /// token and gets zeros.
    pub fn push(&mut self, tokens: &[Option<u32>]) -> Result<Vec<Vec<f32>>> {
        for (r, t) in tokens.iter().enumerate() {
            if let Some(t) = *t {
                self.seqs[r].push(t);
                if let Some(m) = &mut self.masks {
                    m[r].push(1);
                }
            }
        }
        // The state holds while the reference would still see the whole sequence.
        if self.state.is_some() && self.seqs.iter().any(|s| s.len() > self.model.decode_limit()) {
            self.state = None;
        }
        let vocab = self.model.config().num_tokens;
        match &mut self.state {
            // A finished row's state steps on with a filler token; its logits are not used.
            Some(st) => {
                let mut logits = rows(&self.model.step(&tokens.iter().map(|t| t.unwrap_or(0)).collect::<Vec<_>>(), st)?)?;
                logits.iter_mut().zip(tokens).filter(|(_, t)| t.is_none()).for_each(|(l, _)| l.fill(0.0));
                Ok(logits)
            }
            None => (0..self.seqs.len()).map(|r| if tokens[r].is_some() { self.uncached(r) } else { Ok(vec![0.0; vocab]) }).collect(),
        }
    }

    fn context_row(&self, r: usize) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let row = |t: Option<&Tensor>| t.map(|t| t.narrow(0, r, 1)).transpose();
        Ok((row(self.extras.context)?, row(self.extras.context_mask)?))
    }

    /// Row `r`'s next-token logits the reference's way: its last `max_seq_len` tokens (and mask)
    /// in one forward pass.
    fn uncached(&self, r: usize) -> Result<Vec<f32>> {
        let seq = &self.seqs[r];
        let from = seq.len().saturating_sub(self.model.config().max_seq_len);
        let ctx = &seq[from..];
        let device = self.model.device();
        let tokens = Tensor::from_slice(ctx, (1, ctx.len()), device)?;
        let mask = self.masks.as_ref().map(|m| Tensor::from_slice(&m[r][from..], (1, ctx.len()), device)).transpose()?;
        let (context, context_mask) = self.context_row(r)?;
        let inputs = Inputs { input_mask: mask.as_ref(), context: context.as_ref(), context_mask: context_mask.as_ref() };
        let logits = self.model.forward(&tokens, &inputs, &Pass::eval())?;
        Ok(logits.narrow(1, ctx.len() - 1, 1)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }
}

fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

/// Continues every prompt by up to `max_new` tokens.
///
/// ```
/// use candle_core::{DType, Device};
/// use linear_attention_transformer::generate::{generate, Sampling};
/// use linear_attention_transformer::{Config, LinearAttentionTransformerLM};
///
/// let mut config = Config::new(256, 32, 1, 64);
/// config.causal = true;
/// let model = LinearAttentionTransformerLM::new(&config, 0, &Device::Cpu, DType::F32)?;
/// let sampling = Sampling { temperature: 0.8, top_k: None, top_p: Some(0.9) };
/// let prompts = vec![b"Hello".iter().map(|&b| b as u32).collect(), vec![1, 2, 3]];
/// let mut streamed = 0;
/// let out = generate(&model, &prompts, 10, &sampling, 42, None, true, &mut |_row, _token| streamed += 1)?;
/// assert_eq!((out.len(), out[0].len(), streamed), (2, 10, 20));
/// # Ok::<(), linear_attention_transformer::Error>(())
/// ```
///
/// With `cache`, the prompts are read into recurrent states and then every new token costs
/// the same, whatever the length so far (the recurrent form); without it, every token re-runs
/// the whole sequence as the reference does. Both give the same logits up to float rounding.
/// Once a sequence outgrows `max_seq_len` the reference slides its window and restarts the
/// positions; generation then continues the reference's way. Decoders with cross-attention
/// generate through [`crate::AutoregressiveWrapper::generate`], which takes the context.
///
/// Each row draws from its own stream (`seed`, row), so a row's output does not depend on the
/// others. A row stops after emitting `eos` (which is included); `on_token(row, token)` sees
/// every token as soon as it is drawn.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    model: &LinearAttentionTransformerLM,
    prompts: &[Vec<u32>],
    max_new: usize,
    sampling: &Sampling,
    seed: u64,
    eos: Option<u32>,
    cache: bool,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<Vec<Vec<u32>>> {
    sampling.validate()?;
    let b = prompts.len();
    let mut rngs: Vec<Rng> = (0..b).map(|r| Rng::new(derive(seed, r as u64))).collect();
    let (mut run, mut logits) = Continuation::start(model, prompts, Extras::default(), cache)?;
    let mut out = vec![vec![]; b];
    let mut done = vec![false; b];
    for step in 0..max_new {
        // Each row draws from its own stream, so the rows draw in parallel.
        let drawn: Vec<Option<u32>> = (&logits, &mut rngs, &done).into_par_iter().map(|(l, rng, &d)| (!d).then(|| sampling.sample(l, rng))).collect();
        let mut next = vec![None; b];
        for (r, t) in drawn.into_iter().enumerate() {
            let Some(t) = t else { continue };
            out[r].push(t);
            on_token(r, t);
            done[r] = eos == Some(t);
            next[r] = Some(t).filter(|_| !done[r]);
        }
        if step + 1 == max_new || done.iter().all(|&d| d) {
            break;
        }
        logits = run.push(&next)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_follow_their_definitions() {
        let logits = [1.0f32, 3.0, 2.0, 0.0];
        let mut rng = Rng::new(0);
        assert_eq!(Sampling::greedy().sample(&logits, &mut rng), 1);
        let top2 = Sampling { top_k: Some(2), ..Sampling::default() };
        for _ in 0..100 {
            assert!(matches!(top2.sample(&logits, &mut rng), 1 | 2));
        }
        // A tiny nucleus keeps only the most likely token.
        let nucleus = Sampling { top_p: Some(0.1), ..Sampling::default() };
        assert!((0..50).all(|_| nucleus.sample(&logits, &mut rng) == 1));
        assert_eq!(Sampling::reference_top_k(0.9, 256).top_k, Some(25));
        assert_eq!(Sampling::reference_top_k(0.9, 10).top_k, Some(0));
        assert!(Sampling::reference_top_k(0.9, 10).validate().is_err());
        assert!((Sampling::reference_top_p(0.9).top_p.unwrap() - 0.1).abs() < 1e-12);
        assert!(Sampling { temperature: 0.0, ..Sampling::default() }.validate().is_err());
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()];
        let mut rng = Rng::new(5);
        let ones = (0..20000).filter(|_| Sampling::default().sample(&logits, &mut rng) == 1).count();
        assert!((ones as f64 / 20000.0 - 0.75).abs() < 0.02);
        let hot = Sampling { temperature: 1e6, ..Sampling::default() };
        let ones = (0..20000).filter(|_| hot.sample(&logits, &mut rng) == 1).count();
        assert!((ones as f64 / 20000.0 - 0.5).abs() < 0.02);
    }
}
