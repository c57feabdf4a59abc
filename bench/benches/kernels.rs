//! Criterion benches of the kernels a training step is made of, at the shapes
//! of the shipped configs, grouped `<backend>/<kernel>`, each with its
//! throughput declared (FLOPs as elements, or bytes). Every timed closure ends
//! by reading a value back, so the device has finished before the clock stops.
//!
//!   cargo bench -p baton-bench                      # all
//!   cargo bench -p baton-bench -- train_step        # one group
//!   BATON_BENCH_QUICK=1 cargo bench -p baton-bench  # fewer samples

use std::path::Path;
use std::time::Duration;

use baton_bench::{Shape, Stepper, flops_per_token, random_batch};
use baton_core::backend::{self, Inner, Train};
use baton_core::burn::module::AutodiffModule;
use baton_core::burn::optim::GradientsParams;
use baton_core::burn::tensor::backend::Backend;
use baton_core::burn::tensor::{Distribution, ElementConversion, Tensor};
use baton_core::model::{
    Attention, AttentionMask, LayerInputs, ModelConfig, Positions, Rope, token_logprobs,
};
use baton_core::optim::{AdamW, AdamWConfig, global_grad_norm};
use baton_core::train::int_tensor;
use criterion::{
    BatchSize, BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main,
};

const CONFIGS: [&str; 2] = ["configs/pretrain.toml", "configs/shakespeare-cpu.toml"];

fn shape(path: &str) -> Shape {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Shape::load(&root.join(path), &[]).expect("shipped config")
}

fn sync<B: Backend, const D: usize>(t: Tensor<B, D>) -> f32 {
    t.sum().into_scalar().elem::<f32>()
}

fn group<'a>(
    c: &'a mut Criterion,
    kernel: &str,
) -> BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(format!("{}/{kernel}", backend::NAME));
    let quick = std::env::var_os("BATON_BENCH_QUICK").is_some();
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(if quick { 200 } else { 1000 }))
        .measurement_time(Duration::from_secs(if quick { 1 } else { 4 }));
    g
}

