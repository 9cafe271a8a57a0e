"""OpenAI's Vector Stores request bodies, and the plain values the collection service takes from them.

The models follow ``openai/openai-python``'s spec copy field by field (reference ``collections.md`` §1): the bodies
OpenAI marks ``additionalProperties: false`` forbid unknown fields, so a misspelt option is a 400 naming it instead
of a silently ignored one.  corral's extensions are spelt out where they are: ``model`` on create (the embedding
model; OpenAI has one), ``ranking_options.hybrid_search`` on search (OpenAI has it only in the ``file_search``
tool), a rerank model's name as ``ranking_options.ranker``, and the ``sync``/``reembed`` bodies of the CLI.

Filters are checked by hand (:func:`check_filter`) rather than by pydantic's union of two recursive models: a
union's complaint names the branch it tried last, and a client needs to hear which filter lacks its ``key`` or has
a value of the wrong type (``filters.filters[1].value``).  The service never imports pydantic: the views hand it
:class:`Chunking`, :class:`FileSpec`, :class:`SyncDocument` and plain dicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from corral.errors import BadRequest

MAX_STORE_FILE_IDS = 500
MAX_BATCH_FILES = 2000
MAX_SYNC_DOCUMENTS = 100_000
MAX_PAIRS = 16  # metadata pairs and attribute keys
MAX_KEY_CHARS = 64
MAX_VALUE_CHARS = 512
MAX_QUERIES = 10  # strings in one search's query list: each is embedded and searched (OpenAI states no bound)
MAX_QUERY_CHARS = 64 * 1024
MAX_FILTER_DEPTH = 8
MAX_FILTER_NODES = 256
AUTO_CHUNKING = (800, 400)  # OpenAI's "auto": 800 tokens a chunk, 400 shared with the previous one
OPENAI_RANKERS = ("none", "auto", "default-2024-11-15")  # OpenAI's own rankers: fused scores, no rerank model
COMPARISONS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "nin")
COMPOUNDS = ("and", "or")


# -- what the service takes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunking:
    """A resolved chunking strategy: at most ``max_tokens`` per chunk, ``overlap`` shared with the previous one."""

    max_tokens: int
    overlap: int


@dataclass(frozen=True)
class FileSpec:
    """One File to add to a store, with its own attributes and chunking (None: the store's or the batch's)."""

    file_id: str
    attributes: dict[str, Any] | None = None
    chunking: Chunking | None = None


@dataclass(frozen=True)
class SyncDocument:
    """One document of a CLI sync: its stable source id and content hash, and the uploaded File when it changed."""

    source_id: str
    sha256: str
    file_id: str | None = None
    attributes: dict[str, Any] | None = None


# -- shared pieces -----------------------------------------------------------------------------------------

_Forbid = ConfigDict(extra="forbid")
Scalar = str | bool | int | float  # bool first: pydantic's smart union keeps True a bool and 5 an int


def _check_pairs(value: dict[str, Any] | None, what: str, *, strings_only: bool) -> dict[str, Any] | None:
    """OpenAI's bounds on ``metadata`` (string values) and ``attributes`` (string, number or bool values)."""
    if value is None:
        return None
    if len(value) > MAX_PAIRS:
        raise ValueError(f"{what} may have at most {MAX_PAIRS} keys, got {len(value)}")
    for key, item in value.items():
        if len(key) > MAX_KEY_CHARS:
            raise ValueError(f"{what} keys may be at most {MAX_KEY_CHARS} characters: {key[:80]!r}")
        if strings_only and not isinstance(item, str):
            raise ValueError(f"{what} values must be strings: {key!r}")
        if isinstance(item, str) and len(item) > MAX_VALUE_CHARS:
            raise ValueError(f"{what} string values may be at most {MAX_VALUE_CHARS} characters: {key!r}")
    return value


