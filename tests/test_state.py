"""State that survives: the binary format, save/load, checkpoints and rollback, batch operations."""

import copy
import errno
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

import kvfold
from kvfold import rules

_w = np.random.default_rng(11)
GRU = rules.GRU(
    weight_ih=0.3 * _w.standard_normal((2, 24, 8)),
    weight_hh=0.3 * _w.standard_normal((2, 24, 8)),
    bias_ih=0.1 * _w.standard_normal((2, 24)),
)  # per head; D = head_dim + value_dim = 8


def max_and_decay(mem_k, mem_v, k, v, count):
    """A Custom fold: slot 0 the running max, slot 1 a decaying sum."""
    mk, mv = mem_k.copy(), mem_v.copy()
    mk[:, 0], mv[:, 0] = (k, v) if count == 0 else (np.maximum(mk[:, 0], k), np.maximum(mv[:, 0], v))
    mk[:, 1], mv[:, 1] = 0.5 * mk[:, 1] + k, 0.5 * mv[:, 1] + v
    return mk, mv


SERIALIZABLE = [
    rules.Drop(),
    rules.Cumulative(),
    rules.Moving(3),
    rules.Weighted((0.5, 0.0, 2.0)),
    rules.EMA(0.3),
    rules.Compressive(2, 3),
    rules.Compressive(3, 2, "max"),
    GRU,
    rules.Linear(),
    rules.Linear("elu1", normalize=True, mix=0.7),
    rules.Gated(decay=[-0.1, -0.3]),
    rules.Gated(mix=0.5),  # per-token decay
    rules.Delta(beta=0.5),
    rules.GatedDelta(),  # per-token decay and beta
]
RULES = SERIALIZABLE + [rules.Custom(max_and_decay, slots=2)]
DTYPES = ["float32", "float16", "bfloat16"]


def make(rule=None, **kw):
    rule = rules.EMA(0.3) if rule is None else rule
    cfg = dict(num_heads=2, head_dim=5, value_dim=3, num_query_heads=4, batch_size=2, window=4, sinks=1)
    cfg.update(kw)
    return kvfold.MemoryCache(rule, **cfg)


def tokens(rule, rng, B, H, T, dk=5, dv=3):
    """k (unit-norm rows, so the delta rules stay tame), v, and the per-token gates the rule takes."""
    k = rng.standard_normal((B, H, T, dk))
    k = (k / np.linalg.norm(k, axis=-1, keepdims=True)).astype(np.float32)
    v = rng.standard_normal((B, H, T, dv)).astype(np.float32)
    gates = {}
    if getattr(rule, "decay", 0) is None:
        gates["decay"] = (-0.5 * rng.random((B, H, T))).astype(np.float32)
    if getattr(rule, "beta", 0) is None:
        gates["beta"] = rng.uniform(0.1, 1.0, (B, H, T)).astype(np.float32)
    return k, v, gates


def part(gates, index):
    """Gates of some rows and tokens: gates[name][index]."""
    return {name: g[index] for name, g in gates.items()}


def feed(cache, rng, T=11):
    k, v, gates = tokens(cache.rule, rng, cache.batch_size, cache.num_heads, T, cache.head_dim, cache.value_dim)
    cache.update(k, v, **gates)
    return k, v, gates


def state(cache):
    """Everything a cache holds, comparable bit for bit (Custom rules have no to_bytes)."""
    if not isinstance(cache.rule, rules.Custom):
        return cache.to_bytes()
    keys, values, mask = cache.visible()
    return (
        cache.batch_size,
        cache.length.tobytes(),
        *(m.tobytes() for m in cache.memory()),
        keys.tobytes(),
        values.tobytes(),
        mask.tobytes(),
    )


def queries(cache, rng, T=None):
    shape = (cache.batch_size, cache.num_query_heads) + ((T,) if T else ()) + (cache.head_dim,)
    return rng.standard_normal(shape, dtype=np.float32)


def reseal(body):
    """A state from its bytes without the CRC: total size and CRC32 recomputed, as a writer would."""
    body = bytearray(body)
    body[16:24] = struct.pack("<Q", len(body) + 4)
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


