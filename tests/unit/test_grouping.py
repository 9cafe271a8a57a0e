"""Prefix grouping at submission (jobs/grouping.py): which prompts share chunks, and that nothing else moves."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func

from jobs.grouping import grouped, prompt_key, window_size


def test_prompts_that_share_a_prefix_become_neighbours_in_input_order() -> None:
    rubric_a, rubric_b = "Grade this essay for clarity. " * 20, "Translate into French. " * 20
    window = [(n, f"id-{n}", {"prompt": (rubric_a if n % 2 else rubric_b) + f"input {n}"}) for n in range(6)]
    order = [seq for seq, _, _ in grouped("generate", window)]
    assert order == [1, 3, 5, 0, 2, 4]  # each rubric's prompts together, each group still in input order


def test_the_system_prompt_and_chat_history_lead_the_key() -> None:
    terse, verbose = {"system": "Be terse.", "prompt": "Hi"}, {"system": "Be verbose.", "prompt": "A"}
    assert prompt_key("generate", terse) < prompt_key("generate", verbose)
    first = prompt_key("chat", {"messages": [{"role": "system", "content": "Rubric"}, {"role": "user", "content": "b"}]})
    second = prompt_key("chat", {"messages": [{"role": "system", "content": "Rubric"}, {"role": "user", "content": "a"}]})
    assert first.startswith(second[:-1]) and second < first


def test_embedding_inputs_keep_their_order() -> None:
    window = [(n, None, {"input": text}) for n, text in enumerate(["b", "a", "c"])]
    assert grouped("embed", window) == window


def test_windows_hold_whole_chunks() -> None:
    assert window_size(16) == 10_000 and window_size(7) % 7 == 0 and window_size(20_000) == 20_000


def test_chunks_close_where_a_shared_prefix_ends_and_unrelated_prompts_fill_them(tmp_path: Path) -> None:
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import sessionmaker

    from jobs.grouping import ChunkWriter
    from jobs.models import Base, Item, Job

    engine = create_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    Base.metadata.create_all(engine)
    rubric_a, rubric_b = "Grade this essay for clarity. " * 20, "Translate into French. " * 20
    prompts = [rubric_a + f"essay {n}" for n in range(6)] + [rubric_b + f"text {n}" for n in range(10)]
    unrelated = [f"Summarise document {n}." for n in range(16)]
    ids = iter(f"chunk_{n}" for n in range(100))
    with sessionmaker(engine)() as session:
        for job_id, texts in (("grouped", prompts), ("plain", unrelated)):
            session.add(Job(id=job_id, kind="generate", model="m", model_digest="d", options={}, chunk_size=8, meta={}))
            session.flush()
            with ChunkWriter(session, job_id, "generate", "d", "m", 8, {}, lambda: next(ids)) as writer:
                writer.write([(n, None, {"prompt": text}) for n, text in enumerate(texts)])
        session.commit()
        sizes = {job: sorted(n for _, n in session.execute(
            select(Item.chunk_id, func.count()).where(Item.job_id == job).group_by(Item.chunk_id)).all())
            for job in ("grouped", "plain")}
    # rubric A's six prompts close their chunk (6 >= half of 8); B's ten fill one and start another
    assert sizes["grouped"] == [2, 6, 8]
    assert sizes["plain"] == [8, 8]  # no shared openings: full chunks
