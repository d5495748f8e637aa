"""python -m arenaflow.train [overrides]: fine-tune, checkpoint, gather and register the chat model."""

from arenaflow.config import hydra_main
from arenaflow.train import run

if __name__ == "__main__":
    hydra_main(run)()
