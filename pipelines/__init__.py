"""The arenaflow Dagster code location: thin assets that compose Hydra config and call `arenaflow`."""
