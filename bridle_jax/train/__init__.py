"""Training engine: sharding, optimizer, state, steps, checkpoints, monitoring."""
