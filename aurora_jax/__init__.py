"""aurora-jax trainer: ingests speculative-decoding traces and trains the EAGLE3 draft in JAX.

Importing the package is cheap; JAX is imported only by the modules that train.
"""

__version__ = "0.1.0"
