"""Property tests of dcp.routing: CRT topology numbers, primes, bit helpers.

sympy is the oracle (``sympy.ntheory.modular.crt`` and ``sympy.isprime``); the module
under test must not import it.
"""

from __future__ import annotations

import functools
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import sympy
from hypothesis import assume, example, given, settings, strategies as st
from sympy.ntheory.modular import crt

from tests.purity import copy_with_import, loaded
from dcp.errors import DcpError, RoutingError
from dcp.routing import (
    FAN,
    ROOT_FAN,
    KeyLayout,
    allocate_keys,
    random_key,
    bitmap_of,
    encode,
    forward,
    int_from_bytes,
    int_to_bytes,
    is_prime,
    ports_of,
    x_bits,
    x_bytes,
)


SMALL_PRIMES = list(sympy.primerange(2, 2000))

# Keys as brokers get them: primes just above 2**ports.  Computed once (cheap).
KEY_POOLS = {ports: allocate_keys(12, ports) for ports in (1, 3, 8, 16, 64, 65)}


# --------------------------------------------------------------------------- strategies

@st.composite
def distinct_small_primes(draw: st.DrawFn, max_size: int = 8) -> list[int]:
    return draw(st.lists(st.sampled_from(SMALL_PRIMES), min_size=1, max_size=max_size, unique=True))


@st.composite
def distinct_allocated_keys(draw: st.DrawFn) -> list[int]:
    pool = KEY_POOLS[draw(st.sampled_from(sorted(KEY_POOLS)))]
    return draw(st.lists(st.sampled_from(pool), min_size=1, max_size=8, unique=True))


key_sets = st.one_of(distinct_small_primes(), distinct_allocated_keys())


@st.composite
def residue_maps(draw: st.DrawFn) -> dict[int, int]:
    keys = draw(key_sets)
    return {k: draw(st.integers(0, k - 1)) for k in keys}


# --------------------------------------------------------------------------- encode

def test_article_worked_example() -> None:
    assert encode({3: 2, 4: 3, 5: 1}) == 11
    assert 11 % 3 == 2 and 11 % 4 == 3 and 11 % 5 == 1


def test_encode_empty_is_zero() -> None:
    assert encode({}) == 0


@given(residue_maps(), st.data())
def test_round_trip_and_forward(residues: dict[int, int], data: st.DataObject) -> None:
    x = encode(residues)
    for key, bitmap in residues.items():
        assert x % key == bitmap
        ingress = data.draw(st.integers(0, max(key.bit_length(), 1)), label="ingress")
        attached = data.draw(
            st.one_of(st.just((1 << key.bit_length()) - 1), st.integers(0, 2 ** key.bit_length())),
            label="attached",
        )
        out = forward(x, key, ingress, attached)
        assert out == bitmap & ~(1 << ingress) & attached
        # never the ingress port, never an unattached port
        assert not out >> ingress & 1
        assert out & ~attached == 0


@given(residue_maps())
def test_minimal_and_matches_sympy_crt(residues: dict[int, int]) -> None:
    keys = list(residues)
    x = encode(residues)
    product = math.prod(keys)
    assert 0 <= x < product
    oracle = crt(keys, [residues[k] for k in keys])
    assert oracle is not None
    assert x == oracle[0]
    assert product == oracle[1]


@given(residue_maps(), st.randoms(use_true_random=False))
def test_encode_independent_of_key_order(residues: dict[int, int], rnd) -> None:  # type: ignore[no-untyped-def]
    items = list(residues.items())
    rnd.shuffle(items)
    assert encode(dict(items)) == encode(residues)


# --------------------------------------------------------------------------- is_prime

# Composites that fool weak tests: Carmichael numbers, strong pseudoprimes to base 2
# (and to several bases), products of two primes.
TRICKY = [
    0, 1, 2, 3, 4, 41, 43, 561, 1105, 1729, 2047, 2465, 2821, 3277, 4033, 4681, 6601,
    8321, 8911, 41041, 62745, 825265, 1373653, 25326001, 3215031751, 2152302898747,
    3474749660383, 341550071728321, 3825123056546413051, 318665857834031151167461,
    2**61 - 1, 2**64 - 59, 2**89 - 1, (2**31 - 1) * (2**61 - 1), 1000003 * 1000033,
    # Arnault-style product of three primes: p(2p-1)(3p-2)
    *(p * (2 * p - 1) * (3 * p - 2) for p in (7, 13, 37, 1000003)),
]


