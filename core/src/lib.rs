//! Baton's shared core: the model, tokenizer, data, training loop, checkpoint
//! contract, configuration and generation every stage builds on.
//!
//! Everything here is generic over `B: Backend`; only [`backend`] names a
//! concrete one.

pub mod backend;
pub mod chat;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod conversations;
pub mod data;
pub mod dist;
pub mod dropout;
pub mod error;
pub mod files;
pub mod fused;
pub mod generate;
pub mod grow;
pub mod kernels;
pub mod lora;
pub mod model;
pub mod moe;
pub mod optim;
pub mod stage_model;
pub mod tasks;
pub mod tokenizer;
pub mod train;

pub use burn;

/// Version recorded in every manifest.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// UTC timestamp (RFC 3339, seconds) for manifests.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Test support: the largest single allocation a thread makes, so the
/// readers' tests can show a crafted file never makes Baton allocate more
/// than a bound.
#[doc(hidden)]
pub mod alloc_probe {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static LARGEST: Cell<usize> = const { Cell::new(0) };
    }

    fn note(size: usize) {
        let _ = LARGEST.try_with(|l| {
            if size > l.get() {
                l.set(size);
            }
        });
    }

    /// Install in a test binary with `#[global_allocator]`.
    pub struct Probe;

    // SAFETY: every call is forwarded to the system allocator unchanged.
    unsafe impl GlobalAlloc for Probe {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size);
            unsafe { System.realloc(ptr, layout, new_size) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[cfg(test)]
    #[global_allocator]
    static PROBE: Probe = Probe;

    /// `f`'s result and the largest single allocation this thread made in it.
    pub fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
        LARGEST.with(|l| l.set(0));
        let out = f();
        (out, LARGEST.with(|l| l.get()))
    }

    /// Writes `cases` mutations of `valid` (see [`mutate`]) to a file named
    /// `fuzz.jsonl` and reads each with `read` (given the path and the case
    /// number): no read may panic or make one allocation of `bound` bytes or
    /// more, and every error is one line that names the file.
    pub fn check_reader(
        valid: &[u8],
        cases: u64,
        bound: usize,
        read: impl Fn(&std::path::Path, u64) -> Result<(), String> + std::panic::RefUnwindSafe,
    ) {
        let dir = std::env::temp_dir().join(format!("baton-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = dir.join(format!("fuzz-{n}.jsonl"));
        for i in 0..cases {
            std::fs::write(&file, mutate(valid, i)).unwrap();
            let (result, largest) =
                largest_allocation(|| std::panic::catch_unwind(|| read(&file, i)));
            let result = result.unwrap_or_else(|_| panic!("case {i} panicked"));
            assert!(largest < bound, "case {i}: allocated {largest} bytes");
            if let Err(e) = result {
                assert!(e.contains("fuzz-") && !e.contains('\n'), "case {i}: {e}");
            }
        }
        let _ = std::fs::remove_file(&file);
    }

    /// Deterministic mutations of a valid file: flipped bytes, a cut, a
    /// window overwritten with an extreme length; `i` picks which.
    pub fn mutate(valid: &[u8], i: u64) -> Vec<u8> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(i);
        let mut bytes = valid.to_vec();
        match i % 4 {
            0 => {
                for _ in 0..rng.random_range(1..8) {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] ^= 1 << rng.random_range(0..8);
                }
            }
            1 => bytes.truncate(rng.random_range(0..bytes.len())),
            2 => {
                let at = rng.random_range(0..bytes.len().saturating_sub(8).max(1));
                let v: u64 = match rng.random_range(0..4) {
                    0 => u64::MAX,
                    1 => u64::MAX - rng.random_range(0..64),
                    2 => 1 << rng.random_range(20..63),
                    _ => rng.random(),
                };
                let end = (at + 8).min(bytes.len());
                bytes[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
            _ => {
                let n = rng.random_range(0..4096);
                bytes = (0..n).map(|_| rng.random()).collect();
                if i % 8 == 3 && bytes.len() >= 4 {
                    // Random bytes behind a valid magic.
                    bytes[..4.min(valid.len())].copy_from_slice(&valid[..4.min(valid.len())]);
                }
            }
        }
        bytes
    }
}
