"""engmoe: a sparse Mixture-of-Experts LM (EngGPT2-16B-A3B family) on megatron-core.

The optional CUDA extension ``engmoe._C`` (sources in ``csrc/``) is built only where a CUDA build of
torch and ``nvcc`` are both present; everywhere else the install succeeds and says the extension was
skipped, and the pure-PyTorch kernels are used. Install with ``--no-build-isolation`` so this script
sees the torch you installed (otherwise pip's isolated build environment has no torch and the
extension is always skipped).

``libengmoe_sm90.so`` (engmoe's Hopper grouped GEMM, csrc/sm90/, torch-free) is built with the extension where
nvcc and the CUTLASS headers (``ENGMOE_CUTLASS_DIR`` or the ``nvidia-cutlass`` wheel) are both found, into
engmoe/kernels/ (so it ships in the wheel); skipped with one message otherwise, or with ENGMOE_SKIP_SM90_BUILD=1.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


def _cuda_extension():
    """Return ([ext_modules], cmdclass) for engmoe._C, or ([], {}) with a message when it can't build."""
    if os.environ.get("ENGMOE_SKIP_CUDA_BUILD") == "1":
        print("engmoe: ENGMOE_SKIP_CUDA_BUILD=1, CUDA extension engmoe._C skipped", file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("engmoe: torch not importable at build time, CUDA extension engmoe._C skipped "
              "(use pip install --no-build-isolation to build it)", file=sys.stderr)
        return [], {}
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda is None or not nvcc or not os.path.exists(nvcc) or not sources:
        print("engmoe: no CUDA torch / nvcc / sources, CUDA extension engmoe._C skipped; "
              "the PyTorch reference kernels will be used", file=sys.stderr)
        return [], {}
    # sm_80 (A100) and sm_90a (H100/H200); override e.g. ENGMOE_CUDA_ARCHS="90a" for a faster one-arch build.
    archs = [a for a in os.environ.get("ENGMOE_CUDA_ARCHS", "80;90a").split(";") if a]
    gencode = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs]
    ext = CUDAExtension(
        name="engmoe._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        # no --use_fast_math: the router softmax and SwiGLU use accurate expf (they are memory-bound anyway)
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", *gencode]},
    )
    print(f"engmoe: building CUDA extension engmoe._C for {archs} from {sources}", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension}


def _load_build_sm90():
    """engmoe/kernels/build_sm90.py by path: importing the package would import torch."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("engmoe_build_sm90", os.path.join("engmoe", "kernels",
                                                                                    "build_sm90.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build_sm90(out_dir: str) -> None:
    if os.environ.get("ENGMOE_SKIP_SM90_BUILD") == "1":
        print("engmoe: ENGMOE_SKIP_SM90_BUILD=1, libengmoe_sm90.so skipped", file=sys.stderr)
        return
    b = _load_build_sm90()
    try:
        b.find_nvcc()
        b.find_cutlass()
    except b.BuildError as e:
        print(f"engmoe: libengmoe_sm90.so skipped (the sm90 expert GEMMs stay off): {e}", file=sys.stderr)
        return
    # a compile error here is a real failure: report it (objects stay in build/sm90/obj, out of the package)
    b.build(out_dir, obj_dir=os.path.join("build", "sm90", "obj"))


def _with_sm90(cmdclass: dict) -> dict:
    """build_ext that also builds libengmoe_sm90.so next to engmoe/kernels/sm90_gemm.py."""
    from setuptools.command.build_ext import build_ext as _plain

    base = cmdclass.get("build_ext", _plain)

    class BuildExtWithSm90(base):
        def run(self):
            super().run()
            here = os.path.dirname(os.path.abspath(__file__))
            if self.inplace:
                shadow = _load_build_sm90().shadowing_library(here)
                if shadow is not None:  # an in-place copy would never be loaded: do not spend minutes on it
                    print(f"engmoe: libengmoe_sm90.so not built in place: {shadow} is the one loaded "
                          "(rebuild it with python -m engmoe.kernels.build_sm90)", file=sys.stderr)
                    return
            _build_sm90(os.path.join(here if self.inplace else self.build_lib, "engmoe", "kernels"))

    return {**cmdclass, "build_ext": BuildExtWithSm90}


ext_modules, cmdclass = _cuda_extension()
cmdclass = _with_sm90(cmdclass)

setup(
    name="engmoe",
    version="0.1.0",
    description="Sparse Mixture-of-Experts LM (EngGPT2-16B-A3B family): model, kernels, data prep, staged pretraining",
    python_requires=">=3.11",
    packages=find_packages(include=["engmoe", "engmoe.*"]),
    # presets, stages, demo overlays, blends and sbatch templates (read with importlib.resources)
    package_data={"engmoe.resources": ["*/*.yaml", "slurm/*.sbatch"], "engmoe": ["data_prep/resources/*"]},
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "numpy",
        "pyyaml>=6",
        "tqdm",
        "tensorboard",
        "psutil",  # megatron-core's checkpoint writer processes need it but do not declare it
    ],
    extras_require={
        # data preparation: datatrove pipelines, the Tekken tokenizer, demo corpus sources
        "data": [
            "datatrove==0.10.1",
            "orjson",
            "regex",
            "tokenizers>=0.20",
            "pyarrow",
            "zstandard",
            # the Tekken v3 vocabulary (build-tokenizer); pins numpy < 2.4, so it stays out of the runtime deps
            "mistral-common",
            # offline sources of the built-in demo corpus (English Wikipedia extract, Italian dialogues)
            "gensim",
            "mwparserfromhell",
            "chatterbot-corpus",
        ],
        # test-only dependencies (transformers is the independent oracle for RoPE/YaRN and HF export); ruff is
        # the linter .ci/run runs; setuptools>=70.1 builds wheels without the `wheel` package (install test)
        "dev": ["pytest>=8", "pytest-timeout", "transformers>=4.46", "lm-eval==0.4.13", "matplotlib", "ruff>=0.8",
                "setuptools>=70.1"],
        # evaluation harness adapter and the loss/MFU plots of `engmoe report`
        "eval": ["lm-eval==0.4.13", "matplotlib"],
        # optional fast GPU backends, used when importable
        "gpu": ["flash-attn", "transformer-engine[pytorch]", "grouped_gemm"],
    },
    entry_points={"console_scripts": ["engmoe=engmoe.cli:run", "engmoe-data=engmoe.data_prep.cli:run"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