fn rand<B: Backend, const D: usize>(shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

/// The layer shape of the default config (d_model 128, 4 heads, d_ff 384).
fn layer_config() -> ModelConfig {
    shape("configs/pretrain.toml").model
}

fn matmul(c: &mut Criterion) {
    let device = backend::device().unwrap();
    let s = shape("configs/pretrain.toml");
    let (m, d, f, v) = (
        s.tokens_per_step(),
        s.model.d_model,
        s.model.d_ff,
        s.model.vocab_size,
    );
    let mut g = group(c, "matmul");
    // Projections, MLP and head of one step's tokens; then a square reference.
    for (k, n) in [(d, d), (d, f), (f, d), (d, v), (1024, 1024)] {
        let rows = if k == 1024 { 1024 } else { m };
        let a = rand::<Inner, 2>([rows, k], &device);
        let b = rand::<Inner, 2>([k, n], &device);
        g.throughput(Throughput::Elements((2 * rows * k * n) as u64));
        g.bench_function(format!("{rows}x{k}x{n}"), |bench| {
            bench.iter(|| sync(a.clone().matmul(b.clone())))
        });
    }
    g.finish();
}

/// What the model builds once per forward for `batch × seq` causal positions;
/// `fused = false` keeps the plain tensor path on backends with a fused kernel.
fn causal_inputs<B: Backend>(
    rope: &Rope<B>,
    attn: &Attention<B>,
    [batch, seq]: [usize; 2],
    fused: bool,
    device: &B::Device,
) -> LayerInputs<B> {
    let positions = Positions::Contiguous { start: 0, len: seq };
    LayerInputs::new(
        rope,
        attn,
        &positions,
        &AttentionMask::Causal,
        [batch, 0, seq],
        fused,
        device,
    )
}

fn attention(c: &mut Criterion) {
    let device = backend::device().unwrap();
    let base = layer_config();
    let (d, h) = (base.d_model, base.n_heads);
    let mut g = group(c, "attention");
    // `fused`: the per-row kernel of core::fused where the backend has one
    // (flex); `plain`: the tensor formulation every backend runs.
    let variants: &[(&str, bool)] = if baton_core::kernels::Kernels::of::<Inner>().fused() {
        &[("fused", true), ("plain", false)]
    } else {
        &[("plain", false)]
    };
    for seq in [64, 128, 256, 512, 1024] {
        let cfg = ModelConfig {
            max_seq_len: seq,
            n_layers: 1,
            ..base.clone()
        };
        let batch = (4096 / seq).max(1);
        // Scores and weighted sum: 4·b·h·T²·hd forward; backward twice that.
        let flops = (4 * batch * seq * seq * d) as u64;
        for &(name, fused) in variants {
            let model = cfg.init::<Inner>(1, &device);
            let attn = &model.model.layers[0].self_attn;
            let x = rand::<Inner, 3>([batch, seq, d], &device);
            g.throughput(Throughput::Elements(flops));
            g.bench_function(format!("{name}/forward/seq{seq}/b{batch}/h{h}"), |bench| {
                bench.iter(|| {
                    let inputs = causal_inputs(&model.rope, attn, [batch, seq], fused, &device);
                    sync(attn.forward(x.clone(), &inputs, None))
                })
            });
            let model = cfg.init::<Train>(1, &device);
            let attn = &model.model.layers[0].self_attn;
            let x = rand::<Train, 3>([batch, seq, d], &device).require_grad();
            g.throughput(Throughput::Elements(3 * flops));
            g.bench_function(
                format!("{name}/forward_backward/seq{seq}/b{batch}/h{h}"),
                |bench| {
                    bench.iter(|| {
                        let inputs = causal_inputs(&model.rope, attn, [batch, seq], fused, &device);
                        let y = attn.forward(x.clone(), &inputs, None);
                        let grads = y.sum().backward();
                        sync(x.grad(&grads).unwrap())
                    })
                },
            );
        }
    }
    g.finish();
}

fn pointwise(c: &mut Criterion) {
    let device = backend::device().unwrap();
    let s = shape("configs/pretrain.toml");
    let (b, t, d) = (s.train.batch_size, s.train.seq_len, s.model.d_model);
    let model = s.model.init::<Inner>(1, &device);
    let x = rand::<Inner, 3>([b, t, d], &device);
    let bytes = (b * t * d * 4) as u64;

    // `fused`: the fused RMSNorm (core::kernels) where the backend has it (flex); `plain`:
    // the tensor formulation.
    let mut g = group(c, "rmsnorm");
    let variants: &[(&str, bool)] = if baton_core::kernels::Kernels::of::<Inner>().fused() {
        &[("fused", true), ("plain", false)]
    } else {
        &[("plain", false)]
    };
    let tmodel = s.model.init::<Train>(1, &device);
    let xt = rand::<Train, 3>([b, t, d], &device).require_grad();
    for &(name, fused) in variants {
        let norm = &model.model.norm;
        g.throughput(Throughput::Bytes(2 * bytes));
        g.bench_function(format!("{name}/forward/{b}x{t}x{d}"), |bench| {
            bench.iter(|| {
                sync(if fused {
                    norm.forward(x.clone())
                } else {
                    norm.forward_plain(x.clone())
                })
            })
        });
        let norm = &tmodel.model.norm;
        g.throughput(Throughput::Bytes(5 * bytes));
        g.bench_function(format!("{name}/forward_backward/{b}x{t}x{d}"), |bench| {
            bench.iter(|| {
                let y = if fused {
                    norm.forward(xt.clone())
                } else {
                    norm.forward_plain(xt.clone())
                };
                let grads = y.sum().backward();
                sync(xt.grad(&grads).unwrap())
            })
        });
    }
    g.finish();

    // RoPE: the plain 4-D reference beside the fast rows path (rotated weight
    // matmul + row-broadcast multiplies) that attention uses.
    let mut g = group(c, "rope");
    let hd = s.model.head_dim();
    let h = s.model.n_heads;
    let rope = Rope::<Inner>::new(hd, t, s.model.rope_theta, &device);
    let positions = Positions::Contiguous { start: 0, len: t };
    let (cos, sin) = rope.tables(&positions);
    let q = rand::<Inner, 4>([b, h, t, hd], &device);
    g.throughput(Throughput::Bytes(2 * bytes));
    g.bench_function(format!("reference_4d/{b}x{h}x{t}x{hd}"), |bench| {
        bench.iter(|| sync(Rope::apply(q.clone(), &cos, &sin)))
    });
    let w = rand::<Inner, 2>([d, d], &device);
    g.bench_function(format!("rows_with_rotated_matmul/{b}x{t}x{d}"), |bench| {
        bench.iter(|| {
            let rows = rope.rows(&positions, h);
            let y = x.clone().matmul(w.clone().unsqueeze());
            let y_rot = x
                .clone()
                .matmul(Rope::rotate_cols(w.clone(), h).unsqueeze());
            sync(rows.rotate(y, y_rot))
        })
    });
    // What the fused attention does instead (flex): one projection, then the
    // rotation as a loop over the host rows (`kernels::RopeTables::rotate`).
    if baton_core::kernels::Kernels::of::<Inner>().fused() {
        let tables = rope.tables_for_kernel(&positions, b);
        g.bench_function(format!("kernel_after_matmul/{b}x{t}x{d}"), |bench| {
            bench.iter(|| {
                let y = x.clone().matmul(w.clone().unsqueeze());
                let host = y.into_data().to_vec::<f32>().unwrap();
                let out = tables.rotate(&host, false);
                out[out.len() - 1]
            })
        });
    }
    g.finish();

    let mut g = group(c, "swiglu");
    let f = s.model.d_ff;
    let mlp = model.model.layers[0].mlp.as_ref().expect("a dense layer");
    g.throughput(Throughput::Elements((6 * b * t * d * f) as u64));
    g.bench_function(format!("mlp_forward/{b}x{t}x{d}x{f}"), |bench| {
        bench.iter(|| sync(mlp.forward(x.clone())))
    });
    // The same layer as a mixture of 4 experts, top 2 (the upcycling
    // recipe's): routing on the host, tokens gathered per expert, one GEMM
    // per projection per expert. Its FLOPs are 2× the dense MLP's; the ratio
    // of the two times beyond 2 is what the routing and gathering cost.
    let sparse = ModelConfig {
        moe: Some(baton_core::moe::MoeConfig {
            experts: 4,
            top_k: 2,
            every: 1,
        }),
        n_layers: 1,
        ..s.model.clone()
    }
    .init::<Inner>(7, &device);
    let moe = sparse.model.layers[0]
        .block_sparse_moe
        .as_ref()
        .expect("a sparse layer");
    g.bench_function(format!("moe_4x2_forward/{b}x{t}x{d}x{f}"), |bench| {
        bench.iter(|| sync(moe.forward(x.clone(), 0, None).0))
    });
    g.finish();

    // `model`: token_logprobs as the model runs it (the fused kernel on flex);
    // `plain`: log-softmax + gather in tensor ops, what other backends run.
    let mut g = group(c, "cross_entropy");
    let v = s.model.vocab_size;
    let logits = rand::<Inner, 3>([b, t, v], &device);
    let targets = int_tensor::<Inner>(&random_batch(v, b, t, 3).targets, b, t, &device);
    let logits_t = rand::<Train, 3>([b, t, v], &device).require_grad();
    let targets_t = int_tensor::<Train>(&random_batch(v, b, t, 3).targets, b, t, &device);
    g.throughput(Throughput::Bytes((b * t * v * 4) as u64));
    for (name, fused) in [("model", true), ("plain", false)] {
        g.bench_function(format!("{name}/log_softmax_gather/{b}x{t}x{v}"), |bench| {
            bench.iter(|| {
                sync(if fused {
                    token_logprobs(logits.clone(), targets.clone())
                } else {
                    plain_logprobs(logits.clone(), targets.clone())
                })
            })
        });
        g.bench_function(format!("{name}/forward_backward/{b}x{t}x{v}"), |bench| {
            bench.iter(|| {
                let lp = if fused {
                    token_logprobs(logits_t.clone(), targets_t.clone())
                } else {
                    plain_logprobs(logits_t.clone(), targets_t.clone())
                };
                let grads = lp.sum().neg().backward();
                sync(logits_t.grad(&grads).unwrap())
            })
        });
    }
    g.finish();
}

/// Target log-probabilities as tensor ops: log-softmax over the vocabulary, then gather.
fn plain_logprobs<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, baton_core::burn::tensor::Int>,
) -> Tensor<B, 2> {
    let [b, t, v] = logits.dims();
    baton_core::burn::tensor::activation::log_softmax(logits.reshape([b * t, v]), 1)
        .gather(1, targets.reshape([b * t, 1]))
        .reshape([b, t])
}

