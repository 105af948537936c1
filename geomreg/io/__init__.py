"""Reading measures from files and writing results safely.

:func:`read_measure` turns point clouds (``.npy``, ``.ply``, ``.pcd``, ``.xyz``, ``.pts``,
``.txt``, ``.csv``) and density images (``.png`` and friends) into
:class:`~geomreg.measure.Measure` objects; :func:`atomic_write` and :func:`write_npy`
write outputs that appear complete or not at all.
"""

from .readers import SUFFIXES, read_measure, read_weights
from .writers import (
    atomic_write,
    atomic_write_many,
    check_output,
    density_png_writer,
    heatmap_rgb,
    npy_writer,
    png_heatmap_writer,
    points_writer,
    text_writer,
    write_npy,
    write_text,
)

__all__ = [
    "SUFFIXES",
    "atomic_write",
    "atomic_write_many",
    "check_output",
    "density_png_writer",
    "heatmap_rgb",
    "npy_writer",
    "png_heatmap_writer",
    "points_writer",
    "text_writer",
    "read_measure",
    "read_weights",
    "write_npy",
    "write_text",
]
