"""`python -m toto COMMAND ...` == `toto COMMAND ...`; under torchrun, e.g.
`torchrun --nproc_per_node 8 -m toto finetune ...`."""

import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