def parse(data):
    """Reads a state exactly as docs/state.md describes it."""
    at = 0

    def take(fmt):
        nonlocal at
        values = struct.unpack_from("<" + fmt, data, at)
        at += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def text():
        nonlocal at
        n = take("I")
        s = bytes(data[at : at + n]).decode()
        at += n
        return s

    out = {"magic": bytes(data[:8])}
    at = 8
    out["version"], out["flags"], out["total"] = take("I"), take("I"), take("Q")
    names = ["batch_size", "num_heads", "head_dim", "value_dim", "num_query_heads", "window", "sinks"]
    out.update(zip(names, take("7q")))
    out["scale"], out["dtype"], out["check_finite"] = take("d"), take("B"), take("B")
    out["kind"] = text()
    arrays = {}
    for _ in range(take("I")):
        name = text()
        shape = [take("q") for _ in range(take("I"))]
        n = int(np.prod(shape)) if shape else 1
        arrays[name] = np.frombuffer(data, "<f8", n, at).reshape(shape)
        at += 8 * n
    out["arrays"] = arrays
    out["options"] = {text(): text() for _ in range(take("I"))}
    out["length"] = list(struct.unpack_from(f"<{out['batch_size']}q", data, at))
    at += 8 * out["batch_size"]
    lanes = out["batch_size"] * out["num_heads"]
    out["lane_bytes"] = []
    for _ in range(take("I")):
        lane_bytes = take("Q")
        out["lane_bytes"].append(lane_bytes)
        at += lane_bytes * lanes
    out["crc"] = take("I")
    assert at == len(data) == out["total"]
    return out


# ---------------------------------------------------------------------------------------------
# The format


def test_the_format_is_as_documented(rng):
    c = make(rules.Compressive(3, 2, "max"), dtype="float16", scale=0.5, check_finite=False, batch_size=3)
    feed(c, rng)
    data = c.to_bytes()
    f = parse(data)
    assert f["magic"] == b"KVFOLD\r\n" and f["version"] == 1 and f["flags"] == 0 and f["total"] == len(data)
    assert [
        f[n] for n in ("batch_size", "num_heads", "head_dim", "value_dim", "num_query_heads", "window", "sinks")
    ] == [3, 2, 5, 3, 4, 4, 1]
    assert (f["scale"], f["dtype"], f["check_finite"]) == (0.5, 1, 0)
    assert f["kind"] == "compressive" and f["options"] == {"pool": "max"}
    assert {k: a.tolist() for k, a in f["arrays"].items()} == {"slots": 3.0, "rate": 2.0}
    assert f["length"] == [11, 11, 11]
    # sinks k, v and window k, v, then the rule's slots k, v: all float16
    assert f["lane_bytes"] == [1 * 5 * 2, 1 * 3 * 2, 4 * 5 * 2, 4 * 3 * 2, 3 * 5 * 2, 3 * 3 * 2]
    assert f["crc"] == zlib.crc32(data[:-4])
    assert make(scale=None).to_bytes()[24 + 7 * 8 : 24 + 8 * 8] == struct.pack("<d", 0.0)  # default scale


@pytest.mark.parametrize("rule", SERIALIZABLE, ids=repr)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_bit_exact_and_continues_like_the_original(rule, dtype, rng):
    a = make(rule, dtype=dtype, batch_size=3)
    feed(a, rng, T=13)
    data = a.to_bytes()
    b = kvfold.MemoryCache.from_bytes(data)
    assert type(b) is kvfold.MemoryCache and b.rule == a.rule and repr(b) == repr(a)
    assert b.to_bytes() == data and b.nbytes == a.nbytes
    for T in (1, 5, 9):
        q = queries(a, rng, T)
        k, v, gates = tokens(rule, rng, 3, 2, T)
        np.testing.assert_array_equal(a.forward(q, k, v, **gates), b.forward(q, k, v, **gates))
        assert a.to_bytes() == b.to_bytes()
    np.testing.assert_array_equal(a.visible()[0], b.visible()[0])


def test_from_bytes_accepts_any_bytes_like(rng):
    c = make()
    feed(c, rng)
    data = c.to_bytes()
    for form in (bytearray(data), memoryview(data)):
        assert kvfold.MemoryCache.from_bytes(form).to_bytes() == data
    with pytest.raises(TypeError, match="data: expected bytes, got str"):
        kvfold.MemoryCache.from_bytes("KVFOLD")


