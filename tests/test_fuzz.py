"""Fuzzing: from_bytes with random and mutated states, and the public API with random arguments.

Whatever the input, the only outcomes allowed are a result or a ValueError/TypeError, and after an
error the cache is exactly as it was.
"""

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvfold
from rule_cases import every_rule

RULES = every_rule(head_dim=3, value_dim=2)


def valid_states():
    rng = np.random.default_rng(0)
    states = []
    for i, rule in enumerate(RULES):
        c = kvfold.MemoryCache(
            rule,
            num_heads=2,
            head_dim=3,
            value_dim=2,
            num_query_heads=2,
            batch_size=1 + i % 2,
            window=i % 3,
            sinks=i % 2,
            dtype=["float32", "float16", "bfloat16", "int8"][i % 4],
        )
        T = 1 + 2 * i
        gates = {"decay": -rng.random((c.batch_size, 2, T)), "beta": rng.random((c.batch_size, 2, T))}
        gates = {name: gates[name] for name in rule.per_token_gates}
        c.update(rng.standard_normal((c.batch_size, 2, T, 3)), rng.standard_normal((c.batch_size, 2, T, 2)), **gates)
        states.append(c.to_bytes())
    scaled = kvfold.MemoryCache(kvfold.rules.Merge(2), 2, 3, window=1, rope=kvfold.RoPE(1e4, dim=2, frequencies=(0.5,)))
    scaled.update(rng.standard_normal((1, 2, 5, 3)), rng.standard_normal((1, 2, 5, 3)))
    states.append(scaled.to_bytes())  # format version 4: a RoPE's own frequencies
    return states


STATES = valid_states()
INTERESTING = [0, 1, 2, 7, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**40, 2**62, 2**63 - 1, -1, -(2**63)]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


VERSION_AT = 8  # the u32 format version, after the 8-byte magic (docs/state.md)


def reseal(body):
    body = bytearray(body)
    body[16:24] = struct.pack("<Q", len(body) + 4)
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


@st.composite
def mutated_states(draw):
    data = bytearray(draw(st.sampled_from(STATES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "byte", "int64", "uint32", "insert", "delete", "truncate", "float"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and data:
            data[at] = draw(st.integers(0, 255))
        elif op in ("int64", "uint32"):
            fmt, value = (
                ("<q", draw(st.sampled_from(INTERESTING)))
                if op == "int64"
                else ("<I", draw(st.sampled_from(INTERESTING)) % 2**32)
            )
            data[at : at + struct.calcsize(fmt)] = struct.pack(fmt, value)
        elif op == "float":
            data[at : at + 8] = struct.pack("<d", draw(st.sampled_from([0.0, -0.0, 1e308, float("nan"), float("inf")])))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            del data[at:]
    if len(data) >= 28 and draw(st.booleans()):  # a valid header and CRC, to reach the parser
        data = bytearray(reseal(data[:-4]))
    return bytes(data)


def check_loaded(cache, data):
    """A state that loads is whole: it writes back the same bytes (an older format version's in the
    current version, which then reads back to the same bytes) and works."""
    written = cache.to_bytes()
    (version,) = struct.unpack_from("<I", data, VERSION_AT)
    (current,) = struct.unpack_from("<I", written, VERSION_AT)
    if version == current:
        assert written == data
    else:
        assert version < current
        assert kvfold.MemoryCache.from_bytes(written).to_bytes() == written
    rng = np.random.default_rng(0)
    B, H, Hq = cache.batch_size, cache.num_heads, cache.num_query_heads
    q = rng.standard_normal((B, Hq, cache.head_dim), dtype=np.float32)
    k = rng.standard_normal((B, H, 2, cache.head_dim), dtype=np.float32)
    v = rng.standard_normal((B, H, 2, cache.value_dim), dtype=np.float32)
    cache.attend(q)
    gates = {"decay": np.zeros((B, H, 2)), "beta": np.ones((B, H, 2))}
    # A state may hold positions ahead of its length, up to the largest int64: the next two go on from
    # there without overflowing (positions never decrease, so repeating the largest is allowed).
    last = cache.last_position[:, None]
    positions = last + np.minimum(np.arange(2), np.iinfo(np.int64).max - last)
    cache.update(k, v, positions=positions, **{name: gates[name] for name in cache.rule.per_token_gates})
    cache.visible()
    cache.memory()
    cache.checkpoint()


def loads_or_refuses(data):
    """Bytes load as a cache that works, or are refused as an invalid state: nothing else."""
    try:
        cache = kvfold.MemoryCache.from_bytes(data)
    except ValueError as e:
        assert str(e).startswith("data: invalid kvfold state: ")
        return
    check_loaded(cache, data)


@pytest.mark.one_backend
def test_a_state_of_version_2_is_written_back_as_version_3():
    for data in STATES:
        if data[VERSION_AT] > 3 or kvfold.MemoryCache.from_bytes(data).dtype == "int8":  # version 3 on
            continue
        old = reseal(data[:VERSION_AT] + struct.pack("<I", 2) + data[VERSION_AT + 4 : -4])
        loads_or_refuses(old)
        assert kvfold.MemoryCache.from_bytes(old).to_bytes() == data


@pytest.mark.one_backend
@FUZZ
@given(data=mutated_states())
def test_from_bytes_of_mutated_states(data):
    loads_or_refuses(data)


@pytest.mark.one_backend
@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=300).map(lambda b: b"KVFOLD\r\n" + b),
        st.binary(min_size=16, max_size=300).map(lambda b: reseal(b"KVFOLD\r\n\x01\0\0\0\0\0\0\0" + b)),
    )
)
def test_from_bytes_of_random_bytes(data):
    loads_or_refuses(data)


