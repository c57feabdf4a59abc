//! The NCCL sum behind `train.devices`, checked on this machine's GPUs: the
//! gradients of row parts of a smoke-config model, part i on GPU i, summed by
//! `dist::nccl::sum_on_first` and, for comparison, moved to GPU 0 and added
//! there. With one GPU the communicator has one member; the call still goes
//! through Burn's `DistributedBackend::all_reduce`.
//!
//!   cargo build --release -p baton-bench --no-default-features --features nccl --example nccl_sum
//!   target/release/examples/nccl_sum [GPUS]      # on the GPU machine, from the repository root

#[cfg(feature = "nccl")]
fn main() {
    use std::path::Path;

    use baton_bench::{Shape, random_batch};
    use baton_core::backend::{self, Train};
    use baton_core::burn::module::Module;
    use baton_core::burn::optim::{GradientsAccumulator, GradientsParams};
    use baton_core::model::Llama;
    use baton_core::optim::{grad_values, max_abs_diff};

    let gpus: usize = std::env::args()
        .nth(1)
        .map_or(1, |a| a.parse().expect("GPUS: a whole number"));
    let devices = backend::step_devices(gpus).unwrap_or_else(|e| panic!("{}", e.0));
    let s = Shape::load(Path::new("configs/smoke/pretrain.toml"), &[]).unwrap();
    let model = s.model.init::<Train>(1, &devices[0]);
    let (v, t) = (s.model.vocab_size, s.train.seq_len);
    // Part i's gradients on GPU i (its rows seeded by i, so the parts differ).
    let parts = || -> Vec<GradientsParams> {
        devices
            .iter()
            .enumerate()
            .map(|(i, device)| {
                let replica: Llama<Train> = model.clone().fork(device);
                let rows = random_batch(v, 2, t, i as u64 + 1);
                let loss = rows.nll_sum(&replica, device);
                GradientsParams::from_grads(loss.backward(), &replica)
            })
            .collect()
    };
    let mut moved = GradientsAccumulator::<Llama<Train>>::new();
    for grads in parts() {
        moved.accumulate(&model, grads.to_device(&devices[0], &model));
    }
    let expected = grad_values(&model, &moved.grads());
    let summed = grad_values(
        &model,
        &baton_core::dist::nccl::sum_on_first(&model, parts(), &devices),
    );
    let norm = expected.iter().map(|g| g * g).sum::<f32>().sqrt();
    let diff = max_abs_diff(&summed, &expected).expect("the same parameters");
    println!(
        "{gpus} GPU(s): NCCL sum against moved-and-added: max |diff| {diff:.3e}, gradient norm {norm:.4}"
    );
    if !(norm > 0.0 && diff <= 1e-5 * norm.max(1.0)) {
        eprintln!("FAIL: the NCCL sum differs");
        std::process::exit(1);
    }
    println!("ok");
}

#[cfg(not(feature = "nccl"))]
fn main() {
    eprintln!("nccl_sum needs a CUDA build with the `nccl` feature (see its header)");
    std::process::exit(2);
}
