"""The matrix rules, the linear-attention family as ONNX LinearAttention defines it: the memory is S
(d_k x d_v) per KV head, read linearly. Each rule's NumPy reference step and read (float64, from the
formula in its docstring) stand beside its definition."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Optional, Tuple

import numpy as np

from ._base import Reals, Rule, Token, _real, _reals

# The rules kvfold.rules exports (a new rule adds its class here).
__all__ = ["MatrixRule", "Linear", "Gated", "Delta", "GatedDelta"]

State = Tuple[np.ndarray, Optional[np.ndarray]]  # S (H, d_k, d_v) and, for normalized Linear, z (H, d_k)


@dataclass(frozen=True)
class MatrixRule(Rule):
    """The base of the matrix rules: the reference model's step and read."""

    matrix: ClassVar[bool] = True

    def __post_init__(self) -> None:
        """Gates and mixes (real numbers or arrays of them) become floats or nested tuples of floats."""
        for f in fields(self):
            if f.type in ("Reals", "Optional[Reals]"):
                object.__setattr__(self, f.name, _reals(type(self).__name__, f.name, getattr(self, f.name)))
        super().__post_init__()

    def reference_step(self, S: np.ndarray, z: Optional[np.ndarray], token: Token) -> State:
        """One token ``(k (H, d_k), v (H, d_v), decay, beta)`` into S (H, d_k, d_v) (and z (H, d_k)); decay
        is the token's log-space gate, (H,) or (H, d_k), beta (H,): used where the rule has no constant."""
        raise TypeError(f"reference: no model of {type(self).__name__}")

    def _gate(self, name: str, given: Optional[np.ndarray]) -> Any:
        """The rule's constant gate ``name``, else the token's own."""
        constant: Optional[Reals] = getattr(self, name)
        return given if constant is None else constant

    def reference_read(self, S: np.ndarray, z: Optional[np.ndarray], q: np.ndarray, scale: float) -> np.ndarray:
        """o = scale q^T S: q (d_k,), S (d_k, d_v)."""
        return scale * (q @ S)


def feature_map(name: str, x: np.ndarray) -> np.ndarray:
    if name == "elu1":
        return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
    if name == "relu":
        return np.maximum(x, 0.0)
    return x


def _decayed(S: np.ndarray, g: Optional[Reals], k: np.ndarray) -> np.ndarray:
    """exp(g) S, g log-space per KV head (H,) or per key dimension (H, d_k): it scales the rows of S."""
    H, dk = k.shape
    a = np.broadcast_to(np.exp(np.asarray(g, np.float64)).reshape(H, -1), (H, dk))
    return a[:, :, None] * S


def _delta(S: np.ndarray, k: np.ndarray, v: np.ndarray, beta: Optional[Reals]) -> np.ndarray:
    """beta (v - S^T k): what the delta rules write along k."""
    b = np.broadcast_to(np.asarray(beta, np.float64), (len(k),))
    return b[:, None] * (v - np.einsum("hkv,hk->hv", S, k))


def _write(S: np.ndarray, k: np.ndarray, u: np.ndarray) -> np.ndarray:
    """S + k u^T per head."""
    return S + k[:, :, None] * u[:, None, :]


@dataclass(frozen=True)
class Linear(MatrixRule):
    """Linear attention: ``S_t = S_{t-1} + k_t v_t^T``, read ``o_t = scale * q_t^T S_t``. A matrix rule.

    With a feature map phi (``"identity"``, ``"elu1"`` = elu(x) + 1, ``"relu"``) keys and queries are
    mapped first; ``normalize=True`` also keeps ``z_t = z_{t-1} + phi(k_t)`` and reads
    ``o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)`` (no scale; meant for a positive feature map).
    ``mix`` (scalar or (Hq,)) is the Infini-attention logit m used with sinks or a window:
    ``o = sigmoid(m) o_memory + (1 - sigmoid(m)) o_local``."""

    feature_map: str = "identity"
    normalize: bool = False
    eps: float = 1e-6
    mix: Reals = 0.0
    kind: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        if not isinstance(self.feature_map, str):
            raise TypeError(
                f"Linear: feature_map must be 'identity', 'elu1' or 'relu', got {type(self.feature_map).__name__}"
            )
        if not isinstance(self.normalize, bool):
            raise TypeError(f"Linear: normalize must be True or False, got {type(self.normalize).__name__}")
        object.__setattr__(self, "eps", _real("Linear", "eps", self.eps))
        super().__post_init__()

    def reference_step(self, S: np.ndarray, z: Optional[np.ndarray], token: Token) -> State:
        phi = feature_map(self.feature_map, token[0])
        return _write(S, phi, token[1]), (None if z is None else z + phi)

    def reference_read(self, S: np.ndarray, z: Optional[np.ndarray], q: np.ndarray, scale: float) -> np.ndarray:
        """scale phi(q)^T S, or phi(q)^T S / (phi(q)^T z + eps) when normalized."""
        phi = feature_map(self.feature_map, q)
        if self.normalize:
            return (phi @ S) / (phi @ z + self.eps)
        return scale * (phi @ S)


@dataclass(frozen=True)
class Gated(MatrixRule):
    """Gated linear attention: ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, read ``o_t = scale * q_t^T S_t``.

    g is log-space, per KV head or per key dimension (it scales the rows of S). ``decay`` of shape
    (H,) or (H, d_k) is a constant g for every token (RetNet-style); without it every token brings
    its own: ``update(k, v, decay=g)``. ``mix``: see ``Linear``. A matrix rule."""

    decay: Optional[Reals] = None
    mix: Reals = 0.0
    kind: ClassVar[str] = "gated"

    def reference_step(self, S: np.ndarray, z: Optional[np.ndarray], token: Token) -> State:
        k, v, decay, _ = token
        return _write(_decayed(S, self._gate("decay", decay), k), k, v), z


@dataclass(frozen=True)
class Delta(MatrixRule):
    """The delta rule: ``S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T``, read ``o_t = scale * q_t^T S_t``.

    ``beta`` (a scalar or (H,)) is a constant for every token; without it every token brings its own:
    ``update(k, v, beta=b)``. ``mix``: see ``Linear``. A matrix rule."""

    beta: Optional[Reals] = None
    mix: Reals = 0.0
    kind: ClassVar[str] = "delta"

    def reference_step(self, S: np.ndarray, z: Optional[np.ndarray], token: Token) -> State:
        k, v, _, beta = token
        return _write(S, k, _delta(S, k, v, self._gate("beta", beta))), z


@dataclass(frozen=True)
class GatedDelta(MatrixRule):
    """The gated delta rule:
    ``S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T``, read ``o_t = scale * q_t^T S_t``.

    ``decay`` as in ``Gated``, ``beta`` as in ``Delta``: constants of the rule, or per token.
    ``mix``: see ``Linear``. A matrix rule."""

    decay: Optional[Reals] = None
    beta: Optional[Reals] = None
    mix: Reals = 0.0
    kind: ClassVar[str] = "gated_delta"

    def reference_step(self, S: np.ndarray, z: Optional[np.ndarray], token: Token) -> State:
        k, v, decay, beta = token
        S = _decayed(S, self._gate("decay", decay), k)
        return _write(S, k, _delta(S, k, v, self._gate("beta", beta))), z
