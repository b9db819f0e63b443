"""SIMD dispatch: the backend is named, a cap picks the best kernels at or below it, unknown names fail."""

import os
import subprocess
import sys

import pytest

import kvfold
from kvfold import _core

# This architecture's backends, least capable first; avx512bf16 runs only when named.
LADDER = ["scalar", "neon"] if "neon" in kvfold.available_backends() else ["scalar", "avx2", "avx512", "avx512bf16"]
KNOWN = "scalar, avx2, avx512, avx512bf16, neon"


def default_backend():
    """The backend picked with no cap: the best this machine runs, but never avx512bf16."""
    return [b for b in kvfold.available_backends() if b != "avx512bf16"][-1]


@pytest.mark.one_backend
def test_backends_are_named():
    have = kvfold.available_backends()
    assert have[0] == "scalar"
    assert set(have) <= set(_core._known_backends()) == {"scalar", "avx2", "avx512", "avx512bf16", "neon"}
    assert kvfold.simd_backend() in have


@pytest.mark.one_backend
@pytest.mark.parametrize("cap", ["scalar", "avx2", "avx512", "avx512bf16", "neon"])
def test_a_cap_picks_the_best_backend_at_or_below_it(cap):
    have = kvfold.available_backends()
    _core._set_simd_backend(cap)
    if cap not in LADDER:  # another architecture's name caps nothing
        want = default_backend()
    else:  # the best this machine runs at or below the cap
        want = [b for b in have if LADDER.index(b) <= LADDER.index(cap)][-1]
    assert kvfold.simd_backend() == want


@pytest.mark.one_backend
def test_unknown_backend_is_refused():
    before = kvfold.simd_backend()
    with pytest.raises(ValueError, match=f"expected one of {KNOWN}, got 'sse9'"):
        _core._set_simd_backend("sse9")
    assert kvfold.simd_backend() == before


def run_python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )


@pytest.mark.one_backend
def test_the_environment_caps_the_backend_at_import():
    out = run_python("import kvfold; print(kvfold.simd_backend())", KVFOLD_SIMD="scalar")
    assert out.stdout.strip() == "scalar"
    out = run_python("import warnings, kvfold; print(kvfold.simd_backend())", KVFOLD_SIMD="bogus")
    assert out.stdout.strip() == default_backend()
    assert f"KVFOLD_SIMD: expected one of {KNOWN}, got 'bogus'" in out.stderr


@pytest.mark.one_backend
def test_avx512bf16_runs_only_when_named():
    env = {k: v for k, v in os.environ.items() if k != "KVFOLD_SIMD"}
    out = subprocess.run(
        [sys.executable, "-c", "import kvfold; print(kvfold.simd_backend())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == default_backend() != "avx512bf16"
    if "avx512bf16" in kvfold.available_backends():
        out = run_python("import kvfold; print(kvfold.simd_backend())", KVFOLD_SIMD="avx512bf16")
        assert out.stdout.strip() == "avx512bf16"
