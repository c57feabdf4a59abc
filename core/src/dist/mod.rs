//! Data-parallel training across processes and machines.
//!
//! A process learns its place from torchrun's variables (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), which
//! `baton launch` sets. Ports, from `MASTER_PORT` = P: Burn's collective
//! orchestrator (started by rank 0) listens on P, Baton's control channel
//! (rank 0) on P + 1, and each rank's tensor data service on P + 2 + 2 ·
//! `LOCAL_RANK` and the port after it.
//!
//! - **Control channel** ([`join`]): every rank connects to rank 0 and sends
//!   a hash of its run (settings, inputs, tokenizer); rank 0 refuses a rank
//!   whose hash differs from its own, naming it. Afterwards both sides send
//!   heartbeats: a rank whose connection closes (the process died) or falls
//!   silent for `BATON_DIST_HEARTBEAT` seconds is lost, and every other rank
//!   exits non-zero with one line naming it.
//! - **Gradients** ([`sync`]): after backward, every process's gradients
//!   are summed with Burn's collective all-reduce (`burn-collective`).
//! - **Several GPUs in one process** ([`nccl`], CUDA builds with the `nccl`
//!   feature): `train.devices` splits each micro-batch's rows among the
//!   process's GPUs and NCCL sums their gradients (`crate::train`'s row
//!   passes); it is not a world of ranks and needs no launcher.
//! - **Files**: rank 0 alone writes the checkpoint. The other ranks run the
//!   same stage against a scratch directory under the system's temporary
//!   directory ([`scratch_out`]), removed at exit ([`cleanup`]), and read a
//!   resumed run's `train_state` from rank 0's working directory (a shared
//!   filesystem across machines).

#[cfg(feature = "nccl")]
pub mod nccl;
pub mod sync;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use sync::{GradSync, grad_sync};

/// Where this process stands in a data-parallel run.
#[derive(Clone, Debug, PartialEq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl World {
    /// The world from torchrun's environment variables: `None` without
    /// `WORLD_SIZE` or with `WORLD_SIZE=1` (one process).
    pub fn from_env() -> Result<Option<World>, String> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<World>, String> {
        let number = |name: &str, default: Option<usize>| -> Result<usize, String> {
            match var(name) {
                Some(v) => v
                    .trim()
                    .parse()
                    .map_err(|_| format!("{name}={v}: not a non-negative whole number")),
                None => default.ok_or_else(|| format!("{name} is not set (WORLD_SIZE is)")),
            }
        };
        let size = match var("WORLD_SIZE") {
            None => return Ok(None),
            Some(_) => number("WORLD_SIZE", None)?,
        };
        if size == 0 {
            return Err("WORLD_SIZE=0: a run needs at least one process".into());
        }
        if size == 1 {
            return Ok(None);
        }
        let rank = number("RANK", None)?;
        if rank >= size {
            return Err(format!("RANK={rank} is not below WORLD_SIZE={size}"));
        }
        let local_rank = number("LOCAL_RANK", Some(rank))?;
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        // torchrun's agent holds MASTER_PORT itself: BATON_DIST_PORT moves
        // Baton's ports elsewhere.
        let port_var = match var("BATON_DIST_PORT") {
            Some(_) => "BATON_DIST_PORT",
            None => "MASTER_PORT",
        };
        let port = number(port_var, Some(29500))?;
        let master_port = u16::try_from(port)
            .ok()
            .filter(|p| *p > 0 && (*p as usize) + 3 + 2 * local_rank <= u16::MAX as usize)
            .ok_or_else(|| format!("{port_var}={port}: not a usable port"))?;
        Ok(Some(World {
            rank,
            size,
            local_rank,
            master_addr,
            master_port,
        }))
    }

    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }

    fn orchestrator_port(&self) -> u16 {
        self.master_port
    }

    fn control_port(&self) -> u16 {
        self.master_port + 1
    }

    /// This rank's tensor data service in all-reduce session `session`:
    /// consecutive sessions alternate between two ports, so a new session
    /// never meets the previous one's server still closing.
    fn data_port(&self, session: u64) -> u16 {
        self.master_port + 2 + 2 * self.local_rank as u16 + (session % 2) as u16
    }

    fn control_addr(&self) -> String {
        format!("{}:{}", self.master_addr, self.control_port())
    }
}

