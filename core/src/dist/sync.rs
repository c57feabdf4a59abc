//! The seam between the training loop and the processes it runs in:
//! [`GradSync`]. One process: nothing to do. Several: gradients are
//! flattened in parameter order (the model's structure, the same in every
//! process, unlike Burn's random `ParamId`s) into buckets, summed with
//! `burn-collective`'s all-reduce, and put back.

use std::ops::Range;
use std::str::FromStr;
use std::time::Instant;

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_collective::{AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation};
use burn_communication::Address;

use super::World;

/// How a training step's gradients become the same in every process.
pub trait GradSync<B: AutodiffBackend, M: AutodiffModule<B>> {
    /// Which of a step's `micro` micro-batches (in order) this process
    /// computes: all of them in one process; a contiguous share per rank in
    /// several, so N ranks draw exactly the rows one process draws.
    fn share(&self, micro: usize) -> Range<usize>;
    /// Checks that every process holds the same `what` (a hash of its bytes).
    fn check_same(&mut self, what: &str, hash: &[u8], device: &B::Device) -> Result<(), String>;
    /// Sums `grads` and `extra` over all processes; afterwards every process
    /// holds the same gradients and the same `extra`.
    fn all_reduce(
        &mut self,
        model: &M,
        grads: GradientsParams,
        extra: &mut [f64],
        device: &B::Device,
    ) -> Result<GradientsParams, String>;
    /// Seconds the last [`GradSync::all_reduce`] took (`None` in one process).
    fn last_seconds(&self) -> Option<f64>;
    /// How many processes the run has.
    fn processes(&self) -> usize;
    /// Sums `values` over all processes (an MoE step's routing counts).
    fn sum_values(&mut self, values: &mut [f64], device: &B::Device) -> Result<(), String>;
}

/// One process: every micro-batch here, nothing to sum.
pub struct Local;

impl<B: AutodiffBackend, M: AutodiffModule<B>> GradSync<B, M> for Local {
    fn share(&self, micro: usize) -> Range<usize> {
        0..micro
    }
    fn check_same(&mut self, _: &str, _: &[u8], _: &B::Device) -> Result<(), String> {
        Ok(())
    }
    fn all_reduce(
        &mut self,
        _: &M,
        grads: GradientsParams,
        _: &mut [f64],
        _: &B::Device,
    ) -> Result<GradientsParams, String> {
        Ok(grads)
    }
    fn last_seconds(&self) -> Option<f64> {
        None
    }
    fn processes(&self) -> usize {
        1
    }
    fn sum_values(&mut self, _: &mut [f64], _: &B::Device) -> Result<(), String> {
        Ok(())
    }
}

/// The [`GradSync`] of this process: [`Local`] alone, [`Collective`] in a
/// data-parallel run (which must have been joined, see [`super::join`]).
pub fn grad_sync<B: AutodiffBackend, M: AutodiffModule<B>>()
-> Result<Box<dyn GradSync<B, M>>, String> {
    match super::world()? {
        None => Ok(Box::new(Local)),
        Some(world) => {
            if !super::joined() {
                return Err(
                    "a data-parallel rank must join the run before training (a stage without StageDir::record_run?)"
                        .into(),
                );
            }
            Ok(Box::new(Collective::new(world)?))
        }
    }
}

/// Starts Burn's collective orchestrator on rank 0, in a thread of its own
/// (`MASTER_PORT`).
pub(super) fn start_orchestrator(world: &World) -> Result<(), String> {
    let port = world.orchestrator_port();
    // The orchestrator only logs a failure to bind: check the port first.
    std::net::TcpListener::bind(("0.0.0.0", port))
        .map_err(|e| format!("rank 0 cannot listen on MASTER_PORT {port}: {e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the collective orchestrator: {e}"))?;
    std::thread::spawn(move || {
        runtime.block_on(burn_collective::start_global_orchestrator(port));
    });
    Ok(())
}

/// Default all-reduce bucket, MB of f32 gradients.
const DEFAULT_BUCKET_MB: f64 = 8.0;

/// Largest bucket accepted. Buckets of 25 MB failed in the first tests,
/// which also had the session races fixed since; larger buckets have not
/// been tried again.
const MAX_BUCKET_MB: f64 = 10.0;

