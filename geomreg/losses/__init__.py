"""The losses geomreg computes, each written once against the engine contract."""

from ..params import LOSSES
from .hausdorff import hausdorff_loss
from .kernels import KERNELS, kernel_loss
from .sinkhorn import sinkhorn_loss

__all__ = ["KERNELS", "LOSSES", "hausdorff_loss", "kernel_loss", "sinkhorn_loss"]
