r"""The epsilon-scaling schedule of the Sinkhorn loop, as an object (docs/theory.md).

The temperature starts at :math:`d^p` (d the diameter of the problem) and is divided by
:math:`\text{scaling}^{-p}` at every step until it reaches :math:`\varepsilon = \text{blur}^p`:

.. math::
    [d^p] + [\exp(e) \text{ for } e \text{ in arange}(p\ln d,\ p\ln \text{blur},\ p\ln s)]
    + [\text{blur}^p]

which is exactly GeomLoss 0.3.1's ``epsilon_schedule`` (same floating-point values), so that
``--tol inf`` reproduces its numbers. Degenerate inputs get a defined answer: a diameter
of 0 (identical single points) or below the blur gives the two-step list
``[max(d, blur)^p, blur^p]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .errors import ParameterError


@dataclass(frozen=True)
class EpsilonSchedule:
    """Temperatures of the epsilon-scaling descent.

    Attributes:
        p: exponent of the cost (1 or 2); epsilon = sigma ** p.
        diameter: largest distance scale of the problem (> 0 after clamping to blur).
        blur: the final scale sigma; the final temperature is ``blur ** p``.
        scaling: ratio in (0, 1) between successive values of sigma.
    """

    p: int
    diameter: float
    blur: float
    scaling: float

    def __post_init__(self):
        if not (self.blur > 0 and math.isfinite(self.blur)):
            raise ParameterError("blur", f"must be a positive finite number, got {self.blur}")
        if not (0 < self.scaling < 1):
            raise ParameterError("scaling", f"must lie in (0, 1), got {self.scaling}")
        if not (self.diameter >= 0 and math.isfinite(self.diameter)):
            raise ParameterError("diameter", f"must be finite and >= 0, got {self.diameter}")

    @property
    def epsilons(self) -> list[float]:
        """The list of temperatures, first and last included (first one appears twice)."""
        p, blur, s = self.p, self.blur, self.scaling
        d = max(self.diameter, blur) if self.diameter > 0 else blur
        # Same expression as GeomLoss 0.3.1 so that the floats agree bit for bit.
        middle = [np.exp(e) for e in np.arange(p * np.log(d), p * np.log(blur), p * np.log(s))]
        return [float(d**p)] + [float(e) for e in middle] + [float(blur**p)]

    @property
    def eps(self) -> float:
        """The final temperature blur ** p."""
        return float(self.blur**self.p)

    def __iter__(self) -> Iterator[float]:
        return iter(self.epsilons)

    def __len__(self) -> int:
        return len(self.epsilons)

    def __str__(self) -> str:
        return (
            f"EpsilonSchedule(p={self.p}, diameter={self.diameter:.4g}, blur={self.blur:.4g}, "
            f"scaling={self.scaling:.4g}: {len(self)} steps, "
            f"eps {self.epsilons[0]:.4g} -> {self.eps:.4g})"
        )


def estimate_steps(p: int, diameter: float, blur: float, scaling: float) -> int:
    """Number of schedule steps without building the list (to refuse absurd requests early)."""
    if diameter <= blur:
        return 2
    return 2 + math.ceil(math.log(diameter / blur) / math.log(1 / scaling))
