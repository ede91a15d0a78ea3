"""Every Triton kernel compiles for real GPUs, on any machine: what ``TRITON_INTERPRET=1`` cannot check.

One subprocess (with ``TRITON_INTERPRET`` unset: the interpreter replaces ``triton.jit`` at import) runs
``python -m fdpg.kernels._compile_check``: it calls each module's launch wrappers on ``meta`` tensors of
representative shapes (V = 512/50257/128256, d = 768/1000/4096; fp32/bf16/fp16; prior/entropy/KL/bias/grad flags,
in-place backward), records every ``kernel[grid](...)`` instead of launching it, and compiles each distinct
specialisation with ``triton.compile`` for sm_90 (all) and sm_80 (the primary, main-path ones), through ptxas.
Fails on a compile error, on a kernel its module launches that no case reached, and on register spills of a
primary variant for sm_90 (the tuned main path); other spills are reported as warnings.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in (ROOT / "kernels").glob("*.py") if not p.stem.startswith("_"))
ARCHS = ("90", "80:primary")
NO_SPILL_ARCH = 90          # primary variants for this target must not spill

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("triton_compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fdpg.kernels._compile_check", "--json", str(out)]
    for a in ARCHS:
        cmd += ["--arch", a]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    if p.returncode not in (0, 1) or not out.exists():
        pytest.fail(f"compile check crashed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    rep = json.loads(out.read_text())
    if rep.get("unsupported"):
        pytest.skip(f"cannot compile Triton kernels here: {rep['unsupported']}")
    print(f"\ncompiled {len(rep['variants'])} variants in {rep['seconds']} s (triton {rep['triton']})")
    return rep


def _describe(v: dict) -> str:
    return (f"{v['module']}.{v['kernel']} sm_{v['arch']} warps={v['num_warps']} stages={v['num_stages']} "
            f"{v['pointer_dtypes']} {v['constexprs']}\n    from: {'; '.join(v['cases'][:4])}")


def test_parse_ptxas():
    from fdpg.kernels._compile_check import parse_ptxas

    log = ("ptxas-blackwell info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas-blackwell info    : Function properties for k\n"
           "    312 bytes stack frame, 480 bytes spill stores, 464 bytes spill loads\n"
           "ptxas-blackwell info    : Used 255 registers, used 1 barriers, 16 bytes smem\n")
    assert parse_ptxas(log) == dict(registers=255, spill_stores=480, spill_loads=464, stack=312)
    assert parse_ptxas("ptxas info : Used 40 registers")["spill_stores"] is None


@pytest.mark.parametrize("module", MODULES)
def test_every_launched_kernel_is_compiled(report, module):
    info = report["modules"].get(module)
    assert info is not None, f"kernels/{module}.py was not checked"
    errs = "\n\n".join(f"{e['case']}:\n{e['error']}" for e in info["capture_errors"])
    assert not info["capture_errors"], f"calling the launch wrappers of kernels/{module}.py failed:\n{errs}"
    assert info["launched"], f"kernels/{module}.py launches no kernel that the check can see"
    missing = sorted(set(info["launched"]) - set(info["captured"]))
    assert not missing, f"kernels/{module}.py launches {missing}, but no case of _compile_check reached them"


@pytest.mark.parametrize("module", MODULES)
def test_kernels_compile(report, module):
    vs = [v for v in report["variants"] if v["module"] == module]
    assert vs or report["modules"][module]["capture_errors"], f"no variant of kernels/{module}.py was compiled"
    bad = [v for v in vs if not v["ok"]]
    msg = "\n\n".join(f"{_describe(v)}\n{v['error']}" for v in bad)
    assert not bad, f"{len(bad)} of {len(vs)} specialisations of kernels/{module}.py fail to compile:\n{msg}"
    # ptxas ran on every PTX and its report was read
    assert all(v["registers"] is not None and v["spill_stores"] is not None for v in vs), \
        [v["ptxas_log"] for v in vs if v["registers"] is None][:2]


def test_no_register_spills_on_main_path(report):
    ok = [v for v in report["variants"] if v["ok"]]
    spills = [v for v in ok if (v["spill_stores"] or 0) + (v["spill_loads"] or 0) > 0]
    hard = [v for v in spills if v["primary"] and v["arch"] == NO_SPILL_ARCH]
    for v in spills:
        if v not in hard:
            warnings.warn(f"register spills ({v['spill_stores']} B stores, {v['spill_loads']} B loads, "
                          f"{v['registers']} registers): {_describe(v)}", stacklevel=1)
    msg = "\n".join(f"{v['spill_stores']}/{v['spill_loads']} B spilled, {v['registers']} registers: {_describe(v)}"
                    for v in hard)
    assert not hard, f"main-path kernels spill registers on sm_{NO_SPILL_ARCH}:\n{msg}"
    assert any(v["primary"] and v["arch"] == NO_SPILL_ARCH for v in ok)