static WORLD: OnceLock<Result<Option<World>, String>> = OnceLock::new();

/// This process's world (read from the environment once).
pub fn world() -> Result<Option<&'static World>, String> {
    match WORLD.get_or_init(World::from_env) {
        Ok(world) => Ok(world.as_ref()),
        Err(e) => Err(e.clone()),
    }
}

/// This process's rank (0 outside a data-parallel run).
pub fn rank() -> usize {
    world().ok().flatten().map_or(0, |w| w.rank)
}

/// Whether this process writes files: rank 0, or the only process.
pub fn is_leader() -> bool {
    rank() == 0
}

fn secs_from_env(name: &str, default: f64) -> Duration {
    let secs = std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(default);
    Duration::from_secs_f64(secs)
}

/// How long ranks wait for each other to start (`BATON_DIST_TIMEOUT`, s).
fn start_timeout() -> Duration {
    secs_from_env("BATON_DIST_TIMEOUT", 300.0)
}

/// How long a silent rank counts as alive (`BATON_DIST_HEARTBEAT`, s).
fn heartbeat_timeout() -> Duration {
    secs_from_env("BATON_DIST_HEARTBEAT", 20.0)
}

const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);

// ------------------------------------------------------------ files

/// The scratch root of a rank other than 0 (what [`cleanup`] removes).
fn scratch_root(world: &World) -> PathBuf {
    std::env::temp_dir().join(format!("baton-rank{}-{}", world.rank, std::process::id()))
}

/// Where a rank other than 0 puts the output it would write at `out`: a
/// scratch directory, so that rank 0 alone writes the user's files. `None`
/// for rank 0 and single-process runs.
pub fn scratch_out(out: &Path) -> Option<PathBuf> {
    let world = world().ok().flatten().filter(|w| !w.is_leader())?;
    let name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "out".into());
    Some(scratch_root(world).join(name))
}

/// Exit status of a rank that stops because the run as a whole failed, not
/// its own input: Burn's collective engine failed or got stuck. `baton launch
/// --max-restarts` restarts the run on it and on [`EXIT_PEER_LOST`] (75 is
/// sysexits.h's `EX_TEMPFAIL`); any other failure exits with 1.
pub const EXIT_RESTARTABLE: i32 = 75;

/// Exit status of a rank that stops because another rank was lost: a
/// failure of the run as a whole too, but not where it started (76, after
/// [`EXIT_RESTARTABLE`]), so that a launcher names the rank that did fail.
pub const EXIT_PEER_LOST: i32 = 76;

static RESTARTABLE: AtomicBool = AtomicBool::new(false);

/// Marks this process's failure as the run's, not its input's: [`exit_code`]
/// is then [`EXIT_RESTARTABLE`].
pub(crate) fn mark_restartable() {
    RESTARTABLE.store(true, Ordering::SeqCst);
}

/// The status a failed stage exits with: [`EXIT_RESTARTABLE`] after a
/// failure of the run as a whole, else 1.
pub fn exit_code() -> i32 {
    if RESTARTABLE.load(Ordering::SeqCst) {
        EXIT_RESTARTABLE
    } else {
        1
    }
}

/// Ends this process at once with `status`, for a failure of the run as a
/// whole (called from watch threads: the main thread may be blocked inside
/// the engine).
pub(crate) fn exit_run_failed(status: i32) -> ! {
    cleanup();
    std::process::exit(status);
}

