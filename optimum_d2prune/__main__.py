"""`python -m optimum_d2prune ...`: the same command as `optimum-cli d2prune ...`."""

import sys

from .commands import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m optimum_d2prune"))
