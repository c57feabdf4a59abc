//! Baton against PyTorch, side by side: the same architecture, initial weights,
//! batch and optimizer, timed in alternating rounds in one invocation.
//!
//!   cargo run -p baton-bench --release --bin versus -- --config configs/shakespeare-cpu.toml
//!
//! Prints each round's tokens/s, the ratio's median and spread, model FLOPs
//! utilisation against the best measured f32 matmul of this machine, and ends
//! with one JSON line.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use baton_bench::{Shape, Stepper, flops_per_token, matmul_peak};
use baton_core::backend::{self, Inner, Train};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Baton vs PyTorch training tokens/s on the same model, side by side")]
struct Args {
    /// A pretrain config (its [model] and [train] shape the run).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Override a key (repeatable), e.g. --set model.n_layers=4.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Timed steps per round and side.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps before the first timed round of each side.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Alternations (Baton then PyTorch, PyTorch then Baton, …).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value = "python3")]
    python: String,
    /// Threads for PyTorch (default: the cores Baton uses).
    #[arg(long)]
    threads: Option<usize>,
    /// PyTorch device (cpu, cuda).
    #[arg(long, default_value = "cpu")]
    torch_device: String,
    /// Float type of both sides: f32, or bf16 (pure bfloat16 parameters,
    /// activations and optimizer state; GPU backends).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    dtype: String,
    /// Side of the square matmul that measures the peak FLOP/s for MFU
    /// (1024 suits a CPU; use 8192 on a GPU).
    #[arg(long, default_value_t = 1024)]
    peak_size: usize,
}

struct TorchRun {
    tokens_per_s: f64,
    first_step: f64,
    peak_memory: f64,
    first_loss: f64,
    peak: f64,
    version: String,
}

