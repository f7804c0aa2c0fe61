"""`python -m stepdapo ...` is `stepdapo ...`; launchers need the module form:
`torchrun --nproc-per-node 8 -m stepdapo run CONFIG`."""

import sys

from stepdapo.cli import main

if __name__ == "__main__":  # vLLM's engine process re-imports the main module (spawn)
    sys.exit(main())
