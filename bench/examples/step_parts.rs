//! Where one training step's time goes: forward, backward, gradient norm and
//! AdamW, and the forward's big pieces, at a shipped config's shape.
//!
//!   cargo run -p baton-bench --release --example step_parts [-- configs/shakespeare-cpu.toml]

use std::path::PathBuf;
use std::time::Instant;

use baton_bench::{Shape, random_batch};
use baton_core::backend::{self, Inner, Train};
use baton_core::burn::module::AutodiffModule;
use baton_core::burn::optim::GradientsParams;
use baton_core::burn::tensor::{ElementConversion, Tensor};
use baton_core::model::token_logprobs;
use baton_core::optim::{AdamW, AdamWConfig, global_grad_norm};
use baton_core::train::int_tensor;

fn time(name: &str, reps: usize, mut f: impl FnMut() -> f32) {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    println!(
        "{name:44} {:8.2} ms",
        t.elapsed().as_secs_f64() * 1e3 / reps as f64
    );
}

fn main() {
    let path = std::env::args().nth(1).map_or_else(
        || PathBuf::from("configs/shakespeare-cpu.toml"),
        PathBuf::from,
    );
    let s = Shape::load(&path, &[]).unwrap();
    let device = backend::device().unwrap();
    let (b, t, v) = (s.train.batch_size, s.train.seq_len, s.model.vocab_size);
    let batch = random_batch(v, b, t, 1);
    let model = s.model.init::<Train>(1, &device);
    let inner = model.valid();
    let ids = int_tensor::<Inner>(&batch.inputs, b, t, &device);
    let targets = int_tensor::<Inner>(&batch.targets, b, t, &device);
    let reps = 5;
    println!("{} on {}", s.name, backend::NAME);
    time("forward: logits", reps, || {
        inner.forward(ids.clone()).sum().into_scalar().elem()
    });
    let logits = inner.forward(ids.clone());
    time("forward: log-softmax + gather (CE)", reps, || {
        token_logprobs(logits.clone(), targets.clone())
            .sum()
            .into_scalar()
            .elem()
    });
    let hidden = Tensor::<Inner, 3>::zeros([b, t, s.model.d_model], &device);
    let emb = inner.model.embed_tokens.weight.val();
    time("forward: head matmul [b,t,d] x E^T", reps, || {
        hidden
            .clone()
            .matmul(emb.clone().transpose().unsqueeze::<3>())
            .sum()
            .into_scalar()
            .elem()
    });
    let d = s.model.d_model;
    time("  same as 2-D [b·t,d] x E^T", reps, || {
        hidden
            .clone()
            .reshape([b * t, d])
            .matmul(emb.clone().transpose())
            .sum()
            .into_scalar()
            .elem()
    });
    let et = Tensor::<Inner, 2>::zeros([d, v], &device);
    time("  2-D [b·t,d] x contiguous [d,V]", reps, || {
        hidden
            .clone()
            .reshape([b * t, d])
            .matmul(et.clone())
            .sum()
            .into_scalar()
            .elem()
    });
    time("  2-D, 4 column chunks of E", reps, || {
        let h2 = hidden.clone().reshape([b * t, d]);
        let parts: Vec<_> = emb
            .clone()
            .chunk(4, 0)
            .into_iter()
            .map(|e| h2.clone().matmul(e.transpose()))
            .collect();
        Tensor::cat(parts, 1).sum().into_scalar().elem()
    });
    time("  2-D, 8 row chunks of hidden", reps, || {
        let h2 = hidden.clone().reshape([b * t, d]);
        let parts: Vec<_> = h2
            .chunk(8, 0)
            .into_iter()
            .map(|h| h.matmul(emb.clone().transpose()))
            .collect();
        Tensor::cat(parts, 0).sum().into_scalar().elem()
    });
    let w = Tensor::<Inner, 2>::zeros([d, 3 * d], &device);
    time("  projection 3-D [b,t,d] x W[1,d,3d]", reps, || {
        hidden
            .clone()
            .matmul(w.clone().unsqueeze())
            .sum()
            .into_scalar()
            .elem()
    });
    time("  projection 2-D [b·t,d] x W[d,3d]", reps, || {
        hidden
            .clone()
            .reshape([b * t, d])
            .matmul(w.clone())
            .sum()
            .into_scalar()
            .elem()
    });
    time("forward + backward (nll_sum)", reps, || {
        let nll = batch.nll_sum(&model, &device);
        let grads = nll.backward();
        let g = GradientsParams::from_grads(grads, &model);
        global_grad_norm(&model, &g) as f32
    });
    let mut optim = AdamW::<Inner>::new(AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    });
    let mut m = Some(model.clone());
    time("forward + backward + norm + AdamW", reps, || {
        let model = m.take().unwrap();
        let nll = batch.nll_sum(&model, &device);
        let g = GradientsParams::from_grads(nll.backward(), &model);
        let norm = global_grad_norm(&model, &g);
        let model = optim.step::<Train, _>(model, g, 1e-3, norm, 1.0);
        let out = baton_bench::sync_model(&model);
        m = Some(model);
        out
    });
}
