"""The tokenization job: read jsonl/parquet → optional filters → tokenize → megatron shards → manifest.

Two datatrove stages:

1. ``tokenize`` (N tasks): a strict reader (rank r reads input files r::N), optional filters (the
   copyright-risk filter), then ``TokenizeToMegatron``, which writes ``<out>/<name>_<rank>.bin/.idx``
   under temporary names, renames them when the rank is done (a rank with no documents leaves no shard),
   and then writes its rank record ``<name>_<rank>.json``.
2. ``manifest`` (1 task, depends on 1): gathers the rank records and the per-rank datatrove stats into
   ``<out>/manifest.json``.

Resume: datatrove marks each finished rank under ``<logging_dir>/completions``; a rerun of the same
command runs only the ranks that did not finish, and, since a rank's output depends only on its input
files, the shards equal those of an uninterrupted run byte for byte. A killed rank leaves only ``*.tmp``
files, which its rerun overwrites.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from datatrove.pipeline.base import PipelineStep

from engmoe.data.manifest import MANIFEST_NAME
from engmoe.data_prep.manifest import build_manifest, rank_record_path, shard_prefix
from engmoe.io import write_json_atomic

log = logging.getLogger(__name__)


def _batched(iterable, n: int):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


class TokenizeToMegatron(PipelineStep):
    """Tokenize each document (special-token strings stay plain text), append EOS (optionally prepend BOS),
    and write this rank's megatron shard atomically, then its rank record."""

    name = "🔢 tokenize → megatron shard"
    type = "🔢 - TOKENIZER"

    def __init__(self, output_dir: str, tokenizer_path: str, shard_name: str = "tokens", add_bos: bool = False,
                 batch_size: int = 512):
        super().__init__()
        self.output_dir = str(output_dir)
        self.tokenizer_path = str(tokenizer_path)
        self.shard_name = shard_name
        self.add_bos = add_bos
        self.batch_size = batch_size

    def run(self, data, rank: int = 0, world_size: int = 1):
        from engmoe.data.tokenizer import load_tokenizer
        from engmoe.data_prep.indexed_writer import IndexedDatasetWriter, token_dtype

        tok = load_tokenizer(self.tokenizer_path)
        prefix = shard_prefix(self.shard_name, rank)
        writer = IndexedDatasetWriter(Path(self.output_dir) / prefix, token_dtype(tok.vocab_size))
        head = [tok.bos] if self.add_bos else []
        try:
            for batch in _batched(data, self.batch_size):
                with self.track_time(unit="batch"):
                    encoded = tok.encode_batch([doc.text for doc in batch], allow_special=False)
                    for ids in encoded:
                        writer.add_document(head + ids + [tok.eod])
                        self.stat_update("documents")
                        self.stat_update("tokens", value=len(ids) + len(head) + 1)
        except BaseException:
            writer.abort()
            raise
        if writer.documents == 0:
            writer.abort()
            published = None
        else:
            writer.finalize()
            published = prefix
        write_json_atomic(rank_record_path(self.output_dir, self.shard_name, rank),
                          {"rank": rank, "prefix": published, "documents": writer.documents, "tokens": writer.tokens})
        return
        yield  # a generator step that consumes everything and yields nothing


