"""Partitions bound to SuperNode keys: the operator's ``node-keys`` file, and comparing a node's key with it.

With ``flower-superlink --enable-supernode-auth`` the SuperLink admits only registered public keys and reports each
connected node's key (``Grid.get_nodes``: ``NodeInfo.public_key``, PEM). The ``node-keys`` file, a TOML file on the
server, names the key that may hold each partition, so a registered node cannot take another's partition:

    # partition = the node's public key: the path of its .pub file (relative to this file), or the key itself
    0 = "certs/node-0.pub"
    1 = "ecdsa-sha2-nistp384 AAAAE2VjZHNh... node-1"

Every partition of the run must be listed, each with its own key. Keys are compared as DER
(``SubjectPublicKeyInfo``), whatever encoding each side used.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization


def _der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _openssh(text: str, where: str) -> bytes:
    try:
        return _der(serialization.load_ssh_public_key(text.strip().encode()))
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise ValueError(f"{where}: not an OpenSSH public key ({error})") from None


def read_node_keys(path: str | Path, clients: int) -> dict[int, bytes]:
    """``{partition: public key (DER)}`` from a ``node-keys`` file; a one-line ``ValueError`` for a file that does
    not list every partition ``0 … clients-1`` once with a key of its own."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"node-keys file {str(path)!r} not found on the server (give an absolute path)")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"node-keys file {path}: {' '.join(str(error).split())}") from None
    keys: dict[int, bytes] = {}
    for name, value in table.items():
        if not name.isdigit() or not 0 <= int(name) < clients or not isinstance(value, str):
            raise ValueError(f"node-keys file {path}: each line is partition = \"key or .pub file\", with partitions "
                             f"0 … {clients - 1}; got {name} = {value!r}")
        where = f"node-keys file {path}, partition {name}"
        text = value
        if not value.strip().startswith(("ecdsa-", "ssh-")):
            key_file = path.parent / value
            if not key_file.is_file():
                raise ValueError(f"{where}: {value!r} is neither an OpenSSH public key nor a file")
            text = key_file.read_text(encoding="utf-8")
        keys[int(name)] = _openssh(text, where)
    missing = sorted(set(range(clients)) - set(keys))
    if missing:
        raise ValueError(f"node-keys file {path} names no key for partition(s) {missing}: list every partition")
    if len(set(keys.values())) < len(keys):
        raise ValueError(f"node-keys file {path} gives one key to several partitions: give each its own node")
    return keys


def same_key(reported: bytes | None, expected: bytes) -> bool:
    """Whether the key the SuperLink reported for a node (PEM, or DER) is ``expected`` (DER)."""
    if not reported:
        return False
    try:
        loaded = (serialization.load_pem_public_key(reported) if reported.lstrip().startswith(b"-----")
                  else serialization.load_der_public_key(reported))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return _der(loaded) == expected


__all__ = ["read_node_keys", "same_key"]
