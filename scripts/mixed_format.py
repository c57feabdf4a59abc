#!/usr/bin/env python3
"""Rewrites a share of `baton data tasks` replies into a chatty form.

    python3 scripts/mixed_format.py IN.jsonl OUT.jsonl --fraction 0.3 [--seed 1]

Each selected conversation's assistant reply `42` becomes `The answer is 42.`;
the `answer` field (what the checker compares against) is unchanged. SFT on the
result imitates both forms, so its greedy replies are sometimes in the chatty
form and fail the exact-match checker even when the number inside is right:
an imperfect parent whose flaw is a behaviour, not a missing skill, which is
what preference optimisation is meant to correct (README, "Alignment").
"""

import argparse
import json
import random
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--fraction", type=float, required=True)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if not 0.0 <= args.fraction <= 1.0:
        print(f"--fraction {args.fraction}: must be in [0, 1]", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    rewritten = total = 0
    with open(args.input) as src, open(args.output, "w") as dst:
        for number, line in enumerate(src, 1):
            try:
                row = json.loads(line)
                reply = row["messages"][-1]
                assert reply["role"] == "assistant"
            except (ValueError, KeyError, IndexError, AssertionError) as err:
                print(f"{args.input}:{number}: not a task conversation ({err})", file=sys.stderr)
                return 1
            total += 1
            if rng.random() < args.fraction:
                reply["content"] = f"The answer is {reply['content']}."
                rewritten += 1
            dst.write(json.dumps(row) + "\n")
    print(f"rewrote {rewritten} of {total} replies into the chatty form", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
