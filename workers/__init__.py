"""Celery workers, each pinned to one GPU (or the CPU), running llama-cpp-python.  Never imports Flask."""
