"""State that survives: the binary format and save/load (checkpoints and batch operations: test_checkpoints.py)."""

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
from state_cases import DTYPES, RULES, SERIALIZABLE, feed, make, queries, reseal, state, tokens


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
    out["rope_theta"], out["rope_dim"], out["rope_layout"] = take("d"), take("q"), take("B")
    out["retain"], out["recent"] = take("B"), take("q")
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
    out["length_at"] = at
    out["length"] = list(struct.unpack_from(f"<{out['batch_size']}q", data, at))
    at += 8 * out["batch_size"]
    out["last_position"] = list(struct.unpack_from(f"<{out['batch_size']}q", data, at))
    at += 8 * out["batch_size"]
    lanes = out["batch_size"] * out["num_heads"]
    out["lane_bytes"], out["buffer_at"] = [], []
    for _ in range(take("I")):
        lane_bytes = take("Q")
        out["lane_bytes"].append(lane_bytes)
        out["buffer_at"].append(at)  # lane 0's bytes, the other lanes' after them
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
    assert f["magic"] == b"KVFOLD\r\n" and f["version"] == 3 and f["flags"] == 0 and f["total"] == len(data)
    assert [
        f[n] for n in ("batch_size", "num_heads", "head_dim", "value_dim", "num_query_heads", "window", "sinks")
    ] == [3, 2, 5, 3, 4, 4, 1]
    assert (f["scale"], f["dtype"], f["check_finite"]) == (0.5, 1, 0)
    assert (f["rope_theta"], f["rope_dim"], f["rope_layout"], f["retain"], f["recent"]) == (0.0, 0, 0, 0, -1)
    assert f["kind"] == "compressive" and f["options"] == {"pool": "max"}
    assert {k: a.tolist() for k, a in f["arrays"].items()} == {"slots": 3.0, "rate": 2.0}
    assert f["length"] == [11, 11, 11] and f["last_position"] == [10, 10, 10]
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
    yield "future version", data[:8] + struct.pack("<I", 5) + data[12:], ["format version 5 is newer", "upgrade"]
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
        ["needs 274877908512 bytes, more than the"],
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
    options = dtype + 2  # RoPE theta, dim, layout, retain, recent
    theta, layout, retain, recent = options, options + 16, options + 17, options + 18
    yield "negative theta", reseal(body[:theta] + struct.pack("<d", -1.0) + body[theta + 8 :]), ["theta", "> 0"]
    yield "layout code", reseal(body[:layout] + b"\x02" + body[layout + 1 :]), ["rope layout code 2"]
    yield "retain code", reseal(body[:retain] + b"\x03" + body[retain + 1 :]), ["retain code 3"]
    yield "recent", reseal(body[:recent] + struct.pack("<q", 2) + body[recent + 8 :]), ["only retain='h2o'"]
    kind = options + 26
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


def written(data, at, value):
    """The state with `value` (bytes) at offset `at`, resealed as a writer would."""
    return reseal(data[:at] + value + data[at + len(value) : -4])


# A value no cache with check_finite=True stores, as each dtype stores it: the first value of a row
# (int8: the scale of the row's first block, after its 32 codes).
NOT_FINITE = {
    "float32": (0, struct.pack("<f", float("nan"))),
    "float16": (0, struct.pack("<H", 0x7C00)),
    "bfloat16": (0, struct.pack("<H", 0x7FC0)),
    "int8": (32, struct.pack("<f", float("inf"))),
}


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_stored_nan_or_inf_is_refused_unless_check_finite_is_off(dtype, rng):
    c = make(rules.Cumulative(), dtype=dtype)
    feed(c, rng)
    data = c.to_bytes()
    f = parse(data)
    offset, value = NOT_FINITE[dtype]
    sink_key = f["buffer_at"][0] + offset
    acc_k = f["buffer_at"][-2]  # float64 running sums: the key's, then the value's
    for bad in (written(data, sink_key, value), written(data, acc_k, struct.pack("<d", float("-inf")))):
        with pytest.raises(ValueError, match="invalid kvfold state: buffer [0-9]+ holds a NaN or an Inf, which a"):
            kvfold.MemoryCache.from_bytes(bad)
        check_finite_at = 24 + 8 * 8 + 1
        assert bad[check_finite_at] == 1
        lenient = kvfold.MemoryCache.from_bytes(written(bad, check_finite_at, b"\0"))
        assert not lenient.check_finite


@pytest.mark.parametrize(
    "place, value, words",
    [
        ("count", 0.0, ["merge slot 0 counts 0 pairs, expected a whole number from 1 to 11"]),
        ("count", float("nan"), ["merge slot 0 counts nan pairs"]),
        ("count", -1.0, ["counts -1 pairs"]),
        ("count", 1.5, ["counts 1.5 pairs"]),
        ("count", 1e308, ["counts 1e+308 pairs"]),
        ("count", "one more", ["the merge slots count 12 pairs, the lane has folded 11"]),
        ("order", 9, ["merge slot 0 is in place 9, expected a place from 0 to 3 that no other slot holds"]),
        ("order", 1, ["merge slot 1 is in place 1"]),  # slot 0 taken there
        ("free place", "slot 0's", ["merge slot 3 is in place", "that no other slot holds"]),
    ],
)
def test_merge_slots_that_no_folds_could_leave_are_refused(place, value, words, rng):
    c = make(rules.Merge(3), window=2, sinks=0, check_finite=False)  # no finite-value check to hide behind
    feed(c, rng, T=13)  # 11 pairs folded into 3 slots per lane
    data = c.to_bytes()
    at = parse(data)["buffer_at"]
    # sinks k, v (empty) and window k, v, then the sums of keys and values, the counts and the order
    count, order = at[-2], at[-1]
    slot0 = struct.unpack_from("<q", data, order)[0]
    if value == "one more":
        value = struct.unpack_from("<d", data, count + 8 * slot0)[0] + 1
    if place == "count":
        bad = written(data, count + 8 * slot0, struct.pack("<d", value))
    elif place == "order":
        bad = written(data, order, struct.pack("<q", value))
    else:  # the place the next pair takes is one a slot holds
        bad = written(data, order + 8 * 3, struct.pack("<q", slot0))
    with pytest.raises(ValueError) as info:
        kvfold.MemoryCache.from_bytes(bad)
    assert str(info.value).startswith("data: invalid kvfold state: ")
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_a_row_at_the_longest_length_refuses_more_tokens_and_still_saves(rng):
    c = make(rules.Cumulative())
    feed(c, rng)
    data = c.to_bytes()
    longest = written(data, parse(data)["length_at"], struct.pack("<q", 2**62))
    full = kvfold.MemoryCache.from_bytes(longest)
    assert full.length.tolist() == [2**62, 11]
    k, v, _ = tokens(full.rule, rng, 2, 2, 1)
    with pytest.raises(ValueError, match=r"k: expected at most 0 tokens \(a row holds at most 2\^62, row 0 has"):
        full.update(k, v)
    assert full.to_bytes() == longest


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
