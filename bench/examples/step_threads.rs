//! Experiment: does running two half-batches' forward + backward on two OS
//! threads use the second core that flex's single-threaded elementwise ops
//! leave idle?
//!
//!   cargo run -p baton-bench --release --example step_threads [-- configs/shakespeare-cpu.toml]

use std::path::PathBuf;
use std::time::Instant;

use baton_bench::{Shape, random_batch};
use baton_core::backend::{self, Train};
use baton_core::burn::optim::{GradientsAccumulator, GradientsParams};
use baton_core::burn::tensor::ElementConversion;
use baton_core::model::Llama;
use baton_core::train::Batch;

fn grads(model: &Llama<Train>, batch: &Batch, device: &backend::Device) -> (f64, GradientsParams) {
    let nll = batch.nll_sum(model, device);
    let loss = nll.clone().into_scalar().elem::<f64>();
    let g = GradientsParams::from_grads(nll.backward(), model);
    (loss, g)
}

fn main() {
    let path = std::env::args().nth(1).map_or_else(
        || PathBuf::from("configs/shakespeare-cpu.toml"),
        PathBuf::from,
    );
    let s = Shape::load(&path, &[]).unwrap();
    let device = backend::device().unwrap();
    let (b, t, v) = (s.train.batch_size, s.train.seq_len, s.model.vocab_size);
    let full = random_batch(v, b, t, 1);
    let halves = [random_batch(v, b / 2, t, 2), random_batch(v, b / 2, t, 3)];
    let model = s.model.init::<Train>(1, &device);
    let reps = 8;
    let time = |name: &str, f: &dyn Fn() -> f64| {
        f();
        let started = Instant::now();
        let mut loss = 0.0;
        for _ in 0..reps {
            loss += f();
        }
        let ms = started.elapsed().as_secs_f64() * 1e3 / reps as f64;
        println!(
            "{name:40} {ms:8.1} ms  ({:.0} tok/s, loss {:.3})",
            (b * t) as f64 / ms * 1e3,
            loss / reps as f64
        );
    };
    time("two halves, one thread", &|| {
        let mut acc = GradientsAccumulator::<Llama<Train>>::new();
        let mut loss = 0.0;
        for h in &halves {
            let (l, g) = grads(&model, h, &device);
            loss += l;
            acc.accumulate(&model, g);
        }
        let _ = acc.grads();
        loss
    });
    time("two halves, two threads", &|| {
        let (a, bb) = std::thread::scope(|scope| {
            let m0 = model.clone();
            let m1 = model.clone();
            let (d0, d1) = (device, device);
            let h0 = &halves[0];
            let h1 = &halves[1];
            let j0 = scope.spawn(move || grads(&m0, h0, &d0));
            let j1 = scope.spawn(move || grads(&m1, h1, &d1));
            (j0.join().unwrap(), j1.join().unwrap())
        });
        let mut acc = GradientsAccumulator::<Llama<Train>>::new();
        acc.accumulate(&model, a.1);
        acc.accumulate(&model, bb.1);
        let _ = acc.grads();
        a.0 + bb.0
    });
    time("full batch, one thread", &|| {
        grads(&model, &full, &device).0
    });
}