/// Several processes: Burn's collective all-reduce over WebSocket (each
/// process one node of one device).
pub struct Collective {
    world: World,
    /// The host other nodes reach this process at.
    host: String,
    /// The configuration every session shares (the data port alternates).
    config: CollectiveConfig,
    /// All-reduce sessions so far.
    sessions: u64,
    watchdog: Watchdog,
    peer: PeerId,
    /// Elements per all-reduce (`BATON_BUCKET_MB`, default 8 MB of f32).
    bucket: usize,
    last: Option<f64>,
}

impl Collective {
    fn new(world: &World) -> Result<Self, String> {
        let strategy = match std::env::var("BATON_ALL_REDUCE").as_deref() {
            Err(_) | Ok("ring") => AllReduceStrategy::Ring,
            Ok("tree") => AllReduceStrategy::Tree(2),
            Ok("centralized") => AllReduceStrategy::Centralized,
            Ok(other) => {
                return Err(format!(
                    "BATON_ALL_REDUCE={other}: expected ring, tree or centralized"
                ));
            }
        };
        let global = address(&format!(
            "ws://{}:{}",
            world.master_addr,
            world.orchestrator_port()
        ))?;
        let config = CollectiveConfig::default()
            .with_num_devices(1)
            .with_num_nodes(world.size as u32)
            .with_global_address(global)
            .with_global_all_reduce_strategy(strategy);
        let peer = PeerId::from(0u32);
        let mb = match std::env::var("BATON_BUCKET_MB") {
            Err(_) => DEFAULT_BUCKET_MB,
            Ok(v) => v
                .parse::<f64>()
                .ok()
                .filter(|mb| *mb > 0.0 && *mb <= MAX_BUCKET_MB)
                .ok_or_else(|| {
                    format!(
                        "BATON_BUCKET_MB={v}: expected a size in MB above 0 and at most {MAX_BUCKET_MB}"
                    )
                })?,
        };
        Ok(Self {
            world: world.clone(),
            host: own_host(world),
            config,
            sessions: 0,
            watchdog: Watchdog::start(world.rank)?,
            peer,
            bucket: ((mb * 1e6 / 4.0) as usize).max(1),
            last: None,
        })
    }

    /// Sums a flat f32 buffer over all processes. Padded to more elements
    /// than there are processes (the ring splits it into that many slices).
    fn sum<IB: Backend>(&mut self, flat: Tensor<IB, 1>) -> Result<Tensor<IB, 1>, String> {
        let n = flat.dims()[0];
        let min = 2 * self.world.size;
        let flat = if n < min {
            let pad = Tensor::<IB, 1>::zeros([min - n], &flat.device());
            Tensor::cat(vec![flat, pad], 0)
        } else {
            flat
        };
        let device = flat.device();
        let primitive = flat.into_primitive().tensor();
        // burn-collective 0.21's global sync keeps the peers of its first
        // sync and waits forever in the second (`SyncService::sync` clears a
        // copy of its list): each all-reduce is a session of its own, the
        // pattern Burn's multi-node test runs.
        // Sessions do not overlap: every rank finished the last one (and
        // its data service moves to the other of its two ports).
        let port = self.world.data_port(self.sessions);
        self.sessions += 1;
        let node = address(&format!("ws://{}:{port}", self.host))?;
        let config = self
            .config
            .clone()
            .with_node_address(node)
            .with_data_service_port(port);
        let session = self.sessions;
        // The pending compute (the backward pass on a GPU) finishes before
        // the exchange starts, so the watchdog times the transfer alone.
        IB::sync(&device).map_err(|e| format!("device sync before the all-reduce: {e:?}"))?;
        // Errors from here on are the engine's or the network's: the run may
        // be restarted.
        let engine = |what: &str, e: &dyn std::fmt::Debug| {
            super::mark_restartable();
            format!("{what} failed (Burn's collective engine): {e:?}")
        };
        self.watchdog.enter(session, "registration");
        burn_collective::register::<IB>(self.peer, device, config)
            .map_err(|e| engine("collective registration", &e))?;
        self.watchdog.enter(session, EXCHANGE);
        let summed = burn_collective::all_reduce::<IB>(self.peer, primitive, ReduceOperation::Sum)
            .map_err(|e| engine("all-reduce", &e))?;
        self.watchdog.enter(session, "finish");
        burn_collective::finish_collective::<IB>(self.peer)
            .map_err(|e| engine("collective finish", &e))?;
        self.watchdog.enter(session, "barrier");
        super::barrier()?;
        self.watchdog.leave();
        Ok(Tensor::<IB, 1>::from_primitive(TensorPrimitive::Float(summed)).narrow(0, 0, n))
    }
}

