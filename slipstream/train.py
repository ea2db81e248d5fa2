"""`python -m slipstream.train recipe=NAME key=value ...`: the training entry point (as `slipstream train`).

Under `torchrun --nproc_per_node=N -m slipstream.train ...` every rank runs this. An exception
that escapes a rank goes to torchrun's error file (`rank_entry_point`), so the launcher's summary
names the failed rank with its traceback, and torchrun then stops the other ranks.
"""

import sys

from slipstream.cli import main
from slipstream.trainer.distributed import rank_entry_point


@rank_entry_point
def run() -> int:
    return main(["train", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(run())
