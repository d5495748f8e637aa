"""`python -m arenaflow.serve [overrides]`: serve a model in the foreground (what `make serve` runs)."""

from arenaflow.config import hydra_main
from arenaflow.serve import run

if __name__ == "__main__":
    hydra_main(run)()
