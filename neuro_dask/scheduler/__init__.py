"""The trusted coordinator's decisions, pure: expert placement and its coordinator, model
versions, the evidence desk that settles disputes. plugins/neuro_scheduler.py enacts them."""
