//! Reversible layers keep no activations: the peak heap memory of a training step at depth 12
//! stays within 1.3x of depth 2, while a sequential stack's grows with depth (it keeps each
//! block's input for the recomputing backward pass). Measured with a counting allocator (this
//! file is its own test binary and runs its cases one after another).

#[path = "common/counting.rs"]
mod counting;

use candle_core::{DType, Device, Tensor};
use linear_attention_transformer::kernels::cross_entropy::cross_entropy_rows;
use linear_attention_transformer::{Config, Inputs, LinearAttentionTransformerLM, LocalHeads, Pass};

/// Peak heap bytes of one training step (forward, loss, backward), beyond what was allocated
/// before it (the model).
fn step_peak(depth: usize, reversible: bool) -> usize {
    let n = 2048;
    let mut c = Config::new(256, 32, depth, n);
    c.heads = 4;
    c.dim_head = Some(8);
    c.causal = true;
    c.n_local_attn_heads = LocalHeads::Uniform(2);
    c.local_attn_window_size = 64;
    c.blindspot_size = 16;
    c.reversible = reversible;
    let model = LinearAttentionTransformerLM::new(&c, 0, &Device::Cpu, DType::F32).unwrap();
    let ids: Vec<u32> = (0..2 * n as u32).map(|i| i * 7 % 256).collect();
    let tokens = Tensor::from_vec(ids.clone(), (2, n), &Device::Cpu).unwrap();
    counting::peak_of(|| {
        let pass = Pass::train(1);
        let logits = model.forward(&tokens, &Inputs::default(), &pass).unwrap();
        let loss = cross_entropy_rows(&logits.reshape((2 * n, 256)).unwrap(), &ids).unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(&model.params()[0].tensor).is_some());
    }) as usize
}

#[test]
fn reversible_memory_does_not_grow_with_depth() {
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let (r2, r12) = (step_peak(2, true), step_peak(12, true));
    let (s2, s12) = (step_peak(2, false), step_peak(12, false));
    println!("reversible: depth 2 {:.1} MiB, depth 12 {:.1} MiB; sequential: depth 2 {:.1} MiB, depth 12 {:.1} MiB", mib(r2), mib(r12), mib(s2), mib(s12));
    assert!((r12 as f64) <= 1.3 * r2 as f64, "reversible: depth 12 uses {:.2}x the memory of depth 2", r12 as f64 / r2 as f64);
    // Ten more layers keep twenty more block inputs of [2, 2048, 32] f32.
    let inputs = 20 * 2 * 2048 * 32 * 4;
    assert!(s12 - s2 >= inputs * 9 / 10, "sequential: depth 12 adds only {:.1} MiB", mib(s12 - s2));
}
