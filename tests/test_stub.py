"""The core's stub against the core: what stubtest cannot check of the read-only attributes.

_core.pyi declares each read-only attribute in one line, ``name: _ReadOnly[T]``; stubtest takes any
annotated class attribute for a writable one, so .ci/stubtest-allowlist lets those through, and this
checks them instead: each is a property without a setter on the runtime class, and its value is a T.
"""

import ast
import pathlib
from typing import Dict, Tuple

import numpy as np
import pytest

import kvfold
from kvfold import _core, rules

pytestmark = pytest.mark.one_backend  # declarations, not kernels

STUB = pathlib.Path(_core.__file__).with_name("_core.pyi")


def read_only_attributes() -> Dict[Tuple[str, str], str]:
    """(class, attribute) -> the annotation inside _ReadOnly[...], for every class of the stub."""
    found = {}
    for node in ast.parse(STUB.read_text()).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if (
                isinstance(item, ast.AnnAssign)
                and isinstance(item.target, ast.Name)
                and isinstance(item.annotation, ast.Subscript)
                and ast.unparse(item.annotation.value) == "_ReadOnly"
            ):
                found[(node.name, item.target.id)] = ast.unparse(item.annotation.slice)
    return found


ATTRIBUTES = read_only_attributes()
# _State is the stub's name for what both runtime classes have.
RUNTIME = {"_State": (_core.MemoryCache, _core.Checkpoint), "MemoryCache": (_core.MemoryCache,)}


def test_the_stub_declares_read_only_attributes_of_both_classes():
    classes = {name for name, _ in ATTRIBUTES}
    assert classes == set(RUNTIME), classes
    assert len(ATTRIBUTES) >= 19


@pytest.mark.parametrize("owner, name", sorted(ATTRIBUTES))
def test_each_is_a_property_without_a_setter_at_run_time(owner, name):
    for cls in RUNTIME[owner]:
        attribute = getattr(cls, name)
        assert isinstance(attribute, property), (cls, name, attribute)
        assert attribute.fset is None, (cls, name)


def test_every_runtime_property_is_in_the_stub():
    declared = {name for _, name in ATTRIBUTES}
    for cls in (_core.MemoryCache, _core.Checkpoint):
        properties = {name for name, value in vars(cls).items() if isinstance(value, property)}
        assert properties <= declared, (cls, properties - declared)


def runtime_values():
    cache = kvfold.MemoryCache(rules.Merge(2), num_heads=2, head_dim=4, window=3, sinks=1, rope=kvfold.RoPE(1e4))
    cache.update(np.ones((1, 2, 5, 4), np.float32), np.ones((1, 2, 5, 4), np.float32))
    h2o = kvfold.MemoryCache(rules.Cumulative(), num_heads=2, head_dim=4, window=4, retain="h2o", recent=2)
    matrix = kvfold.MemoryCache(rules.Linear(), num_heads=2, head_dim=4)
    scaled = kvfold.MemoryCache(rules.Merge(2), num_heads=2, head_dim=4, rope=kvfold.RoPE(1e4, frequencies=(1.0, 0.1)))
    return [cache, cache.checkpoint()._state, h2o, matrix, scaled]


SIMPLE = {"int": int, "float": float, "str": str, "bool": bool}


@pytest.mark.parametrize("owner, name", sorted(ATTRIBUTES))
def test_each_value_has_the_declared_type(owner, name):
    annotation = ATTRIBUTES[(owner, name)]
    for obj in runtime_values():
        if not isinstance(obj, RUNTIME[owner]):
            continue
        value = getattr(obj, name)
        if annotation in SIMPLE:
            assert type(value) is SIMPLE[annotation], (name, value)
        elif annotation == "npt.NDArray[np.int64]":
            assert isinstance(value, np.ndarray) and value.dtype == np.int64, (name, value)
        elif annotation == "Optional[int]":
            assert value is None or type(value) is int, (name, value)
        elif annotation == "_Spec":  # (kind, numeric parameters, options, user fold)
            kind, numbers, options, _ = value
            assert type(kind) is str and all(type(x) is np.ndarray for x in numbers.values()), (name, value)
            assert all(type(x) is str for x in options.values()), (name, value)
        elif annotation == "Optional[Tuple[float, int, str, Tuple[float, ...]]]":
            assert value is None or [type(x) for x in value] == [float, int, str, tuple], (name, value)
            assert value is None or all(type(x) is float for x in value[3]), (name, value)
        else:
            pytest.fail(f"{name}: no check for the annotation {annotation}")
