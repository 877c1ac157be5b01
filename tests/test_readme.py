"""Every python example in the README runs as written."""

import pathlib
import re


README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 5


def test_readme_examples_run():
    namespace = {}
    for block in BLOCKS:  # blocks build on each other (imports in the first)
        exec(compile(block, str(README), "exec"), namespace)
