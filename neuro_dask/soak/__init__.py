"""The soak: a network of real processes under load, churn, adversaries and busy machines, and
what fraction of requests complete with a correct answer (`neuro-dask soak`; docs/trust.md)."""
