"""``python -m simmim_fast.train ARGS`` = ``simmim-fast pretrain ARGS`` (the form torchrun needs:
``torchrun --nproc_per_node=N -m simmim_fast.train --preset ...``)."""
import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
