"""README.md's Python examples run as written, and .ci/run runs README's quick-start lines."""
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i, capsys):
    exec(compile(BLOCKS[i], f"README.md[python block {i}]", "exec"), {"__name__": "readme"})


def test_ci_runs_the_readme_quick_start():
    out = subprocess.run(
        ["bash", "-c", "sed -n '/<!-- ci:begin -->/,/<!-- ci:end -->/p' README.md | grep -vE '^(<!--|```|#|\\s*$)'"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 2 and out[0].endswith("fdpg demo") and "pytest" in out[1]
    assert "sed -n '/<!-- ci:begin -->/" in (ROOT / ".ci" / "run").read_text()
