"""SpecBound runtime: lossless self-speculative decoding with calibrated early exits.

Imports nothing from optuna, scikit-learn or datasets: a deployment installs the runtime alone.
"""

__version__ = "0.1.0"
