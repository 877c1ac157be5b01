"""The ptxas gate: every csrc/*.cu compiles for sm_90, and no kernel spills, uses a stack
frame or more than 48 KiB of static shared memory.

Reads nvcc's ``-Xptxas -v`` report (built once per tree by conftest.py, flags
there: torch's no-implicit-half-conversion defines included).
"""

from __future__ import annotations

import re
import subprocess

import pytest

# Bounds per kernel, with their reasons.
MAX_STACK_BYTES = 0          # a stack frame means local memory: spills or dynamically indexed arrays
MAX_SPILL_BYTES = 0
MAX_STATIC_SMEM = 48 * 1024  # beyond it ptxas needs dynamic shared memory and the opt-in attribute
MAX_REGISTERS = 128          # 256-thread blocks: at most 128 registers keeps 2 blocks per SM

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USAGE = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict:
    """{mangled kernel: {registers, stack, spill_stores, spill_loads, smem, arch}} from -Xptxas -v."""
    kernels, current = {}, None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = kernels.setdefault(m.group(1), {"arch": m.group(2)})
        elif current is not None and (m := _PROPS.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := _USAGE.search(line)):
            current.update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    return kernels


def _demangle(names):
    """Readable names via c++filt -p when binutils has it, else the mangled ones."""
    try:
        out = subprocess.run(["c++filt", "-p"], input="\n".join(names), capture_output=True, text=True, timeout=30)
        readable = out.stdout.splitlines()
        if out.returncode == 0 and len(readable) == len(names):
            return [r.replace("guider_fast::cuda::(anonymous namespace)::", "") for r in readable]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return list(names)


def test_parser_reads_a_report():
    log = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 368 bytes cmem[0]"""
    assert parse_ptxas(log) == {"_Z3fooPf": {"arch": "sm_90", "stack": 8, "spill_stores": 4, "spill_loads": 4,
                                             "registers": 40, "smem": 1024}}


def test_ptxas_resources(ptxas_logs):
    rows, failures = [], []
    for source, log in ptxas_logs.items():
        kernels = parse_ptxas(log)
        assert kernels, f"no kernels in the ptxas report of {source}:\n{log}"
        names = sorted(kernels)
        for mangled, readable in zip(names, _demangle(names)):
            k = kernels[mangled]
            assert {"registers", "stack", "spill_stores", "smem"} <= set(k), f"{mangled}: incomplete report {k}"
            assert k["arch"] == "sm_90"
            rows.append(f"{source:18} {readable:55} regs {k['registers']:3}  stack {k['stack']}  "
                        f"spill {k['spill_stores']}/{k['spill_loads']}  smem {k['smem']}")
            for key, bound in (("stack", MAX_STACK_BYTES), ("spill_stores", MAX_SPILL_BYTES),
                               ("spill_loads", MAX_SPILL_BYTES), ("smem", MAX_STATIC_SMEM),
                               ("registers", MAX_REGISTERS)):
                if k[key] > bound:
                    failures.append(f"{source} {mangled}: {key} {k[key]} > {bound}")
    print("\n".join(rows))
    assert not failures, "\n".join(failures)


def test_every_kernel_file_is_in_the_gate(ptxas_logs):
    from .conftest import KERNELS
    assert sorted(ptxas_logs) == sorted(cu.name for cu in KERNELS)
    if not KERNELS:
        pytest.skip("no .cu files in csrc/")
