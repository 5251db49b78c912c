//! A causal language model: build it, read its logits, take a training step, and generate
//! in constant time per token.
//!
//!     cargo run --release -p linear-attention-transformer --example language_model

use candle_core::{DType, Device, Tensor};
use linear_attention_transformer::generate::{generate, Sampling};
use linear_attention_transformer::kernels::cross_entropy::cross_entropy_rows;
use linear_attention_transformer::train::optim::{AdamW, AdamWConfig};
use linear_attention_transformer::{Config, Inputs, LinearAttentionTransformerLM, LocalHeads, Pass};

fn main() -> linear_attention_transformer::Result<()> {
    let mut config = Config::new(256, 128, 2, 1024);
    config.heads = 4;
    config.dim_head = Some(32);
    config.causal = true;
    config.n_local_attn_heads = LocalHeads::Uniform(2);
    config.blindspot_size = 4;
    config.reversible = true;
    let model = LinearAttentionTransformerLM::new(&config, 0, &Device::Cpu, DType::F32)?;
    println!("{} parameters", model.num_parameters());

    let text = b"It is a truth universally acknowledged, that a single man in possession of a good fortune";
    let ids: Vec<u32> = text.iter().map(|&b| b as u32).collect();
    let n = ids.len() - 1;
    let inputs = Tensor::from_slice(&ids[..n], (1, n), &Device::Cpu)?;

    let mut opt = AdamW::new(model.vars(), AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.0 })?;
    for step in 0..30 {
        let pass = Pass::train(step);
        let logits = model.forward(&inputs, &Inputs::default(), &pass)?;
        let loss = cross_entropy_rows(&logits.reshape((n, 256))?, &ids[1..])?.mean_all()?;
        opt.step(&loss.backward()?, 3e-3, 1.0)?;
        if step % 10 == 0 {
            println!("step {step}: loss {:.3}", loss.to_scalar::<f32>()?);
        }
    }

    let prompt: Vec<u32> = b"It is a truth".iter().map(|&b| b as u32).collect();
    let out = generate(&model, &[prompt], 40, &Sampling::greedy(), 0, None, true, &mut |_, _| {})?;
    println!("{}", String::from_utf8_lossy(&out[0].iter().map(|&t| t as u8).collect::<Vec<_>>()));
    Ok(())
}
