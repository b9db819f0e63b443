"""Every Python block of README.md runs as written, and so do those of the docs pages; the README's
test line is what .ci/run runs."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
pytestmark = [
    pytest.mark.one_backend,
    pytest.mark.skipif(not README.is_file(), reason="no README.md beside the tests (not a source checkout)"),
]


def blocks(language, page=README):
    """The code blocks of a page (README.md unless named) fenced as ```language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", page.read_text(encoding="utf-8"), re.DOTALL | re.MULTILINE)


def test_the_readme_has_python_blocks():
    assert len(blocks("python")) >= 2


@pytest.mark.parametrize("index", range(len(blocks("python")) if README.is_file() else 0))
def test_a_readme_python_block_runs_as_written(index, tmp_path):
    code = blocks("python")[index]
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"README.md python block {index + 1}:\n{code}\n{out.stderr}"


@pytest.mark.parametrize("page, commands", [("README.md", {"demo", "bench", "generate"}), ("docs/hf.md", {"generate"})])
def test_the_command_lines_of_a_page_are_ones_kvfold_takes(page, commands):
    """Each ``kvfold ...`` line of the page's shell blocks parses as written (they run elsewhere: the
    demo and the bench in their own tests, generate in tests/test_hf.py)."""
    from kvfold.__main__ import _parser

    lines = [line for block in blocks("bash", ROOT / page) for line in block.splitlines() if line.startswith("kvfold ")]
    assert {shlex.split(line, comments=True)[1] for line in lines} == commands
    for line in lines:
        _parser().parse_args(shlex.split(line, comments=True)[1:])  # SystemExit(2) if an option is unknown


def test_the_readme_test_line_is_what_ci_runs():
    text = README.read_text(encoding="utf-8")
    section = text.split("## Run the tests", 1)[1]
    line = re.search(r"^```bash\n(.*?)\n```$", section, re.DOTALL | re.MULTILINE).group(1)
    assert line.endswith("pytest")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert line in ci


# docs pages whose Python blocks run in order as one script, and the packages they import; the
# others are not scripts (api.md sums the calls up) or download a model (hf.md).
PAGES = {"rules.md": ["torch"], "matrix.md": ["onnx", "onnxruntime"], "state.md": []}


@pytest.mark.parametrize("page", sorted(PAGES))
def test_the_python_blocks_of_a_docs_page_run_in_order(page, tmp_path):
    for module in PAGES[page]:
        pytest.importorskip(module)
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    code = "\n".join(re.findall(r"^```python\n(.*?)^```$", text, re.DOTALL | re.MULTILINE))
    assert code
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"docs/{page}:\n{out.stderr}"
