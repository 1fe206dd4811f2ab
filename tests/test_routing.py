"""Property tests of dcp.routing: CRT topology numbers, primes, bit helpers.

sympy is the oracle (``sympy.ntheory.modular.crt`` and ``sympy.isprime``); the module
under test must not import it.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import sympy
from hypothesis import assume, example, given, settings, strategies as st
from sympy.ntheory.modular import crt

from tests.purity import copy_with_import, loaded
from dcp.errors import DcpError, RoutingError
from dcp.routing import (
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