fn adamw(c: &mut Criterion) {
    let device = backend::device().unwrap();
    for path in CONFIGS {
        let s = shape(path);
        let base = s.model.init::<Train>(1, &device);
        let batch = random_batch(s.model.vocab_size, 2, 16, 5);
        let mut optim = AdamW::<Inner>::new(AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        });
        let mut g = group(c, "adamw");
        // Reads and writes parameter, gradient and both moments.
        g.throughput(Throughput::Bytes((s.model.num_params() * 4 * 7) as u64));
        g.bench_function(format!("step/{}", s.name), |bench| {
            bench.iter_batched(
                || {
                    let m = base.clone();
                    let grads =
                        GradientsParams::from_grads(batch.nll_sum(&m, &device).backward(), &m);
                    (m, grads)
                },
                |(m, grads)| {
                    let norm = global_grad_norm(&m, &grads);
                    let m = optim.step::<Train, _>(m, grads, 1e-3, norm, 1.0);
                    baton_bench::sync_model(&m)
                },
                BatchSize::PerIteration,
            )
        });
        g.finish();
    }
}

fn train_step(c: &mut Criterion) {
    let device = backend::device().unwrap();
    let mut g = group(c, "train_step");
    for path in CONFIGS {
        let s = shape(path);
        let mut stepper = Stepper::<Train>::new(&s, 7, &device);
        stepper.step();
        g.throughput(Throughput::Elements(s.tokens_per_step() as u64));
        g.bench_function(
            format!(
                "{} ({:.1} MFLOP/token)",
                s.name,
                flops_per_token(&s.model, s.train.seq_len) / 1e6
            ),
            |bench| bench.iter(|| stepper.step()),
        );
        let _ = stepper.model().valid();
    }
    g.finish();
}

