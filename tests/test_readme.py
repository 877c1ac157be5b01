"""Every python example in the README runs on its own, as written (a fresh namespace each)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs_on_its_own(index):
    exec(compile(BLOCKS[index], f"{README}:python block {index + 1}", "exec"), {})
