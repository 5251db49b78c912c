//! Times the layers' f32 products over a whole sequence (`kernels::matmul::matmul`, a weight
//! [out, in] passed transposed, as the layers pass theirs) on the seed model's shapes, and
//! prints GFLOP/s, the median (and best) of fifteen timings:
//! `cargo run --release -p linear-attention-transformer --example products [TOKENS]` (default
//! 4096). `RAYON_NUM_THREADS` sets the threads. Each timing includes the fresh output, as in
//! the model, with `lat`'s heap settings; compare the rate with `lat bench`'s FMA peak.

use std::time::Instant;

use candle_core::{Device, Tensor};
use linear_attention_transformer::allocator::{self, Work};
use linear_attention_transformer::kernels::matmul::matmul;

fn main() -> candle_core::Result<()> {
    let tokens = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(4096usize);
    // (out, in): the fused q/k/v projection, the output projection, the feed-forward pair.
    let shapes = [(1536, 512), (512, 512), (2048, 512), (512, 2048)];
    let dev = Device::Cpu;
    // The heap settings `lat` runs whole sequences with: outputs reuse freed memory.
    allocator::configure(Work::WholeSequences);
    // On a worker of the pool, as the `lat` commands run.
    rayon::scope(|_| {
        for (out, k) in shapes {
            let x = Tensor::from_vec((0..tokens * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect::<Vec<_>>(), (tokens, k), &dev)?;
            let w = Tensor::from_vec((0..out * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect::<Vec<_>>(), (out, k), &dev)?;
            let wt = w.t()?;
            std::hint::black_box(matmul(&x, &wt)?);
            let mut times: Vec<f64> = (0..15)
                .map(|_| {
                    let t = Instant::now();
                    let y = matmul(&x, &wt);
                    let s = t.elapsed().as_secs_f64();
                    std::hint::black_box(y).map(|_| s)
                })
                .collect::<candle_core::Result<_>>()?;
            times.sort_by(f64::total_cmp);
            let rate = |s: f64| 2.0 * (tokens * out * k) as f64 / s / 1e9;
            println!("{tokens} x {k} by {k} x {out}: {:7.1} ms, {:6.1} GFLOP/s (best {:6.1})", times[7] * 1e3, rate(times[7]), rate(times[0]));
        }
        Ok(())
    })
}