/// Each f64 as two f32 (value and remainder), so sums over processes keep
/// nearly f64 precision.
fn split_f64(values: &[f64]) -> Vec<f32> {
    values
        .iter()
        .flat_map(|v| {
            let hi = *v as f32;
            [hi, (*v - f64::from(hi)) as f32]
        })
        .collect()
}

/// The f64s back from the sums of their [`split_f64`] pairs.
fn join_f64(values: &mut [f64], pairs: &[f32]) {
    for (v, pair) in values.iter_mut().zip(pairs.chunks(2)) {
        *v = f64::from(pair[0]) + f64::from(pair[1]);
    }
}

fn address(s: &str) -> Result<Address, String> {
    Address::from_str(s).map_err(|e| format!("{s}: {e}"))
}

/// The address other nodes reach this process at: the local end of a route
/// to `MASTER_ADDR` (no packet is sent), or `BATON_NODE_ADDR` when set.
fn own_host(world: &World) -> String {
    if let Ok(addr) = std::env::var("BATON_NODE_ADDR") {
        return addr;
    }
    let target = format!("{}:{}", world.master_addr, world.orchestrator_port());
    super::resolve(&target)
        .ok()
        .and_then(|remote| {
            let socket = std::net::UdpSocket::bind(("0.0.0.0", 0)).ok()?;
            socket.connect(remote).ok()?;
            Some(socket.local_addr().ok()?.ip().to_string())
        })
        .unwrap_or_else(|| "127.0.0.1".into())
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> GradSync<B, M> for Collective {
    fn sum_values(&mut self, values: &mut [f64], device: &B::Device) -> Result<(), String> {
        let pairs = split_f64(values);
        let k = pairs.len();
        let summed = self
            .sum(Tensor::<B::InnerBackend, 1>::from_data(
                TensorData::new(pairs, [k]),
                device,
            ))?
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| format!("{e:?}"))?;
        join_f64(values, &summed);
        Ok(())
    }

    fn share(&self, micro: usize) -> Range<usize> {
        let (rank, size) = (self.world.rank, self.world.size);
        let start = micro * rank / size;
        start..micro * (rank + 1) / size
    }

    fn check_same(&mut self, what: &str, hash: &[u8], device: &B::Device) -> Result<(), String> {
        // 16-bit pieces: exact in f32, and so are their sums over ranks.
        let pieces: Vec<f32> = hash
            .chunks(2)
            .take(8)
            .map(|c| f32::from(u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .collect();
        let n = pieces.len();
        let mine =
            Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(pieces.clone(), [n]), device);
        let sums: Vec<f32> = self
            .sum(mine)?
            .into_data()
            .to_vec()
            .map_err(|e| format!("{e:?}"))?;
        let size = self.world.size as f32;
        if sums.iter().zip(&pieces).any(|(s, p)| *s != p * size) {
            return Err(format!(
                "rank {}: {what} differs from other ranks' (every rank must start from the same parent and seed)",
                self.world.rank
            ));
        }
        Ok(())
    }

    fn all_reduce(
        &mut self,
        model: &M,
        mut grads: GradientsParams,
        extra: &mut [f64],
        device: &B::Device,
    ) -> Result<GradientsParams, String> {
        let started = Instant::now();
        let flat = gather(model, &mut grads, device);
        let extras = split_f64(extra);
        // One buffer, gradients then extras, all-reduced in buckets of at
        // most `self.bucket` elements (a large tensor spans several).
        let mut sizes: Vec<usize> = flat.iter().map(|t| t.dims()[0]).collect();
        let k = extras.len();
        let mut parts = flat;
        parts.push(Tensor::from_data(TensorData::new(extras, [k]), device));
        sizes.push(k);
        let all = Tensor::cat(parts, 0);
        let total_len: usize = sizes.iter().sum();
        let mut chunks = Vec::with_capacity(total_len.div_ceil(self.bucket));
        let mut offset = 0;
        while offset < total_len {
            let len = self.bucket.min(total_len - offset);
            chunks.push(self.sum(all.clone().narrow(0, offset, len))?);
            offset += len;
        }
        let all = Tensor::cat(chunks, 0);
        let mut summed: Vec<Tensor<B::InnerBackend, 1>> = Vec::with_capacity(sizes.len());
        let mut offset = 0;
        for len in &sizes {
            summed.push(all.clone().narrow(0, offset, *len));
            offset += len;
        }
        let extra_sums = summed
            .pop()
            .expect("the extras' part")
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| format!("{e:?}"))?;
        join_f64(extra, &extra_sums);
        scatter(model, &mut grads, summed);
        self.last = Some(started.elapsed().as_secs_f64());
        Ok(grads)
    }

    fn last_seconds(&self) -> Option<f64> {
        self.last
    }

    fn processes(&self) -> usize {
        self.world.size
    }
}

