//! `baton launch`: starts a data-parallel stage the way torchrun does. Each
//! of `--nproc-per-node` processes gets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` (and
//! `RAYON_NUM_THREADS`, its share of the cores); the stage binaries read them
//! (see `baton_core::dist`). When one process fails, the others stop too:
//! they notice the lost rank themselves, and the launcher kills any still
//! running after a grace period.
//!
//! With `--max-restarts K` (torchrun's flag), a run that failed as a whole (a
//! rank crashed or was killed, Burn's collective engine got stuck: a signal or
//! exit status 75; its peers exit with 76) is started again, up to K times, with
//! `--resume` from its last `train_state`, or anew when it had none yet. A
//! rank that failed on its input (exit status 1: bad data, a refused output)
//! ends the launch at once: the next attempt would fail the same way.

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
    /// Times a failed run is started again (`--resume`), as torchrun's flag.
    pub max_restarts: usize,
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
        if self.max_restarts > 0 && self.nnodes > 1 {
            bail!(
                "--max-restarts restarts the ranks of one machine (--nnodes 1); with several machines, restart every node's launch with the stage's --resume"
            );
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

/// Runs `program args…` as this node's ranks and waits for all of them,
/// starting a failed run again up to `launch.max_restarts` times.
pub fn run(launch: &Launch, program: &Path, args: &[String]) -> Result<()> {
    launch.check()?;
    let out = match launch.max_restarts {
        0 => None,
        _ => Some(out_dir(args)?),
    };
    let mut attempt_args = args.to_vec();
    for attempt in 0..=launch.max_restarts {
        let Some(failure) = run_once(launch, program, &attempt_args, attempt)? else {
            return Ok(());
        };
        let Failure {
            rank,
            status,
            restartable,
        } = failure;
        let Some(out) = &out else {
            bail!("rank {rank} failed ({status})");
        };
        if !restartable {
            bail!("rank {rank} failed ({status}); not restarted: the failure is the rank's own");
        }
        if attempt == launch.max_restarts {
            bail!(
                "rank {rank} failed ({status}) after {attempt} restart{}",
                if attempt == 1 { "" } else { "s" }
            );
        }
        attempt_args = restart_args(args, out)
            .with_context(|| format!("rank {rank} failed ({status}); not restarted"))?;
        eprintln!(
            "baton launch: rank {rank} failed ({status}); restart {} of {} {}",
            attempt + 1,
            launch.max_restarts,
            if attempt_args.iter().any(|a| a == "--resume") {
                "from the last train_state (--resume)"
            } else {
                "from the start (no train_state yet)"
            }
        );
    }
    unreachable!("the last attempt returns")
}

/// The rank to blame for a failed attempt, and whether the run may restart.
struct Failure {
    rank: usize,
    status: ExitStatus,
    restartable: bool,
}

/// How much a failed rank's status says about where a failure started: its
/// own error (input, settings) over a crash, a signal or a stuck engine
/// (75), over having lost a peer (76).
fn blame(status: ExitStatus) -> (u8, bool) {
    use baton_core::dist::{EXIT_PEER_LOST, EXIT_RESTARTABLE};
    match status.code() {
        Some(EXIT_PEER_LOST) => (0, true),
        None | Some(EXIT_RESTARTABLE) => (1, true),
        Some(_) => (2, false),
    }
}

/// One attempt: starts the ranks and waits for them.
fn run_once(
    launch: &Launch,
    program: &Path,
    args: &[String],
    attempt: usize,
) -> Result<Option<Failure>> {
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
            .env("BATON_RESTART_COUNT", attempt.to_string())
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
    let mut failed: Option<Failure> = None;
    let mut deadline: Option<Instant> = None;
    while children.iter().any(|(_, c)| c.is_some()) {
        for (rank, slot) in &mut children {
            let Some(child) = slot else { continue };
            if let Some(status) = child.try_wait()? {
                *slot = None;
                if status.success() {
                    continue;
                }
                // Any rank failing on its own input (1) makes the attempt
                // unrestartable, whatever else failed: the next would too.
                let (weight, restartable) = blame(status);
                match &mut failed {
                    None => {
                        failed = Some(Failure {
                            rank: *rank,
                            status,
                            restartable,
                        });
                        deadline = Some(Instant::now() + launch.grace);
                    }
                    Some(first) => {
                        if weight > blame(first.status).0 {
                            first.rank = *rank;
                            first.status = status;
                        }
                        first.restartable &= restartable;
                    }
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
    Ok(failed)
}

/// The stage's `--out` directory in `args`: a restart must continue there.
fn out_dir(args: &[String]) -> Result<PathBuf> {
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--out" {
            if let Some(dir) = it.next() {
                return Ok(PathBuf::from(dir));
            }
        } else if let Some(dir) = arg.strip_prefix("--out=") {
            return Ok(PathBuf::from(dir));
        }
    }
    bail!("--max-restarts needs the stage's --out DIR (a restart continues there)")
}

/// The stage's arguments for a restart: `--resume` when the failed run left
/// a train_state in `<out>.partial`; else the run starts over, which
/// discards that `.partial` (`--force`), allowed only where it cannot replace
/// a finished checkpoint the user did not ask to replace.
fn restart_args(args: &[String], out: &Path) -> Result<Vec<String>> {
    let forced = args.iter().any(|a| a == "--force");
    let mut next: Vec<String> = args
        .iter()
        .filter(|a| *a != "--resume" && *a != "--force")
        .cloned()
        .collect();
    if baton_core::checkpoint::resumable(&baton_core::files::partial_dir(out)) {
        next.push("--resume".into());
    } else if forced || !out.exists() {
        next.push("--force".into());
    } else {
        bail!(
            "{}: no train_state to resume from, and starting over would replace this directory",
            out.display()
        );
    }
    Ok(next)
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
            max_restarts: 0,
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
        // The rank where the failure started is named, not the first to
        // exit: rank 0 only lost its peer (76), rank 1 was stuck (75) or
        // killed.
        for rank_1 in ["exit 75", "kill -9 $$"] {
            let err = run(
                &launch(),
                Path::new("sh"),
                &[
                    "-c".into(),
                    format!(r#"[ "$RANK" = 0 ] && exit 76; sleep 0.3; {rank_1}"#),
                ],
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("rank 1 failed"), "{err}");
        }
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

    /// Runs `body` (sh) as 2 ranks with `--max-restarts restarts`, the stage's
    /// `--out` being `out` (and `extra` flags). Rank 0 logs each attempt's
    /// number and flags; returns the result and those lines.
    fn restarting(
        restarts: usize,
        out: &Path,
        extra: &[&str],
        body: &str,
    ) -> (Result<()>, Vec<String>) {
        let log = out.with_extension("log");
        let script = format!(
            r#"[ "$RANK" = 0 ] && echo "$BATON_RESTART_COUNT $*" >> '{}'; {body}"#,
            log.display()
        );
        let mut args = vec!["-c".to_string(), script, "sh".into(), "--out".into()];
        args.push(out.display().to_string());
        args.extend(extra.iter().map(|a| a.to_string()));
        let launch = Launch {
            max_restarts: restarts,
            ..launch()
        };
        let result = run(&launch, Path::new("sh"), &args);
        let lines = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect();
        (result, lines)
    }

    #[test]
    fn a_run_that_failed_as_a_whole_restarts_from_its_train_state_or_anew() {
        let tmp = tempfile::tempdir().unwrap();
        // Attempt 0: rank 0 saves a train_state, then rank 1 is killed (a
        // crash) and rank 0 exits as a rank that lost its peer. Attempt 1
        // succeeds only if resumed.
        let out = tmp.path().join("resumed");
        let (result, lines) = restarting(
            2,
            &out,
            &[],
            r#"if [ "$BATON_RESTART_COUNT" = 0 ]; then
                 if [ "$RANK" = 1 ]; then kill -9 $$; fi
                 mkdir -p "$2.partial/train_state" && echo '{}' > "$2.partial/train_state/state.json"
                 exit 76
               fi
               case "$*" in *--resume*) exit 0;; esac; exit 9"#,
        );
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[1].starts_with("1 ") && lines[1].ends_with("--resume"),
            "{lines:?}"
        );

        // No train_state yet and no output: the run starts over (--force
        // discards its own .partial), and the user's --resume is not repeated.
        let out = tmp.path().join("anew");
        let (result, lines) = restarting(
            1,
            &out,
            &["--resume"],
            r#"[ "$BATON_RESTART_COUNT" = 0 ] && exit 75
               case "$*" in *--force*) case "$*" in *--resume*) exit 8;; esac; exit 0;; esac; exit 9"#,
        );
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(lines.len(), 2, "{lines:?}");

        // Without a train_state, a restart would replace an existing output
        // the user did not pass --force for: not restarted.
        let out = tmp.path().join("kept");
        std::fs::create_dir(&out).unwrap();
        let (result, lines) = restarting(1, &out, &[], "exit 75");
        let err = format!("{:#}", result.unwrap_err());
        assert!(err.contains("would replace this directory"), "{err}");
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(out.is_dir());
    }

    #[test]
    fn a_rank_failing_on_its_own_or_too_often_ends_the_launch() {
        let tmp = tempfile::tempdir().unwrap();
        // Exit status 1 (bad input) on rank 1, while rank 0 only lost its
        // peer: never restarted.
        let (result, lines) = restarting(
            2,
            &tmp.path().join("own"),
            &[],
            r#"[ "$RANK" = 1 ] && exit 1; exit 76"#,
        );
        let err = result.unwrap_err().to_string();
        assert!(err.contains("the failure is the rank's own"), "{err}");
        assert_eq!(lines.len(), 1, "{lines:?}");
        // Failing as a whole every time: 1 + 2 attempts, then an error.
        let (result, lines) = restarting(2, &tmp.path().join("again"), &[], "exit 75");
        let err = result.unwrap_err().to_string();
        assert!(err.contains("after 2 restarts"), "{err}");
        assert_eq!(lines.len(), 3, "{lines:?}");
        // Refused before anything starts: no --out, or several machines.
        let (result, lines) = {
            let launch = Launch {
                max_restarts: 1,
                ..launch()
            };
            (
                run(&launch, Path::new("sh"), &["-c".into(), "exit 0".into()]),
                Vec::<String>::new(),
            )
        };
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains("--max-restarts needs the stage's --out"),
            "{err}"
        );
        assert!(lines.is_empty());
        let err = Launch {
            max_restarts: 1,
            nnodes: 2,
            ..launch()
        }
        .check()
        .unwrap_err()
        .to_string();
        assert!(err.contains("one machine"), "{err}");
    }
}