fn torch_round(args: &Args, spec: &std::path::Path, threads: usize) -> Result<TorchRun> {
    // The script beside this crate's sources; from the repository root when
    // the binary runs on another machine than the one that built it.
    let mut script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("torch_train.py");
    if !script.exists() {
        script = PathBuf::from("bench/torch_train.py");
    }
    let out = Command::new(&args.python)
        .arg(&script)
        .args(["--spec", &spec.display().to_string()])
        .args(["--steps", &args.steps.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--device", &args.torch_device])
        .args(["--dtype", &args.dtype])
        .args(["--peak-size", &args.peak_size.to_string()])
        .output()
        .with_context(|| format!("running {} {}", args.python, script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed (pip install torch safetensors?): {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(line)
        .with_context(|| format!("{}: not JSON: {line}", script.display()))?;
    let num = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok(TorchRun {
        tokens_per_s: num("tokens_per_s"),
        first_step: num("first_step_seconds"),
        peak_memory: num("peak_memory_bytes"),
        first_loss: num("first_loss"),
        peak: num("matmul_peak_flops"),
        version: v["torch"].as_str().unwrap_or("?").to_string(),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let shape = Shape::load(&args.config, &args.sets)?;
    let float = match args.dtype.as_str() {
        "bf16" => baton_core::burn::tensor::FloatDType::BF16,
        _ => baton_core::burn::tensor::FloatDType::F32,
    };
    let device = backend::device_with_float(float).map_err(anyhow::Error::msg)?;
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let tokens = shape.tokens_per_step();
    let m = &shape.model;
    eprintln!(
        "{}: {} layers, d_model {}, {} heads ({} kv), d_ff {}, vocab {}, batch {} × seq {} = {tokens} tokens/step; backend {}, {}, torch threads {threads}",
        shape.name,
        m.n_layers,
        m.d_model,
        m.n_heads,
        m.n_kv_heads,
        m.d_ff,
        m.vocab_size,
        shape.train.batch_size,
        shape.train.seq_len,
        backend::NAME,
        args.dtype
    );

    // Both sides start from these weights and train on this batch.
    let mut baton = Stepper::<Train>::new(&shape, 1234, &device);
    let dir = std::env::temp_dir().join(format!("baton-versus-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let weights = dir.join("init.safetensors");
    let tensors = baton_core::checkpoint::named_tensors(
        &baton_core::burn::module::AutodiffModule::valid(baton.model()),
    );
    std::fs::write(
        &weights,
        baton_core::checkpoint::safetensors_bytes(
            tensors.iter().map(|(n, d)| (n, d)),
            baton_core::checkpoint::WeightDtype::F32,
        )
        .map_err(anyhow::Error::msg)?,
    )?;
    let t = &shape.train;
    let spec = serde_json::json!({
        "model": shape.model,
        "train": {
            "batch_size": t.batch_size, "seq_len": t.seq_len, "lr": t.lr, "beta1": t.beta1,
            "beta2": t.beta2, "eps": t.eps, "weight_decay": t.weight_decay, "grad_clip": t.grad_clip,
        },
        "weights": weights,
        "inputs": baton.batch.inputs,
        "targets": baton.batch.targets,
    });
    let spec_path = dir.join("spec.json");
    std::fs::write(&spec_path, spec.to_string())?;

    // The first step in a fresh process pays kernel compilation and
    // autotuning on GPU backends: reported apart from the steady state.
    let started = Instant::now();
    let first_loss = baton.step();
    let first_step = started.elapsed().as_secs_f64();
    eprintln!("baton warm-up step 1: {first_step:.2} s (loss {first_loss:.4})");
    for i in 1..args.warmup {
        let started = Instant::now();
        baton.step();
        eprintln!(
            "baton warm-up step {}: {:.3} s",
            i + 1,
            started.elapsed().as_secs_f64()
        );
    }
    let mut rows = Vec::new();
    let mut torch_first_loss = f64::NAN;
    let mut torch_peak = 0f64;
    let mut torch_version = String::new();
    let mut torch_peak_memory = 0f64;
    let mut torch_first_steps = Vec::new();
    for round in 0..args.rounds {
        let run_baton = |baton: &mut Stepper<Train>| {
            let started = Instant::now();
            for _ in 0..args.steps {
                baton.step();
            }
            (tokens * args.steps) as f64 / started.elapsed().as_secs_f64()
        };
        let (b, p) = if round % 2 == 0 {
            let b = run_baton(&mut baton);
            (b, torch_round(&args, &spec_path, threads)?)
        } else {
            let p = torch_round(&args, &spec_path, threads)?;
            (run_baton(&mut baton), p)
        };
        torch_first_loss = p.first_loss;
        torch_first_steps.push(p.first_step);
        torch_peak = torch_peak.max(p.peak);
        torch_version = p.version;
        torch_peak_memory = torch_peak_memory.max(p.peak_memory);
        eprintln!(
            "round {}: baton {b:.0} tok/s · torch {:.0} tok/s · ratio {:.3}",
            round + 1,
            p.tokens_per_s,
            b / p.tokens_per_s
        );
        rows.push((b, p.tokens_per_s));
    }
    let _ = std::fs::remove_dir_all(&dir);

    // Host memory of this process before the matmul probe: Baton's model,
    // optimizer state and activations (PyTorch runs in its own processes).
    let baton_peak_memory = baton_bench::peak_rss_bytes().map_or(f64::NAN, |b| b as f64);
    let baton_peak = matmul_peak::<Inner>(args.peak_size, 3, &device);
    let torch_first_step = median(torch_first_steps);
    let peak = baton_peak.max(torch_peak);
    let ratios: Vec<f64> = rows.iter().map(|(b, p)| b / p).collect();
    let baton_tps = median(rows.iter().map(|r| r.0).collect());
    let torch_tps = median(rows.iter().map(|r| r.1).collect());
    let ratio = median(ratios.clone());
    let (lo, hi) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &r| (a.min(r), b.max(r)));
    let fpt = flops_per_token(&shape.model, shape.train.seq_len);
    let mfu = fpt * baton_tps / peak;
    let torch_mfu = fpt * torch_tps / peak;
    println!("config            {}", shape.name);
    println!(
        "first-step loss   baton {first_loss:.5} · torch {torch_first_loss:.5} (same weights and batch)"
    );
    println!(
        "tokens/s (median) baton {baton_tps:.0} · torch {torch_tps:.0} (torch {torch_version}, {threads} threads)"
    );
    println!(
        "ratio             {ratio:.3} (spread {lo:.3}–{hi:.3} over {} rounds of {} steps)",
        args.rounds, args.steps
    );
    println!(
        "first step        baton {first_step:.2} s · torch {torch_first_step:.2} s (fresh process: compilation, autotuning, allocation; torch: median over rounds)"
    );
    println!(
        "matmul peak       {:.1} GFLOP/s (best {} {}³: baton {:.1}, torch {:.1})",
        peak / 1e9,
        args.dtype,
        args.peak_size,
        baton_peak / 1e9,
        torch_peak / 1e9
    );
    println!(
        "peak memory       baton {:.0} MiB · torch {:.0} MiB (peak resident set of each process)",
        baton_peak_memory / 1048576.0,
        torch_peak_memory / 1048576.0
    );
    println!(
        "MFU               baton {:.1} % · torch {:.1} % (6·N + 12·L·d·T = {:.2} MFLOP/token)",
        100.0 * mfu,
        100.0 * torch_mfu,
        fpt / 1e6
    );
    println!(
        "{}",
        serde_json::json!({
            "config": shape.name,
            "baton_tokens_per_s": baton_tps,
            "torch_tokens_per_s": torch_tps,
            "ratio": ratio,
            "ratio_min": lo,
            "ratio_max": hi,
            "mfu": mfu,
            "torch_mfu": torch_mfu,
            "baton_peak_memory_bytes": baton_peak_memory,
            "torch_peak_memory_bytes": torch_peak_memory,
            "backend": backend::NAME,
            "dtype": args.dtype,
            "baton_first_step_s": first_step,
            "torch_first_step_s": torch_first_step,
            "peak_flops": peak,
        })
    );
    Ok(())
}
