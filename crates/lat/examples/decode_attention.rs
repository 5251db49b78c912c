//! Times a decoding step's attention over many streams' states, as a batched step runs it: 768
//! local windows (32 streams x 6 layers x 4 heads) of N keys and 768 global heads' sums, heads of
//! 64, one thread; the median of seven steps. `cargo run --release -p linear-attention-transformer
//! --example decode_attention [N]`; `HEADS=H` times H windows and H heads instead (few enough to
//! stay in the caches), `ROUNDS=R` R steps.

use std::time::Instant;

use linear_attention_transformer::kernels::causal_linear::LinearState;
use linear_attention_transformer::kernels::local::LocalCache;

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(100);
    let heads = std::env::var("HEADS").ok().and_then(|h| h.parse().ok()).unwrap_or(768);
    let (e, window) = (64, 128);
    let data = |len: usize, seed: usize| -> Vec<f32> { (0..len).map(|i| (((i + seed) * 7919) % 1000) as f32 / 1000.0 - 0.5).collect() };
    let (k, v) = (data(n * e, 1), data(n * e, 2));
    let mut locals: Vec<LocalCache> = (0..heads).map(|_| LocalCache::from_prefix(&k, &v, e, window)).collect();
    let mut globals: Vec<LinearState> = (0..heads).map(|_| LinearState::from_prefix(&k, &v, e, e, 64)).collect();
    let (q, kn, vn) = (data(e, 3), data(e, 4), data(e, 5));
    let mut out = vec![0f32; e];
    for (name, local) in [("local", true), ("global", false)] {
        let mut times = Vec::new();
        for _ in 0..std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(7) {
            let t = Instant::now();
            for h in 0..heads {
                if local {
                    locals[h].step(&q, &kn, &vn, &mut out);
                } else {
                    globals[h].step(&q, &kn, &vn, &mut out);
                }
            }
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        println!("{name}: {heads} heads, {n} keys: {:.3} ms a step (median)", times[times.len() / 2] * 1e3);
    }
}
