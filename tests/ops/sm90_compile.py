"""Compile every Triton kernel of guider_fast ahead of time for an H100 (sm_90), without a GPU.

Run as a script (tests/ops/test_sm90_compile.py does, in a fresh process: kernels
decorated under TRITON_INTERPRET=1 cannot be compiled).  Prints one line per
kernel configuration and exits non-zero on the first compile error.
"""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from guider_fast.kernels import calibration as calibration_kernels
from guider_fast.kernels import dbpr as dbpr_kernels
from guider_fast.kernels import sinkhorn as kernels

TARGET = GPUTarget("cuda", 90, 32)
# An H100 gives one block at most 227 KiB of shared memory: more fails at launch.
H100_SHARED_BYTES = 232448
FLOAT_SCALARS = {"eps", "tol"}
INT_POINTERS = {"iters_ptr"}


def signature(fn, constexprs, point_dtype, types=None):
    """Argument types: ``types`` first, then the Sinkhorn kernels' naming rules."""
    sig = {}
    for name in fn.arg_names:
        if types and name in types:
            sig[name] = types[name]
        elif name in constexprs:
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


# DBPR and calibration kernels: tables of the given dtype, int64 indices, float scalars.
DBPR_INDEX = {name: "*i64" for name in ("users_ptr", "pos_ptr", "neg_ptr", "keys_ptr", "order_ptr",
                                        "items_ptr", "ts_ptr", "tn_ptr", "vs_ptr", "vn_ptr")}
DBPR_FLOATS = {name: "fp32" for name in ("scale", "l2", "lr", "l2_scale", "threshold")}


def dbpr_types(table_dtype):
    tables = {name: table_dtype for name in ("user_ptr", "item_ptr", "table_ptr")}
    return {**DBPR_INDEX, **DBPR_FLOATS, **tables}


def calibration_types(feature_dtype):
    features = {name: feature_dtype for name in ("t_ptr", "v_ptr", "uc_ptr", "tc_ptr", "vc_ptr")}
    return {**DBPR_INDEX, **DBPR_FLOATS, **features}


DBPR_CONFIGS = [
    (dbpr_kernels._dbpr_forward_kernel, dbpr_types("*fp32"),
     dict(HAS_WEIGHTS=True, BLOCK_B=64, BLOCK_D=64), 4),
    (dbpr_kernels._dbpr_forward_kernel, dbpr_types("*bf16"),
     dict(HAS_WEIGHTS=False, BLOCK_B=16, BLOCK_D=256), 4),
    (dbpr_kernels._dbpr_scatter_kernel, dbpr_types("*fp32"),
     dict(PER_OCCURRENCE=False, BLOCK_B=64, BLOCK_D=64), 4),
    (dbpr_kernels._dbpr_scatter_kernel, dbpr_types("*bf16"),
     dict(PER_OCCURRENCE=True, BLOCK_B=16, BLOCK_D=256), 4),
    (dbpr_kernels._dbpr_atomic_sgd_kernel, dbpr_types("*fp32"),
     dict(HAS_WEIGHTS=True, BLOCK_B=64, BLOCK_D=64, BLOCK_K=8), 4),
    (dbpr_kernels._user_segments_kernel, dbpr_types("*fp32"),
     dict(FORWARD=True, HAS_WEIGHTS=True, MODE=dbpr_kernels.UPDATE_STASH, CHUNK=8, BLOCK_D=64), 1),
    (dbpr_kernels._user_segments_kernel, dbpr_types("*bf16"),
     dict(FORWARD=False, HAS_WEIGHTS=False, MODE=dbpr_kernels.UPDATE_GRADIENT, CHUNK=8, BLOCK_D=256), 2),
    (dbpr_kernels._item_segments_kernel, dbpr_types("*fp32"),
     dict(MODE=dbpr_kernels.UPDATE_ADAGRAD, CHUNK=8, BLOCK_D=64), 1),
    (dbpr_kernels._item_segments_kernel, dbpr_types("*bf16"),
     dict(MODE=dbpr_kernels.UPDATE_SGD, CHUNK=8, BLOCK_D=256), 2),
    (dbpr_kernels._apply_stash_kernel, dbpr_types("*bf16"),
     dict(MODE=dbpr_kernels.UPDATE_ADAGRAD, BLOCK_D=256), 2),
    (calibration_kernels._calibration_rows_kernel, calibration_types("*fp32"),
     dict(EUCLIDEAN=False, BLOCK_R=64, BLOCK_D=64, BLOCK_C=64), 4),
    (calibration_kernels._calibration_rows_kernel, calibration_types("*bf16"),
     dict(EUCLIDEAN=True, BLOCK_R=64, BLOCK_D=64, BLOCK_C=64), 4),
    (calibration_kernels._calibration_cached_kernel, calibration_types("*fp32"),
     dict(BLOCK_R=64), 4),
    (calibration_kernels._calibration_finish_kernel, calibration_types("*fp32"),
     dict(BLOCK=1024, BLOCK_P=1024), 4),
]

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
    configs = [(fn, point_dtype, None, constexprs, warps) for fn, point_dtype, constexprs, warps in CONFIGS]
    configs += [(fn, types.get("user_ptr", types.get("t_ptr")), types, constexprs, warps)
                for fn, types, constexprs, warps in DBPR_CONFIGS]
    for fn, point_dtype, types, constexprs, warps in configs:
        source = ASTSource(fn=fn, signature=signature(fn, constexprs, point_dtype, types),
                           constexprs=constexprs)
        compiled = triton.compile(source, target=TARGET, options={"num_warps": warps})
        assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0
        assert compiled.metadata.shared <= H100_SHARED_BYTES, (fn.__name__, constexprs, compiled.metadata.shared)
        print(f"ok {fn.__name__} {point_dtype} {constexprs} warps={warps} "
              f"shared={compiled.metadata.shared} bytes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