@pytest.mark.parametrize("n", TRICKY)
def test_is_prime_tricky_numbers(n: int) -> None:
    assert is_prime(n) == sympy.isprime(n)


def test_is_prime_known_pseudoprimes_are_composite() -> None:
    for n in (561, 41041, 825265, 2047, 3215031751, 3825123056546413051, 318665857834031151167461):
        assert not is_prime(n), n


@given(
    st.one_of(
        st.integers(-10, 10_000),
        st.integers(2**64 - 10**6, 2**64 + 10**6),
        st.integers(2**80 - 10**9, 2**80 + 10**9),
        st.integers(0, 2**100),
    )
)
@example(3317044064679887385961981)  # psi_13: fooled Miller-Rabin with 13 fixed bases (found by this test)
def test_is_prime_agrees_with_sympy(n: int) -> None:
    assert is_prime(n) == sympy.isprime(n)


@given(st.sampled_from(SMALL_PRIMES[5:] + KEY_POOLS[16] + KEY_POOLS[64]),
       st.sampled_from(SMALL_PRIMES[5:] + KEY_POOLS[16] + KEY_POOLS[64]))
def test_is_prime_rejects_semiprimes(p: int, q: int) -> None:
    assert not is_prime(p * q)


@given(st.integers(2**64, 2**80))
@settings(max_examples=50)
def test_is_prime_on_next_prime(n: int) -> None:
    p = sympy.nextprime(n)
    assert is_prime(p)
    assert not is_prime(p * sympy.nextprime(p))


# psi_13 is a strong pseudoprime to all 13 fixed bases (2..41): the first number past
# their exact range, where is_prime must hand over to sympy.
PSI_13 = 3317044064679887385961981


def test_is_prime_is_not_fooled_past_the_exact_range() -> None:
    assert not sympy.isprime(PSI_13)
    assert not is_prime(PSI_13)
    assert is_prime(sympy.nextprime(PSI_13))


# --------------------------------------------------------------------------- allocate_keys

@given(
    n=st.integers(0, 6),
    ports=st.sampled_from([1, 2, 3, 5, 8, 16, 32, 63, 64, 65, 81]),
    data=st.data(),
)
@settings(max_examples=40)
def test_allocate_keys(n: int, ports: int, data: st.DataObject) -> None:
    first = allocate_keys(n + 3, ports)
    exclude = data.draw(st.lists(st.sampled_from(first), unique=True), label="exclude")
    keys = allocate_keys(n, ports, exclude=exclude)
    assert len(keys) == n
    assert keys == sorted(set(keys))  # strictly increasing, so distinct
    for k in keys:
        assert k > 2**ports
        assert sympy.isprime(k)
        assert k not in exclude
    # The keys are the first n primes above 2**ports that are not excluded.
    expected, candidate = [], 2**ports
    while len(expected) < n:
        candidate = sympy.nextprime(candidate)
        if candidate not in exclude:
            expected.append(candidate)
    assert keys == expected


def test_allocate_keys_small_values() -> None:
    assert allocate_keys(3, 1) == [3, 5, 7]
    assert allocate_keys(2, 3) == [11, 13]
    assert allocate_keys(2, 3, exclude=[11]) == [13, 17]
    assert allocate_keys(0, 64) == []


@pytest.mark.parametrize(("n", "ports"), [(-1, 8), (-5, 64), (1, 0), (1, -3)])
def test_allocate_keys_bad_args(n: int, ports: int) -> None:
    with pytest.raises(RoutingError) as info:
        allocate_keys(n, ports)
    assert str(info.value)


# --------------------------------------------------------------------------- errors

def test_routing_error_is_value_error() -> None:
    assert issubclass(RoutingError, ValueError)
    assert issubclass(RoutingError, DcpError)


def test_non_coprime_keys_message_names_both() -> None:
    with pytest.raises(ValueError) as info:
        encode({6: 1, 9: 2})
    assert isinstance(info.value, RoutingError)
    message = str(info.value)
    assert "6" in message and "9" in message and "coprime" in message


