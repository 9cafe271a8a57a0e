"""Documents into text, text into token-counted chunks: shared by ``corral embed`` (which chunks on the client)
and collections (whose workers chunk a stored file with the model's own tokenizer).

Chunk sizes are counted in the model's tokens through a counter with ``count(word)``: for WordPiece (BERT)
models on the client, :class:`WordPieceCounter` reproduces the tokenizer's splitting from the vocabulary that
``/api/show`` lists; other models are estimated (about four characters a token); a worker counts with the
loaded model's tokenizer itself.  Text comes from PDF (pypdf), HTML, JSON and plain text by the file's name.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any, Protocol

DEFAULT_GLOBS = ("*.txt", "*.md", "*.markdown", "*.rst", "*.html", "*.htm", "*.json", "*.jsonl", "*.pdf")
TEXT_FIELDS = ("text", "content", "body", "page_content")
_WORD = re.compile(r"\S+")


class CorpusError(Exception):
    """A path that cannot be read as documents."""


# -- token counting -------------------------------------------------------------------------------------


class WordPieceCounter:
    """Counts BERT WordPiece tokens per word, as llama.cpp's WPM tokenizer splits them (lower-cased, accents
    stripped, punctuation and CJK characters as separate words, greedy longest-match sub-words)."""

    def __init__(self, tokens: Iterable[str], max_chars: int = 100) -> None:
        # llama.cpp's "phantom space" vocabulary: word starts carry a leading U+2581, continuations are bare.
        self.starts = {t[1:] for t in tokens if t.startswith("\u2581")}
        self.rest = {t for t in tokens if not t.startswith("\u2581")}
        self.max_chars = max_chars
        self._cache: dict[str, int] = {}

    @staticmethod
    def _pieces(word: str) -> list[str]:
        text = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        out, current = [], ""
        for char in text:
            if unicodedata.category(char).startswith("P") or _is_cjk(char) or (char.isascii() and not char.isalnum()):
                if current:
                    out.append(current)
                out.append(char)
                current = ""
            else:
                current += char
        if current:
            out.append(current)
        return out

    def _wordpiece(self, piece: str) -> int:
        if len(piece) > self.max_chars:
            return 1  # [UNK]
        count, start = 0, 0
        while start < len(piece):
            end = len(piece)
            vocab = self.starts if start == 0 else self.rest
            while end > start and piece[start:end] not in vocab:
                end -= 1
            if end == start:
                return 1  # the whole word becomes [UNK]
            count += 1
            start = end
        return count

    def count(self, word: str) -> int:
        cached = self._cache.get(word)
        if cached is None:
            cached = sum(self._wordpiece(p) for p in self._pieces(word)) or 1
            if len(self._cache) < 200_000:
                self._cache[word] = cached
        return cached


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x3040 <= code <= 0x30FF or 0xAC00 <= code <= 0xD7AF


class EstimateCounter:
    """For tokenizers we do not reproduce: about one token per four characters, at least one per word."""

    def count(self, word: str) -> int:
        return max(1, (len(word) + 3) // 4)


def counter_for(show: dict[str, Any]) -> WordPieceCounter | EstimateCounter:
    """The token counter for a model, from its verbose ``/api/show`` reply."""
    info = show.get("model_info") or {}
    tokens = info.get("tokenizer.ggml.tokens")
    if info.get("tokenizer.ggml.model") == "bert" and tokens:
        return WordPieceCounter(tokens)
    return EstimateCounter()


# -- chunking -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    text: str
    start: int
    end: int
    tokens: int


class TokenCounter(Protocol):
    """Tokens in one whitespace-separated word, as some tokenizer counts them."""

    def count(self, word: str) -> int: ...


def chunk_text(text: str, counter: TokenCounter, chunk_tokens: int, overlap: int) -> Iterator[Chunk]:
    """Windows of whole words holding at most ``chunk_tokens`` tokens (the two special tokens included),
    each starting ``overlap`` tokens before the previous one ended."""
    budget = max(1, chunk_tokens - 2)
    words = [(m.start(), m.end(), counter.count(m.group())) for m in _WORD.finditer(text)]
    first = 0
    while first < len(words):
        last, used = first, 0
        while last < len(words) and (used + words[last][2] <= budget or last == first):
            used += words[last][2]
            last += 1
        start, end = words[first][0], words[last - 1][1]
        yield Chunk(text[start:end], start, end, min(used, budget) + 2)
        if last >= len(words):
            return
        back, kept = last, 0
        while back > first + 1 and kept + words[back - 1][2] <= overlap:
            back -= 1
            kept += words[back][2]
        first = back


def rejoin(pieces: Iterable[tuple[int, str]]) -> str:
    """The text that ``chunk_text`` cut into ``pieces`` ((start, text) each, in any order, overlapping or not), each
    put back at its offset, with a space wherever no piece covers the text (the whitespace between two chunks).
    What a document holds once its source is gone; cut again, its chunks' offsets still point into the original."""
    out: list[str] = []
    size = 0
    for start, piece in sorted(pieces):
        if start > size:
            out.append(" " * (start - size))
            size = start
        if start + len(piece) > size:
            out.append(piece[size - start:])
            size = start + len(piece)
    return "".join(out)


