//! The example of the reference's original README (an API before 0.17): `one_kv_head` and
//! `local_attn_window` included, a forward pass over 8192 tokens.
//!
//!     cargo run --release -p linear-attention-transformer --example original_readme

use candle_core::{DType, Device, Tensor};
use linear_attention_transformer::{Config, Inputs, LinearAttentionTransformerLM, Pass};

fn main() -> linear_attention_transformer::Result<()> {
    // LinearAttentionTransformerLM(num_tokens = 20000, dim = 512, heads = 8, depth = 12,
    //     max_seq_len = 8192, causal = True, blindspot_size = 64, n_local_attn_heads = 4,
    //     local_attn_window = 128, one_kv_head = True, reversible = True, ff_chunks = 2)
    let config = Config::from_json_str(
        r#"{"num_tokens": 20000, "dim": 512, "heads": 8, "depth": 12, "max_seq_len": 8192, "causal": true,
            "blindspot_size": 64, "n_local_attn_heads": 4, "local_attn_window": 128, "one_kv_head": true,
            "reversible": true, "ff_chunks": 2}"#,
    )?;
    let model = LinearAttentionTransformerLM::new(&config, 0, &Device::Cpu, DType::F32)?;
    let tokens = Tensor::arange(0u32, 8192, &Device::Cpu)?.reshape((1, 8192))?;
    let t = std::time::Instant::now();
    let logits = model.forward(&tokens, &Inputs::default(), &Pass::eval())?;
    println!("{} parameters; logits {:?} in {:.2} s", model.num_parameters(), logits.dims(), t.elapsed().as_secs_f64());
    Ok(())
}
