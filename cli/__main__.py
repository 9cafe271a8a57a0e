"""``python -m cli``: the ``corral`` command, for processes that spawn their siblings (``corral up``, the tests)."""

from cli.main import main

main()