class StaticChunkingParams(BaseModel):
    model_config = _Forbid

    max_chunk_size_tokens: int = Field(ge=100, le=4096)
    chunk_overlap_tokens: int = Field(ge=0)

    @model_validator(mode="after")
    def _half(self) -> StaticChunkingParams:
        if self.chunk_overlap_tokens > self.max_chunk_size_tokens // 2:
            raise ValueError("chunk_overlap_tokens must not exceed half of max_chunk_size_tokens")
        return self


class ChunkingStrategy(BaseModel):
    """``{"type": "auto"}`` (800 tokens, 400 overlap) or ``{"type": "static", "static": {...}}``, counted in the
    store's embedding model's own tokens.  One model rather than a tagged union, so an error names
    ``chunking_strategy.static.max_chunk_size_tokens`` and not the union's branch."""

    model_config = _Forbid

    type: Literal["auto", "static"]
    static: StaticChunkingParams | None = None

    @model_validator(mode="after")
    def _shape(self) -> ChunkingStrategy:
        if self.type == "static" and self.static is None:
            raise ValueError("a static chunking_strategy needs 'static': {max_chunk_size_tokens, chunk_overlap_tokens}")
        if self.type == "auto" and self.static is not None:
            raise ValueError("an auto chunking_strategy takes no 'static'")
        return self

    def resolved(self) -> Chunking | None:
        """The service's value: None for ``auto`` (it applies its default), the bounds for ``static``."""
        if self.static is None:
            return None
        return Chunking(self.static.max_chunk_size_tokens, self.static.chunk_overlap_tokens)


def chunking_of(strategy: ChunkingStrategy | None) -> Chunking | None:
    return strategy.resolved() if strategy is not None else None


class ExpiresAfter(BaseModel):
    model_config = _Forbid

    anchor: Literal["last_active_at"]
    days: int = Field(ge=1, le=365)


class _WithMetadata(BaseModel):
    metadata: dict[str, str] | None = Field(
        None, description=f"At most {MAX_PAIRS} pairs; keys up to {MAX_KEY_CHARS} characters, string values up to "
                          f"{MAX_VALUE_CHARS}.")

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        _check_pairs(value, "metadata", strings_only=True)
        return value


