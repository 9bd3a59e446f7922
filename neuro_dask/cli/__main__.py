"""`python -m neuro_dask.cli`: the same as the `neuro-dask` command."""

import sys

from neuro_dask.cli.main import main

sys.exit(main())
