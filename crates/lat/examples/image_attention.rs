//! `ImageLinearAttention` on a feature map, with and without a context.
//!
//!     cargo run --release -p linear-attention-transformer --example image_attention

use candle_core::{DType, Device, Tensor};
use linear_attention_transformer::image::{ImageAttentionConfig, ImageLinearAttention};

fn main() -> linear_attention_transformer::Result<()> {
    let mut config = ImageAttentionConfig::new(32);
    config.heads = 4;
    config.key_dim = 16;
    config.value_dim = 16;
    config.kernel_size = 3;
    config.padding = 1;
    let attn = ImageLinearAttention::new(&config, 0, &Device::Cpu, DType::F32)?;
    let image = Tensor::randn(0f32, 1.0, (2, 32, 24, 24), &Device::Cpu)?;
    println!("output {:?}", attn.forward(&image, None)?.dims());
    let context = Tensor::randn(0f32, 1.0, (2, 32, 10), &Device::Cpu)?;
    println!("with a context of 10 positions {:?}", attn.forward(&image, Some(&context))?.dims());
    // Strided projections work here (the reference breaks on them): attention runs on the
    // downsampled map.
    config.stride = 2;
    let strided = ImageLinearAttention::new(&config, 0, &Device::Cpu, DType::F32)?;
    println!("stride 2 {:?}", strided.forward(&image, None)?.dims());
    Ok(())
}
