"""A run's folder: never start over another run, write files whole or not at all, and name the file a write failed on.

A new run starts only in a missing or empty folder, or, asked to overwrite, in a folder it clears whole: only one
that is recognisably a run (``is_run``), and never ``/``, the home folder, the working directory or a folder above
it. Files are written
to a temporary sibling and renamed over the old one, and the exports (``adapter/``, ``base/``, ``merged/``) are
built aside and swapped in together, so a folder never mixes two runs. An operating-system error while writing
(a full disk, no permission) is raised as an ``OSError`` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors import SafetensorError

CONFIG = "config.json"
CHECKPOINT = "checkpoint.safetensors"
RUN_FILES = (CHECKPOINT, "metrics.jsonl")  # a run has one of these beside its config
RUN_KEYS = {"method", "rounds", "lora_r", "clients"}  # keys every run's config.json holds


def is_run(folder: Path) -> bool:
    """Whether ``folder`` is recognisably a fedmomentum run: a ``config.json`` holding a run's keys, and a checkpoint
    or a ``metrics.jsonl`` beside it or nothing else (a run that stopped before it evaluated anything). An HF model
    folder has a ``config.json`` too, but of other keys."""
    try:
        values = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(values, dict) and RUN_KEYS <= values.keys()
            and (any((folder / name).is_file() for name in RUN_FILES)
                 or [entry.name for entry in folder.iterdir()] == [CONFIG]))


def protected(folder: Path) -> str | None:
    """Why ``folder`` must never be deleted whole (``/``, the home folder, the working directory or a folder above
    it), or None."""
    folder = folder.resolve()
    if folder == Path(folder.anchor):
        return "it is the root folder"
    if folder == Path.home().resolve():
        return "it is the home folder"
    cwd = Path.cwd().resolve()
    if folder == cwd or folder in cwd.parents:
        return "it is the working directory" if folder == cwd else "the working directory is inside it"
    return None


def check(out: Path, overwrite: bool = False, resume_flag: str | None = None) -> None:
    """Refuse (one line) to start a new run in ``out`` when it holds files, unless ``overwrite`` and it holds a run.
    ``resume_flag`` is how the message tells to continue instead (default ``--resume OUT``)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            how = resume_flag or f"--resume {out}"
            raise ValueError(f"{out} already holds a run or other files; continue it with {how}, replace it with "
                             "--overwrite, or choose another --out")
        why = protected(out)
        if why is None and not is_run(out):
            why = f"it holds files but no run (a run has a {CONFIG} of run keys and {' or '.join(RUN_FILES)})"
        if why is not None:
            raise ValueError(f"--overwrite refused: {out} is not deleted because {why}; empty it yourself or "
                             "choose another --out")


def start(out: Path, overwrite: bool = False) -> None:
    """Make ``out`` ready for a new run (``check``): create it, or, with ``overwrite``, delete the run it holds."""
    check(out, overwrite)
    if out.is_dir():
        for child in out.iterdir():
            with writing(child):
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)


def started_only(out: Path) -> bool:
    """Whether ``out`` holds a run that stopped before it checkpointed its first round (nothing there to lose)."""
    finished = ("summary.json", "adapter", "checkpoint.safetensors")
    return (out / CONFIG).is_file() and not any((out / name).exists() for name in finished)


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Raise any error writing ``path`` as an ``OSError`` that names it (an OS error on ``write`` names no file,
    and safetensors reports one as a ``SafetensorError``)."""
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror or str(error), str(path)) from None
    except SafetensorError as error:
        code = re.search(r"os error (\d+)", str(error))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(path)) from None


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole: into a temporary sibling, then renamed over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def write_file(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` a file next to ``path``, then rename it over ``path`` (for writers that take a path). The file
    gets the usual permissions (``0666`` less the umask: readable by others), whatever mode the writer chose."""
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    with writing(path):
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def replace_folders(out: Path, build: Callable[[Path], None], names: tuple[str, ...]) -> None:
    """Build the folders ``names`` with ``build(staging)`` aside, then swap them into ``out`` in place of the old
    ones (and remove old ones ``build`` did not make), so ``out`` never holds exports of two different states."""
    staging, old = out / ".exports.tmp", out / ".exports.old"
    for folder in (staging, old):
        shutil.rmtree(folder, ignore_errors=True)
    with writing(staging):
        staging.mkdir()
        try:
            build(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # free the space a failed export took
            raise
        old.mkdir()
        for name in names:
            if (out / name).exists():
                os.replace(out / name, old / name)
        for name in names:
            if (staging / name).exists():
                os.replace(staging / name, out / name)
        shutil.rmtree(staging)
        shutil.rmtree(old)


def is_disk_full(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)
