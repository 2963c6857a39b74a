"""engmoe's Hopper grouped GEMM (``csrc/sm90/``, CUTLASS 3.x on sm_90a) as torch custom ops.

The kernels live in a torch-free shared library, ``libengmoe_sm90.so`` (C ABI, see ``csrc/sm90/engmoe_sm90.h``),
built by ``python -m engmoe.kernels.build_sm90`` (or setup.py where nvcc and CUTLASS's headers are), so it compiles
on a machine without a GPU or a CUDA torch and is carried to the one that has them. This module loads it with
ctypes and hands it raw device pointers, the current stream and a workspace from torch's caching allocator (so a
call is CUDA-graph capturable and owns no memory).

Ops (one launch of the argument kernel plus one of the persistent grouped GEMM each; group sizes read on the device):

* ``torch.ops.engmoe.sm90_grouped_mm(a, b, counts, kind, config=-1)`` with ``kind``:
  ``"fwd"``   ``x [rows, K] @ w[e]``    (w ``[E, K, N]``) -> ``[rows, N]``;
  ``"dgrad"`` ``dy [rows, N] @ w[e]ᵀ``                -> ``[rows, K]``;
  ``"wgrad"`` ``x_eᵀ @ dy_e``                         -> ``[E, K, N]`` (zeros for experts without rows).
  bf16 in and out, fp32 accumulation.
* ``torch.ops.engmoe.sm90_grouped_wgrad_accum_(main_grad, x, dy, counts, config=-1)``: ``main_grad[e] += x_eᵀ dy_e``
  in fp32 (the epilogue reads and writes main_grad, beta = 1); experts without rows are left untouched.
* ``torch.ops.engmoe.sm90_grouped_fwd_swiglu(x, w_il, counts, scale=None, config=-1) -> (h, act)``: the
  up-projection with SwiGLU and the routing probability in the epilogue; ``w_il`` is w13 with gate and up columns
  interleaved in 8-column blocks (:func:`interleave_gate_up`), ``h`` ``[rows, 2F]`` = (gate | up) as the unfused
  GEMM writes it, ``act`` ``[rows, F]`` = ``silu(gate) · up · scale[row]`` (docs/kernels-sm90.md).

Library lookup: ``$ENGMOE_SM90_LIB``, else ``build/sm90/libengmoe_sm90.so`` of the source checkout, else the copy
setup.py put next to this file. A missing or stale library makes :func:`usable` False with the reason in
:func:`unusable_reason`; importing this module never fails.

``config``: -1 is the kind's default for the call's output width (the tile that fits it best, :func:`default_config`);
``ENGMOE_SM90_CONFIGS="fwd=pingpong_128x128x64,wgrad_accum=..."`` overrides the defaults by name (for benchmarks;
:func:`configs` lists the compiled ones).
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import NamedTuple

import torch

from engmoe.kernels.build_sm90 import BUILD_DIR, LIB_ENV, LIB_NAME  # one definition of the name and where it is built

ABI_VERSION = 2  # ENGMOE_SM90_ABI_VERSION in csrc/sm90/engmoe_sm90.h
KINDS = {"fwd": 0, "dgrad": 1, "wgrad": 2, "wgrad_accum": 3, "fwd_swiglu": 4}
SWIGLU_BLOCK = 8  # columns per gate/up block of the interleaved w13 (csrc/sm90/swiglu_epilogue.cuh)
CONFIGS_ENV = "ENGMOE_SM90_CONFIGS"
_REPO = Path(__file__).resolve().parents[2]
BUILD_HINT = "build it with `python -m engmoe.kernels.build_sm90` (needs nvcc and the CUTLASS headers)"
_MAX_ROWS = 2 ** 31 - 1


_DEFAULT_PATHS = (_REPO / BUILD_DIR / LIB_NAME, Path(__file__).resolve().parent / LIB_NAME)


def library_paths() -> list[Path]:
    """Where the library is looked for, in order (``$ENGMOE_SM90_LIB`` alone when set). Asked on every GEMM call
    (through :func:`library`), so the default paths are resolved once, at import."""
    env = os.environ.get(LIB_ENV)
    if env:
        return [Path(env)]
    return list(_DEFAULT_PATHS)


def _bind(lib: ctypes.CDLL) -> None:
    i32, i64, vp, cp = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_char_p
    sig = {
        "engmoe_sm90_abi_version": (i32, []),
        "engmoe_sm90_compiled_for_sm90a": (i32, []),
        "engmoe_sm90_num_configs": (i32, [i32]),
        "engmoe_sm90_default_config": (i32, [i32]),
        "engmoe_sm90_config_name": (cp, [i32, i32]),
        "engmoe_sm90_workspace_bytes": (i64, [i32, i32, i32, i32]),
        "engmoe_sm90_sm_count": (i32, [i32]),
        "engmoe_sm90_run": (i32, [i32, i32, vp, vp, vp, vp, i32, i32, i64, i32, i32, vp, i64, i32, i32, vp]),
        "engmoe_sm90_run_swiglu": (i32, [i32, vp, vp, vp, vp, vp, vp, i32, i32, i64, i32, i32, vp, i64, i32, i32,
                                         vp]),
        "engmoe_sm90_last_error": (cp, []),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


@functools.lru_cache(maxsize=None)
def _load(paths: tuple[Path, ...]) -> tuple[ctypes.CDLL | None, str | None]:
    missing = []
    for path in paths:
        if not path.is_file():
            missing.append(str(path))
            continue
        try:
            lib = ctypes.CDLL(str(path))
            _bind(lib)
        except (OSError, AttributeError) as e:
            return None, f"{path} does not load: {e}; rebuild it ({BUILD_HINT})"
        abi = lib.engmoe_sm90_abi_version()
        if abi != ABI_VERSION:
            return None, f"{path} has ABI {abi}, this engmoe expects {ABI_VERSION}: stale build, {BUILD_HINT}"
        if not lib.engmoe_sm90_compiled_for_sm90a():
            return None, f"{path} was built without sm_90a kernels; {BUILD_HINT}"
        return lib, None
    return None, f"libengmoe_sm90.so not found (looked at {', '.join(missing)}; set {LIB_ENV}, or {BUILD_HINT})"


def library() -> ctypes.CDLL | None:
    """The loaded library, or None (see :func:`load_error`)."""
    return _load(tuple(library_paths()))[0]


def load_error() -> str | None:
    return _load(tuple(library_paths()))[1]


def unusable_reason() -> str | None:
    """Why the sm90 kernels cannot run here (None when they can): library, CUDA device, compute capability."""
    err = load_error()
    if err is not None:
        return err
    return _device_reason(torch.cuda.current_device() if torch.cuda.is_available() else -1)


@functools.lru_cache(maxsize=None)
def _device_reason(device: int) -> str | None:
    """The device half of :func:`unusable_reason`, cached: it is asked once per GEMM call on the hot path."""
    if device < 0:
        return "no CUDA device"
    cap = torch.cuda.get_device_capability(device)
    if cap != (9, 0):  # sm_90a code runs on sm_90 only (H100/H200), not on sm_100+ nor older parts
        return f"needs an sm_90 GPU (H100/H200); this one is sm_{cap[0]}{cap[1]}"
    return None


def usable() -> bool:
    return unusable_reason() is None


def configs(kind: str) -> list[str]:
    """Names of the compiled configurations of ``kind`` (index = the ops' ``config``; 0 is the default)."""
    lib = library()
    if lib is None:
        return []
    k = KINDS[kind]
    return [lib.engmoe_sm90_config_name(k, i).decode() for i in range(lib.engmoe_sm90_num_configs(k))]


def config_index(kind: str, name: str) -> int:
    names = configs(kind)
    if name not in names:
        raise ValueError(f"sm90 {kind} config {name!r}: compiled ones are {names}")
    return names.index(name)


@functools.lru_cache(maxsize=None)
def _env_defaults(spec: str) -> dict[str, int]:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, name = item.partition("=")
        if kind.strip() not in KINDS:
            raise ValueError(f"{CONFIGS_ENV}: unknown kind {kind!r} in {spec!r} (kinds: {sorted(KINDS)})")
        out[kind.strip()] = config_index(kind.strip(), name.strip())
    return out


# Defaults other than config 0, by measurement (bench/sm90_gemm.py, one H200, 16 experts x top-8, 2880/1080, device
# time with the stream held, 2026-12-03): fwd at 8k / 32k tokens, cooperative 128x256 with a 2x1 cluster 718 / 581
# (up) and 646 / 577 (down) TFLOP/s vs 684 / 571 and 638 / 577 without (torch._grouped_mm 720 / 607, 647 / 565);
# the accumulating wgrad cooperative 128x256 593 / 614 (up) vs ping-pong 503 / 407 (torch fp32-out + add_ 515 / 572).
MEASURED_DEFAULTS = {
    "fwd": "cooperative_128x256x64_c2x1",
    "wgrad": "cooperative_128x256x64",
    "wgrad_accum": "cooperative_128x256x64",
}


@functools.lru_cache(maxsize=None)
def _measured_default(kind: str) -> int:
    name = MEASURED_DEFAULTS.get(kind)
    return configs(kind).index(name) if name in configs(kind) else 0


# Tiles that fit (docs/kernels-sm90.md): an output width that the tile's N does not divide pays for the padded
# columns of its last tile column in every row tile (1080 on 256-wide tiles computes 1280 columns), so where the
# output width is known the default is the candidate with the fewest padded columns; ties go to the earlier name.
# dgrad reads the weight K-contiguous, so any N that is a multiple of 8 keeps the 128-byte swizzle (at 8k tokens
# 224 runs the 1080-wide dgrad at 656-666 TFLOP/s against 607-616 for 256 with a 2x1 cluster and 597 for torch).
# The 2880-wide dgrad also runs fastest on 224 (32 padded columns), not on 240 with a 2x1 cluster (none): 224 won
# 7 of 8 shapes (4k-32k tokens over 16 and 64 experts; 8k over 64: 669 vs 602 TFLOP/s, 32k over 16: 570 vs 590),
# so 240 is no candidate.
# fwd and wgrad_accum read their B operand N-contiguous, where an N that is not a multiple of 64 falls back to a
# narrower swizzle (240 ran them at 370-650 TFLOP/s against 640-720 for 256), so their candidates are multiples of
# 64: 192 divides 2880 (at 4k / 8k tokens fwd2 623 / 645 vs 607 / 630, accum2 535 / 598 vs 505 / 564 TFLOP/s) and
# 256x128 pads 2160 by 16 columns instead of 144 (fwd1 694 / 696 vs 686 / 661). The 2160-wide accumulation ties
# and keeps 128x256 (543 vs 516 at 4k). The bf16 wgrad (unfused path) has the same operands as wgrad_accum: 192
# for the 2880-wide w2 gradient (4k / 8k / 32k tokens, 16 experts: 624 / 637 / 632 vs torch._grouped_mm 571 / 512 /
# 560), 128x256 for the 2160-wide one (638 / 639 / 628 vs 660 / 682 / 603; ping-pong 128x128 550 / 557 / 428).
# Only compiled names count (an older library keeps its defaults).
FIT_CANDIDATES: dict[str, tuple[str, ...]] = {
    "fwd": ("cooperative_128x256x64_c2x1", "cooperative_256x128x64", "cooperative_128x192x64_c2x1"),
    "dgrad": ("cooperative_128x256x64_c2x1", "cooperative_128x224x64"),
    "wgrad": ("cooperative_128x256x64", "cooperative_128x192x64"),
    "wgrad_accum": ("cooperative_128x256x64", "cooperative_128x192x64"),
    "fwd_swiglu": ("cooperative_256x128x64", "cooperative_128x128x64", "cooperative_128x256x64_c2x1"),
}


# Small groups (at most SMALL_GROUP_ROWS rows per expert on average: the accumulating wgrad's reduction is that
# short): the fp32 read + write of main_grad per tile outweighs a tile's 16 k-steps, and the ping-pong kernel, whose
# warp groups alternate so one's epilogue overlaps the other's mainloop, joins the candidates (fewest padded columns
# still decides). One H200, 2026-12-04, bench/sm90_gemm.py --tokens 4096 8192 --experts 16 32 64: the 2160-wide
# accumulation at 512 / 1024 / 1024 rows per expert (4k x 64, 4k x 32, 8k x 64) 1.246 / 0.855 / 1.786 ms on
# ping-pong 128x128 (16 padded columns) against 1.282 / 0.908 / 1.869 on 128x256 (144); at 2048 rows 128x256 wins
# (4k x 16: 0.750 vs 0.822) and the 2880-wide one stays on 128x192 (no padded column; 8k x 64: 0.892 vs 0.999).
SMALL_GROUP_ROWS = 1024
SMALL_GROUP_CANDIDATES: dict[str, tuple[str, ...]] = {
    "wgrad_accum": FIT_CANDIDATES["wgrad_accum"] + ("pingpong_128x128x64",),
}


def tile_n(name: str) -> int:
    """The N of a configuration's tile, from its name (``cooperative_128x240x64_c2x1`` -> 240)."""
    for part in name.split("_"):
        dims = part.split("x")
        if len(dims) == 3 and all(d.isdigit() for d in dims):
            return int(dims[1])
    raise ValueError(f"sm90 config name {name!r} has no MxNxK tile")


def padded_columns(cols: int, n_tile: int) -> int:
    """Columns a tile width of ``n_tile`` computes past ``cols`` (the last tile column's waste)."""
    return -cols % n_tile


def fit_config(names: list[str], candidates: tuple[str, ...], cols: int) -> str | None:
    """The candidate among ``names`` (compiled) with the fewest padded columns at output width ``cols``."""
    present = [c for c in candidates if c in names]
    return min(present, key=lambda c: (padded_columns(cols, tile_n(c)), present.index(c))) if present else None


@functools.lru_cache(maxsize=None)
def _fit_default(kind: str, cols: int, small_groups: bool = False) -> int:
    names = configs(kind)
    cands = SMALL_GROUP_CANDIDATES.get(kind) if small_groups else None
    name = fit_config(names, cands or FIT_CANDIDATES.get(kind, ()), cols)
    return names.index(name) if name is not None else _measured_default(kind)


def default_config(kind: str, cols: int | None = None, rows_per_group: float | None = None) -> int:
    """The config a call with ``config=-1`` runs: ``ENGMOE_SM90_CONFIGS`` if it names ``kind``, else the
    best-fitting tile for output width ``cols`` (``FIT_CANDIDATES``; ``SMALL_GROUP_CANDIDATES`` when the groups
    average at most ``SMALL_GROUP_ROWS`` rows), else the measured default (``MEASURED_DEFAULTS``), else 0."""
    env = _env_defaults(os.environ.get(CONFIGS_ENV, ""))
    if kind in env:
        return env[kind]
    if cols is None:
        return _measured_default(kind)
    return _fit_default(kind, cols, rows_per_group is not None and rows_per_group <= SMALL_GROUP_ROWS)


@functools.lru_cache(maxsize=None)
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=4096)
def workspace_bytes(kind: str, config: int, groups: int, sm_count: int) -> int:
    """Device bytes one call needs (CUTLASS's workspace and the per-group argument arrays), cached."""
    n = library().engmoe_sm90_workspace_bytes(KINDS[kind], config, groups, sm_count)
    if n < 0:
        raise ValueError(f"sm90 {kind}: no workspace size for config {config}, {groups} groups, {sm_count} SMs")
    return int(n)


