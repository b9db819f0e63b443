"""The rules, caches and data the state and checkpoint tests share."""

import struct
import zlib

import numpy as np

import kvfold
from kvfold import rules
from rule_cases import every_rule


def max_and_decay(mem_k, mem_v, k, v, count):
    """A Custom fold: slot 0 the running max, slot 1 a decaying sum."""
    mk, mv = mem_k.copy(), mem_v.copy()
    mk[:, 0], mv[:, 0] = (k, v) if count == 0 else (np.maximum(mk[:, 0], k), np.maximum(mv[:, 0], v))
    mk[:, 1], mv[:, 1] = 0.5 * mk[:, 1] + k, 0.5 * mv[:, 1] + v
    return mk, mv


SERIALIZABLE = every_rule(head_dim=5, value_dim=3)
RULES = SERIALIZABLE + [rules.Custom(max_and_decay, slots=2)]
DTYPES = ["float32", "float16", "bfloat16", "int8"]


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
