"""A real cross-encoder for the rerank row of bench/collections_quality.py, fine-tuned on this machine (#37 item 5).

    .venv/bin/pip install torch==2.13.0      # the CPU build: pyproject's `train` extra, not in `make install`
    env -u REDIS_URL .venv/bin/python -m bench.cross_encoder_train [--out bench/.cache/cross-encoder.gguf]
        [--pages 2000] [--steps 240] [--batch 4] [--negatives 5] [--threads 2]

No cross-encoder's weights can be had offline (bench/README.md names the packages looked at).  The random-weight
one (harness/cross_encoder.py) checks the rerank path, but says nothing of what a rerank does for quality.  So
this script trains one, the way sentence-transformers' ``CrossEncoder`` recipe does, small enough for a 2-core VM:

- **Start**: the default embedding model's network (all-MiniLM-L6-v2, read from its GGUF in the model store) and
  a new classifier head: ``cls`` (dense + tanh, BERT's pooler) and ``cls.output`` (one score).
- **Data**: known-item pairs from the manual pages of sections 3, 5 and 7.  These are disjoint from the quality
  bench's sections 1 and 8, so no query or page the bench scores is trained on.  The query is a page's NAME
  summary and the positive is one of the first two windows of its body (``--window`` words).  The negatives are
  windows of other pages: most are the ones sharing the most IDF-weighted words with the query, as a keyword
  search would rank them, and one is random.
- **Pairs** are tokenized by the worker's own code (workers/rerank.py :func:`~workers.rerank.pairs`: [CLS] query
  [SEP] document [SEP], all token types zero, as llama.cpp feeds them), from the untrained network's GGUF loaded
  with rank pooling.  So training sees exactly the tokens a rerank request gives the model.
- **Loss**: each query's group (one positive, ``--negatives`` negatives) as a softmax over its scores, with
  cross-entropy on the positive.  AdamW, a higher rate for the new head, linear warm-up and decay.
- **Network**: llama.cpp's BERT graph with rank pooling (tests/rerank_reference.py writes it out), in torch:
  post-norm layers, tanh GELU, the first token's row into the head.
- **Output**: a GGUF with the base's vocabulary and tokenizer metadata, the trained weights (the base's tensor
  types) and ``pooling_type`` RANK.  It is then loaded by llama-cpp-python with rank pooling, and its scores are
  compared with torch's on held-out pairs: if they differ, the file is not the network that was trained.  The
  held-out MRR@10 (one positive among 20 windows, the 19 hardest negatives) is printed before and after training,
  beside the keyword overlap's own MRR on the same groups.

Measured 2026-12-07 on this project's 2-core VM (AMD EPYC, Zen 4, AVX-512 with BF16), defaults: 1,088 pages of
1,558 files (938 to train on, 150 held out; rendered in 49 s), 3,285 windows; 240 steps of 4 x 6 pairs in 719 s
(3.0 s a step), about one pass over the training queries.  Held-out MRR@10: keyword overlap 0.607, untrained
0.111, trained 0.679.  llama.cpp and torch agreed to 0.0017 on scores from -4.26 to 3.28.  What it does for
retrieval is bench/collections_quality.py's rerank row (bench/README.md, 2026-12-07).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.collections_quality import CACHE, known_item, page_name, render
from bench.common import model_path

SECTIONS = ("man3", "man5", "man7")  # never the quality bench's man1 and man8
WORD = re.compile(r"[a-z0-9_]{2,}")
HELD_OUT = 150  # pages whose queries are never trained on: the before/after MRR
GROUP = 20  # windows per held-out query (1 positive, the 19 hardest negatives)
HEAD = ("cls.weight", "cls.bias", "cls.output.weight", "cls.output.bias")


@dataclass(frozen=True)
class TrainPage:
    page: str
    query: str
    windows: list[str]


# -- the pairs ---------------------------------------------------------------------------------------------------


def training_pages(limit: int, seed: int, window: int) -> list[TrainPage]:
    """Up to ``limit`` pages of :data:`SECTIONS`, rendered and split as the quality bench does (cached)."""
    files = sorted({p.resolve(): p for d in SECTIONS for p in (Path("/usr/share/man") / d).glob("*")
                    if p.is_file() and not p.is_symlink()}.values())
    cached = CACHE / f"cross-encoder-pages-{limit}-{seed}-{len(files)}.json"
    if cached.exists():
        rows = json.loads(cached.read_text())
    else:
        random.Random(seed).shuffle(files)
        rows, seen = [], set()
        started = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            for path, text in zip(files, pool.map(render, files)):
                parsed = known_item(text, seen)
                if parsed is None:
                    continue
                summary, body = parsed
                rows.append({"page": page_name(path), "query": summary, "body": body})
                if len(rows) == limit:
                    break
        print(f"rendered {len(rows)} pages of {len(files)} files in {time.perf_counter() - started:.0f} s", flush=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(rows))
    pages = []
    for row in rows:
        words = row["body"].split()
        cut = [" ".join(words[i : i + window]) for i in range(0, len(words), window)][:4]
        pages.append(TrainPage(row["page"], row["query"], cut))
    return pages


class KeywordIndex:
    """The windows of all pages, each scored against a query by the IDF of the words they share: the hard
    negatives a keyword leg would put above the right page."""

    def __init__(self, pages: list[TrainPage]) -> None:
        self.windows: list[tuple[int, str]] = [(p, w) for p, page in enumerate(pages) for w in page.windows]
        self.postings: dict[str, list[int]] = defaultdict(list)
        for i, (_, text) in enumerate(self.windows):
            for term in set(WORD.findall(text.lower())):
                self.postings[term].append(i)
        n = len(self.windows)
        self.idf = {t: math.log(1 + (n - len(ids) + 0.5) / (len(ids) + 0.5)) for t, ids in self.postings.items()}

    def ranked(self, query: str, exclude_page: int, k: int) -> list[int]:
        scores: Counter[int] = Counter()
        for term in set(WORD.findall(query.lower())):
            for i in self.postings.get(term, ()):
                scores[i] += self.idf[term]  # type: ignore[assignment]
        return [i for i, _ in scores.most_common(k + 8) if self.windows[i][0] != exclude_page][:k]


# -- the network -----------------------------------------------------------------------------------------------


def read_base(path: Path) -> tuple[Any, dict[str, np.ndarray], dict[str, int], dict[str, float]]:
    """(reader, float32 tensors, integer hyper-parameters, eps) of a BERT GGUF."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    if arch != "bert":
        raise SystemExit(f"{path}: a {arch} model, not BERT")
    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
    quantized = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in plain})
    if quantized:
        raise SystemExit(f"{path}: {', '.join(quantized)} tensors; training starts from F32 or F16 weights")
    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}

    def field(key: str) -> Any:
        return reader.fields[f"bert.{key}"].contents()

    shape = {"n_embd": int(field("embedding_length")), "n_head": int(field("attention.head_count")),
             "n_layer": int(field("block_count"))}
    return reader, tensors, shape, {"eps": float(field("attention.layer_norm_epsilon"))}