# ------------------------------------------------------------------------------------------------- shape checks
def _dims(kind: str, a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows, K, N, E) of a call, in the weight's [K, N] terms."""
    if kind == "fwd":
        return a.shape[0], b.shape[1], b.shape[2], b.shape[0]
    if kind == "dgrad":
        return a.shape[0], b.shape[1], b.shape[2], b.shape[0]
    return a.shape[0], a.shape[1], b.shape[1], counts.shape[0]


def out_shape(kind: str, a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> tuple[int, ...]:
    rows, k, n, e = _dims(kind, a, b, counts)
    return {"fwd": (rows, n), "dgrad": (rows, k)}.get(kind, (e, k, n))


def check(kind: str, a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor,
          main_grad: torch.Tensor | None = None) -> str | None:
    """None when the kernels take these operands, else why not (the caller falls back to another path).

    TMA needs 16-byte aligned base addresses and row pitches: bf16 rows of K and N elements, K and N multiples
    of 8; the tensors contiguous (row-major, as the C ABI assumes)."""
    if kind not in KINDS:
        return f"unknown kind {kind!r}"
    if kind == "fwd" or kind == "dgrad":
        if a.dim() != 2 or b.dim() != 3:
            return f"{kind}: expected a 2-D input and a 3-D [E, K, N] weight"
        want_cols = b.shape[1] if kind == "fwd" else b.shape[2]
        if a.shape[1] != want_cols:
            return f"{kind}: input has {a.shape[1]} columns, weight wants {want_cols}"
    else:
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
            return f"{kind}: expected x [rows, K] and dy [rows, N] with equal rows"
    tensors = [a, b, counts] + ([main_grad] if main_grad is not None else [])
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        return f"bf16 operands only (got {a.dtype}, {b.dtype})"
    if counts.dtype not in (torch.int64, torch.int32) or counts.dim() != 1 or not counts.is_contiguous():
        return "counts must be a contiguous 1-D int64/int32 tensor"
    if not a.is_contiguous() or not b.is_contiguous():
        return "operands must be contiguous (row-major)"
    rows, k, n, e = _dims(kind, a, b, counts)
    if counts.shape[0] != e or e < 1:
        return f"{counts.shape[0]} group sizes for {e} experts"
    if k % 8 or n % 8:
        return f"K={k} and N={n} must be multiples of 8 (16-byte TMA rows)"
    if rows > _MAX_ROWS:
        return f"{rows} rows exceed int32"
    if kind == "wgrad_accum":
        if main_grad is None or main_grad.dtype != torch.float32 or tuple(main_grad.shape) != (e, k, n):
            return f"wgrad_accum: main_grad must be fp32 [{e}, {k}, {n}]"
        if not main_grad.is_contiguous():
            return "wgrad_accum: main_grad must be contiguous"
    if any(not t.is_cuda for t in tensors) or len({t.device for t in tensors}) != 1:
        return "operands must be CUDA tensors on one device"
    if any(t.numel() and t.data_ptr() % 16 for t in tensors):
        return "operands must be 16-byte aligned"
    return None


def supports(kind: str, a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor,
             main_grad: torch.Tensor | None = None) -> bool:
    """The kernels can run here and take these operands."""
    return usable() and check(kind, a, b, counts, main_grad) is None


# ------------------------------------------------------------------------------------------------- the launch
def _launch(kind: str, config: int, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, counts: torch.Tensor,
            checked: bool = False) -> None:
    """``checked``: the caller ran :func:`check` on these operands already (the eager hot path: a check costs
    as much host time as the launch itself, and a layer makes six of these calls per micro-batch)."""
    if not checked:
        why = unusable_reason() or check(kind, a, b, counts, d if kind == "wgrad_accum" else None)
        if why is not None:
            raise RuntimeError(f"engmoe sm90 {kind}: {why}")
    rows, k, n, _ = _dims(kind, a, b, counts)
    c = _call(kind, config, a, counts, d.shape[-1])  # d's last dim: the tile's N runs over it
    _raise_on_error(kind, c.lib, c.lib.engmoe_sm90_run(
        KINDS[kind], c.config, a.data_ptr(), b.data_ptr(), d.data_ptr(), counts.data_ptr(),
        int(counts.dtype == torch.int64), c.groups, rows, k, n, c.ws.data_ptr(), c.ws_bytes, c.sms, c.device,
        c.stream))


class _Call(NamedTuple):
    lib: ctypes.CDLL
    config: int
    groups: int
    device: int
    sms: int
    ws: torch.Tensor
    ws_bytes: int
    stream: int


def _call(kind: str, config: int, a: torch.Tensor, counts: torch.Tensor, cols: int) -> _Call:
    """What every launch passes besides its operands: the configuration (``config < 0``: the default for output
    width ``cols`` and the call's rows per group, host values, no sync), device, SM count, a workspace from torch's
    caching allocator (freed stream-ordered after the call, captured with a CUDA graph) and the current stream."""
    groups = counts.shape[0]
    if config < 0:
        config = default_config(kind, cols, a.shape[0] / groups)
    device = a.device.index if a.device.index is not None else torch.cuda.current_device()
    sms = _sm_count(device)
    ws_bytes = workspace_bytes(kind, config, groups, sms)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=a.device)
    return _Call(library(), config, groups, device, sms, ws, ws_bytes, torch.cuda.current_stream(a.device).cuda_stream)


