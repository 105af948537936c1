"""``python -m cli``: the same as the ``geomreg`` command."""

from .main import run

run()
