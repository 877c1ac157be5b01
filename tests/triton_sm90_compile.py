"""Compile every Triton kernel of guider_fast ahead of time for an H100 (sm_90), without a GPU.

Run as a script (tests/test_triton_compile.py does, in a fresh process: kernels
decorated under TRITON_INTERPRET=1 cannot be compiled).  Prints one line per
kernel configuration and exits non-zero on the first compile error.
"""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from guider_fast.kernels import sinkhorn as kernels

TARGET = GPUTarget("cuda", 90, 32)
# An H100 gives one block at most 227 KiB of shared memory: more fails at launch.
H100_SHARED_BYTES = 232448
FLOAT_SCALARS = {"eps", "tol"}
INT_POINTERS = {"iters_ptr"}


def signature(fn, constexprs, point_dtype):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INT_POINTERS:
            sig[name] = "*i32"
        elif name in ("x_ptr", "y_ptr"):
            sig[name] = point_dtype
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


CONFIGS = [
    (kernels._sinkhorn_onchip_kernel, "*fp32",
     dict(P=2, USE_TOL=True, CHECK=10, BLOCK_N=32, BLOCK_M=32, BLOCK_D=64), 4),
    # Triton specialises integer arguments equal to 1 into constants at launch.
    (kernels._sinkhorn_onchip_kernel, "*fp32",
     dict(n=1, m=1, P=2, USE_TOL=False, CHECK=10, BLOCK_N=16, BLOCK_M=16, BLOCK_D=16), 4),
    (kernels._sinkhorn_onchip_kernel, "*fp32",
     dict(P=2, USE_TOL=True, CHECK=10, BLOCK_N=256, BLOCK_M=256,
          BLOCK_D=kernels.feature_block(4096, 256)), 16),
    (kernels._sinkhorn_onchip_kernel, "*bf16",
     dict(P=1, USE_TOL=False, CHECK=10, BLOCK_N=256, BLOCK_M=256,
          BLOCK_D=kernels.feature_block(4096, 256)), 16),
    (kernels._samples_loss_onchip_kernel, "*fp32",
     dict(P=1, DEBIAS=True, BLOCK_N=64, BLOCK_M=64, BLOCK_D=64), 4),
    (kernels._samples_loss_onchip_kernel, "*fp16",
     dict(P=2, DEBIAS=False, BLOCK_N=128, BLOCK_M=128, BLOCK_D=32), 8),
    (kernels._samples_loss_onchip_kernel, "*fp32",
     dict(P=2, DEBIAS=True, BLOCK_N=256, BLOCK_M=256, BLOCK_D=kernels.feature_block(4096, 256)), 16),
    (kernels._softmin_streamed_kernel, "*fp32",
     dict(P=2, BLOCK_U=64, BLOCK_V=64, BLOCK_D=64), 4),
    (kernels._envelope_rows_kernel, "*fp32",
     dict(P=1, GEOMLOSS_COST=True, NORMALIZE=True, BLOCK_U=32, BLOCK_V=32, BLOCK_D=256), 4),
    (kernels._envelope_rows_kernel, "*fp32",
     dict(P=2, GEOMLOSS_COST=False, NORMALIZE=False, BLOCK_U=32, BLOCK_V=32, BLOCK_D=64), 4),
]


def main():
    for fn, point_dtype, constexprs, warps in CONFIGS:
        source = ASTSource(fn=fn, signature=signature(fn, constexprs, point_dtype), constexprs=constexprs)
        compiled = triton.compile(source, target=TARGET, options={"num_warps": warps})
        assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0
        assert compiled.metadata.shared <= H100_SHARED_BYTES, (fn.__name__, constexprs, compiled.metadata.shared)
        print(f"ok {fn.__name__} {point_dtype} {constexprs} warps={warps} "
              f"shared={compiled.metadata.shared} bytes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