@given(residue_maps(), st.integers(2, 50), st.data())
def test_shared_factor_detected(residues: dict[int, int], factor: int, data: st.DataObject) -> None:
    keys = list(residues)
    base = data.draw(st.sampled_from(keys))
    bad_key = base * factor
    assume(bad_key not in residues)
    bad = {**residues, bad_key: 0}
    with pytest.raises(RoutingError, match="not coprime") as info:
        encode(bad)
    assert str(bad_key) in str(info.value)


def test_duplicate_factor_names_the_right_key() -> None:
    with pytest.raises(RoutingError) as info:
        encode({5: 1, 7: 2, 11: 3, 21: 4})
    assert "keys 7 and 21 are not coprime" in str(info.value)


@pytest.mark.parametrize(
    ("residues", "fragment"),
    [
        ({7: 7}, "bitmap 7"),
        ({7: 100}, "bitmap 100"),
        ({7: -1}, "bitmap -1"),
        ({5: 1, 7: 8}, "for key 7"),
        ({1: 0}, "key 1 is below 2"),
        ({0: 0}, "key 0 is below 2"),
        ({-7: 0}, "below 2"),
        ({7.0: 1}, "ints"),
        ({7: 1.0}, "ints"),
    ],
)
def test_encode_bad_input(residues: dict, fragment: str) -> None:
    with pytest.raises(RoutingError) as info:
        encode(residues)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "args",
    [(-1, 7, 0, 1), (5, 1, 0, 1), (5, 0, 0, 1), (5, 7, -1, 1), (5, 7, 0, -1)],
)
def test_forward_bad_input(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(RoutingError, match="forward needs"):
        forward(*args)


@pytest.mark.parametrize("func", [x_bits, x_bytes, int_to_bytes, ports_of])
def test_negative_numbers_rejected(func) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RoutingError, match="negative"):
        func(-1)


def test_bitmap_of_negative_port() -> None:
    with pytest.raises(RoutingError, match="port -2 is negative"):
        bitmap_of([1, -2])


# --------------------------------------------------------------------------- bit helpers

@given(st.integers(0, 2**200))
def test_ports_of_bitmap_of_inverse(bitmap: int) -> None:
    ports = ports_of(bitmap)
    assert ports == sorted(set(ports))
    assert bitmap_of(ports) == bitmap
    assert len(ports) == bin(bitmap).count("1")


@given(st.lists(st.integers(0, 300)))
def test_bitmap_of_ports_of_inverse(ports: list[int]) -> None:
    assert ports_of(bitmap_of(ports)) == sorted(set(ports))


def test_ports_of_examples() -> None:
    assert ports_of(0) == []
    assert ports_of(0b1011) == [0, 1, 3]
    assert bitmap_of([]) == 0
    assert bitmap_of([0, 3, 3, 1]) == 0b1011


@given(st.integers(0, 2**9000))
def test_int_bytes_round_trip(x: int) -> None:
    data = int_to_bytes(x)
    assert len(data) == x_bytes(x) == (x_bits(x) + 7) // 8
    assert x_bits(x) == x.bit_length()
    assert int_from_bytes(data) == x
    assert int_from_bytes(bytearray(data)) == x
    assert int_from_bytes(memoryview(data)) == x
    if x:
        assert data[0] != 0  # minimal: no leading zero byte


def test_int_bytes_examples() -> None:
    assert int_to_bytes(0) == b""
    assert x_bits(0) == 0 and x_bytes(0) == 0
    assert int_from_bytes(b"") == 0
    assert int_to_bytes(255) == b"\xff"
    assert int_to_bytes(256) == b"\x01\x00"
    assert x_bytes(2**64) == 9
    assert int_from_bytes(b"\x00\x00\x01") == 1


# --------------------------------------------------------------------------- imports

def test_routing_and_wire_import_no_io_modules() -> None:
    assert loaded(["errors", "routing", "wire"], ["asyncio", "socket", "sympy"]) == "[]"


