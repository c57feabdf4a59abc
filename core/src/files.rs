//! The user's files, read and written without harm.
//!
//! - Every read is of a regular file (a directory, FIFO or device is named as
//!   such, never opened) and under a size cap, with a one-line error.
//! - Every output path is made absolute and checked before anything is
//!   created: `/`, the home directory, the current directory or one above it,
//!   an input of the command, and any place inside a checkpoint are refused.
//! - A directory output is written in `<name>.partial/`, held by an exclusive
//!   lock for the whole run, and swapped into place in one atomic exchange;
//!   only something Baton wrote (a checkpoint, an export, its own `.partial`)
//!   is ever replaced, and only when the user asked (`--force`).
//! - A single-file output refuses an existing file unless `--force`, and is
//!   written to a temporary name beside it and linked or renamed into place.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Component, Path, PathBuf};

/// `{path}: {reason}`: every error of this module names the path.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct FileError {
    pub path: PathBuf,
    pub reason: String,
}

impl FileError {
    pub fn new(path: &Path, reason: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// Size caps of the files Baton reads whole.
pub mod cap {
    /// TOML configs.
    pub const CONFIG: u64 = 16 << 20;
    /// JSON files: manifests, HF `config.json`, shard indexes, train state.
    pub const JSON: u64 = 64 << 20;
    /// `tokenizer.json`.
    pub const TOKENIZER: u64 = 512 << 20;
    /// Corpora and JSONL data.
    pub const TEXT: u64 = 8 << 30;
    /// Weights: safetensors and GGUF.
    pub const WEIGHTS: u64 = 64 << 30;
}

/// The lock file inside a directory Baton is writing; it holds the writer's PID.
pub const LOCK_FILE: &str = ".baton-lock";

/// Suffix of Baton's temporary files (never part of a checkpoint).
pub const TMP_SUFFIX: &str = ".baton-tmp";

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// What a path that is not a regular file is, for messages.
fn kind_of(meta: &fs::Metadata) -> &'static str {
    let kind = meta.file_type();
    if kind.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if kind.is_char_device() || kind.is_block_device() {
            return "a device";
        }
        if kind.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}

/// The size of `path` if it is an existing regular file (symlinks followed);
/// otherwise one line saying what it is. `what` names the file's role
/// ("corpus", "config", …).
pub fn regular_file(path: &Path, what: &str) -> Result<u64, FileError> {
    match fs::metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            Err(FileError::new(path, format!("{what} file not found")))
        }
        Err(e) => Err(FileError::new(path, format!("cannot read {what}: {e}"))),
        Ok(m) if m.is_file() => Ok(m.len()),
        Ok(m) => Err(FileError::new(
            path,
            format!("is {}, not a {what} file", kind_of(&m)),
        )),
    }
}

