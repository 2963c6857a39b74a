"""datatrove readers that do not fail silently.

datatrove 0.10.1's readers log a warning and move on when a jsonl line is not JSON, and drop a record
without the text field after one warning. For training data that is a silent wrong output, so ours
either stop with an error naming the file, line and field (``on_error="raise"``, the default) or skip
the record and count it in the pipeline stats (``on_error="skip"``), where the job summary shows it.
"""
from __future__ import annotations

from typing import Literal

from datatrove.pipeline.readers import JsonlReader, ParquetReader

OnError = Literal["raise", "skip"]


class DataError(ValueError):
    """A record or file of the input is malformed; the message names the file, the record and the field."""


class _Strict:
    """Shared record checks for our readers (mixed into datatrove's reader classes)."""

    on_error: OnError

    def __init__(self, data_folder, *, on_error: OnError = "raise", **kwargs):
        super().__init__(data_folder, **kwargs)  # the datatrove reader's own arguments
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error

    def _bad(self, message: str, stat: str) -> None:
        if self.on_error == "raise":
            raise DataError(message)
        self.stat_update(stat)  # type: ignore[attr-defined]

    def _check_record(self, data: dict, filepath: str, where: str) -> bool:
        if not isinstance(data, dict):
            self._bad(f"{filepath}:{where}: expected a JSON object per record, got {type(data).__name__}",
                      "skipped_not_an_object")
            return False
        text = data.get(self.text_key)  # type: ignore[attr-defined]
        if text is None:
            self._bad(f"{filepath}:{where}: record has no {self.text_key!r} field (fields: "  # type: ignore[attr-defined]
                      f"{', '.join(sorted(map(str, data))) or 'none'}); set --text-key", "skipped_missing_text")
            return False
        if not isinstance(text, str):
            self._bad(f"{filepath}:{where}: field {self.text_key!r} must be a string, got "  # type: ignore[attr-defined]
                      f"{type(text).__name__}", "skipped_text_not_string")
            return False
        if not text:
            self.stat_update("skipped_empty_text")  # type: ignore[attr-defined]
            return False
        return True


class StrictJsonlReader(_Strict, JsonlReader):
    """jsonl / jsonl.gz / jsonl.zst reader: bad JSON or a missing text field raises (or is counted)."""

    name = "🐿 Jsonl (strict)"

    def read_file(self, filepath: str):
        import orjson

        with self.data_folder.open(filepath, "r", compression=self.compression) as f:
            try:
                for li, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        data = orjson.loads(line)
                    except orjson.JSONDecodeError as e:
                        self._bad(f"{filepath}:{li + 1}: invalid JSON ({e})", "skipped_invalid_json")
                        continue
                    if not self._check_record(data, filepath, str(li + 1)):
                        continue
                    document = self.get_document_from_dict(data, filepath, li)
                    if document:
                        yield document
            except (UnicodeDecodeError, EOFError, OSError) as e:
                self._bad(f"{filepath}: corrupt or truncated file ({type(e).__name__}: {e})", "skipped_corrupt_file")


class StrictParquetReader(_Strict, ParquetReader):
    """Parquet reader: a corrupt file or a missing/non-string text column raises (or is counted)."""

    name = "📒 Parquet (strict)"

    def read_file(self, filepath: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            with self.data_folder.open(filepath, "rb") as f, pq.ParquetFile(f) as pqf:
                if self.text_key not in pqf.schema_arrow.names:
                    self._bad(f"{filepath}: parquet file has no {self.text_key!r} column (columns: "
                              f"{', '.join(pqf.schema_arrow.names)}); set --text-key", "skipped_missing_text_column")
                    return
                row = 0
                for batch in pqf.iter_batches(batch_size=self.batch_size):
                    for data in batch.to_pylist():
                        row += 1
                        if not self._check_record(data, filepath, f"row {row}"):
                            continue
                        document = self.get_document_from_dict(data, filepath, row - 1)
                        if document:
                            yield document
        except (pa.ArrowException, OSError) as e:
            self._bad(f"{filepath}: corrupt parquet file ({type(e).__name__}: {e})", "skipped_corrupt_file")