/// Takes every trainable parameter's gradient out of `grads`, flattened, in
/// `model`'s parameter order (the model's structure, the same in every
/// process and on every device), with zeros on `device` where none was
/// computed.
pub(crate) fn gather<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    device: &B::Device,
) -> Vec<Tensor<B::InnerBackend, 1>> {
    let mut gather = Gather::<B> {
        grads,
        flat: Vec::new(),
        device,
    };
    model.visit(&mut gather);
    gather.flat
}

/// Registers `summed` (one flat tensor per trainable parameter, in the
/// order [`gather`] took them) as `grads`, shaped as `model`'s parameters.
pub(crate) fn scatter<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    summed: Vec<Tensor<B::InnerBackend, 1>>,
) {
    let mut scatter = Scatter::<B> {
        grads,
        summed: summed.into_iter(),
    };
    model.visit(&mut scatter);
}

struct Gather<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    flat: Vec<Tensor<B::InnerBackend, 1>>,
    device: &'a B::Device,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Gather<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        if !value.is_require_grad() {
            return;
        }
        let dims = value.dims();
        let numel: usize = dims.iter().product();
        let grad = self
            .grads
            .remove::<B::InnerBackend, D>(param.id)
            .unwrap_or_else(|| Tensor::zeros(dims, self.device));
        self.flat.push(grad.reshape([numel]));
    }
}

struct Scatter<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    summed: std::vec::IntoIter<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scatter<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        if !value.is_require_grad() {
            return;
        }
        let flat = self
            .summed
            .next()
            .expect("one summed gradient per trainable parameter");
        self.grads
            .register::<B::InnerBackend, D>(param.id, flat.reshape(value.dims()));
    }
}

/// Ends the process (with [`super::EXIT_RESTARTABLE`]) when one all-reduce
/// session makes no progress: Burn's collective engine can hang, and a stuck
/// run must fail in bounded time (its last `train_state` resumes it, and
/// `baton launch --max-restarts` does so by itself).
///
/// Any phase may take `BATON_ALLREDUCE_TIMEOUT` seconds (default 60):
/// registration waits for the slowest rank's compute. The exchange itself is
/// transfer only (the device is synchronised before registration), so it gets
/// `BATON_EXCHANGE_TIMEOUT` seconds ([`EXCHANGE_FLOOR_S`] by default) plus
/// 20 times the longest exchange so far, if that is less. That is where
/// burn-collective 0.21 hangs: `SyncService::sync`, the end of every
/// exchange, checks its peer list and only then waits for a notification
/// (`Notify::notify_waiters`, which keeps no permit), so a peer's request
/// arriving in between is lost and the rank waits forever, with the sum
/// already made (about once in 6 000 sessions on the development machine).
struct Watchdog {
    state: Watched,
}

/// An exchange (registered; sending, receiving and the engine's closing sync)
/// that takes longer than this plus 20 times the longest so far is stuck
/// (`BATON_EXCHANGE_TIMEOUT` sets it).
const EXCHANGE_FLOOR_S: f64 = 10.0;

