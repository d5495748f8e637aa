"""python -m arenaflow.judge [judge=gpt4|openai_compatible|local] [key=value ...]"""

from arenaflow.config import hydra_main
from arenaflow.judge.stage import run_cli

if __name__ == "__main__":
    hydra_main(run_cli)()