class CrossEncoder:
    """llama.cpp's BERT graph with rank pooling, as torch parameters named like the GGUF's tensors."""

    def __init__(self, tensors: dict[str, np.ndarray], n_head: int, n_layer: int, eps: float) -> None:
        import torch

        self.torch = torch
        self.params = {name: torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(v))) for name, v in tensors.items()}
        self.n_head, self.n_layer, self.eps = n_head, n_layer, eps

    def __call__(self, ids: Any, lengths: Any) -> Any:
        torch, F, p = self.torch, self.torch.nn.functional, self.params
        batch, width = ids.shape
        d = p["token_embd.weight"].shape[1]
        mask = torch.arange(width)[None, :] < lengths[:, None]

        def norm(x: Any, name: str) -> Any:
            return F.layer_norm(x, (d,), p[f"{name}.weight"], p[f"{name}.bias"], self.eps)

        def linear(x: Any, name: str) -> Any:
            return F.linear(x, p[f"{name}.weight"], p[f"{name}.bias"])

        x = p["token_embd.weight"][ids] + p["token_types.weight"][0] + p["position_embd.weight"][:width]
        x = norm(x, "token_embd_norm")
        heads = lambda t: t.view(batch, width, self.n_head, d // self.n_head).transpose(1, 2)  # noqa: E731
        for i in range(self.n_layer):
            q, k, v = (heads(linear(x, f"blk.{i}.attn_{n}")) for n in ("q", "k", "v"))
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
            x = norm(x + linear(att.transpose(1, 2).reshape(batch, width, d), f"blk.{i}.attn_output"),
                     f"blk.{i}.attn_output_norm")
            up = F.gelu(linear(x, f"blk.{i}.ffn_up"), approximate="tanh")
            x = norm(x + linear(up, f"blk.{i}.ffn_down"), f"blk.{i}.layer_output_norm")
        return linear(torch.tanh(linear(x[:, 0], "cls")), "cls.output")[:, 0]

    def scores(self, token_lists: list[list[int]], chunk: int = 32) -> list[float]:
        torch = self.torch
        out: list[float] = []
        with torch.no_grad():
            for i in range(0, len(token_lists), chunk):
                out.extend(self(*batch_of(token_lists[i : i + chunk])).tolist())
        return out


def batch_of(token_lists: list[list[int]]) -> tuple[Any, Any]:
    import torch

    width = max(len(t) for t in token_lists)
    ids = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids, torch.tensor([len(t) for t in token_lists])


def new_head(n_embd: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "cls.weight": rng.normal(0, 0.02, (n_embd, n_embd)).astype(np.float32),
        "cls.bias": np.zeros(n_embd, np.float32),
        "cls.output.weight": rng.normal(0, 0.02, (1, n_embd)).astype(np.float32),
        "cls.output.bias": np.zeros(1, np.float32),
    }


def write_gguf(target: Path, reader: Any, tensors: dict[str, np.ndarray]) -> Path:
    """The base GGUF's metadata (vocabulary, tokenizer, hyper-parameters) with rank pooling, and ``tensors`` in
    the base's tensor types (f16 stays f16; the new head is f32)."""
    import gguf

    types = {t.name: t.tensor_type for t in reader.tensors}
    writer = gguf.GGUFWriter(target, arch="bert")
    skip = {"general.architecture", "general.name", "bert.pooling_type", "general.file_type"}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in skip:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)
    writer.add_name("corral-bench-cross-encoder (all-MiniLM-L6-v2 fine-tuned on manual pages 3, 5, 7)")
    writer.add_pooling_type(gguf.PoolingType.RANK)
    f16 = any(t == gguf.GGMLQuantizationType.F16 for t in types.values())
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    for name, value in tensors.items():
        kind = types.get(name, gguf.GGMLQuantizationType.F32)
        writer.add_tensor(name, value.astype(np.float16) if kind == gguf.GGMLQuantizationType.F16 else value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def load_ranker(path: Path, n_ctx: int, threads: int) -> Any:
    from workers.engine import LoadedModel, LoadSpec

    return LoadedModel(LoadSpec(path=path, embedding=True, n_ctx=n_ctx, n_gpu_layers=0, n_threads=threads,
                                pooling_rank=True))


# -- training ----------------------------------------------------------------------------------------------------


def mrr(groups: list[list[float]]) -> float:
    """MRR@10 of the first entry (the positive) in each group of scores."""
    total = 0.0
    for scores in groups:
        rank = 1 + sum(s > scores[0] for s in scores[1:])
        total += 1 / rank if rank <= 10 else 0.0
    return total / len(groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=CACHE / "cross-encoder.gguf")
    parser.add_argument("--pages", type=int, default=2000, help="pages drawn from sections 3, 5 and 7")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--batch", type=int, default=4, help="queries per step")
    parser.add_argument("--negatives", type=int, default=5, help="per query: all but one hard, one random")
    parser.add_argument("--window", type=int, default=120, help="words per document window")
    parser.add_argument("--seq", type=int, default=256, help="tokens per pair at most (the document is cut)")
    parser.add_argument("--lr", type=float, default=5e-5, help="the body's rate (the new head's: 20 x)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()

    import torch

    from workers.rerank import pairs

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    home = Path(tempfile.mkdtemp(prefix="corral-cross-encoder-"))
    base = model_path(home, "all-minilm:l6-v2")
    reader, tensors, shape, eps = read_base(base)
    tensors.update(new_head(shape["n_embd"], args.seed))
    untrained = write_gguf(home / "untrained.gguf", reader, tensors)
    tokenizer = load_ranker(untrained, args.seq, args.threads)

    pages = training_pages(args.pages, args.seed, args.window)
    index = KeywordIndex(pages)
    order = list(range(len(pages)))
    rng.shuffle(order)
    held, train = order[:HELD_OUT], order[HELD_OUT:]
    print(f"{len(pages)} pages ({len(train)} to train on, {len(held)} held out), {len(index.windows)} windows",
          flush=True)

    def group(p: int, hard: int, random_extra: int, *, first: bool = False) -> list[str]:
        """The query's positive (its page's first window, or either of its first two), then its negatives."""
        page = pages[p]
        positive = page.windows[0] if first else rng.choice(page.windows[:2])
        negatives = [index.windows[i][1] for i in index.ranked(page.query, p, hard)]
        while len(negatives) < hard + random_extra:
            other, text = index.windows[rng.randrange(len(index.windows))]
            if other != p:
                negatives.append(text)
        return [positive, *negatives]

    held_groups = [(pages[p].query, group(p, GROUP - 1, 0, first=True)) for p in held]
    held_tokens = [pairs(tokenizer, q, docs, truncate=True) for q, docs in held_groups]
    keyword = [[sum(index.idf.get(t, 0.0) for t in set(WORD.findall(q.lower())) & set(WORD.findall(d.lower())))
                for d in docs] for q, docs in held_groups]
    model = CrossEncoder(tensors, shape["n_head"], shape["n_layer"], eps["eps"])
    before = mrr([model.scores(t) for t in held_tokens])

    head = [model.params[n] for n in HEAD]
    body = [v for n, v in model.params.items() if n not in HEAD]
    optimizer = torch.optim.AdamW([{"params": body, "lr": args.lr}, {"params": head, "lr": args.lr * 20}],
                                  weight_decay=0.01)
    warm = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (args.steps - s) / (args.steps - warm))))
    started, losses = time.perf_counter(), []
    size = 1 + args.negatives
    for step in range(args.steps):
        chosen = [train[(step * args.batch + j) % len(train)] for j in range(args.batch)]
        token_lists = [t for p in chosen for t in pairs(tokenizer, pages[p].query, group(p, args.negatives - 1, 1),
                                                         truncate=True)]
        scores = model(*batch_of(token_lists)).view(args.batch, size)
        loss = torch.nn.functional.cross_entropy(scores, torch.zeros(args.batch, dtype=torch.long))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.params.values(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 20 == 0:
            print(f"  step {step + 1}/{args.steps}: loss {np.mean(losses[-20:]):.3f}, "
                  f"{(time.perf_counter() - started) / (step + 1):.1f} s/step", flush=True)
    train_s = time.perf_counter() - started
    trained = {n: v.detach().numpy() for n, v in model.params.items()}
    after = mrr([model.scores(t) for t in held_tokens])

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(args.out, reader, trained)
    tokenizer.close()
    ranker = load_ranker(args.out, 512, args.threads)
    from workers.rerank import score_pairs

    check = held_tokens[0][:10]
    ours, theirs = CrossEncoder(trained, shape["n_head"], shape["n_layer"], eps["eps"]).scores(check), score_pairs(ranker, check)
    ranker.close()
    drift = max(abs(a - b) for a, b in zip(ours, theirs))
    print(f"\nwrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) after {args.steps} steps "
          f"of {args.batch} x {size} pairs in {train_s:.0f} s")
    print(f"held-out MRR@10 over {len(held)} queries, 1 positive in {GROUP} windows: keyword overlap "
          f"{mrr(keyword):.3f}, untrained {before:.3f}, trained {after:.3f}")
    print(f"llama.cpp against torch on 10 held-out pairs: largest score difference {drift:.4f} "
          f"(scores {min(theirs):.2f}..{max(theirs):.2f})")
    if drift > 0.05 * max(1.0, max(abs(s) for s in theirs)):
        raise SystemExit("llama.cpp's scores are not the trained network's: the GGUF is wrong")


if __name__ == "__main__":
    main()
