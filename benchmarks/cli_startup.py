"""CPU time of the command line's quick answers, beside what importing torch, transformers and peft costs.

Every command used to import those three (and more) first. ``--before SRC`` also times the same commands on the
sources in ``SRC``, for instance the code before the command line was made torch-free:

    git worktree add /tmp/before 6f9a908 && python benchmarks/cli_startup.py --before /tmp/before/src

Each command runs in a fresh interpreter, all of them alternately, and the CPU time (user + system) of each child
is read from ``resource.getrusage``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src"

COMMANDS = {
    "fedmomentum --help": ["-m", "fedmomentum.cli", "--help"],
    "fedmomentum methods": ["-m", "fedmomentum.cli", "methods"],
    "fedmomentum run --set lr=abc (a config error)": ["-m", "fedmomentum.cli", "run", "--set", "lr=abc"],
    "import torch, transformers, peft (what each paid before)": ["-c", "import torch, transformers, peft"],
}


def cpu_seconds(args: list[str], source: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(source)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                   env=env, cwd="/")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", type=Path, default=None, help="other sources to time the same commands on")
    args = parser.parse_args()
    runs = [(name, command, HERE, "") for name, command in COMMANDS.items()]
    if args.before is not None:
        runs += [(name, command, args.before.resolve(), " [before]") for name, command in COMMANDS.items()
                 if command[0] == "-m"]
    times: dict[str, list[float]] = {name + tag: [] for name, _, _, tag in runs}
    for _ in range(args.repeats):
        for name, command, source, tag in runs:
            times[name + tag].append(cpu_seconds(command, source))
    imports = statistics.median(times[list(COMMANDS)[-1]])
    print(f"CPU seconds (user + system), median of {args.repeats}, commands run alternately; sources: {HERE}"
          + (f", [before] {args.before}" if args.before else ""))
    for name, values in times.items():
        median = statistics.median(values)
        versus = f"   {median / imports:5.2f}× the imports" if name != list(COMMANDS)[-1] else ""
        if name.endswith(" [before]"):
            now = statistics.median(times[name.removesuffix(" [before]")])
            versus += f", {median / now:5.1f}× the same command now"
        print(f"  {name:66s} {median:6.2f} s (min {min(values):.2f}){versus}")


if __name__ == "__main__":
    main()
