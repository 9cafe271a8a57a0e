"""The typed model of Ollama's options (corral/options.py): one table of types, bounds, defaults and llama.cpp
names, read by the worker as LoadOptions and SamplingOptions."""

from __future__ import annotations

import dataclasses

from corral.options import BY_NAME, IGNORED, OPTION_TYPES, OPTIONS, LoadOptions, SamplingOptions, parse_options


def test_every_option_belongs_to_one_part_and_the_parts_cover_them_all() -> None:
    load = {f.name for f in dataclasses.fields(LoadOptions)}
    sampling = {f.name for f in dataclasses.fields(SamplingOptions)}
    assert load.isdisjoint(sampling)
    assert load | sampling | set(IGNORED) == set(OPTION_TYPES) == {o.name for o in OPTIONS}
    assert all(BY_NAME[n].part == "load" for n in load) and all(BY_NAME[n].part == "sampling" for n in sampling)


def test_the_defaults_are_ollamas() -> None:
    """api/types.go DefaultOptions."""
    s = SamplingOptions()
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.typical_p, s.repeat_last_n, s.repeat_penalty) == \
        (0.8, 40, 0.9, 0.0, 1.0, 64, 1.0)
    assert (s.presence_penalty, s.frequency_penalty, s.num_predict, s.num_keep, s.seed, s.stop) == \
        (0.0, 0.0, -1, 4, -1, ())
    assert LoadOptions() == LoadOptions(num_ctx=None, num_gpu=-1, num_thread=None)


def test_a_request_sets_what_it_names_and_nulls_keep_the_default() -> None:
    options = parse_options({"temperature": 0, "num_ctx": 512, "stop": ["\n\n"], "seed": None, "made_up": 1})
    assert SamplingOptions.of(options) == SamplingOptions(temperature=0.0, stop=("\n\n",))
    assert LoadOptions.of(options) == LoadOptions(num_ctx=512)
    assert SamplingOptions.of(options).seed == -1


def test_a_pulled_models_parameters_reach_the_worker_as_their_types() -> None:
    """A registry's params layer is not checked by parse_options: 40.0 is still top_k 40 (ctypes takes no float)."""
    assert SamplingOptions.of({"top_k": 40.0, "temperature": "0.7", "seed": "x"}) == SamplingOptions(top_k=40, temperature=0.7)
    assert LoadOptions.of({"num_ctx": 4096.0}).num_ctx == 4096
