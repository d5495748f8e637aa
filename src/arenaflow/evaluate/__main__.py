"""python -m arenaflow.evaluate [overrides]: MT-bench questions -> every competitor's answers -> decontamination."""

from arenaflow.config import hydra_main
from arenaflow.evaluate import run

if __name__ == "__main__":
    hydra_main(run)()
