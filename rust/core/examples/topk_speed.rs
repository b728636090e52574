//! Quick single-process timing of `topk_encode` (for profiling; the benchmark that counts
//! is `benches/bench_topk.py`, against torch and numpy in the same run).
use nlrw_core::topk::topk_encode;
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn main() {
    let n: usize = std::env::var("N")
        .map(|v| v.parse().unwrap())
        .unwrap_or(2048);
    let (d, k) = (32768usize, 32usize);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let x: Vec<f32> = (0..n * d)
        .map(|_| {
            rng.random_range(
                -3.0f32
                    ..std::env::var("HI")
                        .map(|v| v.parse().unwrap())
                        .unwrap_or(3.0),
            )
        })
        .collect();
    let mut times = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let out = topk_encode(&x, n, d, k).unwrap();
        times.push(t.elapsed().as_secs_f64());
        std::hint::black_box(out);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let gbs = (n * d * 4) as f64 / times[3] / 1e9;
    println!(
        "topk_encode {n}x{d} k={k}: median {:.4} s ({gbs:.1} GB/s)",
        times[3]
    );
}
