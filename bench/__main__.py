"""`python -m bench`: every benchmark in one go, one combined JSON, one summary.

Runs, in order: the milter-protocol benchmark of the `checks` filter, the same
for the core-only `scripted` filter (the baseline: what the adapter, pymilter and
libmilter cost without any rules), then the end-to-end Postfix benchmark (none,
checks, scripted; skipped with its reason when not root). About two minutes on
two cores. Each part also takes its own options: run `python -m
bench.milter_bench --help` and `python -m bench.postfix_bench --help`.

Writes bench/results/all-TIMESTAMP.json holding each part's full result.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python bench/__main__.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, milter_bench, postfix_bench


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = common.arg_parser(
        "bench", "Run the milter-protocol and Postfix benchmarks; write one JSON.")
    p.add_argument("--duration", type=float, default=5.0,
                   help="seconds per milter-protocol case")
    p.add_argument("--workers", type=int, default=None,
                   help="filter workers (default: as each benchmark's default)")
    p.add_argument("--no-scripted", action="store_true", help="skip the core-only baseline")
    p.add_argument("--no-postfix", action="store_true", help="skip the Postfix benchmark")
    p.add_argument("--out", type=Path, help="JSON file (default: bench/results/...)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workers = [] if args.workers is None else ["--workers", str(args.workers)]
    combined = common.new_result("all")
    summaries: list[str] = []

    filters = ["checks"] + ([] if args.no_scripted else ["scripted"])
    for name in filters:
        print(f"milter benchmark: {name} ...", file=sys.stderr, flush=True)
        margs = milter_bench.parse_args(
            ["--filter", name, "--duration", str(args.duration), "--quiet", *workers])
        result = milter_bench.run(margs)
        combined[f"milter_{name}"] = result
        summaries.append(milter_bench.table(result))

    if not args.no_postfix:
        print("postfix benchmark ...", file=sys.stderr, flush=True)
        pargs = postfix_bench.parse_args(
            ["--quiet", *workers] + ([] if args.no_scripted else ["--scripted"]))
        result = postfix_bench.run(pargs)
        combined["postfix"] = result
        summaries.append(postfix_bench.table(result))
        if result.get("headline"):
            combined["headline"] = result["headline"]

    path = common.write_results("all", combined, args.out)
    print("\n\n".join(summaries))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
