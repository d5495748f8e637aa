"""python -m arenaflow.data [overrides]: raw ShareGPT -> cleaned JSONL -> tokenized SFT dataset."""

from arenaflow.config import hydra_main
from arenaflow.data import run

if __name__ == "__main__":
    hydra_main(run)()
