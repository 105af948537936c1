"""Reading measures from files and writing results safely.

:func:`read_measure` turns point clouds (``.npy``, ``.ply``, ``.pcd``, ``.xyz``, ``.pts``,
``.txt``, ``.csv``, ``.las``, ``.laz``), meshes (``.obj``, ``.off``, ``.stl``, ``.ply`` with
faces) and density images (``.png`` and friends) into :class:`~geomreg.measure.Measure`
objects; :func:`atomic_write` and :func:`write_npy` write outputs that appear complete or not
at all; :func:`moved_writer` writes a moved measure as a mesh, a LAS file or a cloud.
"""

from .readers import ALL_SUFFIXES, SUFFIXES, read_measure, read_weights, sampled, with_area_weights
from .writers import (
    atomic_write,
    atomic_write_many,
    check_moved,
    check_output,
    density_png_writer,
    heatmap_rgb,
    moved_writer,
    npy_writer,
    png_heatmap_writer,
    points_writer,
    text_writer,
    write_npy,
    write_text,
)

__all__ = [
    "ALL_SUFFIXES",
    "SUFFIXES",
    "atomic_write",
    "atomic_write_many",
    "check_moved",
    "check_output",
    "density_png_writer",
    "heatmap_rgb",
    "moved_writer",
    "npy_writer",
    "png_heatmap_writer",
    "points_writer",
    "text_writer",
    "read_measure",
    "read_weights",
    "sampled",
    "with_area_weights",
    "write_npy",
    "write_text",
]
