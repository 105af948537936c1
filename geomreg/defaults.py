"""Default parameter values, importable without torch (the CLI's help text uses them).

``TOL``: the default stopping tolerance on the marginal error of the Sinkhorn loop; see
README.md, "Convergence", for the measurements behind it.
"""

#: stop the converge phase when every relative L1 marginal error is <= TOL
TOL = 1e-3
#: most Sinkhorn iterations, schedule steps included
MAX_ITER = 5000
BLUR = 0.05
SCALING = 0.5
P = 2
