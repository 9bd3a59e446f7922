"""The volunteer's side beyond the expert runtime: idle-only serving (policy and the machine
shell), reconnecting to a scheduler, and `neuro-dask worker-status`. plugins/neuro_worker.py
wires them into a Dask worker."""