# -- documents ------------------------------------------------------------------------------------------


class _HTMLText(HTMLParser):
    SKIP = {"script", "style", "noscript", "template"}
    BLOCK = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "section", "article", "pre"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def html_text(raw: str) -> str:
    parser = _HTMLText()
    parser.feed(raw)
    parser.close()
    return re.sub(r"\n\s*\n+", "\n\n", "".join(parser.parts)).strip()


def json_texts(obj: Any, fields: tuple[str, ...]) -> str:
    if isinstance(obj, dict):
        return "\n\n".join(str(obj[f]) for f in fields if isinstance(obj.get(f), str) and obj[f].strip())
    if isinstance(obj, list):
        return "\n\n".join(t for t in (json_texts(x, fields) for x in obj) if t)
    return obj if isinstance(obj, str) else ""


class UnsupportedDocument(CorpusError):
    """A file whose type collections do not read (an image, an archive, a binary)."""



def extract_text(filename: str, raw: bytes, fields: tuple[str, ...] = TEXT_FIELDS) -> str:
    """The text of one stored file, chosen by its name: PDF pages, HTML's visible text, the text fields of
    JSON (and of each JSONL line), or the bytes as UTF-8.  Binary content under a text name is refused."""
    suffix = os.path.splitext(filename.lower())[1]
    if suffix == ".pdf" or raw.startswith(b"%PDF-"):
        try:
            from pypdf import PdfReader
            from pypdf.errors import PyPdfError
        except ImportError as exc:
            raise CorpusError(f"{filename}: reading PDF needs pypdf (pip install pypdf)") from exc
        import io

        try:
            reader = PdfReader(io.BytesIO(raw))
            return "\n\n".join((page.extract_text() or "") for page in reader.pages)
        except (PyPdfError, ValueError, KeyError, TypeError) as exc:
            raise CorpusError(f"{filename}: not a readable PDF ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if b"\x00" in raw[:8192]:
        raise UnsupportedDocument(f"{filename}: binary content; collections read PDF, HTML, Markdown, JSON and text")
    text = raw.decode("utf-8", errors="replace")
    if suffix in (".html", ".htm", ".xhtml"):
        return html_text(text)
    if suffix == ".jsonl":
        parts = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    parts.append(json_texts(json.loads(line), fields))
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"{filename} line {number}: not valid JSON ({exc.msg})") from exc
        return "\n\n".join(p for p in parts if p)
    if suffix == ".json":
        try:
            return json_texts(json.loads(text), fields)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{filename}: not valid JSON ({exc.msg})") from exc
    return text

