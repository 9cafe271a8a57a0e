"""Write a job's result lines (``GET /api/jobs/{id}/results``) as JSONL, CSV or Parquet, streaming.

Used by ``corral results`` and by the operator console's downloads.  Results arrive in input order as NDJSON;
each writer consumes them one line at a time and keeps at most one row group in memory, so exporting a
million-item job needs no more memory than exporting ten.  Embeddings are float lists in JSONL and CSV, a
``list<float32>`` column in Parquet, one row per vector.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

FORMATS = ("jsonl", "csv", "parquet", "npy")
ROW_GROUP = 2048
TEXT_COLUMNS = ["custom_id", "index", "state", "text", "done_reason", "prompt_tokens", "completion_tokens", "error"]
EMBED_COLUMNS = ["custom_id", "index", "vector_index", "state", "text", "metadata", "embedding", "prompt_tokens", "error"]


class ExportError(Exception):
    """The requested format cannot be written (e.g. Parquet without pyarrow)."""


def rows(lines: Iterable[bytes], kind: str) -> Iterator[dict[str, Any]]:
    """Flatten result lines to table rows: text and rerank jobs one row per item, embed jobs one row per vector."""
    for raw in lines:
        line = json.loads(raw)
        response = line.get("response") or {}
        base = {"custom_id": line.get("custom_id"), "index": line.get("index"), "state": line.get("state"),
                "error": line.get("error")}
        if kind == "embed":
            inputs = (line.get("input") or {}).get("input")
            texts = inputs if isinstance(inputs, list) else [inputs]
            metadata = json.dumps(line["metadata"], ensure_ascii=False) if "metadata" in line else None
            vectors = response.get("embeddings") or [None]
            for n, vector in enumerate(vectors):
                yield {**base, "vector_index": n if vector is not None else None, "embedding": vector,
                       "text": texts[n] if n < len(texts) else None, "metadata": metadata,
                       "prompt_tokens": response.get("prompt_eval_count")}
            continue
        if kind == "rerank":  # the ranked results as JSON text, best first
            results = response.get("results")
            yield {**base, "text": json.dumps(results, ensure_ascii=False) if results is not None else None,
                   "prompt_tokens": (response.get("usage") or {}).get("prompt_tokens")}
            continue
        message = response.get("message") or {}
        yield {**base, "text": response.get("response", message.get("content")), "done_reason": response.get("done_reason"),
               "prompt_tokens": response.get("prompt_eval_count"), "completion_tokens": response.get("eval_count")}


def write_jsonl(lines: Iterable[bytes], out: IO[bytes]) -> int:
    count = 0
    for line in lines:
        out.write(line.rstrip(b"\n") + b"\n")
        count += 1
    return count


def write_csv(lines: Iterable[bytes], kind: str, out: IO[str]) -> int:
    count = [0]
    for piece in csv_pieces(lines, kind, count):
        out.write(piece)
    return count[0]


def csv_pieces(lines: Iterable[bytes], kind: str, count: list[int] | None = None) -> Iterator[str]:
    """The CSV text in pieces of about 64 KiB (a streamed download), adding the rows written to ``count[0]``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EMBED_COLUMNS if kind == "embed" else TEXT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows(lines, kind):
        if row.get("embedding") is not None:
            row["embedding"] = json.dumps(row["embedding"])
        writer.writerow(row)
        if count is not None:
            count[0] += 1
        if buffer.tell() > 1 << 16:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def write_parquet(lines: Iterable[bytes], kind: str, path: str) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ExportError("Parquet export needs pyarrow: pip install 'corral[parquet]'") from exc
    if kind == "embed":
        schema = pa.schema([
            ("custom_id", pa.string()), ("index", pa.int64()), ("vector_index", pa.int32()), ("state", pa.string()),
            ("text", pa.string()), ("metadata", pa.string()), ("embedding", pa.list_(pa.float32())),
            ("prompt_tokens", pa.int64()), ("error", pa.string()),
        ])
    else:
        schema = pa.schema([
            ("custom_id", pa.string()), ("index", pa.int64()), ("state", pa.string()), ("text", pa.string()),
            ("done_reason", pa.string()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
            ("error", pa.string()),
        ])
    count = 0
    batch: list[dict[str, Any]] = []
    with pq.ParquetWriter(path, schema) as writer:
        for row in rows(lines, kind):
            batch.append(row)
            count += 1
            if len(batch) >= ROW_GROUP:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        if batch or count == 0:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    return count


def write_npy(lines: Iterable[bytes], kind: str, path: str) -> int:
    """Vectors as one float32 ``(rows, dims)`` ``.npy`` matrix, and their rows' metadata beside it as
    ``<path>.meta.jsonl`` (custom_id, index, vector_index, text, metadata), row for row.

    Rows are streamed to a scratch file first (the header needs the row count), so memory stays flat.
    """
    import numpy as np  # here: the CLI imports this module at every start, and only npy needs numpy

    if kind != "embed":
        raise ExportError("--format npy is for embedding jobs")
    directory = os.path.dirname(os.path.abspath(path))
    count, dims = 0, None
    with tempfile.TemporaryFile(dir=directory) as scratch, open(f"{path}.meta.jsonl", "w", encoding="utf-8") as meta:
        for row in rows(lines, kind):
            vector = row.get("embedding")
            if vector is None:
                continue
            if dims is None:
                dims = len(vector)
            elif len(vector) != dims:
                raise ExportError(f"row {count}: {len(vector)} dimensions where earlier rows have {dims}")
            scratch.write(np.asarray(vector, dtype="<f4").tobytes())
            meta.write(json.dumps({k: row.get(k) for k in ("custom_id", "index", "vector_index", "text")}
                                  | {"metadata": json.loads(row["metadata"]) if row.get("metadata") else None},
                                  ensure_ascii=False) + "\n")
            count += 1
        scratch.seek(0)
        with open(path, "wb") as out:
            np.lib.format.write_array_header_1_0(
                out, {"descr": "<f4", "fortran_order": False, "shape": (count, dims or 0)}
            )
            while piece := scratch.read(1 << 20):
                out.write(piece)
    return count