def bad_states(data):
    """(name, bytes, words the error must contain) for every way a state can be wrong."""
    body = data[:-4]
    yield "empty", b"", ["empty input"]
    yield "not a state", b"PK\x03\x04 a zip file, not a state", ["wrong magic"]
    yield "short magic", b"KVF", ["truncated", "3 bytes", "24-byte header"]
    yield "short wrong magic", b"XYZ", ["wrong magic"]
    yield "header only", data[:20], ["truncated", "header"]
    yield "truncated", data[:-1], ["truncated", f"state is {len(data)} bytes", f"got {len(data) - 1}"]
    yield "half", data[: len(data) // 2], ["truncated"]
    yield "trailing bytes", data + b"\0\0", ["2 unexpected bytes after the end"]
    yield "future version", data[:8] + struct.pack("<I", 2) + data[12:], ["format version 2 is newer", "upgrade"]
    yield "version 0", data[:8] + struct.pack("<I", 0) + data[12:], ["format version 0"]
    yield "flipped bit", data[:40] + bytes([data[40] ^ 1]) + data[41:], ["CRC32 mismatch"]
    yield "bad crc", body + b"\0\0\0\0", ["CRC32 mismatch"]
    yield "tiny total", data[:16] + struct.pack("<Q", 5) + data[24:], ["claims 5 bytes"]
    yield "flags", reseal(body[:12] + struct.pack("<I", 1) + body[16:]), ["flags are 1"]
    config = 24
    yield "negative batch", reseal(body[:config] + struct.pack("<q", -1) + body[config + 8 :]), ["batch_size -1"]
    yield (
        "huge batch",
        reseal(body[:config] + struct.pack("<q", 2**40) + body[config + 8 :]),
        ["batch_size 1099511627776"],
    )
    window = config + 5 * 8
    yield (
        "huge window",
        reseal(body[:window] + struct.pack("<q", 10**6) + body[window + 8 :]),
        ["the configuration needs 128000512 bytes of state, the data holds"],
    )
    yield (
        "absurd window",
        reseal(body[:window] + struct.pack("<q", 2**31) + body[window + 8 :]),
        ["needs 274877908496 bytes, more than the"],
    )
    yield "bad window", reseal(body[:window] + struct.pack("<q", -3) + body[window + 8 :]), ["window", "-3"]
    heads = config + 8
    yield (
        "heads",
        reseal(body[:heads] + struct.pack("<q", 3) + body[heads + 8 :]),
        ["stored configuration is invalid: num_query_heads: expected a multiple of num_heads=3, got 4"],
    )
    head_dim = config + 16
    yield "huge head_dim", reseal(body[:head_dim] + struct.pack("<q", 2**19) + body[head_dim + 8 :]), ["bytes of state"]
    dtype = config + 7 * 8 + 8
    yield "dtype code", reseal(body[:dtype] + b"\x07" + body[dtype + 1 :]), ["dtype code 7"]
    yield "check_finite", reseal(body[: dtype + 1] + b"\x05" + body[dtype + 2 :]), ["check_finite is 5"]
    scale = config + 7 * 8
    yield "nan scale", reseal(body[:scale] + struct.pack("<d", float("nan")) + body[scale + 8 :]), ["scale"]
    kind = dtype + 2
    yield "huge name", reseal(body[:kind] + struct.pack("<I", 2**31) + body[kind + 4 :]), ["2147483648 bytes long"]
    yield "unknown rule", reseal(body[: kind + 4] + b"xyz" + body[kind + 7 :]), ["rule: expected one of", "'xyz'"]
    yield (
        "custom rule",
        reseal(body[:kind] + struct.pack("<I", 6) + b"custom" + body[kind + 7 :]),
        ["Custom rules cannot be serialized"],
    )


def test_bad_input_gets_a_precise_value_error(rng):
    c = make(rules.EMA(0.5))  # kind "ema": 3 letters, replaced in place above
    feed(c, rng)
    data = c.to_bytes()
    for name, bad, words in bad_states(data):
        with pytest.raises(ValueError) as info:
            kvfold.MemoryCache.from_bytes(bad)
        message = str(info.value)
        assert message.startswith("data: invalid kvfold state: "), (name, message)
        for w in words:
            assert w in message, (name, w, message)


def test_every_truncation_and_every_byte_flip_is_caught(rng):
    c = make(rules.Moving(2), dtype="bfloat16")
    feed(c, rng)
    data = c.to_bytes()
    for n in range(len(data)):
        with pytest.raises(ValueError, match="truncated|wrong magic|empty"):
            kvfold.MemoryCache.from_bytes(data[:n])
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x10
        with pytest.raises(ValueError):
            kvfold.MemoryCache.from_bytes(bytes(bad))


def test_custom_rules_cannot_be_serialized(tmp_path, rng):
    c = make(RULES[-1])
    feed(c, rng)
    for call in (c.to_bytes, lambda: c.save(tmp_path / "c.kvf"), lambda: pickle.dumps(c)):
        with pytest.raises(ValueError, match="Custom rules cannot be serialized"):
            call()
    assert os.listdir(tmp_path) == []
    assert state(c.copy()) == state(c)  # within a process, copies and checkpoints work


def test_pickle_uses_the_format(rng):
    c = make(rules.Weighted((1.0, 2.0)))
    feed(c, rng)
    assert pickle.loads(pickle.dumps(c)).to_bytes() == c.to_bytes()


# ---------------------------------------------------------------------------------------------
# save / load


@pytest.mark.one_backend
def test_save_and_load(tmp_path, rng):
    c = make(rules.Compressive(2, 2), dtype="float16")
    feed(c, rng)
    path = tmp_path / "cache.kvf"
    c.save(path)
    assert path.read_bytes() == c.to_bytes()
    loaded = kvfold.load(path)
    assert loaded.to_bytes() == c.to_bytes() and loaded.rule == c.rule
    feed(c, rng)
    c.save(str(path))  # replaces the old file
    assert kvfold.load(os.fsencode(path)).to_bytes() == c.to_bytes()
    assert os.listdir(tmp_path) == ["cache.kvf"]  # no temporary file left behind


@pytest.mark.one_backend
def test_save_keeps_the_mode_of_the_file_it_replaces(tmp_path, rng):
    path = tmp_path / "cache.kvf"
    path.write_bytes(b"old")
    path.chmod(0o640)
    make().save(path)
    assert path.stat().st_mode & 0o777 == 0o640


@pytest.mark.one_backend
def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        kvfold.load(tmp_path / "missing.kvf")
    (tmp_path / "junk").write_bytes(b"not a state")
    with pytest.raises(ValueError, match="wrong magic"):
        kvfold.load(tmp_path / "junk")
    with pytest.raises(ValueError, match="path: expected a regular file"):
        kvfold.load("/dev/zero")
    with pytest.raises(TypeError, match="path: expected a str or os.PathLike, got int"):
        kvfold.load(3)
    with pytest.raises(TypeError, match="path: expected a str or os.PathLike, got NoneType"):
        make().save(None)


@pytest.mark.one_backend
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, rng, monkeypatch):
    path = tmp_path / "cache.kvf"
    old = make()
    old.save(path)
    before = path.read_bytes()
    new = make(window=500)
    feed(new, rng)
    written = []

    def full_disk(fd, data):  # the first chunk goes out, then the disk is full
        if written:
            raise OSError(28, "No space left on device")
        written.append(len(data) // 2)
        return real_write(fd, bytes(data)[: len(data) // 2])

    real_write = os.write
    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        new.save(path)
    monkeypatch.undo()
    assert written and path.read_bytes() == before
    assert os.listdir(tmp_path) == ["cache.kvf"]
    with pytest.raises(IsADirectoryError):
        new.save(tmp_path)  # the rename fails: nothing is left behind either
    assert os.listdir(tmp_path) == ["cache.kvf"]


# A child process writes a large state over a small one with its file size limited (RLIMIT_FSIZE),
# so the kernel stops the write midway: with SIGXFSZ ignored the write fails (EFBIG, as on a full
# disk); with its default action the process is killed there (a crash).
CHILD = textwrap.dedent(
    """
    import resource, signal, sys
    import numpy as np, kvfold
    from kvfold import rules
    path, crash = sys.argv[1], sys.argv[2] == "crash"
    cache = kvfold.MemoryCache(rules.Moving(64), num_heads=4, head_dim=64, window=256)
    cache.update(np.ones((1, 4, 400, 64), np.float32), np.ones((1, 4, 400, 64), np.float32))
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL if crash else signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    try:
        cache.save(path)
    except OSError as e:
        print("error", e.errno)
    """
)


@pytest.mark.one_backend
@pytest.mark.parametrize("mode", ["error", "crash"])
def test_a_write_stopped_by_the_kernel_never_damages_the_previous_file(mode, tmp_path, rng):
    path = tmp_path / "cache.kvf"
    old = make()
    feed(old, rng)
    old.save(path)
    before = path.read_bytes()
    child = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True)
    if mode == "crash":
        assert child.returncode == -signal.SIGXFSZ, child
    else:
        assert child.returncode == 0 and child.stdout.split() == ["error", str(errno.EFBIG)], child
    assert path.read_bytes() == before
    assert kvfold.load(path).to_bytes() == old.to_bytes()
    left = sorted(os.listdir(tmp_path))
    if mode == "error":
        assert left == ["cache.kvf"]
    else:  # the crash leaves the hidden temporary file, cut short at the limit
        assert len(left) == 2 and left[1] == "cache.kvf"
        assert left[0].startswith(".kvfold-") and left[0].endswith(".tmp")
        assert (tmp_path / left[0]).stat().st_size == 100_000


# ---------------------------------------------------------------------------------------------
# Checkpoints and rollback


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_rollback_restores_bit_exactly(rule, rng):
    c = make(rule, batch_size=3, dtype="bfloat16")
    feed(c, rng)
    cp = c.checkpoint()
    before = state(c)
    assert cp.nbytes == c.nbytes and cp.batch_size == 3 and cp.length.tolist() == [11] * 3
    feed(c, rng, T=7)
    assert state(c) != before
    c.rollback(cp)
    assert state(c) == before
    feed(c, rng, T=2)
    c.rollback(cp)  # a checkpoint can be restored many times
    assert state(c) == before


def test_rollback_of_some_rows(rng):
    c = make(rules.Moving(2), batch_size=3)
    feed(c, rng)
    cp = c.checkpoint()
    at_cp = c.copy()
    feed(c, rng, T=5)
    after = c.copy()
    c.rollback(cp, rows=[2, 0])
    for row, source in [(0, at_cp), (1, after), (2, at_cp)]:
        assert c.select([row]).to_bytes() == source.select([row]).to_bytes()
    assert c.length.tolist() == [11, 16, 11]
    c.rollback(cp, rows=[])
    assert c.length.tolist() == [11, 16, 11]


@pytest.mark.parametrize("rule", RULES, ids=repr)
@pytest.mark.parametrize("window, sinks", [(0, 0), (3, 2), (6, 0)])
def test_speculative_decoding_equals_a_cache_that_saw_only_accepted_tokens(rule, window, sinks, rng):
    """Checkpoint, verify k draft tokens, roll back, re-feed the accepted prefix."""
    spec = make(rule, window=window, sinks=sinks)
    truth = make(rule, window=window, sinks=sinks)
    k, v, gates = feed(spec, rng, T=5)
    truth.update(k, v, **gates)
    for _ in range(25):
        draft = int(rng.integers(1, 6))
        q = queries(spec, rng, draft)
        k, v, gates = tokens(rule, rng, 2, 2, draft)
        cp = spec.checkpoint()
        verified = spec.forward(q, k, v, **gates)  # scores every draft token
        n = int(rng.integers(0, draft + 1))  # accepted
        spec.rollback(cp)
        if n:
            accepted = part(gates, np.s_[:, :, :n])
            spec.update(k[:, :, :n], v[:, :, :n], **accepted)
            expected = truth.forward(q[:, :, :n], k[:, :, :n], v[:, :, :n], **accepted)
            if spec.matrix_memory:  # blocks of different lengths run in different chunks
                np.testing.assert_allclose(verified[:, :, :n], expected, rtol=1e-5, atol=1e-6)
            else:
                np.testing.assert_array_equal(verified[:, :, :n], expected)
        assert state(spec) == state(truth)
    q = queries(spec, rng)
    np.testing.assert_array_equal(spec.attend(q), truth.attend(q))


def test_checkpoint_from_another_cache_of_the_same_configuration(rng):
    a, b = make(), make()
    feed(a, rng)
    b.rollback(a.checkpoint())
    assert b.to_bytes() == a.to_bytes()


@pytest.mark.parametrize(
    "other, words",
    [
        (dict(window=5), ["window=4", "window=5"]),
        (dict(sinks=0), ["sinks=1", "sinks=0"]),
        (dict(batch_size=3), ["batch_size=2", "batch_size=3"]),
        (dict(num_heads=1, num_query_heads=2), ["num_heads=2", "num_heads=1"]),
        (dict(head_dim=6), ["head_dim=5", "head_dim=6"]),
        (dict(value_dim=5), ["value_dim=3", "value_dim=5"]),
        (dict(num_query_heads=2), ["num_query_heads=4", "num_query_heads=2"]),
        (dict(dtype="float16"), ["dtype=float32", "dtype=float16"]),
        (dict(scale=0.25), ["scale=0.44721", "scale=0.25"]),
        (dict(check_finite=False), ["check_finite=True", "check_finite=False"]),
        (dict(rule=rules.EMA(0.25)), ["rule=EMA(alpha=0.3)", "rule=EMA(alpha=0.25)"]),
        (dict(rule=rules.Cumulative()), ["rule=EMA(alpha=0.3)", "rule=Cumulative()"]),
    ],
)
def test_a_checkpoint_from_another_configuration_is_refused(other, words, rng):
    source = make()
    feed(source, rng)
    cp = source.checkpoint()
    target = make(**other)
    feed(target, rng)
    before = target.to_bytes()
    with pytest.raises(ValueError) as info:
        target.rollback(cp)
    assert str(info.value).startswith("checkpoint: taken from a cache with ")
    for w in words:
        assert w in str(info.value)
    assert target.to_bytes() == before


def test_rollback_errors_leave_the_cache_unchanged(rng):
    c = make()
    feed(c, rng)
    cp = c.checkpoint()
    feed(c, rng)
    before = c.to_bytes()
    for call, error, words in [
        (lambda: c.rollback(cp, rows=[0, 2]), ValueError, "rows: expected row indices in [0, 2), got 2 at position 1"),
        (lambda: c.rollback(cp, rows=[-1]), ValueError, "got -1"),
        (lambda: c.rollback(cp, rows=[[0]]), ValueError, "rows: expected a 1-D sequence"),
        (lambda: c.rollback(cp, rows=["a"]), TypeError, "rows: expected a sequence of integer row indices"),
        (lambda: c.rollback(c.to_bytes()), TypeError, "checkpoint: expected a kvfold.Checkpoint"),
        (lambda: c.rollback(None), TypeError, "got NoneType"),
    ]:
        with pytest.raises(error) as info:
            call()
        assert words in str(info.value)
        assert c.to_bytes() == before


def test_checkpoint_is_immutable_and_readable(rng):
    c = make(rules.Moving(3), batch_size=3)
    feed(c, rng)
    cp = c.checkpoint()
    assert repr(cp) == f"Checkpoint(rule=Moving(n=3), batch_size=3, length=[11, 11, 11], nbytes={c.nbytes})"
    with pytest.raises(AttributeError, match="immutable"):
        cp.nbytes = 0
    with pytest.raises(AttributeError, match="immutable"):
        cp._state = None
    with pytest.raises(TypeError, match="made by MemoryCache.checkpoint"):
        kvfold.Checkpoint()
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(cp)
    assert copy.copy(cp) is cp and copy.deepcopy(cp) is cp
    length = cp.length
    length[0] = 99  # a copy
    assert cp.length.tolist() == [11, 11, 11]
    before = c.to_bytes()
    feed(c, rng)
    c.reset()
    c.rollback(cp)
    assert c.to_bytes() == before


# ---------------------------------------------------------------------------------------------
# Batch operations, against caches that were fed the rows in that order from the start


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_reorder_select_concat_equal_caches_fed_in_that_order(rule, rng):
    k, v, gates = tokens(rule, rng, 3, 2, 13)
    kw = dict(dtype="float16", window=3, sinks=2)

    def rows_fed(order):
        c = make(rule, batch_size=len(order), **kw)
        c.update(k[order], v[order], **part(gates, order))
        return state(c)

    c = make(rule, batch_size=3, **kw)
    c.update(k, v, **gates)
    for order in ([2, 0, 1], [1, 1, 1, 0, 2, 2], [2], [0, 1, 2]):
        assert state(c.select(order)) == rows_fed(order)
    joined = kvfold.MemoryCache.concat([c.select([2]), c, c.select([1, 0])])
    assert state(joined) == rows_fed([2, 0, 1, 2, 1, 0])
    assert joined.rule == rule and joined.batch_size == 6
    c.reorder([2, 2, 0, 1])  # in place; the batch grows
    assert c.batch_size == 4 and state(c) == rows_fed([2, 2, 0, 1])
    c.reorder([3])  # and shrinks
    assert state(c) == rows_fed([1])
    assert c.nbytes == make(rule, batch_size=1, **kw).nbytes


def test_beam_search_reorder_then_continue(rng):
    """Beams that are reordered and then fed equal beams that were fed that history from the start."""
    rule = rules.Compressive(2, 2)
    beams = make(rule, batch_size=1)
    k0, v0, _ = feed(beams, rng, T=3)
    beams.reorder([0, 0, 0, 0])
    history = [[(k0[0], v0[0])] for _ in range(4)]
    for _ in range(6):
        k = rng.standard_normal((4, 2, 1, 5), dtype=np.float32)
        v = rng.standard_normal((4, 2, 1, 3), dtype=np.float32)
        beams.update(k, v)
        history = [h + [(k[b], v[b])] for b, h in enumerate(history)]
        keep = rng.integers(0, 4, size=4)
        beams.reorder(keep)
        history = [list(history[i]) for i in keep]
    for b in range(4):
        alone = make(rule, batch_size=1)
        for k, v in history[b]:
            alone.update(k[None], v[None])
        assert beams.select([b]).to_bytes() == alone.to_bytes()


def test_batch_operation_errors_leave_the_cache_unchanged(rng):
    c = make()
    feed(c, rng)
    before = c.to_bytes()
    cases = [
        (lambda: c.reorder([]), ValueError, "indices: expected at least one row index, got none"),
        (lambda: c.reorder([0, 5]), ValueError, "indices: expected row indices in [0, 2), got 5 at position 1"),
        (lambda: c.reorder([[0, 1]]), ValueError, "indices: expected a 1-D sequence"),
        (lambda: c.reorder([0.5]), TypeError, "indices: expected a sequence of integer row indices"),
        (lambda: c.reorder(None), TypeError, "indices:"),
        (lambda: c.reorder(np.zeros(1 << 25, np.int64)), ValueError, "batch_size"),
        (lambda: c.select([]), ValueError, "rows: expected at least one row index"),
        (lambda: c.select([-1]), ValueError, "rows: expected row indices in [0, 2), got -1"),
        (lambda: c.select("0"), TypeError, "rows:"),
        (lambda: kvfold.MemoryCache.concat([]), ValueError, "caches: expected at least one cache, got none"),
        (lambda: kvfold.MemoryCache.concat(c), TypeError, "caches: expected a sequence of kvfold.MemoryCache"),
        (lambda: kvfold.MemoryCache.concat([c, 3]), TypeError, "caches[1]: expected a kvfold.MemoryCache, got int"),
        (
            lambda: kvfold.MemoryCache.concat([c, make(window=2)]),
            ValueError,
            "caches[1]: expected window=4 like caches[0], got window=2",
        ),
        (lambda: kvfold.MemoryCache.concat([c, make(dtype="bfloat16")]), ValueError, "dtype=float32"),
        (
            lambda: kvfold.MemoryCache.concat([c, c, make(rules.Moving(3))]),
            ValueError,
            "caches[2]: expected rule=EMA(alpha=0.3) like caches[0], got rule=Moving(n=3)",
        ),
    ]
    for call, error, words in cases:
        with pytest.raises(error) as info:
            call()
        assert words in str(info.value), str(info.value)
        assert c.to_bytes() == before


def test_concat_of_one_cache_with_itself(rng):
    c = make()
    feed(c, rng)
    assert kvfold.MemoryCache.concat([c, c]).to_bytes() == c.select([0, 1, 0, 1]).to_bytes()
    assert kvfold.MemoryCache.concat(x for x in [c]).to_bytes() == c.to_bytes()
