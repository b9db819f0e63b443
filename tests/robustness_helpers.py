"""What the robustness and limits tests share: a fresh interpreter, a call that must finish, data."""

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest


def run_python(code, timeout=60, env=None):
    """Runs code in a fresh interpreter; returns the finished process (a hang fails the test)."""
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the subprocess hung for {timeout} s")


def finishes(fn, timeout=20):
    """Runs fn in a daemon thread; returns what it returned or raised (a hang fails the test)."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"the call hung for {timeout} s")
    return box


def pairs(B, H, d, T=None, seed=0):
    rng = np.random.default_rng(seed)
    shape = (B, H, d) if T is None else (B, H, T, d)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def state(cache):
    return cache.to_bytes()
