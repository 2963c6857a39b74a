"""Build ``libengmoe_sm90.so``, engmoe's Hopper grouped GEMM (csrc/sm90/), with nvcc and CUTLASS's headers.

The library is torch-free (C ABI, linked only against the static CUDA runtime), so it builds wherever ``nvcc``
(CUDA >= 12.3, for sm_90a's modifiable TMA descriptors) and the CUTLASS 3.x/4.x headers are, GPU or not;
``engmoe.kernels.sm90_gemm`` loads it with ctypes. CUTLASS is a build dependency only, never copied into the repo:

* ``ENGMOE_CUTLASS_DIR`` (or ``--cutlass``): a directory with ``include/cutlass/cutlass.h`` (a CUTLASS checkout,
  or the ``source`` folder of the ``cutlass_library`` package), else
* the installed ``nvidia-cutlass`` wheel (``pip install nvidia-cutlass``: its ``cutlass_library/source``).

Usage::

    python -m engmoe.kernels.build_sm90 [--out DIR] [--jobs N] [--cutlass DIR] [--force]

Each ``.cu`` (one per GEMM configuration, kernels/) is a separate nvcc process, ``--jobs`` at a time (a CUTLASS
instantiation takes about a minute and a few GB of memory); objects are kept under ``DIR/obj`` and rebuilt only
when a source or header is newer. Default ``DIR``: ``build/sm90`` of the source checkout. This module imports
nothing but the standard library (setup.py loads it by path, before torch may be importable).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
from pathlib import Path

LIB_NAME = "libengmoe_sm90.so"
LIB_ENV = "ENGMOE_SM90_LIB"  # a library path that replaces the lookup (engmoe.kernels.sm90_gemm.library_paths)
BUILD_DIR = Path("build", "sm90")  # relative to the repository: the default output, first in the lookup
REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "csrc" / "sm90"
DEFAULT_OUT = REPO / BUILD_DIR


class BuildError(RuntimeError):
    """The library cannot be built here (missing compiler or headers, or a compile error); the message says why."""


def shadowing_library(repo: str | os.PathLike = REPO) -> Path | None:
    """The library that import would load instead of an in-place copy next to ``sm90_gemm.py``, or None.

    ``sm90_gemm.library_paths``: ``$ENGMOE_SM90_LIB`` alone when set, else ``build/sm90/`` before the package copy.
    setup.py's in-place ``build_ext`` skips its CUTLASS build when this is not None: the copy would never be
    loaded, and the build is minutes of nvcc (on the device machine, every call that carried the library)."""
    env = os.environ.get(LIB_ENV)
    if env:
        return Path(env)
    built = Path(repo) / BUILD_DIR / LIB_NAME
    return built if built.is_file() else None


def find_cutlass(explicit: str | os.PathLike | None = None) -> Path:
    """The CUTLASS root (holding ``include/cutlass/cutlass.h``): ``explicit``, ``$ENGMOE_CUTLASS_DIR``, the wheel."""
    tried = []
    for cand in (explicit, os.environ.get("ENGMOE_CUTLASS_DIR")):
        if cand:
            root = Path(cand)
            for r in (root, root / "source", root / "cutlass_library" / "source"):
                if (r / "include" / "cutlass" / "cutlass.h").is_file():
                    return r
            tried.append(str(root))
    try:
        import cutlass_library  # noqa: WPS433 - the nvidia-cutlass wheel's header package

        root = Path(cutlass_library.__file__).resolve().parent / "source"
        if (root / "include" / "cutlass" / "cutlass.h").is_file():
            return root
        tried.append(f"{root} (cutlass_library without headers)")
    except ImportError:
        tried.append("the cutlass_library package (not installed)")
    raise BuildError("CUTLASS headers not found (looked in: " + ", ".join(tried) + "). Set ENGMOE_CUTLASS_DIR to a "
                     "directory with include/cutlass/cutlass.h, or `pip install nvidia-cutlass` (headers only, "
                     "a build dependency of libengmoe_sm90.so).")


def find_nvcc() -> Path:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return Path(home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        return Path("/usr/local/cuda/bin/nvcc")
    raise BuildError("nvcc not found (set CUDA_HOME or put nvcc on PATH; CUDA >= 12.3 for sm_90a)")


def sources() -> list[Path]:
    """api.cu first (seconds), then one TU per configuration (about a minute each)."""
    return [SRC / "api.cu", *sorted((SRC / "kernels").glob("*.cu"))]


def headers() -> list[Path]:
    return sorted(SRC.glob("*.h")) + sorted(SRC.glob("*.cuh"))


def compile_flags(cutlass: Path) -> list[str]:
    return [
        "-std=c++17",
        # the -gencode form: `-arch=sm_90a` also ran a plain sm_90 pass that rejects wgmma with nvcc 13.0
        "-gencode=arch=compute_90a,code=sm_90a",
        "--expt-relaxed-constexpr",
        "-O3",
        "-lineinfo",
        "-DNDEBUG",
        "-DENGMOE_SM90_HAVE_SM90A",
        "-Xcompiler", "-fPIC",
        f"-I{cutlass / 'include'}",
        f"-I{cutlass / 'tools' / 'util' / 'include'}",
        f"-I{SRC}",
    ]


def _stale(obj: Path, src: Path, deps: list[Path]) -> bool:
    if not obj.is_file():
        return True
    t = obj.stat().st_mtime
    return any(p.stat().st_mtime > t for p in (src, *deps))


def build(out_dir: str | os.PathLike | None = None, jobs: int | None = None,
          cutlass_dir: str | os.PathLike | None = None, force: bool = False, verbose: bool = True,
          obj_dir: str | os.PathLike | None = None) -> Path:
    """Compile and link the library into ``out_dir``; returns its path. Objects go to ``obj_dir`` (default
    ``out_dir/obj``). Raises :class:`BuildError` with the reason."""
    out = Path(out_dir) if out_dir else DEFAULT_OUT
    cutlass = find_cutlass(cutlass_dir)
    nvcc = find_nvcc()
    if not SRC.is_dir():
        raise BuildError(f"{SRC} not found (the build needs a source checkout)")
    obj_dir = Path(obj_dir) if obj_dir else out / "obj"
    obj_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    flags = compile_flags(cutlass)
    deps = headers()
    todo = []
    objs = []
    for src in sources():
        obj = obj_dir / (src.stem + ".o")
        objs.append(obj)
        if force or _stale(obj, src, deps):
            todo.append((src, obj))
    jobs = jobs or max(1, min(len(todo), (os.cpu_count() or 2) // 2))

    def one(item):
        src, obj = item
        cmd = [str(nvcc), *flags, "-c", str(src), "-o", str(obj)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        return src, r

    if verbose:
        print(f"engmoe sm90: nvcc {nvcc}, CUTLASS {cutlass}, {len(todo)} of {len(objs)} sources to compile "
              f"({jobs} at a time)", file=sys.stderr, flush=True)
    failures = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for src, r in pool.map(one, todo):
            if r.returncode != 0:
                failures.append(f"{src.name}:\n{r.stderr[-4000:]}")
            elif verbose:
                warn = r.stderr.strip()
                print(f"engmoe sm90: compiled {src.name}" + (f" with output:\n{warn[-2000:]}" if warn else ""),
                      file=sys.stderr, flush=True)
    if failures:
        raise BuildError("nvcc failed on " + "\n".join(failures))
    lib = out / LIB_NAME
    link = [str(nvcc), "-shared", "-cudart", "static", "-o", str(lib), *map(str, objs)]
    r = subprocess.run(link, capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"link failed: {' '.join(link)}\n{r.stderr[-4000:]}")
    if verbose:
        print(f"engmoe sm90: built {lib}", file=sys.stderr, flush=True)
    return lib


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help=f"output directory (default {DEFAULT_OUT})")
    ap.add_argument("--jobs", "-j", type=int, default=None, help="parallel nvcc processes")
    ap.add_argument("--cutlass", default=None, help="CUTLASS root (default $ENGMOE_CUTLASS_DIR or the wheel)")
    ap.add_argument("--force", action="store_true", help="recompile every source")
    args = ap.parse_args(argv)
    try:
        lib = build(args.out, args.jobs, args.cutlass, args.force)
    except BuildError as e:
        print(f"engmoe sm90 build: {e}", file=sys.stderr)
        return 1
    print(lib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
