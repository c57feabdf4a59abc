//! Where attention's forward time goes on the CPU backend, op by op, at the
//! default config's shape (batch 16, 4 heads, seq 128, head_dim 32).
//!
//!   cargo run -p baton-bench --release --example attention_parts

use std::time::Instant;

use baton_core::backend::{self, Inner};
use baton_core::burn::tensor::activation::softmax;
use baton_core::burn::tensor::{Bool, Distribution, ElementConversion, Tensor};

type B = Inner;

fn time<const D: usize>(name: &str, f: impl Fn() -> Tensor<B, D>) {
    let sync = |t: Tensor<B, D>| t.sum().into_scalar().elem::<f32>();
    sync(f());
    let reps = 20;
    let t = Instant::now();
    for _ in 0..reps {
        sync(f());
    }
    println!(
        "{name:40} {:8.3} ms",
        t.elapsed().as_secs_f64() * 1e3 / reps as f64
    );
}

fn main() {
    let device = backend::device().unwrap();
    let (b, h, t, hd) = (16, 4, 128, 32);
    let d = h * hd;
    let r = |s: [usize; 4]| Tensor::<B, 4>::random(s, Distribution::Normal(0.0, 1.0), &device);
    let q = r([b, h, t, hd]);
    let k = r([b, h, t, hd]);
    let x3 = Tensor::<B, 3>::random([b, t, d], Distribution::Normal(0.0, 1.0), &device);
    let w = Tensor::<B, 2>::random([d, d], Distribution::Normal(0.0, 1.0), &device);
    let scores = q.clone().matmul(k.clone().swap_dims(2, 3));
    let cos = Tensor::<B, 4>::random([1, 1, t, hd], Distribution::Normal(0.0, 1.0), &device);
    time("sum (sync cost) [b,h,t,hd]", || q.clone());
    time("projection x@W [b,t,d]x[d,d]", || {
        x3.clone().matmul(w.clone().unsqueeze())
    });
    time("reshape+swap_dims -> heads", || {
        x3.clone().reshape([b, t, h, hd]).swap_dims(1, 2)
    });
    time("q @ k^T", || q.clone().matmul(k.clone().swap_dims(2, 3)));
    time("scores * scale", || scores.clone().mul_scalar(0.17));
    time("tril_mask + mask_fill", || {
        let blocked = Tensor::<B, 2, Bool>::tril_mask([t, t], 0, &device);
        scores.clone().mask_fill(blocked.unsqueeze::<4>(), -1e9)
    });
    time("softmax", || softmax(scores.clone(), 3));
    time("probs @ v", || scores.clone().matmul(q.clone()));
    time("rope: slice+cat+mul+add", || {
        let x1 = q.clone().slice([0..b, 0..h, 0..t, 0..hd / 2]);
        let x2 = q.clone().slice([0..b, 0..h, 0..t, hd / 2..hd]);
        let rot = Tensor::cat(vec![x2.neg(), x1], 3);
        q.clone().mul(cos.clone()).add(rot.mul(cos.clone()))
    });
    time("elementwise mul broadcast [1,1,t,hd]", || {
        q.clone().mul(cos.clone())
    });
    time("elementwise add same shape", || q.clone().add(k.clone()));
    let bias2 = Tensor::<B, 2>::zeros([t, t], &device);
    time("scores + bias [t,t] (4-D broadcast)", || {
        scores.clone().add(bias2.clone().unsqueeze::<4>())
    });
    time("scores + bias as [b*h, t*t] + [1, t*t]", || {
        scores
            .clone()
            .reshape([b * h, t * t])
            .add(bias2.clone().reshape([1, t * t]))
            .reshape([b, h, t, t])
    });
    let full = bias2
        .clone()
        .unsqueeze::<4>()
        .repeat_dim(0, b)
        .repeat_dim(1, h);
    time("scores + full-shape bias", || {
        scores.clone().add(full.clone())
    });
    time("repeat bias to full shape", || {
        bias2
            .clone()
            .unsqueeze::<4>()
            .repeat_dim(0, b)
            .repeat_dim(1, h)
    });
    let xh = x3.clone().reshape([b, t, h, hd]).swap_dims(1, 2);
    time("xh @ xh^T (both from swap_dims)", || {
        xh.clone().matmul(xh.clone().swap_dims(2, 3))
    });
    time("xh @ (x permuted to [b,h,hd,t])", || {
        xh.clone()
            .matmul(x3.clone().reshape([b, t, h, hd]).permute([0, 2, 3, 1]))
    });
    time("probs @ xh", || scores.clone().matmul(xh.clone()));
    time("q*cos as [b*h, t*hd] * [1, t*hd]", || {
        q.clone()
            .reshape([b * h, t * hd])
            .mul(cos.clone().reshape([1, t * hd]))
            .reshape([b, h, t, hd])
    });
    time("xh * cos (strided * broadcast)", || {
        xh.clone().mul(cos.clone())
    });
    time("x3 [b,t,d] * cos3 [1,t,d]", || {
        x3.clone().mul(Tensor::<B, 3>::ones([1, t, d], &device))
    });
    time("x3 + x3", || x3.clone().add(x3.clone()));
    time("silu(x3)", || {
        baton_core::burn::tensor::activation::silu(x3.clone())
    });
    time("exp(scores)", || scores.clone().exp());
    time("max_dim(scores,3)", || scores.clone().max_dim(3));
    time("fused attention (inference op)", || {
        baton_core::burn::tensor::module::attention(
            q.clone(),
            k.clone(),
            k.clone(),
            None,
            None,
            baton_core::burn::tensor::ops::AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: true,
            },
        )
    });
}
