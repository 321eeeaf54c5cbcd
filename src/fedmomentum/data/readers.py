"""Records from data files: JSON lines, JSON arrays, Parquet, and folders saved by ``datasets``' ``save_to_disk``.

Each record comes with where it is (``file:line``, or the row), so that an error can name it. The text of JSON
files must be UTF-8 (a byte that is not names its line). Parquet and ``save_to_disk`` folders (Arrow files) are
read with pyarrow; the ``datasets`` library itself is not needed.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["SUFFIXES", "Record", "is_dataset_folder", "read_records"]

SUFFIXES = (".jsonl", ".json", ".parquet")


class Record(NamedTuple):
    """One record of a data file and where it is (``data.jsonl:3``, ``data.parquet: row 2``)."""

    where: str
    value: Any


def is_dataset_folder(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def read_records(path: Path) -> Iterator[Record]:
    """The records of one data file (or ``save_to_disk`` folder), in order; the type follows the file name."""
    if path.is_dir():
        if not is_dataset_folder(path):
            raise ValueError(f"{path}: a folder of data is read file by file; this one is not a saved dataset")
        return _dataset_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _json_lines(path, _text(path))
    if suffix == ".json":
        return _json(path)
    if suffix == ".parquet":
        return _parquet(path)
    raise ValueError(f"{path}: unknown kind of data file {suffix or '(no suffix)'!r}: use .jsonl, .json, .parquet "
                     "or a folder saved by datasets' save_to_disk")


def _text(path: Path) -> str:
    """The file as UTF-8 text (a leading byte-order mark dropped); a byte that is not UTF-8 names its line."""
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        pos = error.start
        line, column = raw.count(b"\n", 0, pos) + 1, pos - raw.rfind(b"\n", 0, pos)
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[pos]:02x} at byte {column} of the line); "
                         "save the file as UTF-8") from None


def _json_lines(path: Path, text: str) -> Iterator[Record]:
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{lineno}: invalid JSON: {error.msg} (column {error.colno})") from None
        yield Record(f"{path}:{lineno}", value)


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _is_one_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _json(path: Path) -> Iterator[Record]:
    """A ``.json`` file: a JSON array of records, or (when it starts with an object) JSON lines."""
    text = _text(path)
    pos = _skip_space(text, 0)
    if text.startswith("{", pos):
        if "\n" in text.strip() and _is_one_object(text):
            raise ValueError(f"{path}: holds one JSON object, not records: write the records as a JSON array "
                             "or one object per line")
        yield from _json_lines(path, text)
        return
    if not text.startswith("[", pos):
        raise ValueError(f"{path}: expected a JSON array of records (or one JSON object per line)")
    decoder = json.JSONDecoder()
    pos, index = _skip_space(text, pos + 1), 0
    while not text.startswith("]", pos):
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: invalid JSON: {error.msg} (column {error.colno})") from None
        index += 1
        yield Record(f"{path}:{_line(text, pos)} (record {index})", value)
        pos = _skip_space(text, end)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif not text.startswith("]", pos):
            raise ValueError(f"{path}:{_line(text, pos)}: invalid JSON: expected ',' or ']' after record {index}")
    if _skip_space(text, pos + 1) != len(text):
        raise ValueError(f"{path}:{_line(text, pos)}: invalid JSON: extra data after the array")


def _rows(table: Any, where: str) -> Iterator[Record]:
    for index, row in enumerate(table.to_pylist(), start=1):
        yield Record(f"{where}: row {index}", row)


def _parquet(path: Path) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read it as Parquet: {error}") from None
    yield from _rows(table, str(path))


def _read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a valid JSON file: {error}") from None


def _dataset_folder(path: Path) -> Iterator[Record]:
    """A ``save_to_disk`` folder: its Arrow files in order (a ``DatasetDict``: its ``train`` split, or its only
    split)."""
    import pyarrow as pa

    where = str(path)
    if (path / "dataset_dict.json").is_file():
        splits = _read_json_file(path / "dataset_dict.json").get("splits")
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise ValueError(f"{path}/dataset_dict.json: 'splits' must be a list of names")
        if "train" in splits:
            split = "train"
        elif len(splits) == 1:
            split = splits[0]
        else:
            raise ValueError(f"{path}: a saved DatasetDict without a 'train' split (splits: {', '.join(splits)}); "
                             "give the folder of the split to read")
        if "/" in split or "\\" in split or split in ("", ".", ".."):
            raise ValueError(f"{path}/dataset_dict.json: bad split name {split!r}")
        path, where = path / split, f"{path} ({split} split)"
        if not (path / "state.json").is_file():
            raise ValueError(f"{path}: the split folder has no state.json")
    state = _read_json_file(path / "state.json")
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not files:
        raise ValueError(f"{path}/state.json: no '_data_files' list")
    tables = []
    for item in files:
        name = item.get("filename") if isinstance(item, dict) else None
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"{path}/state.json: bad data file name {name!r}")
        try:
            with pa.memory_map(str(path / name)) as source:
                tables.append(pa.ipc.open_stream(source).read_all())
        except (pa.ArrowException, OSError) as error:
            raise ValueError(f"{path / name}: cannot read it as an Arrow stream: {error}") from None
    try:
        table = pa.concat_tables(tables)
    except pa.ArrowException as error:
        raise ValueError(f"{path}: its Arrow files do not share one schema: {error}") from None
    yield from _rows(table, where)
