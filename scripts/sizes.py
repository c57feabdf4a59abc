#!/usr/bin/env python3
"""Largest source files and longest functions of the workspace (tests excluded).

    scripts/sizes.py [ROOT] [--top N]

A function is measured from its `fn` line to the closing brace at the same
indentation; code after `#[cfg(test)]` + `mod tests` is left out.
"""
import pathlib
import re
import sys

args = [a for a in sys.argv[1:] if not a.startswith("--")]
root = pathlib.Path(args[0] if args else ".")
top = int(sys.argv[sys.argv.index("--top") + 1]) if "--top" in sys.argv else 5
files, funcs = [], []
for path in sorted(root.rglob("*.rs")):
    rel = path.relative_to(root)
    if rel.parts[0] in ("target",) or rel.parts[0].startswith("."):
        continue
    text = path.read_text()
    code = text.split("#[cfg(test)]\nmod tests")[0]
    lines = code.split("\n")
    files.append((len(text.split("\n")), str(rel)))
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)(?:pub(?:\([a-z]+\))? )?(?:const )?(?:unsafe )?fn (\w+)", line)
        if not m or line.rstrip().endswith(";"):
            continue
        indent = m.group(1)
        for j in range(i + 1, len(lines)):
            if lines[j] == indent + "}":
                funcs.append((j - i + 1, f"{rel}::{m.group(2)}"))
                break
files.sort(reverse=True)
funcs.sort(reverse=True)
print("largest files (lines, tests included):")
for n, name in files[:top]:
    print(f"  {n:5} {name}")
print("longest functions (lines, outside tests):")
for n, name in funcs[:top]:
    print(f"  {n:5} {name}")
