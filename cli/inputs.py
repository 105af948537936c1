"""Reading a command's inputs with the reading options (``--sample``, ``--weights area``, ``--classes``).

One place for ``distance``, ``match`` and ``flow`` (and ``register``): each option applies to
the inputs it fits (``--classes`` to LAS/LAZ files, ``--weights area`` to meshes, ``--sample``
to every point input), and one that fits neither A nor B is a usage error (exit 2). B (and
``--apply``'s points) are expressed in A's frame: relative to A's ``origin`` (a LAS header's
offset), which the writers add back.
"""

from __future__ import annotations

from pathlib import Path


def read_pair(a: Path, b: Path, *, weights_a=None, weights_b=None, weight_property=None, mass="dark",
              as_image=False, sample=None, weights=None, classes=None, seed=0):
    """A and B as measures, B in A's frame (see the module's docstring).

    Raises:
        ParameterError: ``weights`` other than ``"area"``, or given with ``--weights-a``,
            ``--weights-b``, ``--weight-property`` or ``--sample``; ``--weights area`` with no
            mesh among A and B, ``--classes`` with no LAS/LAZ file among them, or bad codes.
        InputError: from the readers.
    """
    from geomreg.errors import ParameterError
    from geomreg.io import read_measure, with_area_weights
    from geomreg.io.las import LAS_SUFFIXES, parse_classes

    if weights is not None:
        if weights != "area":
            raise ParameterError("--weights", f"the one weighting it names is 'area', not {weights!r} "
                                 "(weight files: --weights-a, --weights-b)")
        if weights_a is not None or weights_b is not None or weight_property is not None:
            raise ParameterError("--weights", "give --weights area or --weights-a/--weights-b/"
                                 "--weight-property, not both")
        if sample is not None:
            raise ParameterError("--weights", "--sample draws a mesh's points by area already; "
                                 "--weights area is for its vertices")
    las = [Path(p).suffix.lower() in LAS_SUFFIXES for p in (a, b)]
    if classes is not None:
        if not any(las):
            raise ParameterError("--classes", f"works with .las and .laz inputs; neither {a} nor {b} is one")
        try:
            classes = parse_classes(classes)
        except ParameterError as err:
            raise ParameterError("--classes", err.problem) from None
    read = dict(weight_property=weight_property, mass=mass, as_image=as_image, sample=sample, seed=seed)
    mu, nu = (read_measure(path, weights=w, classes=classes if is_las else None, **read)
              for path, w, is_las in ((a, weights_a, las[0]), (b, weights_b, las[1])))
    if weights is not None:
        if mu.faces is None and nu.faces is None:
            raise ParameterError("--weights", f"area weights need a mesh input; neither {a} nor {b} "
                                 "has faces")
        mu, nu = (with_area_weights(m) if m.faces is not None else m for m in (mu, nu))
    return mu, nu.rebased(mu.origin)


def read_applied(path: Path, frame):
    """``--apply``'s points, whole (no reading option), in the frame of the measure ``frame``."""
    from geomreg.io import read_measure

    return read_measure(path).rebased(frame.origin)