/// Sampling tokens/s of the default model: `generate_batch` at batch 1, 16,
/// 64 and 256 (24-token prompts, 32 new tokens each, no stop token so every
/// row runs to the end), and one-at-a-time `generate` for the same 16
/// prompts as the baseline.
fn sampling(c: &mut Criterion) {
    use baton_core::generate::{Policy, Sampling, generate, generate_batch};
    let device = backend::device().unwrap();
    let s = shape("configs/pretrain.toml");
    let model = s.model.init::<Inner>(7, &device);
    let sampling = Sampling {
        max_new_tokens: 32,
        temperature: 0.8,
        top_k: 40,
        ..Sampling::default()
    };
    let prompts = |n: usize| -> Vec<Vec<u32>> {
        (0..n)
            .map(|r| {
                (0..24)
                    .map(|t| ((r * 31 + t * 7) % 1000) as u32 + 10)
                    .collect()
            })
            .collect()
    };
    let mut g = group(c, "sampling");
    let sixteen = prompts(16);
    g.throughput(Throughput::Elements(16 * 32));
    g.bench_function("one at a time, 16 prompts", |bench| {
        bench.iter(|| {
            for p in &sixteen {
                generate(&model, p, &sampling, &device, |_| {});
            }
        })
    });
    for batch in [1, 16, 64, 256] {
        let batch_prompts = prompts(batch);
        g.throughput(Throughput::Elements((batch * 32) as u64));
        g.bench_function(format!("batch {batch}"), |bench| {
            bench.iter(|| generate_batch(&Policy::One(&model), &batch_prompts, &sampling, &device))
        });
    }
    g.finish();
}

