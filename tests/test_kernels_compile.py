"""Ahead-of-time compile of the Triton kernels for an H100 (sm_90a) on this CPU-only machine.

The interpreter checks the numbers but not the GPU code path: this test runs Triton's real
compiler (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) in a subprocess without
TRITON_INTERPRET, at the DETR shape (bf16 value, fp32 locations and weights, H = 8, D = 32,
L = 4, P = 4, the launcher's block sizes), and checks what the design relies on: vectorised
gathers, relaxed (fence-free) atomics for grad_value, no register spills, and no shared-memory
layout conversion of the backward's tiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

SCRIPT = r"""
import json, os, re, subprocess
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dac_detr.kernels import msda_triton as m

assert not m.INTERPRETED
H, D, L, P = 8, 32, 4, 4
constexprs = {"NUM_HEADS": H, "HEAD_DIM": D, "BLOCK_D": 32, "NUM_LEVELS": L, "NUM_POINTS": P, "ACC_DTYPE": tl.float32}
common = {"level_meta_ptr": "*i32", "loc_ptr": "*fp32", "attn_ptr": "*fp32", "num_queries": "i32", "num_keys": "i32",
          **{name: "constexpr" for name in list(constexprs) + ["BLOCK_Q"]}}
kernels = {
    "forward": (m._msda_forward_kernel, {"value_ptr": "*bf16", "out_ptr": "*bf16", **common}, False),
    "backward": (m._msda_backward_kernel, {"value_ptr": "*bf16", "grad_out_ptr": "*bf16", "grad_value_ptr": "*fp32",
                                           "grad_loc_ptr": "*fp32", "grad_attn_ptr": "*fp32", **common}, True),
}
report = {}
for name, (kernel, types, backward) in kernels.items():
    signature = {arg: types[arg] for arg in kernel.arg_names}
    block_q, _, num_warps = m._launch_config(22223, D, backward=backward)
    # Tensor arguments arrive 16-byte aligned (PyTorch's allocator), as the JIT would specialise.
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names) if types[arg].startswith("*")}
    source = ASTSource(kernel, signature, constexprs={**constexprs, "BLOCK_Q": block_q}, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    with open(os.environ["PTX_OUT"] + name + ".ptx", "w") as f:
        f.write(ptx)
    log = subprocess.run([knobs.nvidia.ptxas.path, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a",
                          os.environ["PTX_OUT"] + name + ".ptx", "-o", os.environ["PTX_OUT"] + name + ".cubin"],
                         capture_output=True, text=True, check=True).stderr
    report[name] = {
        "block_q": block_q,
        # 16-byte (v4.b32) gathers in the forward, 8-byte (v2.b32 = 4 bf16) in the backward
        "vector_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.", ptx)),
        "atomics": sorted(set(re.findall(r"atom\.global[\w.]*", ptx))),
        "shared_tile_loads": len(re.findall(r"ld\.shared(?:\.\w+)*\.v4", ptx)),
        "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
        "spill_bytes": int(re.search(r"(\d+) bytes spill stores", log).group(1)),
    }
print(json.dumps(report))
"""


def test_kernels_compile_for_sm90_with_vector_gathers_relaxed_atomics_and_no_spills(tmp_path):
    version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    if version < (3, 4):
        pytest.skip(f"the ASTSource(constexprs=...) compile API used here needs triton >= 3.4, have {triton.__version__}")
    env = {**os.environ, "PTX_OUT": str(tmp_path) + os.sep}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    forward, backward = report["forward"], report["backward"]
    assert forward["vector_loads"] > 0 and backward["vector_loads"] > 0, report
    assert forward["atomics"] == []
    assert backward["atomics"] and all(".relaxed." in op and ".add." in op and op.endswith("f32")
                                       for op in backward["atomics"]), report  # fmt: skip
    assert forward["spill_bytes"] == 0 and backward["spill_bytes"] == 0, report
    # The bf16 backward keeps its [BLOCK_Q, D] tiles in the atomics' layout: no tile goes
    # through shared memory (only the per-row gradient vectors are re-laid out for their stores).
    assert backward["shared_tile_loads"] == 0, report