/// Reads a whole regular file of at most `cap` bytes.
pub fn read_bounded(path: &Path, what: &str, cap: u64) -> Result<Vec<u8>, FileError> {
    let len = regular_file(path, what)?;
    let too_big = |len: u64| {
        FileError::new(
            path,
            format!(
                "is {}, more than the {} Baton reads as a {what} file",
                human_bytes(len),
                human_bytes(cap)
            ),
        )
    };
    if len > cap {
        return Err(too_big(len));
    }
    let file = File::open(path).map_err(|e| FileError::new(path, format!("cannot open: {e}")))?;
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| FileError::new(path, format!("cannot read: {e}")))?;
    if bytes.len() as u64 > cap {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Reads a UTF-8 text file of at most `cap` bytes; a leading UTF-8 byte-order
/// mark is dropped (as most tools do).
pub fn read_text(path: &Path, what: &str, cap: u64) -> Result<String, FileError> {
    let bytes = read_bounded(path, what, cap)?;
    text_from_bytes(bytes, path)
}

/// UTF-8 text from bytes read from `path`, without a leading byte-order mark.
pub fn text_from_bytes(mut bytes: Vec<u8>, path: &Path) -> Result<String, FileError> {
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        bytes.drain(..3);
    }
    String::from_utf8(bytes).map_err(|e| {
        FileError::new(
            path,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

// ---------------------------------------------------------------- output paths

/// `path` made absolute with `.` and `..` resolved by name (it need not exist).
pub fn normalize(path: &Path) -> Result<PathBuf, FileError> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| FileError::new(path, format!("no current directory: {e}")))?
            .join(path)
    };
    let mut out = PathBuf::new();
    for part in absolute.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    Ok(out)
}

/// `path` absolute, with every existing ancestor's symlinks resolved (the
/// last component is kept as named).
fn real_path(path: &Path) -> Result<PathBuf, FileError> {
    let path = normalize(path)?;
    let Some(name) = path.file_name() else {
        return Ok(path);
    };
    let parent = path.parent().unwrap_or(Path::new("/"));
    // The deepest existing ancestor, canonicalised, then the rest as named.
    let mut existing = parent.to_path_buf();
    let mut rest = Vec::new();
    while fs::canonicalize(&existing).is_err() {
        match (existing.file_name(), existing.parent()) {
            (Some(n), Some(p)) => {
                rest.push(n.to_os_string());
                existing = p.to_path_buf();
            }
            _ => break,
        }
    }
    let mut real = fs::canonicalize(&existing).unwrap_or(existing);
    for part in rest.iter().rev() {
        real.push(part);
    }
    real.push(name);
    Ok(real)
}

fn canonical(path: &Path) -> Option<PathBuf> {
    fs::canonicalize(path).ok()
}

/// Whether `dir` holds a `manifest.json` (a complete checkpoint, or one a
/// reader will check further).
fn has_manifest(dir: &Path) -> bool {
    dir.join(MANIFEST).is_file()
}

/// The file that makes a directory a checkpoint (the checkpoint module's
/// contract; named here so that the output discipline, which refuses to write
/// inside a checkpoint, needs nothing from it).
pub const MANIFEST: &str = "manifest.json";

/// Checks an output path before anything is written and returns it absolute.
///
/// Refused: the root, the home directory, the current directory or any
/// directory above them; a symbolic link as the last component; any of
/// `inputs` (what the command reads: a parent checkpoint, a source
/// directory), a directory holding one, or a place inside one; any place
/// inside a checkpoint or inside Baton's working directory.
pub fn output_path(path: &Path, inputs: &[&Path]) -> Result<PathBuf, FileError> {
    let real = real_path(path)?;
    let refuse = |reason: String| Err(FileError::new(path, reason));
    if real.file_name().is_none() {
        return refuse("is the root directory; Baton will not write there".into());
    }
    if fs::symlink_metadata(&real).is_ok_and(|m| m.file_type().is_symlink()) {
        return refuse("is a symbolic link; name the directory or file itself".into());
    }
    if let Some(cwd) = std::env::current_dir().ok().and_then(|c| canonical(&c))
        && cwd.starts_with(&real)
    {
        return refuse(
            "is the current directory or one above it; Baton will not replace it".into(),
        );
    }
    if let Some(home) = std::env::var_os("HOME").and_then(|h| canonical(Path::new(&h)))
        && home.starts_with(&real)
    {
        return refuse("is the home directory or one above it; Baton will not replace it".into());
    }
    for input in inputs {
        let Some(input) = canonical(input).or_else(|| normalize(input).ok()) else {
            continue;
        };
        if input.starts_with(&real) {
            return refuse(format!(
                "is (or holds) {}, an input of this command",
                input.display()
            ));
        }
        if real.starts_with(&input) {
            return refuse(format!(
                "lies inside {}, an input of this command",
                input.display()
            ));
        }
    }
    for ancestor in real.ancestors().skip(1) {
        if has_manifest(ancestor) {
            return refuse(format!(
                "lies inside the checkpoint {}; write beside it, not in it",
                ancestor.display()
            ));
        }
        if ancestor.join(LOCK_FILE).is_file() {
            return refuse(format!(
                "lies inside {}, a directory Baton is writing",
                ancestor.display()
            ));
        }
    }
    Ok(real)
}

// ---------------------------------------------------------------- single files

/// Writes a single-file output: refuses an existing file unless `force`, and
/// anything that is not a regular file even then; never inside a checkpoint
/// (see [`output_path`]). Written beside the target and linked (or, with
/// `force`, renamed) into place, so a reader never sees half a file.
pub fn write_new_file(
    path: &Path,
    bytes: &[u8],
    force: bool,
    inputs: &[&Path],
) -> Result<PathBuf, FileError> {
    let real = output_path(path, inputs)?;
    match fs::symlink_metadata(&real) {
        Ok(m) if m.is_file() && !force => {
            return Err(FileError::new(
                path,
                "already exists (pass --force to replace it, or choose another path)",
            ));
        }
        Ok(m) if !m.is_file() => {
            return Err(FileError::new(
                path,
                format!("is {}; Baton writes a file here only", kind_of(&m)),
            ));
        }
        _ => {}
    }
    if let Some(parent) = real.parent() {
        fs::create_dir_all(parent).map_err(|e| FileError::new(parent, e.to_string()))?;
    }
    let tmp = tmp_path(&real);
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    };
    write().map_err(|e| FileError::new(&tmp, e.to_string()))?;
    let placed = if force {
        fs::rename(&tmp, &real)
    } else {
        // A hard link never replaces: a file that appeared meanwhile survives.
        fs::hard_link(&tmp, &real).and_then(|_| fs::remove_file(&tmp))
    };
    if let Err(e) = placed {
        let _ = fs::remove_file(&tmp);
        let reason = if e.kind() == ErrorKind::AlreadyExists {
            "already exists (pass --force to replace it, or choose another path)".to_string()
        } else {
            e.to_string()
        };
        return Err(FileError::new(path, reason));
    }
    Ok(real)
}

