"""Users' own data: examples from files and folders, and federations whose clients are one file each.

``load_examples`` reads a JSON-lines, JSON or Parquet file, a folder saved by ``datasets``' ``save_to_disk``, or
a folder of those, in any of the forms of ``forms`` (detected per file, or given). ``client_sources`` /
``load_client_data`` read a naturally partitioned federation: a folder holding one file per client, the file's
name being the client's id. Every error names the file and the line (or row) and what is wrong.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .example import Example
from .forms import FORMATS, detect_format, to_example
from .readers import SUFFIXES, is_dataset_folder, read_records

__all__ = ["client_sources", "data_sources", "load_client_data", "load_examples", "load_jsonl"]


def _name(source: Path) -> str:
    """A source's name: a file's name without its suffix, a saved dataset's folder name."""
    return source.name if source.is_dir() else source.stem


def data_sources(path: str | os.PathLike) -> list[Path]:
    """The data sources ``path`` stands for: itself (a data file or a saved dataset), else the data files and
    saved datasets in the folder, by name. Hidden files are skipped; anything else in the folder is an error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data not found: {path}")
    if path.is_file() or is_dataset_folder(path):
        return [path]
    sources, others = [], []
    for child in sorted(path.iterdir()):
        if child.name.startswith("."):
            continue
        if (child.is_file() and child.suffix.lower() in SUFFIXES) or is_dataset_folder(child):
            sources.append(child)
        else:
            others.append(child.name)
    if others:
        raise ValueError(f"{path}: cannot read {', '.join(map(repr, others[:3]))}{' …' if len(others) > 3 else ''}: "
                         "a data folder holds .jsonl, .json and .parquet files and folders saved by datasets' "
                         "save_to_disk (move anything else out)")
    if not sources:
        raise ValueError(f"{path}: the folder holds no data files")
    return sources


def _load_source(source: Path, format: str | None, family: str | None,
                 prompt_field: str = "prompt", response_field: str = "response") -> list[Example]:
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}: use one of {', '.join(FORMATS)} (or none to detect it)")
    default_family = family or _name(source)
    examples: list[Example] = []
    for record in read_records(source):
        if format is None:
            format = detect_format(record.value, record.where)
        example = to_example(record.value, format, record.where, default_family,
                             prompt_field=prompt_field, response_field=response_field)
        examples.append(example if family is None else dataclasses.replace(example, family=family))
    if not examples:
        raise ValueError(f"{source}: no examples (the file is empty)")
    return examples


def load_examples(path: str | os.PathLike, format: str | None = None, family: str | None = None) -> list[Example]:
    """Examples from a data file, a saved dataset, or a folder of them (file by file, by name).

    ``format`` is one of ``FORMATS`` (``alpaca``, ``chat``, ``prompt-response``); by default each file's form is
    told from its first record. An example's family is ``family`` when given, else the record's ``family``
    field, else the file's name without its suffix.
    """
    examples: list[Example] = []
    for source in data_sources(path):
        examples += _load_source(source, format, family)
    return examples


def load_jsonl(
    path: str | os.PathLike,
    prompt_field: str = "prompt",
    response_field: str = "response",
    family: str | None = None,
) -> list[Example]:
    """Examples from a JSON-lines file of prompt/response records whose fields may have other names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    return _load_source(path, "prompt-response", family, prompt_field, response_field)


def client_sources(folder: str | os.PathLike) -> dict[str, Path]:
    """A naturally partitioned federation: client id (the file's name without its suffix) → its data source,
    ordered by id. The folder holds one data file (or saved dataset) per client."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"client_data folder not found: {folder}")
    if is_dataset_folder(folder):
        raise ValueError(f"client_data {folder} is one saved dataset; give a folder holding one file per client")
    clients: dict[str, Path] = {}
    for source in data_sources(folder):
        name = _name(source)
        if name in clients:
            raise ValueError(f"client_data {folder}: two files for client {name!r} "
                             f"({clients[name].name} and {source.name}); keep one")
        clients[name] = source
    return clients


def load_client_data(folder: str | os.PathLike, format: str | None = None) -> dict[str, list[Example]]:
    """Each client's examples (client id → examples, ordered by id), one file per client; an example's family
    is its record's ``family``, else the client id."""
    return {name: _load_source(source, format, None) for name, source in client_sources(folder).items()}
