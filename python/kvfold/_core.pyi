"""Type stubs for kvfold's C++ core (kept in sync with python/src/module.cpp)."""

from typing import Any, Dict, Generic, List, NoReturn, Optional, Tuple, TypeVar, Union, overload, type_check_only

import numpy as np
import numpy.typing as npt

__version__: str

_Spec = Tuple[str, Dict[str, npt.NDArray[np.float64]], Dict[str, str], Any]
_Array = npt.ArrayLike  # tokens in, of any real dtype and layout
_Gate = Optional[npt.ArrayLike]  # a matrix rule's per-token gate, or positions
_F32 = npt.NDArray[np.float32]
_Out = Optional[_F32]  # written into when given

def simd_backend() -> str: ...
def available_backends() -> List[str]: ...
def _set_simd_backend(name: str) -> None: ...
def _fma_peak(backend: str, seconds: float) -> float: ...
def _step_work(
    rule: str, heads: int, head_dim: int, window: int, sinks: int, element_bytes: int, tokens: int
) -> Tuple[float, float, float]: ...
def _known_backends() -> List[str]: ...
def set_num_threads(num_threads: int) -> None: ...
def get_num_threads() -> int: ...
def set_chunk_size(chunk_size: int) -> None: ...
def get_chunk_size() -> int: ...
def _set_min_shared_flops(flops: float) -> float: ...

MAX_THREADS: int
MAX_CHUNK: int
MAX_WINDOW: int

def _check_rule(spec: _Spec) -> None: ...

STATE_HEADER: int

def _state_size(header: bytes) -> int: ...
def _threads_without_gil() -> int: ...

_T_co = TypeVar("_T_co", covariant=True)

@type_check_only
class _ReadOnly(Generic[_T_co]):
    """A read-only attribute (a property at run time): reading it gives a _T_co, assigning to it is a
    type error. One line per attribute where @property takes two."""

    @overload
    def __get__(self, obj: None, owner: Any) -> _ReadOnly[_T_co]: ...
    @overload
    def __get__(self, obj: object, owner: Any) -> _T_co: ...
    def __set__(self, obj: object, value: NoReturn) -> None: ...

@type_check_only
class _pybind11_type(type):
    """pybind11's metaclass of every class it binds (pybind11_builtins.pybind11_type)."""

class _ReadLoop(metaclass=_pybind11_type):
    def __init__(self, bytes: int) -> None: ...
    @property
    def bytes(self) -> int: ...
    @property
    def passes(self) -> int: ...
    def read(self) -> None: ...

@type_check_only
class _State(metaclass=_pybind11_type):
    """What a cache and its checkpoints both tell about the state they hold."""

    batch_size: _ReadOnly[int]
    length: _ReadOnly[npt.NDArray[np.int64]]
    nbytes: _ReadOnly[int]
    _rule_spec: _ReadOnly[_Spec]

class Checkpoint(_State): ...

class MemoryCache(_State):
    # (spec, batch_size, num_heads, head_dim, value_dim, num_query_heads, window, sinks, scale, dtype,
    # check_finite, rope=(theta, dim, layout, frequencies) or None, retain, recent=-1), (other) for a copy,
    # (other, rows) for select, (caches) for concat, (data) from bytes
    def __init__(self, *args: Any, **kwargs: Any) -> None: ...
    def update(
        self, k: _Array, v: _Array, *, decay: _Gate = None, beta: _Gate = None, positions: _Gate = None
    ) -> None: ...
    def attend(self, q: _Array, *, out: _Out = None) -> _F32: ...
    def step(
        self,
        q: _Array,
        k: _Array,
        v: _Array,
        *,
        decay: _Gate = None,
        beta: _Gate = None,
        out: _Out = None,
        positions: _Gate = None,
    ) -> _F32: ...
    # step's arguments, checked and converted, without the step (the benchmark's binding overhead)
    _step_overhead = step
    def forward(
        self, q: _Array, k: _Array, v: _Array, *, decay: _Gate = None, beta: _Gate = None, positions: _Gate = None
    ) -> _F32: ...
    # summary rules: (keys, values); matrix rules: S, or (S, z) when normalized
    def memory(self) -> Union[Tuple[_F32, _F32], _F32]: ...
    def load_memory(self, S: npt.ArrayLike, z: Optional[npt.ArrayLike] = None) -> None: ...
    def visible(self, *, out: Optional[Tuple[_F32, _F32]] = None) -> Tuple[_F32, _F32, npt.NDArray[np.bool_]]: ...
    visible_size: _ReadOnly[int]
    def reset(self, rows: Optional[npt.ArrayLike] = None) -> None: ...
    def checkpoint(self) -> Checkpoint: ...
    def rollback(self, checkpoint: Checkpoint, rows: Optional[npt.ArrayLike] = None) -> None: ...
    def reorder(self, indices: npt.ArrayLike) -> None: ...
    def to_bytes(self) -> bytes: ...
    last_position: _ReadOnly[npt.NDArray[np.int64]]
    num_heads: _ReadOnly[int]
    head_dim: _ReadOnly[int]
    value_dim: _ReadOnly[int]
    num_query_heads: _ReadOnly[int]
    window: _ReadOnly[int]
    sinks: _ReadOnly[int]
    scale: _ReadOnly[float]
    dtype: _ReadOnly[str]
    check_finite: _ReadOnly[bool]
    _rope: _ReadOnly[Optional[Tuple[float, int, str, Tuple[float, ...]]]]
    retain: _ReadOnly[str]
    recent: _ReadOnly[Optional[int]]
    memory_slots: _ReadOnly[int]
    matrix_memory: _ReadOnly[bool]
