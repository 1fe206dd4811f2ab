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

import math
import random
from collections.abc import Iterable, Mapping

from .errors import RoutingError

__all__ = [
    "FAN",
    "MAX_PORTS",
    "ROOT_FAN",
    "KeyLayout",
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
            other = next(k for k in seen if math.gcd(k, key) != 1)
            raise RoutingError(f"keys {other} and {key} are not coprime") from None
        x += modulus * (((bitmap - x) * inverse) % key)
        modulus *= key
        seen.append(key)
    return x


#: Ports per bank, and children per directory, of a :class:`KeyLayout`.
FAN = 64
#: The most ports a broker has: control messages name a port with 16 bits.
MAX_PORTS = 65_535


class KeyLayout:
    """The keys of one broker: one prime for up to 64 ports, a tree of primes above.

    A broker with ``P <= 64`` ports owns one key ``m > 2**P``; the residue ``X mod m``
    is the bitmap of its out ports, as in the article.  A broker with more ports would
    need one key above ``2**P``, and every stream crossing it would carry ``P`` bits of
    ``X`` whatever its fan-out.  Instead the key is a tree, every node a prime:

    - the root holds ports 0..63 itself (bits 0..63 of its residue) and, in the bits
      above, the bitmap of its children that the frame uses;
    - the other ports are in banks of 64 (ports ``64 + 64 i ..``), each with a key in
      ``(2**64, 2**65)`` whose residue is the bitmap of the bank's ports;
    - when there are more than 16 banks, directories of up to 64 children (keys in
      ``(2**64, 2**65)`` too, residue: the bitmap of the children used) group them,
      level by level, until at most 16 nodes hang from the root (its key is then
      below ``2**81``, where :func:`is_prime` is exact without sympy).

    ``X`` carries residues only for the nodes a stream's tree uses; the residue of a
    node left out of the CRT is arbitrary, which is why the root and the directories
    name the children to read.  A stream reaching ``k`` ports of a broker carries at
    most the root plus, per port, one bank and one directory per level: one level
    up to 1,088 ports, two up to 65,600 (every port count a port number can name).
    A broker decodes from the root down, reading only the nodes named.

    ``keys`` are in a fixed order, root first, then each level of directories, then
    the banks: with ``ports`` they are the whole layout (what a broker announces).
    """

    __slots__ = ("ports", "keys", "_children", "_bases", "_direct", "_modulus", "_banks", "_up")

    def __init__(self, ports: int, keys: Iterable[int]) -> None:
        """Raises RoutingError: a key count that does not fit ``ports``, a key not
        above its node's bitmaps, or two equal keys."""
        keys = tuple(keys)
        if not isinstance(ports, int) or isinstance(ports, bool) or ports < 1:
            raise RoutingError(f"a broker needs at least one port, got ports={ports!r}")
        shape = _shape(ports)
        if len(keys) != len(shape):
            raise RoutingError(f"a broker with {ports} ports has {len(shape)} keys, got {len(keys)}")
        for i, (key, (width, _, _)) in enumerate(zip(keys, shape)):
            if not isinstance(key, int) or isinstance(key, bool) or key <= 1 << width or key < 3:
                raise RoutingError(f"key {i} of a broker with {ports} ports must be an int above 2**{width}, got {key!r}")
        if len(set(keys)) != len(keys):
            raise RoutingError("the keys of a broker must be distinct")
        self.ports = ports
        self.keys = keys
        self._direct = shape[0][0] if len(shape) == 1 else FAN  # ports the root holds itself
        self._children = [children for _, children, _ in shape]
        self._bases = [base for _, _, base in shape]
        self._modulus = math.prod(keys)  # X reduced by it first: it keeps every residue here
        # the bank nodes by bank (ports FAN + 64 j ...), and each node's parent and bit there
        self._banks = [node for node, children in enumerate(self._children) if node and not children]
        self._up = [(0, 0)] * len(keys)
        for node, children in enumerate(self._children):
            for i, child in enumerate(children):
                self._up[child] = (node, 1 << ((FAN if node == 0 else 0) + i))

    @classmethod
    def single(cls, key: int) -> KeyLayout:
        """One key of any size, ports ``0 .. key.bit_length() - 2``: the article's layout
        (what :class:`dcp.topology.Overlay` makes of a plain int key).

        Raises RoutingError: a key that is not an int of at least 3.
        """
        if not isinstance(key, int) or isinstance(key, bool) or key < 3:
            raise RoutingError(f"a key is an int of at least 3, got {key!r}")
        layout = cls.__new__(cls)
        layout.ports = key.bit_length() - 1
        layout.keys = (key,)
        layout._direct = layout.ports
        layout._children = [[]]
        layout._bases = [0]
        layout._modulus = key
        layout._banks = []
        layout._up = [(0, 0)]
        return layout

    @classmethod
    def from_keys(cls, ports: int, keys: Iterable[int]) -> KeyLayout:
        """The layout a broker announces, checked: the shape of ``ports``, every key prime.

        Raises RoutingError: a key count that does not fit, a key out of range, a key
        that is not prime, or two equal keys.
        """
        layout = cls(ports, keys)
        for key, (width, _, _) in zip(layout.keys, _shape(ports)):
            if key.bit_length() > width + 64 or not is_prime(key):
                raise RoutingError(f"key {key} of a broker with {ports} ports is not a prime below 2**{width + 64}")
        return layout

    @staticmethod
    def root_width(ports: int) -> int:
        """Bits of the root's residue for ``ports``: the root key must be above ``2**root_width``."""
        return _shape(ports)[0][0]

    @classmethod
    def random(cls, ports: int, root: int | None = None, rng: random.Random | None = None) -> KeyLayout:
        """A layout of random primes (``root``: the root key, if chosen).

        Raises RoutingError: ``ports < 1``, or ``root`` not above the root's bitmaps.
        """
        if not isinstance(ports, int) or ports < 1:
            raise RoutingError(f"a broker needs at least one port, got ports={ports!r}")
        keys: list[int] = []
        for width, _, _ in _shape(ports):
            key = root if root is not None and not keys else random_key(width, rng)
            while key in keys:
                key = random_key(width, rng)
            keys.append(key)
        return cls(ports, keys)

    @property
    def root(self) -> int:
        """The root key: the broker's name in links and reports."""
        return self.keys[0]

    def residues(self, bitmap: int) -> dict[int, int]:
        """``{key: residue}`` of the nodes that ``bitmap`` (out ports) uses, for :func:`encode`.

        Raises RoutingError: a negative bitmap or a port past ``ports``.
        """
        if bitmap < 0 or bitmap >> self.ports:
            raise RoutingError(f"bitmap {bitmap} names ports outside 0..{self.ports - 1}")
        keys = self.keys
        if len(keys) == 1:
            return {keys[0]: bitmap} if bitmap else {}
        residues = {0: bitmap & _BANK_MASK}  # node -> residue; the root holds ports 0 .. 63
        rest, bank = bitmap >> FAN, 0
        while rest:  # the banks with a port set, skipping the empty ones: it costs what the bitmap uses
            skip = ((rest & -rest).bit_length() - 1) // FAN
            rest >>= skip * FAN
            bank += skip
            node = self._banks[bank]
            residues[node] = rest & _BANK_MASK
            while node:  # mark the way up to the root, as far as it is not marked yet
                parent, bit = self._up[node]
                marked = parent in residues
                residues[parent] = residues.get(parent, 0) | bit
                if marked:
                    break
                node = parent
            rest >>= FAN
            bank += 1
        return {keys[node]: residue for node, residue in residues.items() if residue}

    def decode(self, x: int) -> int:
        """The bitmap of ports that ``x`` names here (what the broker forwards to,
        before removing the ingress and unattached ports)."""
        keys = self.keys
        if len(keys) == 1:
            return x % keys[0] & ((1 << self.ports) - 1)  # a key below 2**(ports + 1) leaves one bit over
        if x > self._modulus:  # X of a tree over many brokers: each remainder below costs less on what is left
            x %= self._modulus
        residue = x % keys[0]
        out = residue & _BANK_MASK
        pending = [(self._children[0], residue >> FAN)]
        while pending:
            children, used = pending.pop()
            while used:
                low = used & -used
                used ^= low
                index = low.bit_length() - 1
                if index >= len(children):
                    break  # bits past the last child name nothing
                node = children[index]
                residue = x % keys[node]
                if self._children[node]:
                    pending.append((self._children[node], residue))
                else:
                    out |= (residue & _BANK_MASK) << self._bases[node]
        return out & ((1 << self.ports) - 1)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeyLayout):
            return NotImplemented
        return self.ports == other.ports and self.keys == other.keys

    def __hash__(self) -> int:
        return hash((self.ports, self.keys))

    def __repr__(self) -> str:
        return f"KeyLayout(ports={self.ports}, {len(self.keys)} keys, root={self.root})"