/// `.<name>.<pid>.baton-tmp` beside `path`: a name no user file shares.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".{}{TMP_SUFFIX}", std::process::id()));
    path.with_file_name(name)
}

// ---------------------------------------------------------------- the lock

/// An exclusive lock on `<dir>/.baton-lock`, held while this value lives (the
/// operating system drops it when the process dies, so a lock left by a
/// killed run is stale and taken over).
#[derive(Debug)]
pub struct DirLock {
    /// Held open for the lock; never read after `acquire`.
    _file: File,
}

impl DirLock {
    pub fn acquire(dir: &Path) -> Result<Self, FileError> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| FileError::new(&path, format!("cannot create the lock: {e}")))?;
        let mut previous = String::new();
        let _ = file.read_to_string(&mut previous);
        let previous = previous.trim().to_string();
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = if previous.is_empty() {
                    "another process".to_string()
                } else {
                    format!("PID {previous}")
                };
                return Err(FileError::new(
                    dir,
                    format!(
                        "is being written by another Baton run ({holder}); wait for it or stop it first"
                    ),
                ));
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(FileError::new(&path, format!("cannot lock: {e}")));
            }
        }
        if !previous.is_empty() && previous != std::process::id().to_string() {
            tracing::info!(
                "{}: taking over a stale lock (PID {previous} is no longer running)",
                dir.display()
            );
        }
        let write = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            use std::io::Seek;
            file.seek(std::io::SeekFrom::Start(0))?;
            writeln!(file, "{}", std::process::id())?;
            file.sync_all()
        };
        write(&mut file).map_err(|e| FileError::new(&path, e.to_string()))?;
        Ok(Self { _file: file })
    }
}

/// Whether `dir` has a lock file that a live process holds.
pub fn is_locked(dir: &Path) -> bool {
    let Ok(file) = OpenOptions::new().read(true).open(dir.join(LOCK_FILE)) else {
        return false;
    };
    matches!(file.try_lock_shared(), Err(fs::TryLockError::WouldBlock))
}

// ---------------------------------------------------------------- directory outputs

/// What may be replaced at a directory output's final path (with `--force`),
/// and how to name it in messages.
#[derive(Clone, Copy, Debug)]
pub struct OutputKind {
    /// "checkpoint", "export".
    pub noun: &'static str,
    /// Whether a directory is one Baton wrote of this kind.
    pub is_ours: fn(&Path) -> bool,
    /// Whether an interrupted run can be continued (`--resume`).
    pub resumable: bool,
}

/// How a directory output treats what it finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Start anew; `force` replaces a finished output of this kind and
    /// discards Baton's own interrupted `.partial`.
    Fresh { force: bool },
    /// Continue in the existing `.partial`.
    Resume,
}