def test_import_probe_detects_io_imports(tmp_path: Path) -> None:
    """The probe is not vacuous: a routing.py that imports asyncio is caught."""
    fake = copy_with_import(tmp_path, ["errors.py", "wire.py"], "routing.py", "import asyncio\nimport sympy\n")
    assert loaded(["errors", "routing", "wire"], ["asyncio", "socket", "sympy"], fake) == "['asyncio', 'socket', 'sympy']"


# --------------------------------------------------------------------------- pinned by mutation testing (docs/mutation.md)

def test_allocate_keys_defaults_to_64_ports() -> None:
    assert allocate_keys(1) == [2**64 + 13]  # the least prime above 2**64
    assert allocate_keys(3) == allocate_keys(3, 64)


@pytest.mark.parametrize(
    ("n", "ports", "message"),
    [(-1, 64, "cannot allocate -1 keys"), (1, 0, "a broker needs at least one port, got ports=0")],
)
def test_allocate_keys_errors_say_why(n: int, ports: int, message: str) -> None:
    with pytest.raises(RoutingError) as info:
        allocate_keys(n, ports)
    assert str(info.value) == message


# --------------------------------------------------------------------------- random_key


@given(st.integers(1, 80), st.integers(0, 2**32))
@settings(max_examples=60)
def test_random_key_is_a_prime_in_the_port_range(ports: int, seed: int) -> None:
    key = random_key(ports, random.Random(seed))
    assert 2**ports < key < 2**(ports + 1)
    assert sympy.isprime(key)


def test_random_keys_of_default_brokers_differ() -> None:
    keys = {random_key() for _ in range(50)}
    assert len(keys) == 50  # about 2**58 primes to draw from


def test_random_key_refuses_no_ports() -> None:
    with pytest.raises(RoutingError, match="at least one port"):
        random_key(0)


def test_random_key_defaults_to_64_ports() -> None:
    """Pinned by the second mutation run (docs/mutation.md): the default is a key of 65 bits."""
    assert all(random_key().bit_length() == 65 for _ in range(5))
    assert random_key(rng=random.Random(1)).bit_length() == 65


# --------------------------------------------------------------------------- key layouts

#: Port counts at the edges of the layout's shapes: one key; one bank; 16 banks under
#: the root; the first directory; the default; the most a port number names.
LAYOUT_PORTS = (1, 8, 64, 65, 128, 200, 1088, 1089, 4161, 10_000, 65_535)


@functools.cache
def layout_of(ports: int, seed: int = 0) -> KeyLayout:
    """A random layout, the same for the same arguments (65,535 ports take ~0.5 s)."""
    return KeyLayout.random(ports, rng=random.Random(f"{ports}/{seed}"))


@st.composite
def layouts_and_ports(draw: st.DrawFn) -> tuple[int, list[int]]:
    """A port count and the out ports of one stream there (a random sample past 10)."""
    count = draw(st.sampled_from(LAYOUT_PORTS))
    fan_out = draw(st.sampled_from([0, 1, 2, 10, 100, 1000]))
    if fan_out <= 10:
        return count, draw(st.lists(st.integers(0, count - 1), max_size=fan_out, unique=True))
    return count, random.Random(draw(st.integers(0, 2**32))).sample(range(count), min(fan_out, count))


