//! The architecture invariants a reader of ARCHITECTURE.md relies on, checked
//! over the source tree.

use std::path::{Path, PathBuf};

use super::repo;

/// Every `.rs` file of the workspace (not `target/`), relative to the root.
fn sources() -> Vec<PathBuf> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" {
                    walk(&path, root, out);
                }
            } else if name.ends_with(".rs") {
                out.push(path.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let root = repo();
    let mut out = Vec::new();
    for dir in [
        "core",
        "stage-pretrain",
        "stage-sft",
        "stage-align",
        "src",
        "bench",
        "tests",
    ] {
        walk(&root.join(dir), &root, &mut out);
    }
    out
}

/// `(file, line number, line)` of every line in `files` for which `hit` holds.
fn lines_where(files: &[PathBuf], hit: impl Fn(&str) -> bool) -> Vec<String> {
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        for (i, line) in text.lines().enumerate() {
            if hit(line) {
                found.push(format!("{}:{}: {}", file.display(), i + 1, line.trim()));
            }
        }
    }
    found
}

#[test]
fn only_the_backend_file_and_the_flex_kernels_name_a_concrete_backend() {
    const CONCRETE: [&str; 9] = [
        "Flex",
        "FlexTensor",
        "FlexDevice",
        "NdArray",
        "NdArrayDevice",
        "Cuda",
        "CudaDevice",
        "Wgpu",
        "WgpuDevice",
    ];
    let allowed = [
        "core/src/backend.rs",
        "core/src/fused.rs",
        "tests/architecture.rs",
    ];
    let files: Vec<PathBuf> = sources()
        .into_iter()
        .filter(|f| !allowed.iter().any(|a| f == Path::new(a)))
        .collect();
    assert!(
        files.len() > 30,
        "the walk found only {} files",
        files.len()
    );
    let named = lines_where(&files, |line| {
        line.contains("burn::backend::")
            || line
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .any(|word| CONCRETE.contains(&word))
    });
    assert!(
        named.is_empty(),
        "a concrete backend named outside backend.rs:\n{}",
        named.join("\n")
    );
    // The kernel choice is made in one place: model code reaches the fused
    // kernels only through core/src/kernels.rs, and nothing branches on a
    // backend's name.
    let kernel_front = ["core/src/kernels.rs", "core/src/fused.rs"];
    let files: Vec<PathBuf> = sources()
        .into_iter()
        .filter(|f| {
            !kernel_front
                .iter()
                .chain(&allowed)
                .any(|a| f == Path::new(a))
        })
        .collect();
    let bypass = lines_where(&files, |line| {
        line.contains("fused::")
            || line.contains("\"cubecl\"")
            || line.contains("B::name(") && line.contains("contains")
    });
    assert!(
        bypass.is_empty(),
        "kernels chosen outside core/src/kernels.rs:\n{}",
        bypass.join("\n")
    );
}