def _raise_on_error(kind: str, lib: ctypes.CDLL, rc: int) -> None:
    if rc != 0:
        raise RuntimeError(f"engmoe sm90 {kind} failed ({rc}): {lib.engmoe_sm90_last_error().decode()}")


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, kind: str, config: int,
                checked: bool) -> torch.Tensor:
    out = torch.empty(out_shape(kind, a, b, counts), dtype=torch.bfloat16, device=a.device)
    if a.shape[0] == 0:  # nothing to multiply (and nothing the kernel could take a pointer of)
        return out.zero_() if kind == "wgrad" else out
    _launch(kind, config, a, b, out, counts, checked)
    return out


def grouped_mm_checked(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, kind: str) -> torch.Tensor:
    """The ``sm90_grouped_mm`` op's body for operands that passed :func:`check`, called directly in eager mode
    (no dispatcher round trip, no second check); ``torch.compile`` and ``opcheck`` go through the op."""
    return _grouped_mm(a, b, counts, kind, -1, checked=True)


def wgrad_accum_checked(main_grad: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, counts: torch.Tensor,
                        config: int = -1, checked: bool = True) -> None:
    """The ``sm90_grouped_wgrad_accum_`` op's body; called directly (checked operands) in eager mode."""
    if x.shape[0]:
        _launch("wgrad_accum", config, x, dy, main_grad, counts, checked)


