"""Running a study: every cell × seed as a normal run folder, finished runs read back, interrupted ones resumed,
one process per run at a time (a lock file), a failed run reported while the grid goes on."""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import config as config_io
from .. import rundir
from ..config import RunConfig
from ..records import read_metrics
from .spec import Cell, Study


@dataclass
class RunResult:
    """A finished (or failed) run of a study: its summary and per-round rows, or the error."""

    cell: Cell
    seed: int
    folder: Path
    summary: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    error: str | None = None
    redone: bool = False  # trained (or resumed) in this call, not read back


def run_folder(out: Path, cell: Cell, seed: int) -> Path:
    """Where a study keeps a run: ``OUT/runs/<cell>/seed-<k>``."""
    return out / "runs" / cell.folder / f"seed-{seed}"


def flat_folder(out: Path) -> Callable[[Cell, int], Path]:
    """``OUT/<cell>``, one run per cell: the layout of ``fedmomentum compare`` (one seed)."""
    return lambda cell, seed: Path(out) / cell.folder


def claim(folder: Path) -> bool:
    """Take the run in ``folder`` for this process (a ``seed-<k>.lock`` file beside it holding our pid); ``False``
    when another live process holds it. So the same study started twice uses two cores without running a run twice;
    a lock left by a process that died is taken over."""
    lock = folder.with_name(folder.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(lock.read_text(encoding="utf-8").strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner > 0 and owner != os.getpid() and _alive(owner):
                return False
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(str(os.getpid()))
        return True
    return False


def release(folder: Path) -> None:
    folder.with_name(folder.name + ".lock").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def state(folder: Path, config: RunConfig) -> str:
    """``"done"`` (a summary of all its rounds), ``"partial"`` (a checkpoint to resume from), ``"started"`` (stopped
    before its first checkpoint: ``driver.run`` asked to resume starts it over) or ``"new"``.

    A folder holding a run of other settings is an error rather than silently redone or mixed in.
    """
    saved = folder / rundir.CONFIG
    if not saved.is_file():
        return "new"
    try:  # through from_dict, so keys added to RunConfig since the run was written read as their defaults
        old = config_io.from_dict({**json.loads(saved.read_text(encoding="utf-8")), "out": str(folder)})
    except (ValueError, TypeError) as error:
        raise ValueError(f"{saved} cannot be read ({error}); move the folder away to redo the run") from None
    changed = config_io.differences(old.to_dict(), config.to_dict())
    if changed:
        raise ValueError(f"{folder} holds a run with other settings: {', '.join(changed)}; move it away or use "
                         "another --out")
    summary = folder / "summary.json"
    if summary.is_file() and json.loads(summary.read_text(encoding="utf-8")).get("rounds") == config.rounds:
        return "done"
    return "partial" if (folder / rundir.CHECKPOINT).is_file() else "started"


def execute(study: Study, out: str | Path, log: Callable[[str], None] = print,
            verbose: bool = False, folder: Callable[[Cell, int], Path] | None = None) -> list[RunResult]:
    """Run every cell × seed that is not finished in ``out`` (each in ``folder(cell, seed)``, default
    ``run_folder``); a failed run is reported and the grid goes on.

    A run that another live process is running (the same study started twice) is skipped; if it has finished by
    the end of the grid it is read back, so the process that ends last holds every run.
    """
    out = Path(out)
    where = folder or (lambda cell, seed: run_folder(out, cell, seed))
    models: dict[tuple, tuple] = {}  # (model, device) → the loaded base model, copied for every run
    results: list[RunResult] = []
    skipped: list[tuple[int, RunResult, RunConfig]] = []  # (position in the grid, run, its config)
    runs = study.runs()
    started = time.perf_counter()
    for index, (cell, seed) in enumerate(runs, 1):
        result = RunResult(cell, seed, where(cell, seed))
        label = f"[{index}/{len(runs)}] {cell.label} seed {seed}"
        try:
            config = study.config(cell, seed, result.folder)
            if state(result.folder, config) != "done":
                if not claim(result.folder):
                    log(f"{label}: running in another process, skipped")
                    skipped.append((index, result, config))
                    continue
                try:
                    status = state(result.folder, config)  # again: it may have finished before we claimed it
                    if status != "done":
                        doing = {"partial": "resuming", "started": "starting over"}.get(status, "starting")
                        log(f"{label}: {doing} ({config.rounds} rounds)")
                        seconds = _train(config, status != "new", models, verbose)
                        result.redone = True
                        log(f"{label}: finished in {seconds:.0f} s (study {time.perf_counter() - started:.0f} s "
                            "so far)")
                finally:
                    release(result.folder)
            else:
                log(f"{label}: already finished, read back")
            _read_back(result)
        except (Exception, SystemExit) as error:  # noqa: BLE001 - one failed run must not stop the grid
            result.error = f"{type(error).__name__}: {error}".splitlines()[0]
            log(f"{label}: FAILED: {result.error}")
        results.append(result)
    for index, result, config in skipped:
        label = f"[{index}/{len(runs)}] {result.cell.label} seed {result.seed}"
        try:
            if state(result.folder, config) == "done":
                log(f"{label}: finished in another process, read back")
                results.append(_read_back(result))
        except (Exception, SystemExit) as error:  # noqa: BLE001 - the tables of the other runs still get written
            log(f"{label}: finished in another process, but unreadable: {error}".splitlines()[0])
    return sorted(results, key=lambda r: runs.index((r.cell, r.seed)))


def _read_back(result: RunResult) -> RunResult:
    """``result`` with its finished run's summary and metrics, read from its folder."""
    result.summary = json.loads((result.folder / "summary.json").read_text(encoding="utf-8"))
    result.rows = read_metrics(result.folder)
    return result


def _train(config: RunConfig, resume: bool, models: dict, verbose: bool) -> float:
    """Run (or resume) one run with the shared run loop, on a fresh copy of the base model; the seconds it took."""
    from ..models import load_model
    from ..simulation import run as run_simulation

    key = (config.model, config.device)
    if key not in models:
        models[key] = load_model(config.model, device=config.device)
    model, tokenizer = models[key]
    started = time.perf_counter()
    run_simulation(config, model=copy.deepcopy(model), tokenizer=tokenizer, resume=resume, quiet=not verbose)
    return time.perf_counter() - started
