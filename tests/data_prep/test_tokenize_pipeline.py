"""The datatrove tokenization job: shards megatron reads back, resume after a kill, bad input, SLURM script."""
import gzip
import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engmoe.data.manifest import load_manifest
from engmoe.data_prep.readers import DataError
from engmoe.data_prep.tokenize import TokenizeJob, build_pipelines, make_executors, run_job

WORDS = ("the model reads tokens and writes shards while la rete neurale impara parole nuove "
         "<|im_start|> /turbo café naïve 東京 1234 def f(x): return x").split()


def _docs(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": f"d{seed}-{i}", "text": " ".join(rng.choice(WORDS, size=int(rng.integers(5, 60))))}
            for i in range(n)]


def _write_jsonl(path: Path, records, opener=open) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from engmoe.data_prep.tokenizer_build import train_bpe_tokenizer

    return train_bpe_tokenizer([" ".join(WORDS)] * 50, 350, tmp_path_factory.mktemp("tok") / "tok.json")


@pytest.fixture()
def corpus(tmp_path):
    """Four input files (one gzipped), 20-40 documents each."""
    src = tmp_path / "raw"
    _write_jsonl(src / "a.jsonl", _docs(30, 1))
    _write_jsonl(src / "b.jsonl", _docs(25, 2))
    _write_jsonl(src / "sub" / "c.jsonl.gz", _docs(40, 3), opener=gzip.open)
    _write_jsonl(src / "d.jsonl", _docs(20, 4))
    return src


