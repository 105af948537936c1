"""geomreg: point-cloud and density-image registration with geometric losses.

The library under the ``geomreg`` command. Importing it is cheap: torch is imported only
when :func:`divergence` is first called.
"""

from ._version import __version__
from .errors import BackendUnavailable, GeomregError, InputError, OutputError, ParameterError
from .measure import Grid, Measure

__all__ = [
    "BackendUnavailable",
    "GeomregError",
    "Grid",
    "InputError",
    "Measure",
    "OutputError",
    "ParameterError",
    "__version__",
    "divergence",
    "flow",
    "match",
    "register",
]


def divergence(*args, **kwargs):
    """Divergence between two measures; see :func:`geomreg.api.divergence`."""
    from .api import divergence as _divergence

    return _divergence(*args, **kwargs)


def match(*args, **kwargs):
    """Move a source onto a target along the Sinkhorn transport map; see :func:`.registration.match`."""
    from .registration import match as _match

    return _match(*args, **kwargs)


def flow(*args, **kwargs):
    """The Euler gradient flow of a divergence; see :func:`.registration.flow`."""
    from .registration import flow as _flow

    return _flow(*args, **kwargs)


def register(*args, **kwargs):
    """Fit a rigid, similarity or affine transform; see :func:`.registration.register`."""
    from .registration import register as _register

    return _register(*args, **kwargs)