class WriteManifest(PipelineStep):
    """Gather the rank records (and the tokenize stage's stats) into ``manifest.json``."""

    name = "📜 manifest"
    type = "📜 - MANIFEST"

    def __init__(self, output_dir: str, shard_name: str, tasks: int, tokenizer_path: str, dataset_name: str,
                 stats_dir: Optional[str], add_bos: bool, source: Optional[str], license: Optional[str],
                 filters: Optional[dict] = None):
        super().__init__()
        self.output_dir, self.shard_name, self.tasks = str(output_dir), shard_name, tasks
        self.tokenizer_path, self.dataset_name, self.stats_dir = str(tokenizer_path), dataset_name, stats_dir
        self.add_bos, self.source, self.license, self.filters = add_bos, source, license, filters or {}

    def run(self, data, rank: int = 0, world_size: int = 1):
        from engmoe.data.tokenizer import load_tokenizer
        from engmoe.data_prep.indexed_writer import token_dtype

        tok = load_tokenizer(self.tokenizer_path)
        stats = merged_stats(self.stats_dir) if self.stats_dir else {}
        manifest = build_manifest(
            self.output_dir, self.shard_name, self.tasks, name=self.dataset_name,
            tokenizer={"path": str(Path(self.tokenizer_path).resolve()), "sha256": tok.sha256,
                       "vocab_size": tok.vocab_size, "eod": tok.eod, "bos": tok.bos if self.add_bos else None},
            dtype=str(token_dtype(tok.vocab_size)), source=self.source, license=self.license,
            extra={"filters": self.filters, "pipeline_stats": stats})
        # the readers' skip counts (--on-error skip) at the top level, where a reader of the manifest looks
        for step_stats in stats.values():
            for key, value in step_stats.items():
                if key.startswith("skipped_") and value:
                    reason = key[len("skipped_"):]
                    manifest["skipped"][reason] = manifest["skipped"].get(reason, 0) + int(value)
        write_json_atomic(Path(self.output_dir) / MANIFEST_NAME, manifest)
        return
        yield


def merged_stats(stats_dir: str | Path) -> dict[str, dict[str, float]]:
    """Sum datatrove's per-rank stats files (``<logging_dir>/stats/*.json``): step name → stat → total."""
    out: dict[str, dict[str, float]] = {}
    for path in sorted(Path(stats_dir).glob("*.json")):
        for step in json.loads(path.read_text()):
            totals = out.setdefault(step["name"], {})
            for key, value in step.get("stats", {}).items():
                total = value.get("total", 0) if isinstance(value, dict) else value
                totals[key] = totals.get(key, 0) + total
    return out


@dataclass
class TokenizeJob:
    """Everything one tokenization job needs; the CLI fills it from flags."""

    input: str
    output: str
    tokenizer: str
    name: Optional[str] = None
    format: Optional[str] = None  # jsonl | parquet (inferred from the input when None)
    glob: Optional[str] = None
    text_key: str = "text"
    tasks: int = 1
    workers: int = 1
    add_bos: bool = False
    on_error: str = "raise"
    copyright_threshold: Optional[float] = None
    copyright_blocklist: Optional[str] = None
    write_exclusions: bool = True
    source: Optional[str] = None
    license: Optional[str] = None
    logging_dir: Optional[str] = None
    progress: bool = True
    shard_name: str = "tokens"
    slurm: Optional[dict] = field(default=None)  # partition, time, cpus_per_task, mem_per_cpu_gb, ...

    def resolved(self) -> "TokenizeJob":
        src = Path(self.input)
        if not src.exists():
            raise FileNotFoundError(f"--input {self.input}: no such file or directory")
        fmt = self.format or _infer_format(src)
        if fmt not in ("jsonl", "parquet"):
            raise ValueError(f"--format: expected jsonl or parquet, got {fmt!r}")
        if not Path(self.tokenizer).is_file():
            raise FileNotFoundError(f"--tokenizer {self.tokenizer}: tokenizer JSON not found "
                                    "(build one with `engmoe-data build-tokenizer` or `train-tokenizer`)")
        if self.tasks < 1 or self.workers < 1:
            raise ValueError(f"--tasks/--workers must be >= 1, got {self.tasks}/{self.workers}")
        if self.copyright_threshold is not None and not 0 < self.copyright_threshold <= 1:
            raise ValueError(f"--copyright-filter: threshold must be in (0, 1], got {self.copyright_threshold}")
        out = Path(self.output)
        return TokenizeJob(**{**self.__dict__, "format": fmt, "name": self.name or out.name,
                              "logging_dir": self.logging_dir or str(out / ".logs")})