/// `<dir>.partial`, the working directory of an output `<dir>`.
pub fn partial_dir(dir: &Path) -> PathBuf {
    sibling(dir, ".partial")
}

/// `<dir><suffix>`: derived from the whole name (`model.v1` → `model.v1.partial`).
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    dir.with_file_name(name)
}

fn is_empty_dir(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none())
}

/// Whether a `.partial` directory is Baton's own: it carries Baton's lock
/// file, or is a finished output left by an interrupted replacement, or (from
/// Baton versions before the lock) holds a train state or `run.toml`.
pub fn is_own_partial(work: &Path, kind: &OutputKind) -> bool {
    work.join(LOCK_FILE).is_file()
        || (kind.is_ours)(work)
        || work.join("train_state/state.json").is_file()
        || work.join("train_state.old/state.json").is_file()
        || work.join("run.toml").is_file()
        || is_empty_dir(work)
}

/// The checks of [`OutputDir::open`], touching nothing: the absolute final and
/// working paths, or one line saying why not.
pub fn check_output_dir(
    dir: &Path,
    kind: &OutputKind,
    mode: Mode,
    inputs: &[&Path],
) -> Result<(PathBuf, PathBuf), FileError> {
    let final_dir = output_path(dir, inputs)?;
    let work = partial_dir(&final_dir);
    output_path(&work, inputs)?;
    let noun = kind.noun;
    match fs::symlink_metadata(&final_dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(FileError::new(dir, e.to_string())),
        Ok(m) if !m.is_dir() => {
            return Err(FileError::new(
                dir,
                format!(
                    "exists and is {}, not a Baton {noun}; Baton will not replace it",
                    if m.is_file() { "a file" } else { kind_of(&m) }
                ),
            ));
        }
        Ok(_) if is_empty_dir(&final_dir) => {}
        Ok(_) if (kind.is_ours)(&final_dir) => match mode {
            Mode::Fresh { force: false } => {
                return Err(FileError::new(
                    dir,
                    format!("already holds a complete {noun} (pass --force to replace it)"),
                ));
            }
            // Finishing a resume would replace it without the user asking.
            Mode::Resume => {
                return Err(FileError::new(
                    dir,
                    format!(
                        "already holds a complete {noun}; --resume continues only an interrupted run (start over with --force instead)"
                    ),
                ));
            }
            Mode::Fresh { force: true } => {}
        },
        Ok(_) => {
            return Err(FileError::new(
                dir,
                format!(
                    "exists and is not a Baton {noun}; Baton will not replace it (choose another directory)"
                ),
            ));
        }
    }
    match fs::symlink_metadata(&work) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            if mode == Mode::Resume {
                return Err(FileError::new(
                    dir,
                    format!(
                        "nothing to resume: {} does not exist",
                        work.file_name().unwrap_or_default().to_string_lossy()
                    ),
                ));
            }
        }
        Err(e) => return Err(FileError::new(&work, e.to_string())),
        Ok(m) if !m.is_dir() || !is_own_partial(&work, kind) => {
            return Err(FileError::new(
                &work,
                "exists and is not Baton's working directory; Baton will not replace it (move it away)",
            ));
        }
        Ok(_) if is_locked(&work) => {
            let pid = fs::read_to_string(work.join(LOCK_FILE)).unwrap_or_default();
            return Err(FileError::new(
                dir,
                format!(
                    "is being written by another Baton run (PID {}); wait for it or stop it first",
                    pid.trim()
                ),
            ));
        }
        Ok(_) if mode == Mode::Resume && (kind.is_ours)(&work) => {
            return Err(FileError::new(
                &work,
                format!(
                    "holds a finished {noun} left by an interrupted replacement, not an interrupted run; nothing to resume (pass --force to clear it)"
                ),
            ));
        }
        Ok(_) => {
            if mode == (Mode::Fresh { force: false }) && !(kind.is_ours)(&work) {
                return Err(FileError::new(
                    &work,
                    if kind.resumable {
                        "holds an interrupted run: pass --resume to continue it or --force to start over"
                    } else {
                        "holds an interrupted run: pass --force to discard it"
                    },
                ));
            }
        }
    }
    Ok((final_dir, work))
}

