"""``corral embed`` over a folder, token-aware chunks with offsets, skipping unchanged files, search, exports."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest

from cli.corpus import EstimateCounter, WordPieceCounter, chunk_text, counter_for
from tests.helpers import GARDEN, ROCKETS, cli, make_corpus, submit, wait_done


@pytest.fixture(scope="module")
def wordpiece(base_url: str) -> WordPieceCounter:
    show = httpx.post(base_url + "/api/show", json={"model": "all-minilm", "verbose": True}).json()
    counter = counter_for(show)
    assert isinstance(counter, WordPieceCounter)
    return counter


def test_chunks_respect_the_token_budget_overlap_and_offsets(base_url: str, wordpiece: WordPieceCounter) -> None:
    text = (ROCKETS + GARDEN) * 6
    chunks = list(chunk_text(text, wordpiece, 48, 8))
    assert len(chunks) > 3
    for chunk in chunks:
        assert text[chunk.start : chunk.end] == chunk.text and chunk.tokens <= 48
    # the server's own tokenizer agrees with the count
    reply = httpx.post(base_url + "/api/embed", json={"model": "all-minilm", "input": [c.text for c in chunks]}).json()
    assert reply["prompt_eval_count"] == sum(c.tokens for c in chunks)
    # neighbours share their boundary words
    assert all(b.start < a.end for a, b in zip(chunks, chunks[1:]))
    assert all(c.tokens >= 1 for c in chunk_text("x " * 10, EstimateCounter(), 8, 0))




def test_embed_a_folder_search_it_and_skip_unchanged_files(base_url: str, tmp_path: Path) -> None:
    docs = make_corpus(tmp_path)
    manifest = tmp_path / "manifest.json"
    run = cli(base_url, "embed", str(docs), "--chunk-tokens", "64", "--overlap", "16", "--manifest", str(manifest), "--wait")
    assert run.exit_code == 0, run.output
    job_id = run.stdout.splitlines()[0]
    assert "4 files, 11 chunks" in run.stderr and "0 unchanged files skipped" in run.stderr

    reply = httpx.get(f"{base_url}/api/jobs/{job_id}/results", params={"include_input": "true"})
    lines = [json.loads(x) for x in reply.text.splitlines()]
    sources = {line["metadata"]["source"] for line in lines}
    assert sources == {"rockets.md", "garden.txt", "sub/page.html", "sub/notes.jsonl#1", "sub/notes.jsonl#2"}
    rocket_chunks = [line for line in lines if line["metadata"]["source"] == "rockets.md"]
    assert len(rocket_chunks) > 2 and [c["metadata"]["chunk"] for c in rocket_chunks] == list(range(len(rocket_chunks)))
    original = (docs / "rockets.md").read_text()
    for c in rocket_chunks:
        assert original[c["metadata"]["start"] : c["metadata"]["end"]] == c["input"]["input"]
    assert all(line["state"] == "succeeded" for line in lines)
    assert "alert" not in json.dumps(lines)

    hits = httpx.get(f"{base_url}/api/jobs/{job_id}/search", params={"q": "space launch to orbit", "k": 3}).json()
    assert hits["model"] == "all-minilm" and len(hits["results"]) == 3
    assert hits["results"][0]["metadata"]["source"] == "rockets.md"
    assert hits["results"][0]["score"] >= hits["results"][1]["score"] >= hits["results"][2]["score"]
    planet = cli(base_url, "search", job_id, "biggest planet in the solar system", "-k", "1")
    assert planet.exit_code == 0 and "sub/notes.jsonl#1" in planet.stdout and "Jupiter" in planet.stdout

    again = cli(base_url, "embed", str(docs), "--chunk-tokens", "64", "--overlap", "16", "--manifest", str(manifest))
    assert again.exit_code == 0 and "nothing to embed: 4 files unchanged" in again.stderr
    (docs / "garden.txt").write_text(GARDEN * 4)
    changed = cli(base_url, "embed", str(docs), "--chunk-tokens", "64", "--overlap", "16", "--manifest", str(manifest), "--wait")
    assert changed.exit_code == 0 and "1 files" in changed.stderr and "3 unchanged files skipped" in changed.stderr
    new_job = changed.stdout.splitlines()[0]
    new_lines = [json.loads(x) for x in httpx.get(f"{base_url}/api/jobs/{new_job}/results").text.splitlines()]
    assert {line["metadata"]["source"] for line in new_lines} == {"garden.txt"}
    recorded = json.loads(manifest.read_text())["files"]
    assert recorded[str((docs / "garden.txt").resolve())]["job"] == new_job
    assert recorded[str((docs / "rockets.md").resolve())]["job"] == job_id

    out = tmp_path / "vectors.npy"
    assert cli(base_url, "results", job_id, "--format", "npy", "-o", str(out)).exit_code == 0
    matrix = np.load(out)
    meta = [json.loads(x) for x in Path(f"{out}.meta.jsonl").read_text().splitlines()]
    assert matrix.shape == (len(lines), 384) and matrix.dtype == np.float32 and len(meta) == len(lines)
    assert meta[0]["custom_id"] == lines[0]["custom_id"] and meta[0]["text"] == lines[0]["input"]["input"]
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-4)


def test_search_mistakes_are_clear(base_url: str) -> None:
    job = submit(base_url, kind="generate", items=[{"prompt": "hi"}], options={"num_predict": 1})
    wait_done(base_url, job["id"])
    r = httpx.get(f"{base_url}/api/jobs/{job['id']}/search", params={"q": "x"})
    assert r.status_code == 400 and "only embed jobs can be searched" in r.json()["error"]
    r = httpx.get(f"{base_url}/api/jobs/{job['id']}/search")
    assert r.status_code == 400 and r.json() == {"error": "q is required: the text to search for"}
    r = httpx.get(f"{base_url}/api/jobs/job_000000000000000000000000/search", params={"q": "x"})
    assert r.status_code == 404
    bad = cli(base_url, "embed", "/nonexistent/path")
    assert bad.exit_code == 2 and "does not exist" in bad.stderr


def make_pdf(pages: list[str]) -> bytes:
    """A minimal PDF written by hand (Helvetica text, one content stream per page): no PDF library needed to
    make the fixture, so what is tested is corral reading it through pypdf."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(len(pages)))}] /Count {len(pages)} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for i, text in enumerate(pages):
        stream = ("BT /F1 11 Tf 14 TL 50 740 Td " + " ".join(f"({line}) Tj T*" for line in textwrap.wrap(text, 80))
                  + " ET").encode("latin-1")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {5 + 2 * i} 0 R "
                       "/Resources << /Font << /F1 3 0 R >> >> >>".encode())
        objects.append(f"<< /Length {len(stream)} >>\nstream\n".encode() + stream + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def test_pdf_pages_are_read_chunked_and_searchable(base_url: str, tmp_path: Path) -> None:
    from pypdf import PdfReader

    docs = tmp_path / "pdfs"
    docs.mkdir()
    pdf = make_pdf(["Volcanoes erupt molten rock called lava, and ash clouds can ground aircraft. " * 4,
                    "Glaciers carve deep valleys over thousands of years as the ice slowly flows downhill. " * 4])
    (docs / "atlas.pdf").write_bytes(pdf)
    (docs / "garden.md").write_text(GARDEN * 3)
    run = cli(base_url, "embed", str(docs), "--glob", "*.pdf", "--chunk-tokens", "48", "--overlap", "8", "--wait")
    assert run.exit_code == 0, run.output
    assert "1 files" in run.stderr
    job_id = run.stdout.splitlines()[0]
    lines = [json.loads(x) for x in httpx.get(f"{base_url}/api/jobs/{job_id}/results",
                                              params={"include_input": "true"}).text.splitlines()]
    assert {line["metadata"]["source"] for line in lines} == {"atlas.pdf"} and len(lines) > 2
    text = "\n\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    for line in lines:  # offsets point into the PDF's extracted text
        assert text[line["metadata"]["start"] : line["metadata"]["end"]] == line["input"]["input"]
    assert any("Glaciers" in line["input"]["input"] for line in lines)
    hits = httpx.get(f"{base_url}/api/jobs/{job_id}/search", params={"q": "ice flowing down a mountain", "k": 1}).json()
    best = hits["results"][0]
    assert "ice" in best["text"] and "lava" not in best["text"]
    assert best["metadata"]["start"] > text.index("Glaciers") - 40  # from the second page