#[derive(Default)]
struct WatchState {
    /// The session and phase under way, and since when.
    current: Option<(u64, &'static str, Instant)>,
    /// The longest finished exchange phase, seconds.
    longest_exchange: f64,
}

type Watched = std::sync::Arc<std::sync::Mutex<WatchState>>;

/// The phase of a session that is the exchange itself.
const EXCHANGE: &str = "all-reduce";

impl WatchState {
    /// The session and phase that have run past their limit, and the limit.
    fn stuck(&self, limit: f64, floor: f64) -> Option<(u64, &'static str, f64)> {
        let (session, phase, since) = self.current?;
        let allowed = if phase == EXCHANGE {
            limit.min(floor + 20.0 * self.longest_exchange)
        } else {
            limit
        };
        (since.elapsed().as_secs_f64() > allowed).then_some((session, phase, allowed))
    }

    fn end_phase(&mut self) {
        if let Some((_, EXCHANGE, since)) = self.current {
            self.longest_exchange = self.longest_exchange.max(since.elapsed().as_secs_f64());
        }
    }
}

impl Watchdog {
    fn start(rank: usize) -> Result<Self, String> {
        let seconds = |name: &str, default: f64| match std::env::var(name) {
            Err(_) => Ok(default),
            Ok(v) => v
                .parse::<f64>()
                .ok()
                .filter(|s| *s > 0.0 && s.is_finite())
                .ok_or_else(|| format!("{name}={v}: expected seconds above 0")),
        };
        let limit = seconds("BATON_ALLREDUCE_TIMEOUT", 60.0)?;
        let floor = seconds("BATON_EXCHANGE_TIMEOUT", EXCHANGE_FLOOR_S)?;
        let state: Watched = Default::default();
        let watched = state.clone();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_millis(250));
                let stuck = watched
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .stuck(limit, floor);
                if let Some((session, phase, allowed)) = stuck {
                    eprintln!(
                        "error: rank {rank}: all-reduce session {session} stuck in {phase} for {allowed:.0} s (Burn's collective engine); --resume continues from the last train_state"
                    );
                    super::exit_run_failed(super::EXIT_RESTARTABLE);
                }
            }
        });
        Ok(Self { state })
    }

    fn enter(&self, session: u64, phase: &'static str) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.end_phase();
        state.current = Some((session, phase, Instant::now()));
    }

    fn leave(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.end_phase();
        state.current = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn since(seconds: u64) -> Instant {
        Instant::now() - Duration::from_secs(seconds)
    }

    #[test]
    fn an_exchange_is_stuck_sooner_than_a_registration() {
        let mut state = WatchState::default();
        assert_eq!(state.stuck(60.0, EXCHANGE_FLOOR_S), None);
        // No exchange timed yet: 10 s.
        state.current = Some((3, EXCHANGE, since(11)));
        assert_eq!(
            state.stuck(60.0, EXCHANGE_FLOOR_S),
            Some((3, EXCHANGE, EXCHANGE_FLOOR_S))
        );
        // Registration waits for the slowest rank: the whole limit.
        state.current = Some((3, "registration", since(11)));
        assert_eq!(state.stuck(60.0, EXCHANGE_FLOOR_S), None);
        state.current = Some((3, "registration", since(61)));
        assert_eq!(
            state.stuck(60.0, EXCHANGE_FLOOR_S),
            Some((3, "registration", 60.0))
        );
        // A finished 2 s exchange raises the exchange's limit to 50 s, and
        // the whole limit caps it.
        state.current = Some((4, EXCHANGE, since(2)));
        state.end_phase();
        assert!(state.longest_exchange >= 2.0 && state.longest_exchange < 3.0);
        state.current = Some((5, EXCHANGE, since(11)));
        assert_eq!(state.stuck(60.0, EXCHANGE_FLOOR_S), None);
        state.current = Some((5, EXCHANGE, since(55)));
        assert_eq!(state.stuck(60.0, EXCHANGE_FLOOR_S).map(|s| s.0), Some(5));
        state.current = Some((5, EXCHANGE, since(31)));
        assert_eq!(
            state.stuck(30.0, EXCHANGE_FLOOR_S),
            Some((5, EXCHANGE, 30.0))
        );
        // BATON_EXCHANGE_TIMEOUT raises the floor (a slow network).
        assert_eq!(state.stuck(100.0, 60.0), None);
        // Other phases do not count as exchanges.
        state.current = Some((6, "finish", since(200)));
        state.end_phase();
        assert!(state.longest_exchange < 3.0);
    }
}
