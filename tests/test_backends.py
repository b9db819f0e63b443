"""SIMD dispatch: the backend is named, a cap picks the best kernels at or below it, unknown names fail."""

import os
import subprocess
import sys

import pytest

import kvfold
from kvfold import _core

# This architecture's backends, least capable first.
LADDER = ["scalar", "neon"] if "neon" in kvfold.available_backends() else ["scalar", "avx2", "avx512"]


@pytest.mark.one_backend
def test_backends_are_named():
    have = kvfold.available_backends()
    assert have[0] == "scalar"
    assert set(have) <= set(_core._known_backends()) == {"scalar", "avx2", "avx512", "neon"}
    assert kvfold.simd_backend() in have


@pytest.mark.one_backend
@pytest.mark.parametrize("cap", ["scalar", "avx2", "avx512", "neon"])
def test_a_cap_picks_the_best_backend_at_or_below_it(cap):
    have = kvfold.available_backends()
    _core._set_simd_backend(cap)
    if cap not in LADDER:  # another architecture's name caps nothing
        want = have[-1]
    else:  # the best this machine runs at or below the cap
        want = [b for b in have if LADDER.index(b) <= LADDER.index(cap)][-1]
    assert kvfold.simd_backend() == want


@pytest.mark.one_backend
def test_unknown_backend_is_refused():
    before = kvfold.simd_backend()
    with pytest.raises(ValueError, match="expected one of scalar, avx2, avx512, neon, got 'sse9'"):
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
    assert out.stdout.strip() == kvfold.available_backends()[-1]
    assert "KVFOLD_SIMD: expected one of scalar, avx2, avx512, neon, got 'bogus'" in out.stderr
