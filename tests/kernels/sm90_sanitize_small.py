"""Every sm90 grouped-GEMM kind and configuration once on small awkward cases: the program compute-sanitizer runs.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python tests/kernels/sm90_sanitize_small.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tests/kernels/sm90_sanitize_small.py

Covers experts with 0, 1, 7 and 129 rows (partial tiles, skipped groups), empty first/last experts, int32 counts,
rows past the counts (the zeroed tail) and counts summing past the rows (clamped). Without the caching allocator
(memcheck) every operand is its own allocation, so an out-of-bounds access is not hidden inside a cached block.
"""
import torch

from engmoe.kernels import sm90_gemm


def main() -> None:
    why = sm90_gemm.unusable_reason()
    assert why is None, why
    g = torch.Generator(device="cuda").manual_seed(0)
    for counts, K, N, rows_extra in (([0, 1, 7, 129, 0], 64, 80, 0), ([3, 0, 40], 136, 32, 5), ([130], 8, 16, 0)):
        rows, E = sum(counts) + rows_extra, len(counts)
        x = torch.randn(rows, K, device="cuda", generator=g).bfloat16()
        dy = torch.randn(rows, N, device="cuda", generator=g).bfloat16()
        w = torch.randn(E, K, N, device="cuda", generator=g).bfloat16()
        for dtype in (torch.int64, torch.int32):
            c = torch.tensor(counts, device="cuda", dtype=dtype)
            for kind, a, b in (("fwd", x, w), ("dgrad", dy, w), ("wgrad", x, dy)):
                for cfg in range(len(sm90_gemm.configs(kind))):
                    torch.ops.engmoe.sm90_grouped_mm(a, b, c, kind, cfg)
            for cfg in range(len(sm90_gemm.configs("wgrad_accum"))):
                torch.ops.engmoe.sm90_grouped_wgrad_accum_(torch.zeros(E, K, N, device="cuda"), x, dy, c, cfg)
            if N % 16 == 0:  # the SwiGLU up-projection: whole 8-column gate/up pairs
                w_il = sm90_gemm.interleave_gate_up(w).contiguous()
                scale = torch.rand(rows, device="cuda", generator=g)
                for cfg in range(len(sm90_gemm.configs("fwd_swiglu"))):
                    torch.ops.engmoe.sm90_grouped_fwd_swiglu(x, w_il, c, scale, cfg)
                    torch.ops.engmoe.sm90_grouped_fwd_swiglu(x, w_il, c, None, cfg)
        over = torch.tensor([c + 50 for c in counts], device="cuda")  # sums past the rows: clamped
        torch.ops.engmoe.sm90_grouped_mm(x, w, over, "fwd", 0)
        torch.ops.engmoe.sm90_grouped_wgrad_accum_(torch.zeros(E, K, N, device="cuda"), x, dy, over, 0)
    torch.cuda.synchronize()
    print("sm90_sanitize_small: all kinds ran")


if __name__ == "__main__":
    main()
