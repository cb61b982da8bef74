"""sage-jax: SAGE (State-Action Chain dialogue steering) in JAX/Flax."""

__version__ = "0.1.0"