/// A directory output being written: `work` (`<dir>.partial/`, locked) and
/// where [`OutputDir::commit`] puts it.
#[derive(Debug)]
pub struct OutputDir {
    pub final_dir: PathBuf,
    pub work: PathBuf,
    kind: OutputKind,
    _lock: DirLock,
}

impl OutputDir {
    /// Checks `dir` (see [`check_output_dir`]), then creates or takes over its
    /// working directory under the lock. Fresh: the working directory is
    /// emptied (it is Baton's own); Resume: it is kept as it is.
    pub fn open(
        dir: &Path,
        kind: OutputKind,
        mode: Mode,
        inputs: &[&Path],
    ) -> Result<Self, FileError> {
        let (final_dir, work) = check_output_dir(dir, &kind, mode, inputs)?;
        if let Some(parent) = work.parent() {
            fs::create_dir_all(parent).map_err(|e| FileError::new(parent, e.to_string()))?;
        }
        match fs::create_dir(&work) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(FileError::new(&work, e.to_string())),
        }
        let lock = DirLock::acquire(&work)?;
        // Checked again under the lock: another run may have come and gone.
        if !is_own_partial(&work, &kind) {
            return Err(FileError::new(
                &work,
                "exists and is not Baton's working directory; Baton will not replace it",
            ));
        }
        if matches!(mode, Mode::Fresh { .. }) {
            for entry in fs::read_dir(&work).map_err(|e| FileError::new(&work, e.to_string()))? {
                let entry = entry.map_err(|e| FileError::new(&work, e.to_string()))?;
                if entry.file_name() == LOCK_FILE {
                    continue;
                }
                let path = entry.path();
                let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                removed.map_err(|e| FileError::new(&path, e.to_string()))?;
            }
        }
        Ok(Self {
            final_dir,
            work,
            kind,
            _lock: lock,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    /// Puts the finished working directory in place. An existing final
    /// directory (an output of this kind, or empty; checked again here) is
    /// exchanged with it in one atomic rename, so at every instant the final
    /// path holds either the old or the new output whole; the old one is then
    /// removed. Returns the final directory.
    pub fn commit(self) -> Result<PathBuf, FileError> {
        sync_dir(&self.work);
        fault_point("commit-before-swap");
        let final_dir = self.final_dir.clone();
        match fs::symlink_metadata(&final_dir) {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                fs::rename(&self.work, &final_dir)
                    .map_err(|e| FileError::new(&final_dir, e.to_string()))?;
            }
            Err(e) => return Err(FileError::new(&final_dir, e.to_string())),
            Ok(m) => {
                let empty = m.is_dir() && is_empty_dir(&final_dir);
                if !m.is_dir() || !(empty || (self.kind.is_ours)(&final_dir)) {
                    return Err(FileError::new(
                        &final_dir,
                        format!(
                            "changed while Baton ran and is no longer a Baton {}; the new one stays in {}",
                            self.kind.noun,
                            self.work.display()
                        ),
                    ));
                }
                exchange(&self.work, &final_dir)?;
                fault_point("commit-after-swap");
                // `work` now holds the replaced output (or the empty directory).
                let removed = if empty {
                    fs::remove_dir(&self.work)
                } else {
                    fs::remove_dir_all(&self.work)
                };
                if let Err(e) = removed {
                    tracing::warn!(
                        "{}: could not remove the replaced output: {e}",
                        self.work.display()
                    );
                }
            }
        }
        // The lock file came along with the directory; the lock itself ends
        // when `self.lock` drops, below.
        let _ = fs::remove_file(final_dir.join(LOCK_FILE));
        if let Some(parent) = final_dir.parent() {
            sync_dir(parent);
        }
        Ok(final_dir)
    }
}

pub fn sync_dir(path: &Path) {
    if let Ok(dir) = File::open(path) {
        let _ = dir.sync_all();
    }
}

/// Swaps two directories in one atomic step (Linux `renameat2` with
/// `RENAME_EXCHANGE`); elsewhere, or where the file system lacks it, through
/// a backup name derived from the whole directory name.
fn exchange(work: &Path, final_dir: &Path) -> Result<(), FileError> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| {
            CString::new(p.as_os_str().as_bytes())
                .map_err(|_| FileError::new(p, "path holds a NUL byte"))
        };
        let (a, b) = (c(work)?, c(final_dir)?);
        // SAFETY: both pointers are valid NUL-terminated strings for the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::AT_FDCWD,
                b.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
    }
    // Fallback: old → `<name>.baton-old`, new → final, old → work (so the
    // caller removes it from there).
    let backup = sibling(final_dir, ".baton-old");
    if fs::symlink_metadata(&backup).is_ok() {
        return Err(FileError::new(
            &backup,
            "exists; Baton needs this name to replace the output (move it away)",
        ));
    }
    fs::rename(final_dir, &backup).map_err(|e| FileError::new(final_dir, e.to_string()))?;
    fs::rename(work, final_dir).map_err(|e| FileError::new(final_dir, e.to_string()))?;
    fs::rename(&backup, work).map_err(|e| FileError::new(&backup, e.to_string()))
}