@torch.library.custom_op("engmoe::sm90_grouped_mm", mutates_args=())
def sm90_grouped_mm(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, kind: str,
                    config: int = -1) -> torch.Tensor:
    """Grouped ``fwd``/``dgrad``/``wgrad`` GEMM of the experts (module docstring), bf16 out."""
    if kind not in ("fwd", "dgrad", "wgrad"):
        raise ValueError(f"sm90_grouped_mm: kind {kind!r} (fwd, dgrad, wgrad; wgrad_accum has its own op)")
    return _grouped_mm(a, b, counts, kind, config, checked=False)


@sm90_grouped_mm.register_fake
def _(a, b, counts, kind, config=-1):
    return a.new_empty(out_shape(kind, a, b, counts), dtype=torch.bfloat16)


@torch.library.custom_op("engmoe::sm90_grouped_wgrad_accum_", mutates_args=("main_grad",))
def sm90_grouped_wgrad_accum_(main_grad: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, counts: torch.Tensor,
                              config: int = -1) -> None:
    """``main_grad[e] += x_eᵀ @ dy_e`` (fp32 main_grad [E, K, N], bf16 x/dy): one launch, no host counts."""
    wgrad_accum_checked(main_grad, x, dy, counts, config, checked=False)


@sm90_grouped_wgrad_accum_.register_fake
def _(main_grad, x, dy, counts, config=-1):
    return None


