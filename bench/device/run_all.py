"""Run every bench/device script within one time budget: the single script a GPU session runs.

    python bench/device/run_all.py                 # GPU machine: full runs, 540 s budget in all
    python bench/device/run_all.py --smoke         # same scripts in their --smoke mode (CPU ok)
    python bench/device/run_all.py --only scaleout --budget-s 300
    python bench/device/run_all.py --check         # every script's full-run arguments, --dry-run (CPU ok)

Each script gets a share of the budget (``SCRIPTS`` below, scaled to ``--budget-s``) as a hard
timeout, runs in its own process, and writes ``<name>.json`` plus ``<name>.log`` (stdout and
stderr) into ``--out`` (default ``$OUT`` when set, else ``./device-results``). A ``summary.json``
lists each script's exit code, wall time and whether it timed out. Exit code: 0 when every script
exited 0, else 1. The scripts' own order is cheapest-first so a short budget still yields results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

#: name -> (share of the budget, extra arguments for a full run on a GPU). Seen on an H200
#: (2026-11-28, 16 cores): load_and_ewl 22 s, scaleout 170 s (four systems; lambdascale-lend, added
#: since, is a fifth and runs second, local last); multicast not run yet.
SCRIPTS: dict[str, tuple[float, list[str]]] = {
    "load_and_ewl": (0.10, ["--shape", "llama3-8b", "--repeat", "3"]),
    # the cluster (6 agents, 2 holders, a ~1 GB model in 8 blocks / 16 chunks) on one shared
    # GPU; a link cap long enough for pipelines to form, two sequences per instance so that the
    # holders alone cannot absorb the burst
    "scaleout": (0.50, ["--model", "synthetic:qwen2-0.5b", "--nodes", "6", "--sources", "2", "--burst", "48",
                        "--max-tokens", "16", "--max-seqs", "2", "--link-gbps", "4",
                        "--systems", "lambdascale,lambdascale-lend,nccl,faasnet,local"]),
    # issue 6's uncapped multicast / point-to-point with a core per agent (the VM has two for six)
    "multicast": (0.40, ["--receivers", "1,2,3,5", "--link-gbps", "8"]),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=540.0, help="total wall-clock budget for all scripts")
    ap.add_argument("--smoke", action="store_true", help="run each script's --smoke mode")
    ap.add_argument("--check", action="store_true",
                    help="run each script's --dry-run on its full-run arguments (seconds, CPU ok); exit 1 if one fails")
    ap.add_argument("--only", default=None, help="comma list of script names (default: all)")
    ap.add_argument("--out", default=None, help="results folder (default $OUT, else ./device-results)")
    args = ap.parse_args(argv)
    names = list(SCRIPTS) if args.only is None else [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        print(f"--only: unknown scripts {unknown}; known: {list(SCRIPTS)}", file=sys.stderr)
        return 2
    if args.budget_s <= 0:
        print(f"--budget-s must be > 0, got {args.budget_s}", file=sys.stderr)
        return 2
    if args.check:
        bad = [n for n in names if subprocess.run([sys.executable, str(HERE / f"{n}.py"), "--dry-run", *SCRIPTS[n][1]],
                                                  cwd=REPO, env=_env()).returncode != 0]
        print(f"full-run arguments: {'rejected by ' + ', '.join(bad) if bad else 'all accepted'}")
        return 1 if bad else 0
    out = Path(args.out or os.environ.get("OUT") or "device-results")
    out.mkdir(parents=True, exist_ok=True)
    share_total = sum(SCRIPTS[n][0] for n in names)
    deadline = time.monotonic() + args.budget_s
    summary: dict[str, dict[str, object]] = {}
    env = _env()
    for name in names:
        share, extra = SCRIPTS[name]
        left = deadline - time.monotonic()
        limit = min(left, args.budget_s * share / share_total)
        if limit < 5:
            summary[name] = {"rc": None, "skipped": "budget spent"}
            continue
        cmd = [sys.executable, str(HERE / f"{name}.py"), "--json", str(out / f"{name}.json")]
        cmd += ["--smoke"] if args.smoke else extra
        t0 = time.monotonic()
        with open(out / f"{name}.log", "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                    start_new_session=True)
            try:
                rc: int | None = proc.wait(timeout=limit)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the script and the agents it spawned
                proc.wait()
                rc, timed_out = None, True
        summary[name] = {"rc": rc, "timed_out": timed_out, "wall_s": round(time.monotonic() - t0, 2),
                         "limit_s": round(limit, 1)}
        print(f"{name:14} rc={rc} timed_out={timed_out} wall={summary[name]['wall_s']} s (limit {limit:.0f} s)")
        sys.stdout.flush()
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0 if all(s.get("rc") == 0 for s in summary.values()) else 1


def _env() -> dict[str, str]:
    """The scripts import lambdascale from this checkout, before anything else on PYTHONPATH."""
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


if __name__ == "__main__":
    sys.exit(main())