def _infer_format(src: Path) -> str:
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    names = [p.name for p in files]
    if any(".parquet" in n for n in names):
        return "parquet"
    if any(".jsonl" in n or n.endswith(".json") for n in names):
        return "jsonl"
    raise ValueError(f"--input {src}: found no .jsonl(.gz/.zst) or .parquet files; set --format and --glob")


def build_pipelines(job: TokenizeJob):
    """The two datatrove pipelines (tokenize, manifest) for ``job`` (already ``resolved()``)."""
    from engmoe.data_prep.readers import StrictJsonlReader, StrictParquetReader

    src = Path(job.input)
    folder, glob = (str(src.parent), src.name) if src.is_file() else (str(src), job.glob)
    if glob is None:
        glob = "**/*.parquet" if job.format == "parquet" else "**/*.jsonl*"
    reader_cls = StrictParquetReader if job.format == "parquet" else StrictJsonlReader
    reader = reader_cls(folder, glob_pattern=glob, text_key=job.text_key, on_error=job.on_error,
                        file_progress=job.progress, doc_progress=job.progress)
    steps: list = [reader]
    filters: dict = {}
    if job.copyright_threshold is not None:
        from datatrove.pipeline.writers import JsonlWriter

        from engmoe.data_prep.copyright.step import CopyrightRiskFilter

        exclusions = (JsonlWriter(str(Path(job.output) / "excluded" / "copyright"),
                                  output_filename="${rank}.jsonl.gz") if job.write_exclusions else None)
        steps.append(CopyrightRiskFilter(threshold=job.copyright_threshold, blocklist_path=job.copyright_blocklist,
                                         exclusion_writer=exclusions))
        filters["copyright"] = {"threshold": job.copyright_threshold, "blocklist": job.copyright_blocklist}
    steps.append(TokenizeToMegatron(job.output, job.tokenizer, job.shard_name, job.add_bos))
    tokenize = steps
    manifest = [WriteManifest(job.output, job.shard_name, job.tasks, job.tokenizer, job.name,
                              str(Path(job.logging_dir) / "tokenize" / "stats"), job.add_bos, job.source, job.license,
                              filters)]
    return tokenize, manifest


def make_executors(job: TokenizeJob):
    """(tokenize executor, manifest executor) — local processes, or SLURM array jobs with ``job.slurm``."""
    tokenize, manifest = build_pipelines(job)
    logs = Path(job.logging_dir)
    if job.slurm is None:
        from datatrove.executor import LocalPipelineExecutor

        first = LocalPipelineExecutor(tokenize, tasks=job.tasks, workers=job.workers,
                                      logging_dir=str(logs / "tokenize"))
        second = LocalPipelineExecutor(manifest, tasks=1, workers=1, logging_dir=str(logs / "manifest"),
                                       depends=first)
        return first, second
    from datatrove.executor import SlurmPipelineExecutor

    s = dict(job.slurm)
    common = {k: s[k] for k in ("partition", "qos", "env_command", "venv_path", "sbatch_args") if s.get(k)}
    first = SlurmPipelineExecutor(tokenize, tasks=job.tasks, workers=job.workers if job.workers > 1 else -1,
                                  time=s.get("time", "12:00:00"), cpus_per_task=s.get("cpus_per_task", 1),
                                  mem_per_cpu_gb=s.get("mem_per_cpu_gb", 2), job_name=f"tok-{job.name}",
                                  logging_dir=str(logs / "tokenize"), **common)
    second = SlurmPipelineExecutor(manifest, tasks=1, time="00:30:00", cpus_per_task=1, job_name=f"man-{job.name}",
                                   logging_dir=str(logs / "manifest"), depends=first, **common)
    return first, second


def run_job(job: TokenizeJob) -> Optional[dict]:
    """Run (or, on SLURM, submit) the job; returns the manifest when it ran locally."""
    job = job.resolved()
    Path(job.output).mkdir(parents=True, exist_ok=True)
    _, last = make_executors(job)
    last.run()  # runs (or submits) its dependency first
    if job.slurm is not None:
        return None
    return json.loads((Path(job.output) / MANIFEST_NAME).read_text())