/// Batch-1 decode at SmolLM2-135M's shape against the memory-bandwidth limit.
fn decode_bandwidth(c: &mut Criterion) {
    use baton_core::generate::{Sampling, generate};
    let device = backend::device().unwrap();
    let sampling = Sampling {
        temperature: 0.8,
        top_k: 40,
        ..Sampling::default()
    };
    // Batch-1 decode at SmolLM2-135M's shape (random weights: the cost is the
    // shape's), against reading its f32 weights once per token.
    let smol = ModelConfig {
        vocab_size: 49152,
        d_model: 576,
        n_layers: 30,
        n_heads: 9,
        n_kv_heads: 3,
        d_ff: 1536,
        max_seq_len: 2048,
        rope_theta: 100_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
        moe: None,
    };
    let model = smol.init::<Inner>(7, &device);
    let mut g = group(c, "decode_bandwidth");
    let decode = Sampling {
        max_new_tokens: 16,
        ..sampling.clone()
    };
    let prompt: Vec<u32> = (0..16).map(|t| 100 + t * 13).collect();
    g.throughput(Throughput::Elements(16));
    g.bench_function(
        format!("smollm2-135m shape, batch 1 ({} params)", smol.num_params()),
        |bench| bench.iter(|| generate(&model, &prompt, &decode, &device, |_| {})),
    );
    drop(model);
    let weights: Vec<f32> = (0..smol.num_params()).map(|i| (i % 7) as f32).collect();
    g.throughput(Throughput::Bytes((weights.len() * 4) as u64));
    // Two threads (the cores decode uses), 16 lanes each so the adds vectorise.
    let read = |part: &[f32]| -> f32 {
        part.chunks_exact(16)
            .fold([0f32; 16], |mut acc, x| {
                acc.iter_mut().zip(x).for_each(|(a, v)| *a += v);
                acc
            })
            .iter()
            .sum()
    };
    g.bench_function("read the f32 weights once (2 threads)", |bench| {
        bench.iter(|| {
            let (a, b) = weights.split_at(weights.len() / 2);
            std::thread::scope(|scope| {
                let other = scope.spawn(|| read(b));
                read(a) + other.join().expect("reader")
            })
        })
    });
    g.finish();
}

/// What LoRA costs in a training step, at SmolLM2-135M's MLP up-projection
/// (2048 tokens × 576 → 1536): forward and backward of the linear map with
/// `W` trained (full fine-tuning: input and weight gradients), `W` frozen
/// (input gradient only: a frozen layer between trained ones), and `W` frozen
/// with a rank-8 or rank-16 adapter trained (the adapter's extra matmuls).
fn lora(c: &mut Criterion) {
    use baton_core::burn::module::Param;
    use baton_core::model::{Linear, LoraAdapter};
    let device = backend::device().unwrap();
    let mut g = group(c, "lora");
    let (rows, d_in, d_out) = (2048, 576, 1536);
    let x = rand::<Inner, 2>([rows, d_in], &device);
    let w = rand::<Inner, 2>([d_in, d_out], &device).mul_scalar(0.02);
    g.throughput(Throughput::Elements(rows as u64));
    for (name, train_w, rank) in [
        ("W trained (full fine-tuning)", true, 0),
        ("W frozen (input gradient only)", false, 0),
        ("W frozen + rank-8 adapter", false, 8),
        ("W frozen + rank-16 adapter", false, 16),
    ] {
        let mut linear = Linear::<Train>::new(Param::from_tensor(Tensor::from_inner(w.clone())));
        if !train_w {
            linear.weight = linear.weight.set_require_grad(false);
        }
        if rank > 0 {
            let small = |shape: [usize; 2]| {
                Param::from_tensor(Tensor::from_inner(
                    rand::<Inner, 2>(shape, &device).mul_scalar(0.01),
                ))
            };
            linear.lora = Some(LoraAdapter {
                a: small([d_in, rank]),
                b: small([rank, d_out]),
                scale: 2.0,
                dropout: 0.0,
            });
        }
        g.bench_function(name, |bench| {
            bench.iter(|| {
                let input = Tensor::<Train, 2>::from_inner(x.clone()).require_grad();
                let grads = linear.forward(input.clone()).sum().backward();
                sync(input.grad(&grads).expect("input gradient"))
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    matmul,
    attention,
    pointwise,
    adamw,
    train_step,
    sampling,
    decode_bandwidth,
    lora
);
criterion_main!(benches);
