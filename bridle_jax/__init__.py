"""BRIDLE self-supervised pretraining with residual quantization, in JAX/Flax."""

__version__ = "0.1.0"
