"""``python -m xmc_dst``: the same command line as ``xmc-dst``."""

import sys

from xmc_dst.cli import main

if __name__ == "__main__":
    sys.exit(main())
