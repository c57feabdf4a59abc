#!/usr/bin/env python3
"""Regenerates tests/golden/kquants.json: two blocks of random bytes (with
finite f16 scales) for each K-quant type Baton reads, and the values gguf-py
(`pip install gguf`, llama.cpp's own Python package) dequantizes them to.
core/src/gguf.rs checks its dequantization against them.

  python3 scripts/kquants_golden.py
"""

import importlib.metadata
import json

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

# name, block bytes, byte offsets of the f16 scale fields
TYPES = [("Q4_K", 144, [0, 2]), ("Q5_K", 176, [0, 2]), ("Q6_K", 210, [208])]


def main():
    rng = np.random.default_rng(7)
    out = {
        "about": "ggml K-quant blocks (random bytes with finite f16 scales) and their values as gguf-py "
        + importlib.metadata.version("gguf")
        + " dequantizes them; regenerate with scripts/kquants_golden.py",
        "types": {},
    }
    for name, size, scale_at in TYPES:
        blocks = []
        for _ in range(2):
            raw = rng.integers(0, 256, size, dtype=np.uint8)
            for at in scale_at:
                raw[at : at + 2] = np.array([rng.uniform(0.001, 0.05)], dtype=np.float16).view(np.uint8)
            blocks.append(raw)
        data = np.concatenate(blocks)
        values = dequantize(data, getattr(GGMLQuantizationType, name)).reshape(-1)
        out["types"][name] = {
            "hex": data.tobytes().hex(),
            "values": [float(f"{v:.7g}") for v in values.tolist()],
        }
    json.dump(out, open("tests/golden/kquants.json", "w"))
    print("wrote tests/golden/kquants.json")


if __name__ == "__main__":
    main()
