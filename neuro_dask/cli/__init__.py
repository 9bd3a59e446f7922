"""The `neuro-dask` command and its subcommands, one module per family (main.py dispatches)."""
