//! Baton's shared core: the model, tokenizer, data, training loop, checkpoint
//! contract, configuration and generation every stage builds on.
//!
//! Everything here is generic over `B: Backend`; only [`backend`] names a
//! concrete one.

pub mod align;
pub mod backend;
pub mod chat;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod conversations;
pub mod data;
pub mod files;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod hf;
pub mod model;
pub mod optim;
pub mod report;
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
