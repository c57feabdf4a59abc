//! `baton launch`: starts a data-parallel stage the way torchrun does. Each
//! of `--nproc-per-node` processes gets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` (and
//! `RAYON_NUM_THREADS`, its share of the cores); the stage binaries read them
//! (see `baton_core::dist`). When one process fails, the others stop too:
//! they notice the lost rank themselves, and the launcher kills any still
//! running after a grace period.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The stages `baton launch` starts.
pub const STAGES: [&str; 3] = ["pretrain", "sft", "align"];

/// Where the processes of one node run and meet.
#[derive(Clone, Debug)]
pub struct Launch {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Threads per process (default: this machine's cores ÷ processes).
    pub threads: Option<usize>,
    /// How long ranks still running after one failed are given to stop.
    pub grace: Duration,
}

impl Launch {
    fn check(&self) -> Result<()> {
        if self.nproc_per_node == 0 || self.nnodes == 0 {
            bail!("--nproc-per-node and --nnodes must be at least 1");
        }
        if self.node_rank >= self.nnodes {
            bail!(
                "--node-rank {} is not below --nnodes {}",
                self.node_rank,
                self.nnodes
            );
        }
        if self.threads == Some(0) {
            bail!("--threads must be at least 1");
        }
        let last_port = self.master_port as usize + 1 + 2 * self.nproc_per_node;
        if self.master_port == 0 || last_port > u16::MAX as usize {
            bail!(
                "--master-port {}: the run needs ports {}..={last_port}",
                self.master_port,
                self.master_port
            );
        }
        Ok(())
    }
}

/// The binary of `stage` beside this executable.
pub fn stage_binary(stage: &str) -> Result<PathBuf> {
    if !STAGES.contains(&stage) {
        bail!(
            "baton launch runs one of {} (got `{stage}`)",
            STAGES.join(", ")
        );
    }
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let path = dir.join(format!("{stage}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        bail!(
            "{}: no `{stage}` binary beside baton (build the workspace's binaries)",
            path.display()
        );
    }
    Ok(path)
}

/// Runs `program args…` as this node's ranks and waits for all of them.
pub fn run(launch: &Launch, program: &Path, args: &[String]) -> Result<()> {
    launch.check()?;
    let world = launch.nproc_per_node * launch.nnodes;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = launch
        .threads
        .unwrap_or((cores / launch.nproc_per_node).max(1));
    let mut children: Vec<(usize, Option<Child>)> = Vec::new();
    for local in 0..launch.nproc_per_node {
        let rank = launch.node_rank * launch.nproc_per_node + local;
        let mut command = Command::new(program);
        command
            .args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", launch.nproc_per_node.to_string())
            .env("MASTER_ADDR", &launch.master_addr)
            .env("MASTER_PORT", launch.master_port.to_string())
            .env("RAYON_NUM_THREADS", threads.to_string());
        // Rank 0 prints the stage's result; the others' would repeat it.
        if rank != 0 {
            command.stdout(Stdio::null());
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start rank {rank} ({})", program.display()))?;
        children.push((rank, Some(child)));
    }
    let mut failed: Option<(usize, ExitStatus)> = None;
    let mut deadline: Option<Instant> = None;
    while children.iter().any(|(_, c)| c.is_some()) {
        for (rank, slot) in &mut children {
            let Some(child) = slot else { continue };
            if let Some(status) = child.try_wait()? {
                *slot = None;
                if !status.success() && failed.is_none() {
                    failed = Some((*rank, status));
                    deadline = Some(Instant::now() + launch.grace);
                }
            }
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            for (rank, slot) in &mut children {
                if let Some(mut child) = slot.take() {
                    eprintln!("baton launch: rank {rank} still running; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match failed {
        Some((rank, status)) => bail!("rank {rank} failed ({status})"),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch() -> Launch {
        Launch {
            nproc_per_node: 2,
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            threads: None,
            grace: Duration::from_secs(1),
        }
    }

    #[test]
    fn bad_launches_are_refused_in_one_line() {
        assert!(launch().check().is_ok());
        let cases = [
            (
                Launch {
                    nproc_per_node: 0,
                    ..launch()
                },
                "--nproc-per-node",
            ),
            (
                Launch {
                    node_rank: 2,
                    nnodes: 2,
                    ..launch()
                },
                "--node-rank 2 is not below --nnodes 2",
            ),
            (
                Launch {
                    threads: Some(0),
                    ..launch()
                },
                "--threads",
            ),
            (
                Launch {
                    master_port: 65534,
                    ..launch()
                },
                "--master-port 65534",
            ),
        ];
        for (bad, expected) in cases {
            let err = bad.check().unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
        let err = stage_binary("export").unwrap_err().to_string();
        assert!(err.contains("pretrain, sft, align"), "{err}");
    }

    #[test]
    fn a_failed_rank_fails_the_launch_and_its_peers_are_stopped() {
        // `sh` as the stage: rank 1 fails at once, rank 0 would run for a
        // minute; the launcher kills it after the grace period.
        let started = Instant::now();
        let err = run(
            &launch(),
            Path::new("sh"),
            &["-c".into(), r#"[ "$RANK" = 1 ] && exit 3; sleep 60"#.into()],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("rank 1 failed"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(20));
        // Each rank sees its place in the world.
        let ok = run(
            &launch(),
            Path::new("sh"),
            &[
                "-c".into(),
                r#"[ "$WORLD_SIZE" = 2 ] && [ "$LOCAL_RANK" = "$RANK" ] && [ "$MASTER_PORT" = 29500 ]"#
                    .into(),
            ],
        );
        assert!(ok.is_ok(), "{ok:?}");
    }
}
