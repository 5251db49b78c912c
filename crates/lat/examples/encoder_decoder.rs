//! An encoder-decoder from two language models, as in the reference's README: the encoder
//! returns embeddings, the decoder attends to them (`receives_context`). Trained on the toy copy
//! task, it learns to reproduce sequences it has never seen.
//!
//!     cargo run --release -p linear-attention-transformer --example encoder_decoder

use candle_core::{DType, Device, Tensor};
use linear_attention_transformer::train::copy_task::CopyTask;
use linear_attention_transformer::{Config, Inputs, LinearAttentionTransformerLM, Pass};

fn main() -> linear_attention_transformer::Result<()> {
    // The two halves, built by hand.
    let mut enc = Config::new(20000, 512, 6, 4096);
    enc.heads = 8;
    enc.return_embeddings = true;
    let mut dec = enc.clone();
    dec.return_embeddings = false;
    dec.causal = true;
    dec.receives_context = true;
    let (enc, dec) = (enc.clone(), dec.clone());
    let encoder = LinearAttentionTransformerLM::new(&enc, 0, &Device::Cpu, DType::F32)?;
    let decoder = LinearAttentionTransformerLM::new(&dec, 1, &Device::Cpu, DType::F32)?;
    let src = Tensor::zeros((1, 512), DType::U32, &Device::Cpu)?;
    let tgt = Tensor::zeros((1, 256), DType::U32, &Device::Cpu)?;
    let context = encoder.forward(&src, &Inputs::default(), &Pass::eval())?;
    let logits = decoder.forward(&tgt, &Inputs { context: Some(&context), ..Inputs::default() }, &Pass::eval())?;
    println!("encoder output {:?}, decoder logits {:?}", context.dims(), logits.dims());

    // The copy task, trained from scratch.
    let task = CopyTask::default();
    let model = task.train(&Device::Cpu, &mut |step, loss| {
        if step % 100 == 0 {
            println!("step {step}: loss {loss:.4}");
        }
    })?;
    let acc = task.evaluate(&model, &Device::Cpu)?;
    println!("held-out sequences copied exactly: {:.1} %", 100.0 * acc.sequences);
    Ok(())
}