class _WithAttributes(BaseModel):
    attributes: dict[str, Scalar] | None = Field(
        None, description=f"At most {MAX_PAIRS} keys up to {MAX_KEY_CHARS} characters; values strings (up to "
                          f"{MAX_VALUE_CHARS} characters), numbers or booleans.  Search filters test these.")

    @field_validator("attributes")
    @classmethod
    def _attributes(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _check_pairs(value, "attributes", strings_only=False)


# -- stores ------------------------------------------------------------------------------------------------


class CreateStoreRequest(_WithMetadata):
    """``POST /v1/vector_stores``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "handbook"}]})

    name: str | None = Field(None, max_length=256)
    description: str | None = Field(None, max_length=512)
    file_ids: list[str] | None = Field(None, max_length=MAX_STORE_FILE_IDS)
    expires_after: ExpiresAfter | None = None
    chunking_strategy: ChunkingStrategy | None = None
    model: str | None = Field(
        None, min_length=1,
        description="corral's extension: the embedding model (default: the server's default embedding model).")


class UpdateStoreRequest(_WithMetadata):
    """``POST /v1/vector_stores/{vs}``: each field nullable; an absent field is left as it is."""

    model_config = _Forbid

    name: str | None = Field(None, max_length=256)
    expires_after: ExpiresAfter | None = None

    def changes(self) -> dict[str, Any]:
        """The fields the body names (None included: it clears them), as the service takes them."""
        return {name: (getattr(self, name).model_dump() if isinstance(getattr(self, name), BaseModel)
                       else getattr(self, name))
                for name in ("name", "expires_after", "metadata") if name in self.model_fields_set}


# -- files and batches -------------------------------------------------------------------------------------


class CreateFileRequest(_WithAttributes):
    """``POST /v1/vector_stores/{vs}/files`` (and each item of a batch's ``files``)."""

    model_config = _Forbid

    file_id: str = Field(min_length=1)
    chunking_strategy: ChunkingStrategy | None = None

    def spec(self) -> FileSpec:
        return FileSpec(self.file_id, self.attributes, chunking_of(self.chunking_strategy))


class UpdateFileRequest(BaseModel):
    """``POST /v1/vector_stores/{vs}/files/{file_id}``: the whole attribute map (null clears it)."""

    model_config = _Forbid

    attributes: dict[str, Scalar] | None

    @field_validator("attributes")
    @classmethod
    def _attributes(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _check_pairs(value, "attributes", strings_only=False)


class CreateFileBatchRequest(_WithAttributes):
    """``POST /v1/vector_stores/{vs}/file_batches``: ``file_ids`` (sharing the batch's attributes and chunking) or
    ``files`` (each with its own; the batch-level ones are then ignored, as OpenAI documents)."""

    model_config = _Forbid

    file_ids: list[str] | None = Field(None, min_length=1, max_length=MAX_BATCH_FILES)
    files: list[CreateFileRequest] | None = Field(None, min_length=1, max_length=MAX_BATCH_FILES)
    chunking_strategy: ChunkingStrategy | None = None

    @model_validator(mode="after")
    def _one_of(self) -> CreateFileBatchRequest:
        if (self.file_ids is None) == (self.files is None):
            raise BadRequest("give exactly one of 'file_ids' and 'files'", param="file_ids")
        return self

    def specs(self) -> list[FileSpec]:
        if self.files is not None:
            return [item.spec() for item in self.files]
        chunking = chunking_of(self.chunking_strategy)
        return [FileSpec(file_id, self.attributes, chunking) for file_id in self.file_ids or []]


# -- search ------------------------------------------------------------------------------------------------


class ComparisonFilter(BaseModel):
    """Compare one attribute: ``gt``/``gte``/``lt``/``lte`` take a number, ``in``/``nin`` a list, ``eq``/``ne`` a
    string, number or bool."""

    model_config = _Forbid

    key: str
    type: Literal["eq", "ne", "gt", "gte", "lt", "lte", "in", "nin"] = "eq"
    value: str | bool | int | float | list[str | int | float]


class CompoundFilter(BaseModel):
    """All (``and``) or any (``or``) of its filters, which may nest."""

    model_config = _Forbid

    type: Literal["and", "or"]
    filters: list[ComparisonFilter | CompoundFilter] = Field(min_length=1)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_filter(node: Any, param: str = "filters", depth: int = 0, seen: list[int] | None = None) -> dict[str, Any]:
    """A filter tree, checked node by node, as a plain dict (comparison ``type`` defaults to ``eq``); a bad node is a
    400 whose ``param`` is its path (``filters.filters[0].value``)."""
    seen = seen if seen is not None else [0]
    seen[0] += 1
    if depth > MAX_FILTER_DEPTH or seen[0] > MAX_FILTER_NODES:
        raise BadRequest(f"filters may nest {MAX_FILTER_DEPTH} deep with {MAX_FILTER_NODES} filters at most",
                         param=param)
    if not isinstance(node, dict):
        raise BadRequest(f"invalid value for '{param}': a filter must be an object", param=param)
    kind = node.get("type", "eq")
    if kind in COMPOUNDS:
        if set(node) - {"type", "filters"}:
            raise BadRequest(f"unknown fields in '{param}': {sorted(set(node) - {'type', 'filters'})}", param=param)
        children = node.get("filters")
        if not isinstance(children, list) or not children:
            raise BadRequest(f"'{param}.filters' must be a non-empty list of filters", param=f"{param}.filters")
        return {"type": kind, "filters": [check_filter(child, f"{param}.filters[{i}]", depth + 1, seen)
                                          for i, child in enumerate(children)]}
    if kind not in COMPARISONS:
        raise BadRequest(f"invalid filter type '{kind}' in '{param}': one of {[*COMPARISONS, *COMPOUNDS]}",
                         param=f"{param}.type")
    if set(node) - {"type", "key", "value"}:
        raise BadRequest(f"unknown fields in '{param}': {sorted(set(node) - {'type', 'key', 'value'})}", param=param)
    key = node.get("key")
    if not isinstance(key, str) or not key:
        raise BadRequest(f"'{param}.key' is required: the attribute to compare", param=f"{param}.key")
    if "value" not in node:
        raise BadRequest(f"'{param}.value' is required", param=f"{param}.value")
    value = node["value"]
    where = f"{param}.value"
    if kind in ("gt", "gte", "lt", "lte"):
        if not _is_number(value):
            raise BadRequest(f"'{where}' must be a number for '{kind}'", param=where)
    elif kind in ("in", "nin"):
        if not isinstance(value, list) or not all(isinstance(v, str) or _is_number(v) for v in value):
            raise BadRequest(f"'{where}' must be a list of strings or numbers for '{kind}'", param=where)
    elif not (isinstance(value, (str, bool)) or _is_number(value)):
        raise BadRequest(f"'{where}' must be a string, number or boolean for '{kind}'", param=where)
    return {"key": key, "type": kind, "value": value}


class HybridSearch(BaseModel):
    """corral's extension (OpenAI has it only in the ``file_search`` tool): each leg's weight in the fusion; a weight
    of 0 turns a leg off (0 for embeddings: keyword search only)."""

    model_config = _Forbid

    embedding_weight: float = Field(1.0, ge=0)
    text_weight: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _one_leg(self) -> HybridSearch:
        if self.embedding_weight == 0 and self.text_weight == 0:
            raise ValueError("embedding_weight and text_weight cannot both be 0")
        return self


class RankingOptions(BaseModel):
    model_config = _Forbid

    ranker: str = Field(
        "auto", min_length=1,
        description="none, auto or default-2024-11-15 (the fused score), or the name of a rerank model (corral's "
                    "extension): the top candidates are rescored by it and the score is sigmoid(logit).")
    score_threshold: float = Field(0.0, ge=0, le=1)
    hybrid_search: HybridSearch | None = None

    @property
    def rerank_model(self) -> str | None:
        return None if self.ranker in OPENAI_RANKERS else self.ranker


class SearchRequest(BaseModel):
    """``POST /v1/vector_stores/{vs}/search``.  ``rewrite_query`` is accepted and ignored: the query is searched as
    written."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"query": "return policy"}]})

    query: str | list[str]
    filters: ComparisonFilter | CompoundFilter | None = None
    max_num_results: int = Field(10, ge=1, le=50)
    ranking_options: RankingOptions | None = None
    rewrite_query: bool = False

    @field_validator("filters", mode="before")
    @classmethod
    def _filters(cls, value: Any) -> Any:
        return None if value is None else check_filter(value)

    @field_validator("query")
    @classmethod
    def _query(cls, value: str | list[str]) -> str | list[str]:
        queries = [value] if isinstance(value, str) else value
        if not queries:
            raise ValueError("query must be a string or a non-empty list of strings")
        if len(queries) > MAX_QUERIES:
            raise ValueError(f"query may list at most {MAX_QUERIES} strings")
        if any(not q.strip() for q in queries):
            raise ValueError("a query must not be empty")
        if any(len(q) > MAX_QUERY_CHARS for q in queries):
            raise ValueError(f"a query may be at most {MAX_QUERY_CHARS} characters")
        return value

    def queries(self) -> list[str]:
        return [self.query] if isinstance(self.query, str) else list(self.query)

    def filter_dict(self) -> dict[str, Any] | None:
        return None if self.filters is None else self.filters.model_dump()

    def options(self) -> RankingOptions:
        return self.ranking_options or RankingOptions()

    def weights(self) -> tuple[float, float]:
        """(embedding_weight, text_weight): both 1.0 unless ``ranking_options.hybrid_search`` says otherwise."""
        hybrid = self.options().hybrid_search or HybridSearch()
        return hybrid.embedding_weight, hybrid.text_weight


# -- corral's own: sync and reembed ------------------------------------------------------------------------


class SyncItem(_WithAttributes):
    model_config = _Forbid

    source_id: str = Field(min_length=1, max_length=1024, description="Stable identity: the path under the synced root.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="The content hash (lower-case hex).")
    file_id: str | None = Field(None, description="The uploaded File, for a new or changed document.")

    def document(self) -> SyncDocument:
        return SyncDocument(self.source_id, self.sha256, self.file_id, self.attributes)


class SyncRequest(BaseModel):
    """``POST /v1/vector_stores/{vs}/sync`` (corral's extension, what ``corral collection sync`` sends): the whole
    source as (source id, hash) pairs; ``full`` also deletes documents absent from the list, ``incremental`` never
    deletes."""

    model_config = _Forbid

    mode: Literal["incremental", "full"] = "incremental"
    documents: list[SyncItem] = Field(max_length=MAX_SYNC_DOCUMENTS)

    def sync_documents(self) -> list[SyncDocument]:
        return [item.document() for item in self.documents]


class ReembedRequest(BaseModel):
    """``POST /v1/vector_stores/{vs}/reembed`` (corral's extension): build the vectors of ``model`` beside the old
    ones, then switch."""

    model_config = _Forbid

    model: str = Field(min_length=1)


# -- replies, for the OpenAPI document (the views build dicts in these shapes) ----------------------------


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class FileCounts(_Open):
    in_progress: int
    completed: int
    failed: int
    cancelled: int
    total: int


class VectorStore(_Open):
    id: str
    object: Literal["vector_store"]
    created_at: int
    name: str
    usage_bytes: int
    file_counts: FileCounts
    status: Literal["expired", "in_progress", "completed"]
    last_active_at: int | None
    metadata: dict[str, str] | None
    expires_after: dict[str, Any] | None = None
    expires_at: int | None = None


class VectorStoreList(_Open):
    object: Literal["list"]
    data: list[VectorStore]
    first_id: str | None
    last_id: str | None
    has_more: bool


class Deleted(_Open):
    id: str
    object: Literal["vector_store.deleted", "vector_store.file.deleted"]
    deleted: bool


class LastError(_Open):
    code: Literal["server_error", "unsupported_file", "invalid_file"]
    message: str


class VectorStoreFile(_Open):
    id: str
    object: Literal["vector_store.file"]
    created_at: int
    usage_bytes: int
    vector_store_id: str
    status: Literal["in_progress", "completed", "cancelled", "failed"]
    last_error: LastError | None
    attributes: dict[str, Any] | None = None
    chunking_strategy: dict[str, Any] | None = None


class VectorStoreFileList(_Open):
    object: Literal["list"]
    data: list[VectorStoreFile]
    first_id: str | None
    last_id: str | None
    has_more: bool


class TextPart(_Open):
    type: Literal["text"]
    text: str


class FileContentPage(_Open):
    object: Literal["vector_store.file_content.page"]
    data: list[TextPart]
    has_more: bool
    next_page: str | None


class FileBatch(_Open):
    id: str
    object: Literal["vector_store.files_batch"]
    created_at: int
    vector_store_id: str
    status: Literal["in_progress", "completed", "cancelled", "failed"]
    file_counts: FileCounts


class SearchHit(_Open):
    file_id: str | None
    filename: str
    score: float
    attributes: dict[str, Any] | None
    content: list[TextPart]


class SearchResultsPage(_Open):
    object: Literal["vector_store.search_results.page"]
    search_query: list[str]
    data: list[SearchHit]
    has_more: bool
    next_page: str | None


class SyncReport(_Open):
    """What a sync did (the service's report; its fields are the CLI's)."""

    object: Literal["vector_store.sync"]
    vector_store_id: str
    mode: Literal["incremental", "full"]
    status: str
    job_id: str | None
    needed: list[str]


class ReembedReport(_Open):
    """A re-embed under way (``job_id``), or done at once for a store with nothing embedded (``job_id`` null)."""

    object: Literal["vector_store.reembed"]
    vector_store_id: str
    model: str
    job_id: str | None