/// Test hook: with `BATON_FAULT=<point>` the process aborts at that point, as
/// a crash or SIGKILL there would end it.
pub fn fault_point(point: &str) {
    if std::env::var("BATON_FAULT").is_ok_and(|v| v == point) {
        eprintln!("BATON_FAULT: aborting at {point}");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint_kind() -> OutputKind {
        OutputKind {
            noun: "checkpoint",
            is_ours: has_manifest,
            resumable: true,
        }
    }

    #[test]
    fn reads_refuse_directories_fifos_devices_and_big_files_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let dir_err = read_bounded(tmp.path(), "corpus", 10)
            .unwrap_err()
            .to_string();
        assert!(
            dir_err.contains("is a directory, not a corpus file"),
            "{dir_err}"
        );
        let fifo = tmp.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            let err = read_bounded(&fifo, "config", 10).unwrap_err().to_string();
            assert!(err.contains("FIFO"), "{err}");
        }
        let dev = read_bounded(Path::new("/dev/zero"), "tasks", 10)
            .unwrap_err()
            .to_string();
        assert!(dev.contains("is a device"), "{dev}");
        let big = tmp.path().join("big.txt");
        fs::write(&big, vec![b'a'; 100]).unwrap();
        let err = read_bounded(&big, "config", 99).unwrap_err().to_string();
        assert!(err.contains("more than the 99 B"), "{err}");
        assert_eq!(read_bounded(&big, "config", 100).unwrap().len(), 100);
        let bom = tmp.path().join("bom.jsonl");
        fs::write(&bom, b"\xEF\xBB\xBF{}\n").unwrap();
        assert_eq!(read_text(&bom, "JSONL", 100).unwrap(), "{}\n");
    }

    #[test]
    fn output_paths_refuse_cwd_parents_root_home_inputs_and_checkpoint_insides() {
        let tmp = tempfile::tempdir().unwrap();
        let cwd = std::env::current_dir().unwrap();
        for bad in [Path::new("."), Path::new(".."), Path::new("/")] {
            assert!(output_path(bad, &[]).is_err(), "{}", bad.display());
        }
        assert!(output_path(&cwd, &[]).is_err());
        if let Some(home) = std::env::var_os("HOME") {
            assert!(output_path(Path::new(&home), &[]).is_err());
        }
        let ckpt = tmp.path().join("ckpt");
        fs::create_dir(&ckpt).unwrap();
        fs::write(ckpt.join("manifest.json"), "{}").unwrap();
        let err = output_path(&ckpt.join("sub"), &[]).unwrap_err().to_string();
        assert!(err.contains("inside the checkpoint"), "{err}");
        let err = output_path(&ckpt.join("model.safetensors"), &[]).unwrap_err();
        assert!(err.to_string().contains("inside the checkpoint"));
        let err = output_path(&ckpt, &[&ckpt]).unwrap_err().to_string();
        assert!(err.contains("an input of this command"), "{err}");
        let err = output_path(tmp.path(), &[&ckpt]).unwrap_err().to_string();
        assert!(err.contains("an input of this command"), "{err}");
        let ok = output_path(&tmp.path().join("a/../b"), &[&ckpt]).unwrap();
        assert_eq!(ok, fs::canonicalize(tmp.path()).unwrap().join("b"));
    }

    #[test]
    fn single_file_outputs_never_replace_unless_forced_and_never_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("tasks.jsonl");
        fs::write(&out, "mine").unwrap();
        let err = write_new_file(&out, b"new", false, &[]).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(fs::read_to_string(&out).unwrap(), "mine");
        write_new_file(&out, b"new", true, &[]).unwrap();
        assert_eq!(fs::read_to_string(&out).unwrap(), "new");
        let err = write_new_file(tmp.path(), b"x", true, &[]).unwrap_err();
        assert!(
            err.to_string().contains("current directory") || err.to_string().contains("directory")
        );
        let sub = tmp.path().join("sub");
        fs::create_dir(&sub).unwrap();
        fs::write(sub.join("keep"), "k").unwrap();
        let err = write_new_file(&sub, b"x", true, &[]).unwrap_err();
        assert!(err.to_string().contains("a directory"), "{err}");
        assert!(sub.join("keep").exists());
        // No temporary file is left beside the output.
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn directory_outputs_replace_only_their_own_kind_and_lock_out_a_second_writer() {
        let tmp = tempfile::tempdir().unwrap();
        let kind = checkpoint_kind();
        let fresh = Mode::Fresh { force: false };
        let forced = Mode::Fresh { force: true };

        // A user's directory is refused, --force included; nothing in it is touched.
        let user = tmp.path().join("notes");
        fs::create_dir(&user).unwrap();
        fs::write(user.join("notes.txt"), "mine").unwrap();
        for mode in [fresh, forced] {
            let err = OutputDir::open(&user, kind, mode, &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains("not a Baton checkpoint"), "{err}");
        }
        assert!(user.join("notes.txt").exists());
        assert!(!partial_dir(&user).exists());

        // A user's `.partial` and `.baton-old` siblings are never removed.
        let out = tmp.path().join("model.v1");
        let theirs = partial_dir(&out);
        fs::create_dir(&theirs).unwrap();
        fs::write(theirs.join("draft.txt"), "mine").unwrap();
        let err = OutputDir::open(&out, kind, forced, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not Baton's working directory"), "{err}");
        assert!(theirs.join("draft.txt").exists());
        fs::remove_dir_all(&theirs).unwrap();
        let old = tmp.path().join("model.old");
        fs::create_dir(&old).unwrap();

        // First write; a second writer is refused while the first holds the lock.
        let first = OutputDir::open(&out, kind, fresh, &[]).unwrap();
        let err = OutputDir::open(&out, kind, forced, &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("PID {}", std::process::id())),
            "{err}"
        );
        fs::write(first.path("manifest.json"), "{\"v\": 1}").unwrap();
        let done = first.commit().unwrap();
        assert!(!done.join(LOCK_FILE).exists());
        assert!(!partial_dir(&out).exists());

        // Complete: refused without --force, replaced with it; siblings untouched.
        let err = OutputDir::open(&out, kind, fresh, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("pass --force"), "{err}");
        let second = OutputDir::open(&out, kind, forced, &[]).unwrap();
        fs::write(second.path("manifest.json"), "{\"v\": 2}").unwrap();
        second.commit().unwrap();
        assert_eq!(
            fs::read_to_string(out.join("manifest.json")).unwrap(),
            "{\"v\": 2}"
        );
        assert!(old.exists());
        assert!(!partial_dir(&out).exists());

        // A resume never ends by replacing a complete output, and a finished
        // output left in `.partial` (a crash after the exchange) is not a run.
        fs::create_dir(partial_dir(&out)).unwrap();
        fs::write(partial_dir(&out).join("run.toml"), "x").unwrap();
        let err = OutputDir::open(&out, kind, Mode::Resume, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("continues only an interrupted run"), "{err}");
        let other = tmp.path().join("other");
        fs::create_dir(partial_dir(&other)).unwrap();
        fs::write(partial_dir(&other).join("manifest.json"), "{}").unwrap();
        let err = OutputDir::open(&other, kind, Mode::Resume, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("left by an interrupted replacement"), "{err}");
    }
}
