import sys

from splitserve.planner.cli import run_planner

sys.exit(run_planner())