/// Removes this rank's scratch directory (ranks other than 0).
pub fn cleanup() {
    if let Ok(Some(world)) = world()
        && !world.is_leader()
    {
        let _ = std::fs::remove_dir_all(scratch_root(world));
    }
}

static STATE_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Records rank 0's working directory, where a resumed run's `train_state`
/// is read by every rank.
pub fn set_state_dir(dir: PathBuf) {
    let _ = STATE_DIR.set(dir);
}

/// Where this process reads the `train_state` a resumed run continues:
/// rank 0's working directory, which is `work` itself on rank 0.
pub fn state_dir(work: &Path) -> PathBuf {
    match STATE_DIR.get() {
        Some(dir) if !is_leader() => dir.clone(),
        _ => work.to_path_buf(),
    }
}

// ------------------------------------------------------------ control channel

/// Barrier counts, advanced by the watch threads: on rank 0 the `b` lines
/// received from all other ranks, elsewhere the `go` lines from rank 0.
static BARRIER: (Mutex<u64>, std::sync::Condvar) = (Mutex::new(0), std::sync::Condvar::new());

/// How many barriers this process has passed.
static PASSED: Mutex<u64> = Mutex::new(0);

/// Waits until every rank reached this barrier (through the control
/// channel). Burn's collective sessions need it: a rank that registers for
/// the next all-reduce while another still finishes the last one gets the
/// old session's peers and tensors.
pub fn barrier() -> Result<(), String> {
    let Some(world) = world()? else {
        return Ok(());
    };
    let Some(Ok(control)) = CONTROL.get() else {
        return Err("a barrier before joining the run".into());
    };
    let generation = {
        let mut passed = PASSED.lock().map_err(|e| e.to_string())?;
        *passed += 1;
        *passed
    };
    // Rank 0 waits for a `b` from each other rank, then answers `go`; the
    // others send `b` and wait for the `go`.
    let needed = if world.is_leader() {
        generation * (world.size as u64 - 1)
    } else {
        if let Ok(mut s) = control.peers[0].lock() {
            send(&mut s, "b");
        }
        generation
    };
    let (count, ready) = &BARRIER;
    let mut seen = count.lock().map_err(|e| e.to_string())?;
    while *seen < needed {
        seen = ready.wait(seen).map_err(|e| e.to_string())?;
    }
    drop(seen);
    if world.is_leader() {
        for peer in &control.peers {
            if let Ok(mut s) = peer.lock() {
                send(&mut s, "go");
            }
        }
    }
    Ok(())
}

fn barrier_arrival() {
    let (count, ready) = &BARRIER;
    if let Ok(mut seen) = count.lock() {
        *seen += 1;
        ready.notify_all();
    }
}

/// What [`join`] leaves running: the heartbeat threads and the peers' streams.
struct Control {
    /// Rank 0: one stream per other rank (index rank − 1); others: rank 0's.
    peers: Vec<Mutex<TcpStream>>,
    /// Set once this process finished training: losing a peer is then no
    /// longer fatal.
    finished: Arc<AtomicBool>,
}

static CONTROL: OnceLock<Result<Control, String>> = OnceLock::new();

/// Joins the run: every rank reaches rank 0's control channel with `hash`
/// (what must be equal across ranks: settings, inputs). Rank 0 waits for all
/// ranks and refuses one whose hash differs; then heartbeats run until
/// [`finish`]. Called once (later calls return the first result); a no-op
/// outside a data-parallel run.
pub fn join(hash: &str) -> Result<(), String> {
    let Some(world) = world()? else {
        return Ok(());
    };
    match CONTROL.get_or_init(|| {
        if world.is_leader() {
            lead(world, hash)
        } else {
            follow(world, hash)
        }
    }) {
        Ok(_) => {
            quiet::divert();
            quiet::engine_panics();
            Ok(())
        }
        Err(e) => Err(e.clone()),
    }
}

/// Whether [`join`] succeeded in this process.
pub fn joined() -> bool {
    matches!(CONTROL.get(), Some(Ok(_)))
}

