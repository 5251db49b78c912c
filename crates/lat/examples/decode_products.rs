//! Times the decoding products (`kernels::decode::matmul`) on the seed model's shapes at a few
//! batch sizes (the arguments, default 1 8 32 64) and prints GFLOP/s of the best of five timings:
//! `cargo run --release -p linear-attention-transformer --example decode_products [ROWS…]`. The
//! weights cycle through copies larger than the caches, as a decoding step's do; `HOT=1` keeps
//! one copy, to time the kernel from the caches.

use std::time::Instant;

use linear_attention_transformer::kernels::decode::{matmul, Weight};

fn main() {
    let shapes = [(512, 512), (2048, 512), (512, 2048), (256, 512)];
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let batches = if args.is_empty() { vec![1, 8, 32, 64] } else { args };
    // On a worker of the pool, as the `lat` commands run: each product's parallel loop starts
    // there, without handing the call to another thread and back.
    rayon::scope(|_| time(&shapes, &batches));
}

fn time(shapes: &[(usize, usize)], batches: &[usize]) {
    for &rows in batches {
        for &(out, k) in shapes {
            let x: Vec<f32> = (0..rows * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
            // Copies enough to exceed the caches, as a step's weights do.
            let copies = if std::env::var("HOT").is_ok() { 1 } else { (64 << 20) / (out * k * 4) };
            let ws: Vec<Vec<f32>> = (0..copies).map(|c| (0..out * k).map(|i| ((i * 104729 + c) % 1000) as f32 / 1000.0 - 0.5).collect()).collect();
            let reps = (200_000_000 / (rows * out * k)).clamp(20, 20000);
            for _ in 0..reps / 10 {
                std::hint::black_box(matmul(&x, rows, Weight::F32(&ws[0]), out, None));
            }
            let mut times = Vec::new();
            for _ in 0..5 {
                let t = Instant::now();
                for r in 0..reps {
                    std::hint::black_box(matmul(&x, rows, Weight::F32(&ws[r % copies]), out, None));
                }
                times.push(t.elapsed().as_secs_f64() / reps as f64);
            }
            times.sort_by(f64::total_cmp);
            let s = times[0];
            println!("rows {rows:3} out {out:5} in {k:5}: {:8.1} us  {:6.1} GFLOP/s", s * 1e6, 2.0 * (rows * out * k) as f64 / s / 1e9);
        }
    }
}
