"""Dense matmul rate of this device (the MFU denominator) and what the device is; prints one JSON object.

    python benchmarks/matmul.py                      # CUDA: 8192^3 bf16, as performance.md defines it
    python benchmarks/matmul.py --device cpu --n 256 --dtype fp32   # the CPU smoke run

Run as a separate process by benchmarks/run.py, so the harness itself never holds a CUDA context.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--n", type=int, default=8192, help="square matrix size")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    return p.parse_args(argv)


def timed_matmuls(a, b, iters: int, device: str) -> float:
    """Seconds for `iters` back-to-back a @ b."""
    import torch

    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            torch.matmul(a, b)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(iters):
        torch.matmul(a, b)
    return time.perf_counter() - t0


def device_info(device: str) -> dict:
    import torch

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return {"device_name": props.name, "gpu_count": torch.cuda.device_count(),
                "gpu_mem_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                "capability": f"{props.major}.{props.minor}"}
    import platform

    return {"device_name": platform.processor() or platform.machine() or "cpu", "gpu_count": 0,
            "gpu_mem_gib": None, "cuda": None, "capability": None}


def measure(device: str, n: int, dtype_name: str, iters: int, warmup: int) -> dict:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device (use --device cpu)")
    dtype = getattr(torch, DTYPES[dtype_name])
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timed_matmuls(a, b, warmup, device)
    seconds = timed_matmuls(a, b, iters, device)
    tflops = 2.0 * n ** 3 * iters / seconds / 1e12
    return {**device_info(device), "matmul_tflops": round(tflops, 2), "matmul_n": n, "matmul_dtype": dtype_name,
            "torch": torch.__version__}


def main(argv=None) -> int:
    args = parse_args(argv)
    print(json.dumps(measure(args.device, args.n, args.dtype, args.iters, args.warmup)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
