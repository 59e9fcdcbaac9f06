"""`python -m fastdiff ...` (and `torchrun -m fastdiff ...`) is the `fastdiff` command."""
import sys

from .cli import main

if __name__ == "__main__":  # not when spawned ranks re-import the main module
    sys.exit(main())
