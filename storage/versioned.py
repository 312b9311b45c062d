"""Records stored as msgpack arrays whose first field is a version (storage/line_records.py,
storage/member_facts.py): a reader refuses a version it does not know rather than
misreading it."""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import msgspec

T = TypeVar("T")


class UnknownVersion(ValueError):
    """A row written by a newer server; this one cannot read it."""


class _Version(msgspec.Struct, array_like=True):
    version: int        # the first field of every version; the rest is read once it is known


_versioned = msgspec.msgpack.Decoder(_Version)
encode = msgspec.msgpack.Encoder().encode


def reader(kind: type[T], version: int, what: str) -> Callable[[bytes], T]:
    """Decodes a record of kind stored at version; UnknownVersion, naming `what`, for any other."""
    decoder = msgspec.msgpack.Decoder(kind)

    def decode(data: bytes) -> T:
        found = _versioned.decode(data).version
        if found != version:
            raise UnknownVersion(f"{what} of version {found}; this server reads version {version}")
        return decoder.decode(data)
    return decode
