"""`python -m slipstream.train recipe=NAME key=value ...`: the training entry point (as `slipstream train`)."""

import sys

from slipstream.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
