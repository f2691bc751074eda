"""Wall time of the `rayattr` commands that read a finished run, each in a fresh process.

    python bench/cli_startup.py --run ./rayattr_runs/run-20261124-101500   # any run works
    python bench/cli_startup.py --run RUN --repeats 10

Runs `python -m rayattr.cli --version`, `runs STORE`, `show RUN` and `values RUN` as
subprocesses (what a user waits for: interpreter start, imports, reading the run, printing),
prints the best and median wall time of each, and whether the process imported torch or ray.
Target: every one <= 1 s on the 2-core development machine (they used to take 3-7 s because
they imported torch and Ray).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run a command in-process, then report which heavy modules it imported (for the last column).
PROBE = ("import sys; from rayattr.cli import main\n"
         "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
         "print('\\nHEAVY', [m for m in ('torch', 'ray', 'deepspeed') if m in sys.modules], file=sys.stderr)")


def wall(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def heavy_modules(args: list[str], env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True)
    line = [ln for ln in out.stderr.splitlines() if ln.startswith("HEAVY")]
    return line[-1].removeprefix("HEAVY ") if line else "?"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run's path (any status; values needs a finished run)")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    run = a.run.rstrip("/")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    commands = {"--version": ["--version"], "runs": ["runs", os.path.dirname(run)], "show": ["show", run],
                "values": ["values", run]}
    wall([sys.executable, "-c", "pass"], env)  # warm the page cache once
    baseline = min(wall([sys.executable, "-c", "pass"], env) for _ in range(a.repeats))
    print(f"python itself: {baseline:.2f} s\n")
    print(f"{'command':<12}{'best s':>8}{'median s':>10}   imports")
    for name, args in commands.items():
        times = [wall([sys.executable, "-m", "rayattr.cli", *args], env) for _ in range(a.repeats)]
        print(f"{name:<12}{min(times):>8.2f}{statistics.median(times):>10.2f}   {heavy_modules(args, env)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
