"""Reading one npy-encoded array out of bytes that came over the network, checked before anything is allocated.

The caller says the shape and dtype it expects; the byte count is checked against them first, then the npy header
(it must say the same, C order), and only then are the values read, with ``np.frombuffer`` (never ``np.load``: a
header claiming a 37 GiB array is never allocated)."""

from __future__ import annotations

import io
import math

import numpy as np

MAX_HEADER = 4096  # bytes an npy header may take (np.save writes 128 for a matrix)


def read_npy(data: object, shape: tuple[int, ...], dtype: str, what: str,
             error: type[Exception] = ValueError, name: str | None = None) -> np.ndarray:
    """The ``shape`` array of ``dtype`` (an npy descr such as ``"<f4"``) that ``data`` encodes, read-only; ``error``
    naming ``what`` and the fault when ``data`` is anything else (``name``: what to call the dtype in it)."""
    expected = np.dtype(dtype)
    name = name or str(expected)
    body = expected.itemsize * math.prod(shape)
    if not isinstance(data, bytes | bytearray | memoryview) or not body < len(data) <= body + MAX_HEADER:
        size = len(data) if hasattr(data, "__len__") else "?"
        raise error(f"{what}: {size} bytes, a {shape} {name} array takes {body} plus an npy header")
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
        declared, fortran, declared_dtype = reader(stream, max_header_size=MAX_HEADER)
    except (KeyError, ValueError, SyntaxError, TypeError) as fault:
        raise error(f"{what}: not an npy-encoded array ({fault or 'unsupported npy version'})") from None
    if tuple(declared) != shape or declared_dtype != expected or fortran:
        raise error(f"{what}: its npy header says shape {tuple(declared)}, dtype {declared_dtype}"
                    f"{', Fortran order' if fortran else ''}; expected {shape} {name} in C order")
    offset = stream.tell()
    if len(data) - offset != body:
        raise error(f"{what}: {len(data) - offset} bytes of values, a {shape} {name} array takes {body}")
    return np.frombuffer(data, dtype=expected, count=math.prod(shape), offset=offset).reshape(shape)