/// Ends the heartbeat watch (this process trained to the end); tells the
/// peers, so that this process exiting is not taken for a lost rank.
pub fn finish() {
    quiet::restore();
    if let Some(Ok(control)) = CONTROL.get() {
        control.finished.store(true, Ordering::SeqCst);
        for peer in &control.peers {
            if let Ok(mut s) = peer.lock() {
                let _ = s.write_all(b"done\n");
            }
        }
    }
}

fn lost(rank: usize, why: &str) -> ! {
    eprintln!("error: rank {rank} was lost ({why}); every rank stops");
    exit_run_failed(EXIT_PEER_LOST);
}

fn send(stream: &mut TcpStream, line: &str) {
    let _ = stream.write_all(format!("{line}\n").as_bytes());
}

fn lead(world: &World, hash: &str) -> Result<Control, String> {
    sync::start_orchestrator(world)?;
    let addr = format!("0.0.0.0:{}", world.control_port());
    let listener = TcpListener::bind(&addr)
        .map_err(|e| format!("rank 0 cannot listen on {addr} (MASTER_PORT + 1): {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + start_timeout();
    let mut peers: Vec<Option<(TcpStream, BufReader<TcpStream>)>> =
        (1..world.size).map(|_| None).collect();
    let mut refusal = None;
    while peers.iter().any(Option::is_none) && refusal.is_none() {
        let (stream, from) = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<String> = peers
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.is_none())
                        .map(|(i, _)| (i + 1).to_string())
                        .collect();
                    return Err(format!(
                        "rank(s) {} did not join within {:.0} s (control channel {addr})",
                        missing.join(", "),
                        start_timeout().as_secs_f64()
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(format!("control channel {addr}: {e}")),
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = stream.set_nodelay(true);
        let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        let mut stream = stream;
        let words: Vec<&str> = line.split_whitespace().collect();
        let (rank, size, their_hash) = match words.as_slice() {
            ["hello", rank, size, hash] => (
                rank.parse::<usize>().unwrap_or(usize::MAX),
                size.parse::<usize>().unwrap_or(0),
                *hash,
            ),
            // Not a Baton rank (a port scan, a stray client).
            _ => continue,
        };
        let problem = if size != world.size {
            Some(format!(
                "rank {rank} ({from}) was started with WORLD_SIZE={size}, rank 0 with {}",
                world.size
            ))
        } else if rank == 0 || rank >= world.size {
            Some(format!("a process at {from} claims rank {rank}"))
        } else if peers[rank - 1].is_some() {
            Some(format!("two processes claim rank {rank}"))
        } else if their_hash != hash {
            Some(format!(
                "rank {rank} ({from}) was started with other settings or inputs than rank 0 (run hash {} vs {}): every rank needs the same config, parent and data",
                short(their_hash),
                short(hash)
            ))
        } else {
            None
        };
        match problem {
            Some(p) => {
                send(&mut stream, &format!("refuse {p}"));
                refusal = Some(p);
            }
            None => peers[rank - 1] = Some((stream, reader)),
        }
    }
    if let Some(reason) = refusal {
        for (stream, _) in peers.iter_mut().flatten() {
            send(stream, &format!("abort {reason}"));
        }
        return Err(reason);
    }
    let finished = Arc::new(AtomicBool::new(false));
    let mut streams = Vec::new();
    for (i, peer) in peers.into_iter().enumerate() {
        let (mut stream, reader) = peer.expect("every rank joined");
        send(&mut stream, "ok");
        let _ = stream.set_read_timeout(Some(heartbeat_timeout()));
        watch(i + 1, reader, finished.clone());
        streams.push(Mutex::new(stream));
    }
    let control = Control {
        peers: streams,
        finished,
    };
    heartbeat(&control);
    Ok(control)
}

fn follow(world: &World, hash: &str) -> Result<Control, String> {
    let addr = world.control_addr();
    let deadline = Instant::now() + start_timeout();
    let stream = loop {
        let attempt = resolve(&addr).and_then(|a| {
            TcpStream::connect_timeout(&a, Duration::from_secs(5)).map_err(|e| e.to_string())
        });
        match attempt {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                return Err(format!(
                    "cannot reach rank 0's control channel at {addr} (MASTER_ADDR:MASTER_PORT + 1) within {:.0} s: {e}",
                    start_timeout().as_secs_f64()
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let _ = stream.set_nodelay(true);
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    send(
        &mut writer,
        &format!("hello {} {} {hash}", world.rank, world.size),
    );
    let mut reader = BufReader::new(stream);
    let _ = reader.get_ref().set_read_timeout(Some(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1)),
    ));
    let mut line = String::new();
    let verdict = reader.read_line(&mut line);
    let line = line.trim();
    match (verdict, line.split_once(' ')) {
        (Ok(_), _) if line == "ok" => {}
        (Ok(_), Some(("refuse", reason))) => return Err(format!("refused by rank 0: {reason}")),
        (Ok(_), Some(("abort", reason))) => {
            return Err(format!("rank 0 stopped the run: {reason}"));
        }
        (Err(e), _) => return Err(format!("rank 0 ({addr}) did not answer: {e}")),
        _ => return Err(format!("rank 0 ({addr}) closed the control channel")),
    }
    let _ = reader.get_ref().set_read_timeout(Some(heartbeat_timeout()));
    let finished = Arc::new(AtomicBool::new(false));
    watch(0, reader, finished.clone());
    Ok(Control {
        peers: vec![Mutex::new(writer)],
        finished,
    })
    .inspect(heartbeat)
}

/// Sends a heartbeat to every peer twice a second until [`finish`].
fn heartbeat(control: &Control) {
    let streams: Vec<TcpStream> = control
        .peers
        .iter()
        .filter_map(|p| p.lock().ok()?.try_clone().ok())
        .collect();
    let finished = control.finished.clone();
    std::thread::spawn(move || {
        let mut streams = streams;
        while !finished.load(Ordering::SeqCst) {
            for s in &mut streams {
                let _ = s.write_all(b"hb\n");
            }
            std::thread::sleep(HEARTBEAT_EVERY);
        }
    });
}

/// Reads `peer`'s lines until it says `done`; a closed or silent connection
/// (or, on a rank other than 0, rank 0 reporting another rank lost) ends this
/// process unless it finished training.
fn watch(peer: usize, mut reader: BufReader<TcpStream>, finished: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut line = String::new();
        loop {
            line.clear();
            let read = reader.read_line(&mut line);
            if finished.load(Ordering::SeqCst) {
                return;
            }
            let why = match read {
                Ok(0) => "its connection closed".to_string(),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    format!("silent for {:.0} s", heartbeat_timeout().as_secs_f64())
                }
                Err(e) => e.to_string(),
                Ok(_) => match line.trim().split_once(' ') {
                    Some(("lost", who)) => {
                        let who = who.split_once(' ').map_or(who, |(r, _)| r);
                        lost(who.parse().unwrap_or(usize::MAX), "reported by rank 0")
                    }
                    _ if line.trim() == "done" => return,
                    _ if line.trim() == "b" || line.trim() == "go" => {
                        barrier_arrival();
                        continue;
                    }
                    _ => continue,
                },
            };
            if let Some(Ok(control)) = CONTROL.get() {
                // Rank 0 tells the other ranks, which may be blocked in an
                // all-reduce with the lost one.
                for (i, s) in control.peers.iter().enumerate() {
                    if i + 1 != peer
                        && let Ok(mut s) = s.lock()
                    {
                        send(&mut s, &format!("lost {peer}"));
                    }
                }
            }
            lost(peer, &why);
        }
    });
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world_of(vars: &[(&str, &str)]) -> Result<Option<World>, String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        World::from_vars(|name| map.get(name).cloned())
    }

    #[test]
    fn torchrun_variables_give_the_world() {
        assert_eq!(world_of(&[]).unwrap(), None);
        assert_eq!(
            world_of(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(),
            None
        );
        let w = world_of(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((w.rank, w.size, w.local_rank), (3, 4, 1));
        assert_eq!((w.orchestrator_port(), w.control_port()), (1234, 1235));
        assert_eq!(
            (w.data_port(0), w.data_port(1), w.data_port(2)),
            (1238, 1239, 1238)
        );
        assert_eq!(w.control_addr(), "node0:1235");
        let moved = world_of(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("MASTER_PORT", "29500"),
            ("BATON_DIST_PORT", "31000"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(moved.orchestrator_port(), 31000);
        assert!(!w.is_leader());
    }

    #[test]
    fn bad_torchrun_variables_are_named() {
        let err = world_of(&[("WORLD_SIZE", "2")]).unwrap_err();
        assert!(err.contains("RANK is not set"), "{err}");
        let err = world_of(&[("WORLD_SIZE", "2"), ("RANK", "2")]).unwrap_err();
        assert!(err.contains("RANK=2 is not below WORLD_SIZE=2"), "{err}");
        let err = world_of(&[("WORLD_SIZE", "two"), ("RANK", "0")]).unwrap_err();
        assert!(err.contains("WORLD_SIZE=two"), "{err}");
        let err =
            world_of(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "70000")]).unwrap_err();
        assert!(err.contains("MASTER_PORT=70000"), "{err}");
        let err = world_of(&[("WORLD_SIZE", "0")]).unwrap_err();
        assert!(err.contains("WORLD_SIZE=0"), "{err}");
    }
}

/// Burn's collective client prints a line to stdout for every connection it
/// opens, while a stage's stdout is its result (the checkpoint's path and
/// metrics). Between [`join`] and [`finish`] (training, when Baton itself
/// prints nothing there) stdout goes to /dev/null.
mod quiet {
    #[cfg(target_os = "linux")]
    static SAVED: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

    pub fn divert() {
        #[cfg(target_os = "linux")]
        {
            use std::io::Write;
            use std::sync::atomic::Ordering;
            let _ = std::io::stdout().flush();
            // SAFETY: plain descriptor calls on the process's own stdout
            // and stderr; a failed dup leaves stdout as it was.
            unsafe {
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
                let saved = libc::dup(1);
                if null >= 0
                    && saved >= 0
                    && SAVED
                        .compare_exchange(-1, saved, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                {
                    libc::dup2(null, 1);
                } else if saved >= 0 {
                    libc::close(saved);
                }
                if null >= 0 {
                    libc::close(null);
                }
            }
        }
    }

    /// Burn's collective threads panic when a peer disappears mid-transfer;
    /// the control channel then reports the lost rank in one line. Their
    /// panics print one line too, without a backtrace.
    pub fn engine_panics() {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            if !thread.name().is_some_and(|n| n.starts_with("tokio")) {
                return default(info);
            }
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let at = info
                .location()
                .map(|l| format!(" ({}:{})", l.file(), l.line()))
                .unwrap_or_default();
            eprintln!(
                "rank {}: Burn's collective engine stopped: {}{at}",
                super::rank(),
                message.lines().next().unwrap_or("")
            );
        }));
    }

    pub fn restore() {
        #[cfg(target_os = "linux")]
        {
            use std::io::Write;
            use std::sync::atomic::Ordering;
            let _ = std::io::stdout().flush();
            let saved = SAVED.swap(-1, Ordering::SeqCst);
            if saved >= 0 {
                // SAFETY: `saved` is the descriptor `divert` duplicated.
                unsafe {
                    libc::dup2(saved, 1);
                    libc::close(saved);
                }
            }
        }
    }
}