def _read_all(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def _job(src, out, tok, **kw) -> TokenizeJob:
    return TokenizeJob(input=str(src), output=str(out), tokenizer=str(tok), progress=False, **kw)


def test_shards_read_back_with_megatron_and_match_the_tokenizer(corpus, tmp_path, tokenizer_path):
    from engmoe.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    manifest = run_job(_job(corpus, tmp_path / "out", tokenizer_path, tasks=2, name="toy", license="CC0",
                            source="unit test"))
    assert manifest["tasks"] == 2 and len(manifest["shards"]) == 2
    assert manifest["tokenizer"]["sha256"] == tok.sha256 and manifest["license"] == "CC0"
    # datatrove's sharding: files sorted, rank r reads files r::2
    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    got_docs = 0
    for rank, shard in enumerate(manifest["shards"]):
        docs = _read_all(str(tmp_path / "out" / shard["prefix"]))
        expected = []
        for f in files[rank::2]:
            opener = gzip.open if f.suffix == ".gz" else open
            with opener(f, "rt", encoding="utf-8") as fh:
                expected += [tok.encode(json.loads(line)["text"]) + [tok.eod] for line in fh]
        assert docs == expected
        assert shard["documents"] == len(docs) and shard["tokens"] == sum(map(len, docs))
        got_docs += len(docs)
    assert got_docs == manifest["documents"] == 115
    # special-token strings in raw text stay plain text
    flat = {t for shard in manifest["shards"] for d in _read_all(str(tmp_path / "out" / shard["prefix"])) for t in d}
    assert tok.special_ids["<|im_start|>"] not in flat and tok.special_ids["/turbo"] not in flat
    load_manifest(tmp_path / "out" / "manifest.json")  # validates


def test_empty_ranks_leave_no_shard_and_bos_is_optional(corpus, tmp_path, tokenizer_path):
    from engmoe.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    manifest = run_job(_job(corpus / "a.jsonl", tmp_path / "out", tokenizer_path, tasks=3, add_bos=True))
    assert len(manifest["shards"]) == 1 and manifest["documents"] == 30  # one input file: ranks 1, 2 empty
    assert not list((tmp_path / "out").glob("tokens_0000[12].bin")) and not list((tmp_path / "out").rglob("*.tmp"))
    first = _read_all(str(tmp_path / "out" / "tokens_00000"))[0]
    assert first[0] == tok.bos and first[-1] == tok.eod


def _crash_run(job: TokenizeJob, crash_rank: int, after_docs: int) -> None:
    """Run the tokenize stage in this (child) process and die like SIGKILL mid-way through one rank."""
    from datatrove.pipeline.base import PipelineStep

    class DieMidway(PipelineStep):
        name = "💥"

        def run(self, data, rank=0, world_size=1):
            for i, doc in enumerate(data):
                if rank == crash_rank and i == after_docs:
                    os._exit(9)  # no cleanup, no exception handling: as if killed
                yield doc

    tokenize, _ = build_pipelines(job)
    tokenize.insert(1, DieMidway())
    from datatrove.executor import LocalPipelineExecutor

    LocalPipelineExecutor(tokenize, tasks=job.tasks, workers=1, logging_dir=str(Path(job.logging_dir) / "tokenize")).run()


def test_killed_job_rerun_completes_missing_ranks_byte_identical(corpus, tmp_path, tokenizer_path):
    clean = run_job(_job(corpus, tmp_path / "clean", tokenizer_path, tasks=4))
    job = _job(corpus, tmp_path / "killed", tokenizer_path, tasks=4).resolved()
    proc = mp.get_context("spawn").Process(target=_crash_run, args=(job, 2, 7))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 9
    killed = tmp_path / "killed"
    assert (killed / "tokens_00000.bin").is_file() and (killed / "tokens_00001.bin").is_file()
    assert not (killed / "tokens_00002.bin").exists() and (killed / "tokens_00002.bin.tmp").exists()
    assert not (killed / "manifest.json").exists()
    before = {r: (killed / f"tokens_0000{r}.bin").stat().st_mtime_ns for r in (0, 1)}
    resumed = run_job(_job(corpus, killed, tokenizer_path, tasks=4))
    assert {r: (killed / f"tokens_0000{r}.bin").stat().st_mtime_ns for r in (0, 1)} == before  # not redone
    for shard in clean["shards"]:
        for ext in (".bin", ".idx"):
            a = (tmp_path / "clean" / (shard["prefix"] + ext)).read_bytes()
            assert a == (killed / (shard["prefix"] + ext)).read_bytes(), shard["prefix"] + ext
    assert resumed["shards"] == clean["shards"] and not list(killed.glob("*.tmp"))


def test_bad_json_raises_with_file_and_line_or_is_counted(tmp_path, tokenizer_path):
    src = tmp_path / "raw"
    src.mkdir()
    (src / "x.jsonl").write_text('{"text": "fine"}\n{"text": broken\n{"body": "no text"}\n{"text": "ok too"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: invalid JSON"):
        run_job(_job(src, tmp_path / "out", tokenizer_path))
    assert not list((tmp_path / "out").glob("*.bin")) and not (tmp_path / "out" / "manifest.json").exists()
    manifest = run_job(_job(src, tmp_path / "out2", tokenizer_path, on_error="skip"))
    assert manifest["documents"] == 2
    stats = {k: v for s in manifest["pipeline_stats"].values() for k, v in s.items()}
    assert stats["skipped_invalid_json"] == 1 and stats["skipped_missing_text"] == 1
    assert manifest["skipped"] == {"invalid_json": 1, "missing_text": 1}  # the reader's counts, top level
    on_disk = json.loads((tmp_path / "out2" / "manifest.json").read_text())
    assert on_disk["skipped"] == manifest["skipped"]


def test_missing_text_field_names_the_field(tmp_path, tokenizer_path):
    src = tmp_path / "raw"
    _write_jsonl(src / "y.jsonl", [{"content": "a"}])
    with pytest.raises(DataError, match=r"y.jsonl:1: record has no 'text' field \(fields: content\)"):
        run_job(_job(src, tmp_path / "out", tokenizer_path))
    manifest = run_job(_job(src, tmp_path / "out2", tokenizer_path, text_key="content"))
    assert manifest["documents"] == 1


def test_parquet_input_and_corrupt_parquet(tmp_path, tokenizer_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "pq"
    src.mkdir()
    docs = _docs(12, 7)
    pq.write_table(pa.table({"id": [d["id"] for d in docs], "text": [d["text"] for d in docs]}), src / "a.parquet")
    manifest = run_job(_job(src, tmp_path / "out", tokenizer_path))
    assert manifest["documents"] == 12
    (src / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"b.parquet: corrupt parquet file"):
        run_job(_job(src, tmp_path / "out2", tokenizer_path))
    manifest = run_job(_job(src, tmp_path / "out3", tokenizer_path, on_error="skip"))
    assert manifest["documents"] == 12


def test_vocab_that_does_not_fit_the_dtype_is_refused(tmp_path):
    from engmoe.data_prep.indexed_writer import IndexedDatasetWriter, token_dtype

    assert token_dtype(65536) == np.uint16 and token_dtype(131084) == np.int32
    with pytest.raises(ValueError, match="does not fit"):
        token_dtype(2**40)
    w = IndexedDatasetWriter(tmp_path / "t", np.uint16)
    with pytest.raises(ValueError, match="id 70000 does not fit dtype uint16"):
        w.add_document([1, 70000])
    w.abort()
    assert not list(tmp_path.iterdir())


def test_bad_job_arguments(tmp_path, tokenizer_path):
    with pytest.raises(FileNotFoundError, match="--input"):
        run_job(_job(tmp_path / "nope", tmp_path / "out", tokenizer_path))
    (tmp_path / "raw").mkdir()
    _write_jsonl(tmp_path / "raw" / "a.jsonl", _docs(2, 0))
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        run_job(_job(tmp_path / "raw", tmp_path / "out", tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="--copyright-filter"):
        run_job(_job(tmp_path / "raw", tmp_path / "out", tokenizer_path, copyright_threshold=1.5))


def test_slurm_executor_renders_a_valid_array_job(corpus, tmp_path, tokenizer_path):
    job = _job(corpus, tmp_path / "out", tokenizer_path, tasks=8, copyright_threshold=0.4,
               slurm={"partition": "cpu", "time": "02:00:00", "cpus_per_task": 4, "mem_per_cpu_gb": 2,
                      "env_command": "source .venv/bin/activate"}).resolved()
    first, second = make_executors(job)
    script = first.get_launch_file_contents(first.get_sbatch_args(max_array=8), "python run.py")
    assert "--partition=cpu" in script and "--array=0-7" in script and "--cpus-per-task=4" in script
    assert "source .venv/bin/activate" in script
    (tmp_path / "job.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sh")]).returncode == 0
    assert second.depends is first and second.tasks == 1


def test_cli_tokenize_and_check_blend(corpus, tmp_path, tokenizer_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "-m", "engmoe.data_prep.cli", "tokenize", "--input", str(corpus), "--output",
                          str(tmp_path / "tok" / "toy"), "--tokenizer", str(tokenizer_path), "--tasks", "2",
                          "--workers", "2", "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "115 documents" in out.stdout
    blend = tmp_path / "blend.yaml"
    blend.write_text("name: t\ndatasets:\n  toy: {weight: 3, manifest: toy/manifest.json}\n"
                     "  gone: {weight: 1, manifest: gone/manifest.json}\n  unused: {weight: 0, prefixes: [x/y]}\n")
    chk = subprocess.run([sys.executable, "-m", "engmoe.data_prep.cli", "check-blend", str(blend), "--data-root",
                          str(tmp_path / "tok"), "--tokens", "1e6"], capture_output=True, text=True, env=env)
    assert chk.returncode == 1  # a missing dataset
    assert "MISSING" in chk.stdout and "gone/manifest.json" in chk.stdout and "unused (weight 0)" in chk.stdout
    tokens = load_manifest(tmp_path / "tok" / "toy" / "manifest.json")["tokens"]
    row = next(line for line in chk.stdout.splitlines() if line.startswith("| toy"))
    assert f"{0.75e6 / tokens:.2f}" in row  # epochs = weight share × budget / tokens on disk


def test_copyright_filter_in_the_job_drops_reports_and_writes_exclusions(tmp_path, tokenizer_path):
    from engmoe.data_prep.copyright.report import filter_report

    src = tmp_path / "raw"
    keep = _docs(20, 5)
    risky = [{"id": f"news{i}", "text": f"story {i} " * 30, "metadata": {"url": f"https://www.nytimes.com/{i}.html"}}
             for i in range(5)]
    _write_jsonl(src / "a.jsonl", keep + risky)
    manifest = run_job(_job(src, tmp_path / "out", tokenizer_path, copyright_threshold=0.4))
    assert manifest["documents"] == 20 and manifest["filters"]["copyright"]["threshold"] == 0.4
    excluded = list((tmp_path / "out" / "excluded" / "copyright").glob("*.jsonl.gz"))
    assert excluded
    dropped = [json.loads(line) for f in excluded for line in gzip.open(f, "rt")]
    assert sorted(d["id"] for d in dropped) == sorted(d["id"] for d in risky)
    report = filter_report(tmp_path / "out" / ".logs" / "tokenize")
    assert "domain" in report and "5" in report
