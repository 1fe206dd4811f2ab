"""Topology numbers: the routing math of the stateless data plane (pure, no I/O).

A broker ``b`` owns a prime key ``m_b`` greater than ``2**P_b`` (``P_b`` ports).
The orchestrator turns the port bitmaps ``r_b`` of a delivery tree into one integer
``X`` with the Chinese Remainder Theorem: ``X mod m_b == r_b`` for every broker of
the tree.  A broker forwards a frame that arrived on port ``p`` to the ports named by
``(X mod m_b) & ~(1 << p) & attached``.

``encode`` is Garner's incremental CRT on Python ints and ``is_prime`` a
deterministic Miller-Rabin test; the property tests check them against
``sympy.ntheory.modular.crt`` and ``sympy.isprime``.  sympy is imported only for
numbers past Miller-Rabin's exact range, so a broker that allocates its own key
starts in milliseconds (``import sympy`` alone takes most of a second here).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from math import gcd

from .errors import RoutingError

__all__ = [
    "allocate_keys",
    "random_key",
    "is_prime",
    "encode",
    "forward",
    "ports_of",
    "bitmap_of",
    "x_bits",
    "x_bytes",
    "int_to_bytes",
    "int_from_bytes",
]


def allocate_keys(n: int, ports: int = 64, exclude: Iterable[int] = ()) -> list[int]:
    """Return ``n`` distinct primes, each greater than ``2**ports``, in increasing order.

    Args:
        n: how many keys.
        ports: the number of ports of the brokers that will own them.
        exclude: keys already in use, never returned again.

    Raises:
        RoutingError: ``n < 0`` or ``ports < 1``.
    """
    if n < 0:
        raise RoutingError(f"cannot allocate {n} keys")
    if ports < 1:
        raise RoutingError(f"a broker needs at least one port, got ports={ports}")
    taken = set(exclude)
    keys: list[int] = []
    candidate = 1 << ports
    while len(keys) < n:
        candidate += 1
        if candidate not in taken and is_prime(candidate):
            keys.append(candidate)
    return keys


def random_key(ports: int = 64, rng: random.Random | None = None) -> int:
    """A prime key for a broker with ``ports`` ports, drawn at random from
    ``(2**ports, 2**(ports + 1))``: brokers started with default settings then own
    distinct keys (there are about ``2**ports / (ports * 0.69)`` primes to draw from;
    the orchestrator and the link handshake refuse a clash with ``same_key``).

    Raises:
        RoutingError: ``ports < 1``.
    """
    if ports < 1:
        raise RoutingError(f"a broker needs at least one port, got ports={ports}")
    draw = rng or _SYSTEM_RANDOM
    low = 1 << ports
    while True:
        candidate = low + 1 + draw.randrange(low - 1)  # in (2**ports, 2**(ports + 1))
        if is_prime(candidate):
            return candidate


_SYSTEM_RANDOM = random.SystemRandom()

# Bases that make Miller-Rabin exact below 3.3e24 (Sorenson and Webster, 2015): every
# key of a broker with up to 81 ports.  Above that bound they can be fooled (psi_13 is
# a strong pseudoprime to all of them), so larger numbers go to sympy.isprime.
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
_MR_EXACT_BELOW = 3_317_044_064_679_887_385_961_981


def is_prime(n: int) -> bool:
    """Whether ``n`` is prime: exact Miller-Rabin below 3.3e24, sympy above."""
    if n >= _MR_EXACT_BELOW:
        from sympy import isprime  # imported only for keys of brokers with > 81 ports

        return bool(isprime(n))
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while not d & 1:
        d >>= 1
        s += 1
    for a in _MR_BASES:
        y = pow(a, d, n)
        if y in (1, n - 1):
            continue
        for _ in range(s - 1):
            y = y * y % n
            if y == n - 1:
                break
        else:
            return False
    return True


def encode(residues: Mapping[int, int]) -> int:
    """Return the least non-negative ``X`` with ``X % key == bitmap`` for every item.

    Args:
        residues: ``{key: bitmap}``; the keys pairwise coprime, ``0 <= bitmap < key``.

    Raises:
        RoutingError: a key below 2, a bitmap out of range, or two keys sharing a factor.
    """
    x = 0
    modulus = 1
    seen: list[int] = []
    for key, bitmap in residues.items():
        if not isinstance(key, int) or not isinstance(bitmap, int):
            raise RoutingError(f"keys and bitmaps are ints, got {key!r}: {bitmap!r}")
        if key < 2:
            raise RoutingError(f"key {key} is below 2")
        if not 0 <= bitmap < key:
            raise RoutingError(f"bitmap {bitmap} for key {key} is not in [0, {key})")
        try:
            inverse = pow(modulus, -1, key)
        except ValueError:
            other = next(k for k in seen if gcd(k, key) != 1)
            raise RoutingError(f"keys {other} and {key} are not coprime") from None
        x += modulus * (((bitmap - x) * inverse) % key)
        modulus *= key
        seen.append(key)
    return x


def forward(x: int, key: int, ingress_port: int, attached_mask: int) -> int:
    """Return the out-port bitmap of a frame with number ``x`` that arrived on ``ingress_port``.

    Never the ingress port, never a port that is not attached.

    Raises:
        RoutingError: a negative number, a key below 2 or a negative port.
    """
    if x < 0 or key < 2 or ingress_port < 0 or attached_mask < 0:
        raise RoutingError(
            f"forward needs x >= 0, key >= 2, port >= 0, mask >= 0; "
            f"got x={x}, key={key}, port={ingress_port}, mask={attached_mask}"
        )
    return (x % key) & ~(1 << ingress_port) & attached_mask


def ports_of(bitmap: int) -> list[int]:
    """The port numbers whose bits are set, in increasing order: what a bitmap of
    :func:`encode` names (``ports_of(forward(...))``: where a broker sends a frame)."""
    if bitmap < 0:
        raise RoutingError(f"bitmap {bitmap} is negative")
    ports = []
    while bitmap:
        low = bitmap & -bitmap
        ports.append(low.bit_length() - 1)
        bitmap ^= low
    return ports


def bitmap_of(ports: Iterable[int]) -> int:
    """The bitmap with the bits of ``ports`` set: one broker's share of a route, for
    :func:`encode` (``encode({key: bitmap_of([sub1.port, sub2.port])})``)."""
    bitmap = 0
    for port in ports:
        if port < 0:
            raise RoutingError(f"port {port} is negative")
        bitmap |= 1 << port
    return bitmap


def x_bits(x: int) -> int:
    """Bits of the topology number ``x``."""
    if x < 0:
        raise RoutingError(f"topology number {x} is negative")
    return x.bit_length()


def x_bytes(x: int) -> int:
    """Bytes that ``x`` takes on the wire (0 for X = 0)."""
    return (x_bits(x) + 7) // 8


def int_to_bytes(x: int) -> bytes:
    """``x`` as minimal big-endian bytes (empty for 0), as frames carry it."""
    return x.to_bytes(x_bytes(x), "big")


def int_from_bytes(data: bytes | bytearray | memoryview) -> int:
    """The inverse of :func:`int_to_bytes`."""
    return int.from_bytes(data, "big")