# ---------------------------------------------------------------------------------------------
# The public API with random arguments

DTYPES = [np.float32, np.float64, np.float16, np.int32, np.uint8, np.bool_, np.complex64, object]
SPECIAL = [np.nan, np.inf, -np.inf, 1e39, -0.0, 1e-40]


def arrays(draw, shape):
    """An array near `shape`: each axis right or off, any dtype, values sometimes not finite."""
    if draw(st.integers(0, 5)) == 0:  # a wrong rank
        shape = shape[:-1] if draw(st.booleans()) else shape + (2,)
    shape = tuple(n if draw(st.integers(0, 6)) else draw(st.integers(0, 4)) for n in shape)
    dtype = draw(st.sampled_from(DTYPES)) if draw(st.integers(0, 3)) == 0 else np.float32
    x = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal(shape)
    if x.size and draw(st.integers(0, 4)) == 0:
        x.flat[draw(st.integers(0, x.size - 1))] = draw(st.sampled_from(SPECIAL))
    if dtype is object:
        return x.astype(object)
    with np.errstate(all="ignore"):
        x = x.astype(dtype)
    if x.ndim >= 2 and draw(st.booleans()):  # non-contiguous
        x = np.repeat(x, 2, axis=-1)[..., ::2]
    return x if draw(st.integers(0, 9)) else x.tolist()


def size(draw, right):
    return right if draw(st.integers(0, 4)) else draw(st.sampled_from([0, -1, 1, 2, 3, 2**40, 2.5, "3", None]))


def rows(draw, batch):
    choice = draw(st.integers(0, 7))
    if choice == 0:
        return draw(st.sampled_from([[], [[0]], ["a"], [0.5], None, 3, [2**63 - 1], [-(2**63)]]))
    return draw(st.lists(st.integers(-1, batch), min_size=0, max_size=4))


def save_and_load(cache, path):
    cache.save(path)
    assert kvfold.load(path).to_bytes() == cache.to_bytes()


OPS = [
    "update",
    "attend",
    "step",
    "forward",
    "reset",
    "reorder",
    "select",
    "rollback",
    "concat",
    "memory",
    "visible",
    "copy",
    "save",
]


@FUZZ
@given(data=st.data())
def test_public_api_with_random_arguments(data, tmp_path_factory):
    draw = data.draw
    rule = draw(st.sampled_from(RULES))
    H = draw(st.integers(1, 3))
    config = dict(
        num_heads=size(draw, H),
        head_dim=size(draw, draw(st.integers(1, 9))),
        value_dim=size(draw, draw(st.integers(1, 5))),
        num_query_heads=size(draw, H * draw(st.integers(1, 2))),
        batch_size=size(draw, draw(st.integers(1, 3))),
        window=size(draw, draw(st.integers(0, 4))),
        sinks=size(draw, draw(st.integers(0, 2))),
        dtype=draw(st.sampled_from(["float32", "bfloat16", "int8"])),
        scale=draw(st.sampled_from([None, 0.5, 0.0, -1.0, float("nan"), "x"])),
    )
    try:
        cache = kvfold.MemoryCache(rule, **config)
    except (ValueError, TypeError):
        return
    checkpoints = [cache.checkpoint()]
    for _ in range(draw(st.integers(1, 12))):
        B, H, Hq, dk, dv = cache.batch_size, cache.num_heads, cache.num_query_heads, cache.head_dim, cache.value_dim
        T = draw(st.integers(1, 4))
        op = draw(st.sampled_from(OPS))

        def gates(*shape):  # decay/beta: absent, or near the right shape (per head)
            return {name: arrays(draw, shape) for name in ("decay", "beta") if draw(st.integers(0, 2)) == 0}

        calls = {
            "update": lambda: cache.update(arrays(draw, (B, H, T, dk)), arrays(draw, (B, H, T, dv)), **gates(B, H, T)),
            "attend": lambda: cache.attend(arrays(draw, (B, Hq, dk))),
            "step": lambda: cache.step(
                arrays(draw, (B, Hq, dk)), arrays(draw, (B, H, dk)), arrays(draw, (B, H, dv)), **gates(B, H)
            ),
            "forward": lambda: cache.forward(
                arrays(draw, (B, Hq, T, dk)), arrays(draw, (B, H, T, dk)), arrays(draw, (B, H, T, dv)), **gates(B, H, T)
            ),
            "reset": lambda: cache.reset(rows=rows(draw, B) if draw(st.booleans()) else None),
            "reorder": lambda: cache.reorder(rows(draw, B)),
            "select": lambda: cache.select(rows(draw, B)),
            "rollback": lambda: cache.rollback(
                draw(st.sampled_from(checkpoints)), rows=rows(draw, B) if draw(st.booleans()) else None
            ),
            "concat": lambda: kvfold.MemoryCache.concat([cache, draw(st.sampled_from([cache, cache.select([0]), 3]))]),
            "memory": lambda: cache.memory(),
            "visible": lambda: cache.visible(),
            "copy": lambda: checkpoints.append(cache.checkpoint()),
            "save": lambda: save_and_load(cache, tmp_path_factory.mktemp("fuzz") / "cache.kvf"),
        }
        before = cache.to_bytes()
        try:
            calls[op]()
        except (ValueError, TypeError) as e:
            assert cache.to_bytes() == before, (op, e)
            assert str(e)
