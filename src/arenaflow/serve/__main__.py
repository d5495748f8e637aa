"""`python -m arenaflow.serve [overrides]`: serve the model(s) in the foreground (what `make serve` runs)."""

from arenaflow.config import hydra_main
from arenaflow.serve import run_cli

if __name__ == "__main__":
    hydra_main(run_cli)()
