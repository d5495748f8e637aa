"""arenaflow: train, evaluate, rate and serve chat models."""