_BANK_MASK = (1 << FAN) - 1
#: Children of the root, at most: its key then stays below 2**81, within the exact
#: range of :func:`is_prime` (no sympy at start-up), for up to 64 * 16 * 64 ports.
ROOT_FAN = 16


def _shape(ports: int) -> list[tuple[int, list[int], int]]:
    """The nodes of the layout for ``ports``, in key order: ``(width, children, base)``.

    ``width``: the residue's bits (the key is above ``2**width``); ``children``: node
    indexes (empty for a bank); ``base``: a bank's first port.
    """
    if ports <= FAN:
        return [(ports, [], 0)]
    banks: list[tuple[int, list[int], int]] = [(FAN, [], base) for base in range(FAN, ports, FAN)]
    levels = [banks]
    while len(levels[-1]) > ROOT_FAN:
        below = len(levels[-1])
        levels.append([(FAN, [], 0) for _ in range(-(-below // FAN))])
    # key order: root, the top level, ..., the banks; children name indexes in that order
    order = [level for level in reversed(levels)]
    first = [1]
    for level in order:
        first.append(first[-1] + len(level))
    nodes: list[tuple[int, list[int], int]] = [(FAN + len(order[0]), list(range(1, 1 + len(order[0]))), 0)]
    for depth, level in enumerate(order):
        for i, (width, _, base) in enumerate(level):
            if depth + 1 < len(order):
                below = len(order[depth + 1])
                start = first[depth + 1] + i * FAN
                children = list(range(start, min(start + FAN, first[depth + 1] + below)))
            else:
                children = []
            nodes.append((width, children, base))
    return nodes


def forward(x: int, key: int | KeyLayout, ingress_port: int, attached_mask: int) -> int:
    """Return the out-port bitmap of a frame with number ``x`` that arrived on ``ingress_port``
    of a broker with this key (or key layout).

    Never the ingress port, never a port that is not attached.

    Raises:
        RoutingError: a negative number, a key below 2 or a negative port.
    """
    modulus = key.root if isinstance(key, KeyLayout) else key
    if x < 0 or modulus < 2 or ingress_port < 0 or attached_mask < 0:
        raise RoutingError(
            f"forward needs x >= 0, key >= 2, port >= 0, mask >= 0; "
            f"got x={x}, key={modulus}, port={ingress_port}, mask={attached_mask}"
        )
    out = key.decode(x) if isinstance(key, KeyLayout) else x % key
    return out & ~(1 << ingress_port) & attached_mask


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
