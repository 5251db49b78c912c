//! The toy copy task of the reference's examples, with an encoder-decoder built from two
//! language models as the reference's README shows: an encoder with `return_embeddings`, whose
//! output is the context of a causal decoder with `receives_context`. The decoder reads a start
//! token and the sequence so far, and must reproduce the encoder's input.

use candle_core::{DType, Device, Tensor};

use crate::autoregressive::{AutoregressiveWrapper, GenerateArgs};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::kernels::cross_entropy::cross_entropy_rows;
use crate::model::{Inputs, LinearAttentionTransformerLM};
use crate::pass::Pass;
use crate::rng::{derive, Rng};
use crate::train::optim::{AdamW, AdamWConfig};

/// Settings of a copy-task run.
#[derive(Clone, Debug)]
pub struct CopyTask {
    /// Symbols to copy (the decoder adds a start token).
    pub vocab: usize,
    /// Symbols per sequence.
    pub length: usize,
    /// Width of both models.
    pub dim: usize,
    /// Layers of each model.
    pub depth: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Learning rate (decays linearly).
    pub lr: f64,
    /// Seed of the weights and the data.
    pub seed: u64,
    /// Held-out sequences for the accuracy.
    pub eval_sequences: usize,
}

impl Default for CopyTask {
    fn default() -> Self {
        Self { vocab: 16, length: 16, dim: 64, depth: 2, batch: 32, steps: 600, lr: 3e-3, seed: 0, eval_sequences: 256 }
    }
}

/// The two models of an encoder-decoder.
pub struct EncoderDecoder {
    /// Non-causal, returns embeddings.
    pub encoder: LinearAttentionTransformerLM,
    /// Causal, attends to the encoder's output.
    pub decoder: LinearAttentionTransformerLM,
}

/// Accuracy on held-out sequences.
#[derive(Clone, Copy, Debug)]
pub struct CopyAccuracy {
    /// Fraction of sequences copied without a single error.
    pub sequences: f64,
    /// Fraction of symbols copied right.
    pub symbols: f64,
}

impl CopyTask {
    /// The encoder (non-causal, returns embeddings) and decoder (causal, attends to them).
    pub fn configs(&self) -> (Config, Config) {
        let mut enc = Config::new(self.vocab, self.dim, self.depth, self.length);
        enc.heads = 4;
        enc.dim_head = Some(self.dim / 4);
        enc.return_embeddings = true;
        enc.use_axial_pos_emb = false;
        let mut dec = Config::new(self.vocab + 1, self.dim, self.depth, self.length);
        dec.heads = 4;
        dec.dim_head = Some(self.dim / 4);
        dec.causal = true;
        dec.receives_context = true;
        dec.use_axial_pos_emb = false;
        (enc, dec)
    }

    fn batch(&self, rng: &mut Rng, rows: usize, device: &Device) -> Result<(Tensor, Tensor, Vec<u32>)> {
        let (l, v) = (self.length, self.vocab as u64);
        let seqs: Vec<u32> = (0..rows * l).map(|_| rng.below(v) as u32).collect();
        // Decoder input: the start token (id `vocab`), then the sequence shifted right.
        let dec: Vec<u32> = (0..rows).flat_map(|r| std::iter::once(self.vocab as u32).chain(seqs[r * l..(r + 1) * l - 1].iter().copied())).collect();
        Ok((Tensor::from_vec(seqs.clone(), (rows, l), device)?, Tensor::from_vec(dec, (rows, l), device)?, seqs))
    }

    /// Decoder logits [rows, length, vocab + 1] with teacher forcing.
    fn logits(&self, m: &EncoderDecoder, src: &Tensor, dec_in: &Tensor, pass: &Pass) -> Result<Tensor> {
        let context = m.encoder.forward(src, &Inputs::default(), pass)?;
        m.decoder.forward(dec_in, &Inputs { context: Some(&context), ..Inputs::default() }, pass)
    }

    /// Trains a fresh encoder-decoder; `on_step(step, loss)` sees every step.
    pub fn train(&self, device: &Device, on_step: &mut dyn FnMut(usize, f64)) -> Result<EncoderDecoder> {
        if self.vocab == 0 || self.length == 0 || !self.dim.is_multiple_of(4) || self.dim == 0 || self.batch == 0 {
            return Err(Error::input("copy task: vocab, length and batch must be positive and dim a positive multiple of 4"));
        }
        let (enc, dec) = self.configs();
        let m = EncoderDecoder {
            encoder: LinearAttentionTransformerLM::new(&enc, derive(self.seed, 1), device, DType::F32)?,
            decoder: LinearAttentionTransformerLM::new(&dec, derive(self.seed, 2), device, DType::F32)?,
        };
        let mut vars = m.encoder.vars();
        vars.extend(m.decoder.vars().into_iter().map(|(n, v)| (format!("decoder.{n}"), v)));
        let mut opt = AdamW::new(vars, AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.0 })?;
        let mut rng = Rng::new(derive(self.seed, 3));
        for step in 0..self.steps {
            let (src, dec_in, targets) = self.batch(&mut rng, self.batch, device)?;
            let pass = Pass::train(step as u64);
            let logits = self.logits(&m, &src, &dec_in, &pass)?;
            let loss = cross_entropy_rows(&logits.reshape((self.batch * self.length, self.vocab + 1))?, &targets)?.mean_all()?;
            let grads = loss.backward()?;
            let lr = self.lr * (1.0 - step as f64 / self.steps as f64).max(0.05);
            opt.step(&grads, lr, 1.0)?;
            on_step(step + 1, loss.to_dtype(DType::F64)?.to_scalar::<f64>()?);
        }
        Ok(m)
    }

    /// Accuracy on `eval_sequences` held-out sequences (drawn from a stream the training never
    /// sees): the decoder generates each copy greedily from its start token and the encoder's
    /// output, through the recurrent state; a sequence counts only if every symbol is right.
    pub fn evaluate(&self, m: &EncoderDecoder, device: &Device) -> Result<CopyAccuracy> {
        let mut rng = Rng::new(derive(self.seed, 0xE7A1));
        let (src, _, targets) = self.batch(&mut rng, self.eval_sequences, device)?;
        let copies = self.copies(m, &src)?;
        let right: Vec<bool> = copies.iter().flatten().zip(&targets).map(|(p, t)| p == t).collect();
        let sequences = right.chunks(self.length).filter(|r| r.iter().all(|&x| x)).count();
        Ok(CopyAccuracy { sequences: sequences as f64 / self.eval_sequences as f64, symbols: right.iter().filter(|&&x| x).count() as f64 / right.len() as f64 })
    }

    /// The decoder's greedy copy of each row of `src` [rows, length].
    pub fn copies(&self, m: &EncoderDecoder, src: &Tensor) -> Result<Vec<Vec<u32>>> {
        let context = m.encoder.forward(src, &Inputs::default(), &Pass::eval())?;
        let wrapper = AutoregressiveWrapper::new(m.decoder.clone());
        let start = vec![vec![self.vocab as u32]; src.dim(0)?];
        let args = GenerateArgs { context: Some(&context), ..GenerateArgs::greedy(self.vocab + 1) };
        wrapper.generate(&start, self.length, &args)
    }
}
