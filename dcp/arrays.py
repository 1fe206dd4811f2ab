"""numpy arrays as dcp payloads, copied neither on the way out nor on the way in.

::

    from dcp import arrays

    await conn.publish("radar.iq", arrays.pack(iq, frame=n))   # a small header, then the array's own memory
    ...
    iq, meta = arrays.unpack(msg.payload)                      # a view of the received payload

:func:`pack` returns the payload as two parts, a header and a byte view of the array,
which :meth:`dcp.Connection.publish` (and a :class:`dcp.DataAgent` handler's return
value) sends back to back without joining them: the socket reads the array from where
it is.  :func:`unpack` is ``np.frombuffer`` over the payload at the header's offset,
reshaped: the array is a view of the received ``bytes`` (read-only) or, for payloads of
64 KiB or more, of the ``bytearray`` the socket read into (writable).  Without this
module, ``np.frombuffer(msg.payload, dtype).reshape(shape)`` reads a bare array.

A payload, byte by byte::

    offset  size  field
         0     4  magic b"dcpA"
         4     4  length M of the map, u32 big-endian
         8     M  msgpack map: "dtype" (numpy's dtype.str, e.g. "<c8"), "shape" (list of
                  ints), "order" ("C" or "F"), "meta" (what pack() was given)
     8 + M        zero bytes up to the data offset, a multiple of 16
    offset        the array's bytes, in that order

The data offset is a multiple of 16 so that the array is aligned in a received
payload, whose buffer is.  numpy is imported when these functions are called, never
by ``import dcp``: it is in the ``examples`` extra, not a dependency.
"""

from __future__ import annotations

import math
import re
import struct
from typing import TYPE_CHECKING, Any, NamedTuple

import msgpack

if TYPE_CHECKING:
    import numpy as np
    from typing_extensions import Buffer

__all__ = ["MAGIC", "ALIGN", "MAX_HEADER", "Unpacked", "pack", "unpack"]

MAGIC = b"dcpA"
#: The array's data starts at a multiple of this many bytes.
ALIGN = 16
#: The largest map :func:`unpack` reads: a header is a few dozen bytes plus ``meta``.
MAX_HEADER = 64 * 1024
_PREFIX = struct.Struct("!4sI")
_PADDING = bytes(ALIGN)
#: What numpy's ``dtype.str`` looks like ("<c8", "|b1", "<M8[ns]"): the only dtype names
#: read from a payload, so that numpy's dtype parser never sees anything else.
_DTYPE_STR = re.compile(r"[<>|=][a-zA-Z]\d+(\[\w+\])?")


class Unpacked(NamedTuple):
    """What :func:`unpack` returns: the array (a view of the payload) and the ``meta`` map."""

    array: np.ndarray[Any, Any]
    meta: dict[str, Any]


def pack(array: Any, **meta: Any) -> tuple[bytes, memoryview]:
    """The payload of ``array`` and ``meta`` as (header, data), for
    :meth:`dcp.Connection.publish`; the data part is a view of the array's memory.
    ``meta`` holds what msgpack packs: str, int, float, bytes, lists and maps of them
    (``int()`` a numpy integer first).

    A C- or Fortran-ordered array is not copied; any other (a strided view, such as a
    crop) has no one block of memory to send, and is copied once into one.

    Raises:
        ValueError: a dtype that does not survive its ``dtype.str`` (object, structured).
        TypeError: a ``meta`` value msgpack cannot pack.
    """
    import numpy as np

    array = np.asarray(array)
    if _dtype(array.dtype.str) != array.dtype:
        raise ValueError(f"arrays.pack takes plain dtypes (numbers, bool, bytes, datetime), not {array.dtype}")
    order = "C"
    if not array.flags.c_contiguous:
        if array.flags.f_contiguous:
            order, array = "F", array.T  # its transpose is C-ordered: the same bytes
        else:
            array = np.ascontiguousarray(array)
    shape = array.shape[::-1] if order == "F" else array.shape
    body = msgpack.packb({"dtype": array.dtype.str, "shape": list(shape), "order": order, "meta": meta}, use_bin_type=True)
    padding = -(_PREFIX.size + len(body)) % ALIGN
    data = memoryview(array.reshape(-1).view(np.uint8))  # C-ordered: views, not copies
    return _PREFIX.pack(MAGIC, len(body)) + body + _PADDING[:padding], data


def unpack(payload: Buffer) -> Unpacked:
    """The array (a view of ``payload``, no copy) and the ``meta`` of a :func:`pack` payload.

    Raises:
        ValueError: not such a payload: another magic, a header over
            :data:`MAX_HEADER`, a bad map, or data of another size than its dtype and
            shape say.
    """
    import numpy as np

    view = memoryview(payload).cast("B")
    if len(view) < _PREFIX.size:
        raise ValueError(f"not a dcp array payload: {len(view)} bytes")
    magic, size = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise ValueError(f"not a dcp array payload: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if size > MAX_HEADER or _PREFIX.size + size > len(view):
        raise ValueError(f"dcp array payload: a header of {size} bytes in a payload of {len(view)}")
    try:
        header = msgpack.unpackb(view[_PREFIX.size : _PREFIX.size + size], raw=False, strict_map_key=True)
        dtype, shape, order, meta = _dtype(header["dtype"]), header["shape"], header["order"], header["meta"]
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
        raise ValueError(f"dcp array payload: a bad header: {exc}") from exc
    if (
        dtype is None or order not in ("C", "F") or not isinstance(meta, dict)
        or not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape)
    ):
        raise ValueError(f"dcp array payload: a bad header: {header!r:.200}")
    offset = _PREFIX.size + size + -(_PREFIX.size + size) % ALIGN
    count = math.prod(shape)
    if offset + count * dtype.itemsize != len(view):
        raise ValueError(
            f"dcp array payload: {len(view) - offset} data bytes, expected {count * dtype.itemsize} for {dtype} {shape}"
        )
    array = np.frombuffer(view, dtype, count, offset)
    array = array.reshape(shape[::-1]).T if order == "F" else array.reshape(shape)
    return Unpacked(array, meta)


def _dtype(name: Any) -> np.dtype[Any] | None:
    """The plain dtype (one number, bool, string or datetime per item: no fields, no
    subarray, no objects) whose ``dtype.str`` is ``name``, or None."""
    import numpy as np

    if not isinstance(name, str) or not _DTYPE_STR.fullmatch(name):
        return None
    try:
        dtype = np.dtype(name)
    except TypeError:  # a name of the right shape that numpy does not know ("<q9")
        return None
    plain = dtype.fields is None and dtype.subdtype is None and not dtype.hasobject and dtype.itemsize > 0
    return dtype if plain else None
