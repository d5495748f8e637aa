"""python -m arenaflow.rating [overrides]: battles -> leaderboard -> champion alias."""

from arenaflow.config import hydra_main
from arenaflow.rating import run

if __name__ == "__main__":
    hydra_main(run)()
