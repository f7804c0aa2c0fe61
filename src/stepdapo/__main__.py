"""`python -m stepdapo ...` is `stepdapo ...`; launchers need the module form:
`torchrun --nproc-per-node 8 -m stepdapo run CONFIG`."""

import sys

from stepdapo.cli import main

sys.exit(main())
