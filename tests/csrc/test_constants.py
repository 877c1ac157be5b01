"""csrc/constants.h mirrors guider_fast/_constants.py: same names, same values."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = REPO / "guider_fast" / "_constants.py"
HEADER = REPO / "csrc" / "constants.h"
# The constants the calibration kernels use: each must be mirrored.
REQUIRED = {"CALIBRATION_IMAGE_OFFSET", "CALIBRATION_MINMAX_EPS", "GEOMLOSS_SQRT_FLOOR"}


def python_constants() -> dict:
    values = {}
    for node in ast.parse(PY.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = float(ast.literal_eval(node.value))
            except (ValueError, TypeError):
                pass
    return values


def header_constants() -> dict:
    text = re.sub(r"//[^\n]*", "", HEADER.read_text())
    return {name: float(value) for name, value in
            re.findall(r"constexpr\s+double\s+(\w+)\s*=\s*([-+0-9.eE]+)\s*;", text)}


def test_header_mirrors_python_constants():
    py, cc = python_constants(), header_constants()
    assert REQUIRED <= set(cc), f"csrc/constants.h lacks {sorted(REQUIRED - set(cc))}"
    for name, value in cc.items():
        assert name in py, f"csrc/constants.h defines {name}, guider_fast/_constants.py does not"
        assert value == py[name], f"{name}: csrc/constants.h has {value!r}, guider_fast/_constants.py {py[name]!r}"


def test_kernels_do_not_hardcode_the_constants():
    # The kernels name the constants; a literal copy would drift when _constants.py changes.
    for cu in sorted((REPO / "csrc").glob("*.cu")):
        text = re.sub(r"//[^\n]*", "", cu.read_text())
        for literal in ("1e-8", "1e-7", "1e-08", "1e-07"):
            assert literal not in text, f"{cu.name} hardcodes {literal}: use csrc/constants.h"
