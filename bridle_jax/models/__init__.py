"""Pure Flax modules and quantizer functions."""
