"""CPU tests of the sm90 grouped-GEMM front (engmoe.kernels.sm90_gemm, build_sm90, the plan/backend switch):
what it says when the library, the GPU or the CUTLASS headers are missing, the fake (meta) implementations of
its ops, plan parsing, and the ctypes binding of a built library (loaded without a GPU, when one is built)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engmoe.config import MoEConfig
from engmoe.kernels import GemmPlan, build_sm90, get_moe_kernels, grouped, reference, sm90_gemm


@pytest.fixture
def no_lib(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere" / "libengmoe_sm90.so"
    monkeypatch.setenv(sm90_gemm.LIB_ENV, str(missing))
    return missing


def test_missing_library_is_a_reason_not_an_error(no_lib):
    assert sm90_gemm.library() is None
    assert not sm90_gemm.usable()
    why = sm90_gemm.unusable_reason()
    assert str(no_lib) in why and "python -m engmoe.kernels.build_sm90" in why
    assert sm90_gemm.configs("fwd") == []
    assert not grouped.lib_usable("sm90")
    with pytest.raises(RuntimeError, match="libengmoe_sm90.so not found"):
        get_moe_kernels("sm90")


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to make a stand-in library")
def test_stale_library_is_refused(monkeypatch, tmp_path):
    src = tmp_path / "stale.c"
    src.write_text("int engmoe_sm90_abi_version(void) { return 0; }\n"
                   "int engmoe_sm90_compiled_for_sm90a(void) { return 1; }\n")
    lib = tmp_path / "libstale.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    monkeypatch.setenv(sm90_gemm.LIB_ENV, str(lib))
    why = sm90_gemm.unusable_reason()
    assert why is not None and "does not load" in why  # the stand-in lacks the other entry points
    full = tmp_path / "full.c"
    full.write_text("".join(f"int {n}(void) {{ return {v}; }}\n" for n, v in (
        ("engmoe_sm90_abi_version", 0), ("engmoe_sm90_compiled_for_sm90a", 1), ("engmoe_sm90_num_configs", 0),
        ("engmoe_sm90_default_config", 0), ("engmoe_sm90_config_name", 0), ("engmoe_sm90_workspace_bytes", 0),
        ("engmoe_sm90_sm_count", 0), ("engmoe_sm90_run", 0), ("engmoe_sm90_run_swiglu", 0),
        ("engmoe_sm90_last_error", 0))))
    lib2 = tmp_path / "libfull.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib2), str(full)], check=True)
    monkeypatch.setenv(sm90_gemm.LIB_ENV, str(lib2))
    assert "stale build" in sm90_gemm.unusable_reason()


def test_build_names_the_missing_cutlass_headers(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ENGMOE_CUTLASS_DIR", str(tmp_path / "no-cutlass"))
    monkeypatch.setitem(sys.modules, "cutlass_library", None)  # `import cutlass_library` raises ImportError
    with pytest.raises(build_sm90.BuildError, match="CUTLASS headers not found"):
        build_sm90.find_cutlass()
    assert build_sm90.main(["--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "ENGMOE_CUTLASS_DIR" in err and "pip install nvidia-cutlass" in err and "no-cutlass" in err
    assert not (tmp_path / "out" / build_sm90.LIB_NAME).exists()


def test_build_finds_cutlass_layouts(monkeypatch, tmp_path):
    for root in (tmp_path / "a", tmp_path / "b" / "source", tmp_path / "c" / "cutlass_library" / "source"):
        (root / "include" / "cutlass").mkdir(parents=True)
        (root / "include" / "cutlass" / "cutlass.h").write_text("")
    assert build_sm90.find_cutlass(tmp_path / "a") == tmp_path / "a"
    assert build_sm90.find_cutlass(tmp_path / "b") == tmp_path / "b" / "source"
    monkeypatch.setenv("ENGMOE_CUTLASS_DIR", str(tmp_path / "c"))
    assert build_sm90.find_cutlass() == tmp_path / "c" / "cutlass_library" / "source"
    flags = build_sm90.compile_flags(tmp_path / "a")
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags and f"-I{tmp_path / 'a' / 'include'}" in flags
    names = [p.name for p in build_sm90.sources()]
    assert names[0] == "api.cu" and len(names) >= 5


def test_plan_parsing_and_backend_names(monkeypatch):
    assert "sm90" in grouped.LIBS
    p = GemmPlan.parse("sm90")
    assert (p.fwd, p.dgrad, p.wgrad) == ("sm90", "sm90", "sm90")
    p = GemmPlan.parse("torch, sm90 ,grouped_gemm")
    assert (p.fwd, p.dgrad, p.wgrad) == ("torch", "sm90", "grouped_gemm")
    with pytest.raises(ValueError, match="sm90"):
        GemmPlan.parse("sm91")
    auto = GemmPlan.parse("auto")  # fwd and dgrad on sm90; where it does not run, resolved() gives torch
    assert (auto.fwd, auto.dgrad, auto.wgrad) == ("sm90", "sm90", "torch")
    monkeypatch.setattr(grouped, "lib_usable", lambda name: name != "sm90")
    r = auto.resolved()
    assert (r.fwd, r.dgrad, r.wgrad, r.large.wgrad) == ("torch", "torch", "torch", "grouped_gemm")
    monkeypatch.setattr(grouped, "lib_usable", lambda name: True)
    assert str(auto.resolved()) == str(auto)
    assert "sm90" in grouped.EXPERT_WGRAD_ACCUM and "sm90" in grouped.ACCUMULATING_BACKENDS
    MoEConfig(kernel_backend="sm90").validate("model.moe")
    grouped.make_grouped_mlp(GemmPlan.parse("sm90"), reference.swiglu, "sm90")


def test_cpu_tensors_on_an_sm90_plan_take_the_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 16, generator=g)
    w = torch.randn(3, 16, 24, generator=g)
    counts = torch.tensor([5, 0, 15])
    out = grouped.grouped_linear(x, w, counts, GemmPlan.parse("sm90"))
    assert torch.equal(out, reference.grouped_mm(x, w, counts))
    assert sm90_gemm.check("fwd", x.bfloat16(), w.bfloat16(), counts) == "operands must be CUDA tensors on one device"


def test_shape_checks_on_meta_tensors():
    def m(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, device="meta", dtype=dtype)

    c = m(4, dtype=torch.int64)
    assert "multiples of 8" in sm90_gemm.check("fwd", m(10, 20), m(4, 20, 32), c)
    assert "columns" in sm90_gemm.check("fwd", m(10, 24), m(4, 16, 32), c)
    assert "group sizes" in sm90_gemm.check("fwd", m(10, 16), m(3, 16, 32), c)
    assert "bf16" in sm90_gemm.check("dgrad", m(10, 32, dtype=torch.float32), m(4, 16, 32), c)
    assert "main_grad" in sm90_gemm.check("wgrad_accum", m(10, 16), m(10, 32), c, m(4, 16, 32))


def test_fake_implementations_give_the_output_shapes():
    def m(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, device="meta", dtype=dtype)

    c = m(4, dtype=torch.int64)
    x, w, dy = m(10, 16), m(4, 16, 32), m(10, 32)
    assert torch.ops.engmoe.sm90_grouped_mm(x, w, c, "fwd").shape == (10, 32)
    assert torch.ops.engmoe.sm90_grouped_mm(dy, w, c, "dgrad").shape == (10, 16)
    wg = torch.ops.engmoe.sm90_grouped_mm(x, dy, c, "wgrad")
    assert wg.shape == (4, 16, 32) and wg.dtype == torch.bfloat16
    assert torch.ops.engmoe.sm90_grouped_wgrad_accum_(m(4, 16, 32, dtype=torch.float32), x, dy, c) is None


def test_built_library_binds_without_a_gpu(monkeypatch):
    """When a library is built here (build/sm90 or $ENGMOE_SM90_LIB), its C ABI answers without a GPU: the
    configurations per kind, positive workspace sizes, refusals with a message instead of a crash."""
    lib = sm90_gemm.library()
    if lib is None:
        pytest.skip(f"no built library: {sm90_gemm.load_error()}")
    for kind in sm90_gemm.KINDS:
        names = sm90_gemm.configs(kind)
        assert names and all("x" in n for n in names)
        assert sm90_gemm.config_index(kind, names[-1]) == len(names) - 1
        for i in range(len(names)):
            assert sm90_gemm.workspace_bytes(kind, i, 64, 132) > 64 * 8
    assert lib.engmoe_sm90_workspace_bytes(0, 99, 64, 132) < 0
    rc = lib.engmoe_sm90_run(0, 0, 16, 16, 16, 16, 1, 4, 10, 20, 32, 16, 1 << 20, 132, 0, None)
    assert rc == 1 and b"multiples of 8" in lib.engmoe_sm90_last_error()
    rc = lib.engmoe_sm90_run_swiglu(0, 16, 16, 16, 16, None, 16, 1, 4, 10, 32, 40, 16, 1 << 20, 132, 0, None)
    assert rc == 1 and b"multiple of 16" in lib.engmoe_sm90_last_error()
    rc = lib.engmoe_sm90_run(sm90_gemm.KINDS["fwd_swiglu"], 0, 16, 16, 16, 16, 1, 4, 10, 32, 32, 16, 1 << 20, 132, 0,
                             None)
    assert rc == 1 and b"engmoe_sm90_run_swiglu" in lib.engmoe_sm90_last_error()
    monkeypatch.setenv(sm90_gemm.CONFIGS_ENV, f"fwd={sm90_gemm.configs('fwd')[-1]}")
    assert sm90_gemm.default_config("fwd") == len(sm90_gemm.configs("fwd")) - 1
    monkeypatch.setenv(sm90_gemm.CONFIGS_ENV, "fwd=nope")
    with pytest.raises(ValueError, match="compiled ones"):
        sm90_gemm.default_config("fwd")


def test_sm90_backend_needs_the_cuda_extension_too(monkeypatch):
    """The sm90 backend is the cuda backend's dispatch ops (engmoe._C) with sm90 GEMMs: a usable library alone
    must not make it usable, and the refusal names both parts."""
    from engmoe.kernels import backend, cuda_ops

    monkeypatch.setattr(sm90_gemm, "usable", lambda: True)
    monkeypatch.setattr(cuda_ops, "available", lambda: False)
    assert "sm90" not in backend.available_backends()
    with pytest.raises(RuntimeError, match="engmoe._C"):
        backend.get_moe_kernels("sm90")
    monkeypatch.setattr(cuda_ops, "available", lambda: True)
    assert "sm90" in backend.available_backends()


def test_tile_fit_picks_the_tile_whose_n_divides_the_output_width():
    """The default config per output width: the fewest padded columns of the last tile column, ties to the
    earlier candidate, only compiled names (an older library without the fitted tiles keeps its default)."""
    assert sm90_gemm.tile_n("cooperative_128x240x64_c2x1") == 240
    assert sm90_gemm.tile_n("pingpong_128x128x64") == 128
    with pytest.raises(ValueError, match="no MxNxK"):
        sm90_gemm.tile_n("cooperative")
    assert [sm90_gemm.padded_columns(c, 256) for c in (2160, 2880, 1080, 2048)] == [144, 192, 200, 0]
    assert [sm90_gemm.padded_columns(c, 240) for c in (2160, 2880, 1080)] == [0, 0, 120]
    cands = ("cooperative_128x256x64", "cooperative_128x240x64", "cooperative_128x224x64")
    compiled = ["cooperative_128x256x64", "pingpong_128x128x64", *cands[1:]]
    assert sm90_gemm.fit_config(compiled, cands, 2880) == "cooperative_128x240x64"
    assert sm90_gemm.fit_config(compiled, cands, 1080) == "cooperative_128x224x64"
    assert sm90_gemm.fit_config(compiled, cands, 2048) == "cooperative_128x256x64"  # a tie: the earlier name
    assert sm90_gemm.fit_config(["cooperative_128x256x64"], cands, 1080) == "cooperative_128x256x64"
    assert sm90_gemm.fit_config(["pingpong_128x128x64"], cands, 1080) is None
    small = sm90_gemm.SMALL_GROUP_CANDIDATES["wgrad_accum"]
    assert set(sm90_gemm.FIT_CANDIDATES["wgrad_accum"]) < set(small)  # small groups only add candidates
    assert sm90_gemm.fit_config(list(small), small, 2160) == "pingpong_128x128x64"
    assert sm90_gemm.fit_config(list(small), small, 2880) == "cooperative_128x192x64"
    # N-contiguous B (fwd, wgrad_accum): only tiles whose N keeps the 128-byte swizzle (a multiple of 64)
    assert all(sm90_gemm.tile_n(c) % 64 == 0 for k in ("fwd", "wgrad_accum") for c in sm90_gemm.FIT_CANDIDATES[k])
    assert sm90_gemm.FIT_CANDIDATES["fwd"][0] == sm90_gemm.MEASURED_DEFAULTS["fwd"]  # ties keep the measured one
    assert sm90_gemm.FIT_CANDIDATES["wgrad_accum"][0] == sm90_gemm.MEASURED_DEFAULTS["wgrad_accum"]
    # the width a call's default is chosen for is its output's last dim (dgrad writes [rows, K])
    m = lambda *shape: torch.empty(*shape, device="meta", dtype=torch.bfloat16)  # noqa: E731
    c = torch.empty(4, device="meta", dtype=torch.int64)
    assert sm90_gemm.out_shape("dgrad", m(10, 2880), m(4, 1080, 2880), c)[-1] == 1080
    assert sm90_gemm.out_shape("fwd", m(10, 2880), m(4, 2880, 2160), c)[-1] == 2160


def test_built_library_defaults_fit_the_expert_widths(monkeypatch):
    """With a library built here: the EngGPT2 widths get the tiles that divide them, and ENGMOE_SM90_CONFIGS
    still overrides the width-based default."""
    if sm90_gemm.library() is None:
        pytest.skip(f"no built library: {sm90_gemm.load_error()}")
    monkeypatch.delenv(sm90_gemm.CONFIGS_ENV, raising=False)
    name = {k: sm90_gemm.configs(k) for k in sm90_gemm.KINDS}
    assert name["fwd"][sm90_gemm.default_config("fwd", 2160)] == "cooperative_256x128x64"
    assert name["fwd"][sm90_gemm.default_config("fwd", 2880)] == "cooperative_128x192x64_c2x1"
    assert name["fwd"][sm90_gemm.default_config("fwd", 2048)] == "cooperative_128x256x64_c2x1"
    assert name["dgrad"][sm90_gemm.default_config("dgrad", 2880)] == "cooperative_128x224x64"
    assert name["dgrad"][sm90_gemm.default_config("dgrad", 1080)] == "cooperative_128x224x64"
    assert name["wgrad_accum"][sm90_gemm.default_config("wgrad_accum", 2880)] == "cooperative_128x192x64"
    assert name["wgrad_accum"][sm90_gemm.default_config("wgrad_accum", 2160)] == "cooperative_128x256x64"
    # small groups: ping-pong joins the accumulation's candidates (2160: 16 padded columns against 144)
    assert name["wgrad_accum"][sm90_gemm.default_config("wgrad_accum", 2160, 1024)] == "pingpong_128x128x64"
    assert name["wgrad_accum"][sm90_gemm.default_config("wgrad_accum", 2160, 2048)] == "cooperative_128x256x64"
    assert name["wgrad_accum"][sm90_gemm.default_config("wgrad_accum", 2880, 512)] == "cooperative_128x192x64"
    assert name["wgrad"][sm90_gemm.default_config("wgrad", 2160, 512)] == "cooperative_128x256x64"
    assert name["fwd_swiglu"][sm90_gemm.default_config("fwd_swiglu", 2160)] == "cooperative_256x128x64"
    assert name["wgrad"][sm90_gemm.default_config("wgrad", 2880)] == "cooperative_128x192x64"
    assert name["wgrad"][sm90_gemm.default_config("wgrad", 2160)] == "cooperative_128x256x64"
    assert name["wgrad"][sm90_gemm.default_config("wgrad")] == "cooperative_128x256x64"
    monkeypatch.setenv(sm90_gemm.CONFIGS_ENV, "fwd=pingpong_128x128x64")
    assert name["fwd"][sm90_gemm.default_config("fwd", 2160)] == "pingpong_128x128x64"


def test_in_place_build_skips_a_library_that_would_not_be_loaded(tmp_path, monkeypatch):
    """setup.py's in-place build_ext skips its CUTLASS build when build/sm90/ (or $ENGMOE_SM90_LIB) holds the
    library import loads first (sm90_gemm.library_paths): a copy next to sm90_gemm.py would never be used."""
    from engmoe.kernels import build_sm90

    monkeypatch.delenv(sm90_gemm.LIB_ENV, raising=False)
    assert build_sm90.shadowing_library(tmp_path) is None
    built = tmp_path / "build" / "sm90" / sm90_gemm.LIB_NAME
    built.parent.mkdir(parents=True)
    built.write_bytes(b"")
    assert build_sm90.shadowing_library(tmp_path) == built
    assert sm90_gemm._DEFAULT_PATHS[0].relative_to(sm90_gemm._REPO) == built.relative_to(tmp_path)  # same lookup
    monkeypatch.setenv(sm90_gemm.LIB_ENV, "/elsewhere/libengmoe_sm90.so")
    assert build_sm90.shadowing_library(tmp_path) == Path("/elsewhere/libengmoe_sm90.so")
    assert sm90_gemm.library_paths() == [Path("/elsewhere/libengmoe_sm90.so")]


# ------------------------------------------------------------------------------- SwiGLU epilogue (CPU side)
def test_interleave_gate_up_pairs_gate_and_up_blocks():
    """Interleaved column c: 8-column block c // 8; even blocks are gate columns, odd ones the same up columns
    (the pairing csrc/sm90/swiglu_epilogue.cuh relies on), and the inverse reshape undoes it."""
    E, K, F = 2, 3, 24
    w = torch.arange(E * K * 2 * F, dtype=torch.float32).reshape(E, K, 2 * F)
    il = sm90_gemm.interleave_gate_up(w)
    for c in range(2 * F):
        blk, within = divmod(c, 8)
        src = (blk // 2) * 8 + within + (F if blk % 2 else 0)
        assert torch.equal(il[:, :, c], w[:, :, src]), c
    deinterleaved = il.reshape(E, K, 2 * F // 16, 2, 8).transpose(2, 3).reshape(E, K, 2 * F)
    assert torch.equal(deinterleaved, w)
    with pytest.raises(ValueError, match="multiple of 16"):
        sm90_gemm.interleave_gate_up(torch.zeros(1, 2, 40))


def test_fwd_swiglu_fake_and_checks_on_meta_tensors():
    def m(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, device="meta", dtype=dtype)

    c = m(4, dtype=torch.int64)
    h, act = torch.ops.engmoe.sm90_grouped_fwd_swiglu(m(10, 16), m(4, 16, 32), c, m(10, dtype=torch.float32))
    assert h.shape == (10, 32) and act.shape == (10, 16) and act.dtype == torch.bfloat16
    assert "multiple of 16" in sm90_gemm.check_swiglu(m(10, 16), m(4, 16, 40), c, None)
    assert "scale" in sm90_gemm.check_swiglu(m(10, 16), m(4, 16, 32), c, m(9, dtype=torch.float32))
    assert "scale" in sm90_gemm.check_swiglu(m(10, 16), m(4, 16, 32), c, m(10))  # bf16 scale


def test_interleaved_w13_cache_follows_the_weights():
    """Cached on a Parameter until its storage, its version counter or the optimizer-step epoch moves; a plain
    tensor (a per-call cast) is never cached."""
    w = torch.nn.Parameter(torch.randn(2, 4, 32))
    first = grouped.interleaved_w13(w)
    assert torch.equal(first, sm90_gemm.interleave_gate_up(w.detach()))
    assert grouped.interleaved_w13(w) is first
    with torch.no_grad():
        w.mul_(2)  # in place: the version counter moves
    second = grouped.interleaved_w13(w)
    assert second is not first and torch.equal(second, sm90_gemm.interleave_gate_up(w.detach()))
    w.grad = torch.ones_like(w)
    torch.optim.SGD([w], lr=0.1).step()  # the global optimizer-step hook
    third = grouped.interleaved_w13(w)
    assert third is not second and torch.equal(third, sm90_gemm.interleave_gate_up(w.detach()))
    w.data.add_(1)  # .data bypasses the version counter: invalidate_interleaved() is the documented way
    grouped.invalidate_interleaved()
    assert torch.equal(grouped.interleaved_w13(w), sm90_gemm.interleave_gate_up(w.detach()))
    plain = torch.randn(2, 4, 32)
    assert grouped.interleaved_w13(plain) is not grouped.interleaved_w13(plain)


def test_swiglu_epilogue_setting_reaches_the_kernels_and_falls_back_off_gpu():
    from engmoe.config import MoEConfig as Moe

    Moe(swiglu_epilogue=True).validate("model.moe")
    mlp = grouped.make_grouped_mlp(GemmPlan.parse("sm90"), reference.swiglu, "sm90", fused_swiglu=True)
    assert mlp.fused_swiglu
    assert get_moe_kernels("reference").name == "reference"  # the flag is a no-op where no sm90 fwd runs
    g = torch.Generator().manual_seed(0)
    x, w13, w2 = torch.randn(20, 16, generator=g), torch.randn(3, 16, 32, generator=g), torch.randn(3, 16, 16, generator=g)
    counts, scale = torch.tensor([5, 0, 15]), torch.rand(20, generator=g)
    want = reference.grouped_mlp(x, counts, w13, w2, scale)
    torch.testing.assert_close(mlp(x, counts, w13, w2, scale), want)
