"""`python -m toto.tokenize ...` == `toto tokenize ...`, for torchrun: under
`torchrun --nproc_per_node=N [--nnodes ...] -m toto.tokenize INPUTS --tokenizer T --out DIR`
each rank tokenizes part RANK/WORLD_SIZE of the inputs (on GPU cuda:LOCAL_RANK) and the rank that
completes the last part merges them (see `toto.data.build`). No process group is created."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["tokenize", *sys.argv[1:]]))
