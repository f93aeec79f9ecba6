"""``python -m bus.cli``: the same as the ``lamabus`` command."""

from bus.cli.main import main

main()
