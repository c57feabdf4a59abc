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

/// The module files of one crate (`src_dir` relative to the root) and, for
/// each, the module files it names through `crate::…` (tests and comments
/// left out).
fn module_graph(src_dir: &str) -> Vec<(String, Vec<String>)> {
    let root = repo();
    let files: Vec<PathBuf> = sources()
        .into_iter()
        .filter(|f| f.starts_with(src_dir) && !f.ends_with("main.rs"))
        .collect();
    // `a/b.rs` and `a/b/mod.rs` are module `a::b`.
    let module_of = |f: &Path| -> String {
        let rel = f.strip_prefix(src_dir).unwrap().with_extension("");
        let mut parts: Vec<String> = rel
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
            parts.pop();
        }
        parts.join("::")
    };
    let modules: Vec<String> = files.iter().map(|f| module_of(f)).collect();
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(root.join(f)).unwrap();
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
            let mut named = Vec::new();
            for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for (at, _) in line.match_indices("crate::") {
                    let path: String = line[at + 7..]
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                        .collect();
                    // The longest module prefix of the path.
                    let segments: Vec<&str> = path.split("::").collect();
                    let target = (1..=segments.len())
                        .rev()
                        .map(|n| segments[..n].join("::"))
                        .find(|m| modules.contains(m));
                    if let Some(m) = target
                        && m != module_of(f)
                        && !named.contains(&m)
                    {
                        named.push(m);
                    }
                }
            }
            (module_of(f), named)
        })
        .collect()
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    for src_dir in [
        "core/src",
        "stage-align/src",
        "stage-sft/src",
        "stage-pretrain/src",
        "src",
    ] {
        let graph = module_graph(src_dir);
        assert!(!graph.is_empty(), "{src_dir}: no modules found");
        // Depth-first search from every module for a path back to itself.
        let edges = |m: &str| {
            graph
                .iter()
                .find(|(n, _)| n == m)
                .map(|(_, e)| e.clone())
                .unwrap_or_default()
        };
        for (start, _) in &graph {
            let mut stack: Vec<Vec<String>> = vec![vec![start.clone()]];
            let mut seen: Vec<String> = Vec::new();
            while let Some(path) = stack.pop() {
                for next in edges(path.last().unwrap()) {
                    if &next == start {
                        panic!("{src_dir}: import cycle {} → {start}", path.join(" → "));
                    }
                    if !seen.contains(&next) {
                        seen.push(next.clone());
                        let mut longer = path.clone();
                        longer.push(next);
                        stack.push(longer);
                    }
                }
            }
        }
    }
}