def expected_nodes(ports: int, bitmap: int) -> int:
    """How many residues a bitmap needs: the root, each bank it uses, each directory above them."""
    if not bitmap:
        return 0
    if ports <= FAN:
        return 1
    used = ports_of(bitmap)
    banks = {(p - FAN) // FAN for p in used if p >= FAN}
    total_banks = -(-(ports - FAN) // FAN)
    directories: set[tuple[int, int]] = set()
    width, level = total_banks, 0
    nodes = set(banks)
    while width > ROOT_FAN:  # one more level of directories of FAN children
        level += 1
        nodes = {n // FAN for n in nodes}
        directories |= {(level, n) for n in nodes}
        width = -(-width // FAN)
    return 1 + len(banks) + len(directories)


@settings(max_examples=300, deadline=None)
@given(layouts_and_ports())
@example((65_535, [65_534, 64, 0]))
@example((1089, [1088]))
def test_a_layout_decodes_what_the_crt_of_its_residues_encodes(case: tuple[int, list[int]]) -> None:
    """sympy's CRT over the residues is a number the broker decodes to exactly the bitmap,
    with one residue per node used and none for the rest."""
    layout, bitmap = layout_of(case[0]), bitmap_of(case[1])
    residues = layout.residues(bitmap)
    assert len(residues) == expected_nodes(layout.ports, bitmap)
    assert set(residues) <= set(layout.keys)
    if not residues:
        assert bitmap == 0 and layout.decode(0) == 0
        return
    x = int(crt(list(residues), list(residues.values()))[0])
    assert encode(residues) == x
    assert layout.decode(x) == bitmap


@settings(max_examples=100, deadline=None)
@given(st.lists(layouts_and_ports(), min_size=2, max_size=4))
def test_brokers_with_layouts_read_their_own_part_of_one_number(cases: list[tuple[int, list[int]]]) -> None:
    """One X for several brokers (distinct layouts): each decodes its own bitmap."""
    layouts = [layout_of(count, seed) for seed, (count, _) in enumerate(cases)]
    keys = [k for layout in layouts for k in layout.keys]
    assume(len(set(keys)) == len(keys))  # a few ports leave few primes to draw: the orchestrator refuses a clash
    bitmaps = [bitmap_of(ports) for _, ports in cases]
    residues: dict[int, int] = {}
    for layout, bitmap in zip(layouts, bitmaps):
        residues.update(layout.residues(bitmap))
    x = int(crt(list(residues), list(residues.values()))[0]) if residues else 0
    for layout, bitmap in zip(layouts, bitmaps):
        if bitmap:  # a broker left out of X reads an arbitrary residue: no tree sends it the frame
            assert layout.decode(x) == bitmap


@pytest.mark.parametrize("ports", LAYOUT_PORTS)
def test_a_layout_has_prime_keys_in_their_ranges_and_a_small_root(ports: int) -> None:
    layout = layout_of(ports)
    assert len(set(layout.keys)) == len(layout.keys) and all(sympy.isprime(k) for k in layout.keys)
    root_width = KeyLayout.root_width(ports)
    assert 1 << root_width < layout.root < 1 << (root_width + 1) < 2**81 + 1
    top = -(-(ports - FAN) // FAN)  # banks
    while top > ROOT_FAN:
        top = -(-top // FAN)  # directories above them
    assert root_width == (ports if ports <= FAN else FAN + top)
    assert all(2**64 < k < 2**65 for k in layout.keys[1:])
    assert KeyLayout.from_keys(ports, layout.keys) == layout


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(LAYOUT_PORTS), st.binary(max_size=2500))
def test_any_number_decodes_to_ports_of_the_broker(ports: int, x: bytes) -> None:
    """A forged X names ports in range only: directory bits past the last child name nothing."""
    assert layout_of(ports).decode(int.from_bytes(x, "big")) >> ports == 0


def test_a_layout_refuses_keys_that_do_not_fit() -> None:
    layout = layout_of(200)
    with pytest.raises(RoutingError, match="has 4 keys, got 3"):
        KeyLayout(200, layout.keys[:3])
    with pytest.raises(RoutingError, match="distinct"):
        KeyLayout(200, (layout.keys[0], layout.keys[1], layout.keys[1], layout.keys[3]))
    with pytest.raises(RoutingError, match="above 2\\*\\*64"):
        KeyLayout(200, (*layout.keys[:3], 2**64))
    with pytest.raises(RoutingError, match="not a prime"):
        KeyLayout.from_keys(200, (*layout.keys[:3], 2**64 + 1))
    with pytest.raises(RoutingError, match="ports outside 0..199"):
        layout.residues(1 << 200)
    with pytest.raises(RoutingError, match="at least one port"):
        KeyLayout.random(0)


def test_a_layout_of_the_most_ports_is_drawn_without_sympy() -> None:
    """Every key is below 2**81, where is_prime is exact without sympy (whose import
    alone takes most of a second): a broker starts fast at any port count."""
    probe = "import time; t = time.perf_counter(); from dcp.routing import KeyLayout; KeyLayout.random(65535); import sys; print('sympy' in sys.modules, time.perf_counter() - t)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    imported, seconds = result.stdout.split()
    assert imported == "False"
    print(f"65,535 ports: {float(seconds) * 1000:.0f} ms")