# ------------------------------------------------------------------------------------------------- SwiGLU epilogue
def interleave_gate_up(w13: torch.Tensor) -> torch.Tensor:
    """``[E, K, 2F]`` (gate | up) -> the same columns in 8-column blocks, gate block b then up block b: the B
    operand of the ``fwd_swiglu`` kind, whose epilogue finds both members of a SwiGLU pair in one thread."""
    e, k, n = w13.shape
    if n % (2 * SWIGLU_BLOCK):
        raise ValueError(f"interleave_gate_up: width {n} is not a multiple of {2 * SWIGLU_BLOCK}")
    f = n // 2
    return w13.reshape(e, k, 2, f // SWIGLU_BLOCK, SWIGLU_BLOCK).transpose(2, 3).reshape(e, k, n)


def check_swiglu(x: torch.Tensor, w_il: torch.Tensor, counts: torch.Tensor,
                 scale: torch.Tensor | None) -> str | None:
    """None when the ``fwd_swiglu`` kernel takes these operands (the fwd kind's rules, a width that is a multiple
    of 16, a contiguous fp32 ``scale`` of one value per row), else why not."""
    if w_il.dim() != 3 or w_il.shape[2] % (2 * SWIGLU_BLOCK):
        return f"fwd_swiglu: weight {tuple(w_il.shape)}: width not a multiple of {2 * SWIGLU_BLOCK}"
    if scale is not None:
        if scale.dtype != torch.float32 or scale.dim() != 1 or scale.shape[0] != x.shape[0]:
            return f"fwd_swiglu: scale must be fp32 [{x.shape[0]}] (got {scale.dtype} {tuple(scale.shape)})"
        if not scale.is_contiguous() or scale.device != x.device:
            return "fwd_swiglu: scale must be contiguous and on the operands' device"
    return check("fwd", x, w_il, counts)


def launch_swiglu(config: int, x: torch.Tensor, w_il: torch.Tensor, counts: torch.Tensor, scale: torch.Tensor | None,
                  h: torch.Tensor, act: torch.Tensor) -> None:
    """One ``fwd_swiglu`` call into preallocated ``h`` ``[rows, 2F]`` and ``act`` ``[rows, F]`` (bf16, contiguous;
    the tests hand it NaN-poisoned outputs). Operands as :func:`check_swiglu` takes them."""
    rows, n = x.shape[0], w_il.shape[2]
    if h.shape != (rows, n) or act.shape != (rows, n // 2) or h.dtype != torch.bfloat16 or act.dtype != torch.bfloat16:
        raise ValueError(f"fwd_swiglu: h must be bf16 [{rows}, {n}] and act bf16 [{rows}, {n // 2}]")
    if not (h.is_contiguous() and act.is_contiguous()) or h.data_ptr() % 16 or act.data_ptr() % 16:
        raise ValueError("fwd_swiglu: h and act must be contiguous and 16-byte aligned")
    _run_swiglu(config, x, w_il, counts, scale, h, act)


def _run_swiglu(config, x, w_il, counts, scale, h, act) -> None:
    """:func:`launch_swiglu` for outputs allocated here (the op's own path: no output checks)."""
    rows, k, n = x.shape[0], w_il.shape[1], w_il.shape[2]
    if rows == 0:
        return
    c = _call("fwd_swiglu", config, x, counts, n)
    _raise_on_error("fwd_swiglu", c.lib, c.lib.engmoe_sm90_run_swiglu(
        c.config, x.data_ptr(), w_il.data_ptr(), h.data_ptr(), act.data_ptr(),
        scale.data_ptr() if scale is not None else None, counts.data_ptr(), int(counts.dtype == torch.int64),
        c.groups, rows, k, n, c.ws.data_ptr(), c.ws_bytes, c.sms, c.device, c.stream))


def fwd_swiglu_checked(x: torch.Tensor, w_il: torch.Tensor, counts: torch.Tensor, scale: torch.Tensor | None,
                       config: int = -1, checked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``sm90_grouped_fwd_swiglu`` op's body: (h, act); called directly (checked operands) in eager mode."""
    if not checked:
        why = unusable_reason() or check_swiglu(x, w_il, counts, scale)
        if why is not None:
            raise RuntimeError(f"engmoe sm90 fwd_swiglu: {why}")
    rows, n = x.shape[0], w_il.shape[2]
    h = torch.empty(rows, n, dtype=torch.bfloat16, device=x.device)
    act = torch.empty(rows, n // 2, dtype=torch.bfloat16, device=x.device)
    _run_swiglu(config, x, w_il, counts, scale, h, act)
    return h, act


@torch.library.custom_op("engmoe::sm90_grouped_fwd_swiglu", mutates_args=())
def sm90_grouped_fwd_swiglu(x: torch.Tensor, w_il: torch.Tensor, counts: torch.Tensor,
                            scale: torch.Tensor | None = None, config: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, act) of the up-projection with SwiGLU and ``scale`` in the epilogue (module docstring)."""
    return fwd_swiglu_checked(x, w_il, counts, scale, config, checked=False)


@sm90_grouped_fwd_swiglu.register_fake
def _(x, w_il, counts, scale=None, config=-1):
    n = w_il.shape[2]
    return (x.new_empty((x.shape[0], n), dtype=torch.bfloat16), x.new_empty((x.shape[0], n // 2), dtype=torch.bfloat16))
