"""The trusted coordinator's decisions, pure: expert placement and its coordinator, model
versions, the evidence desk that settles disputes, and the rules the scheduler plugin applies
to what it hears (routing: who is routed and in what order; reputation_events: what an
observation costs or earns; requests: who may begin, end and be paid; reports: what a worker's
or client's report counts for). plugins/neuro_scheduler.py gathers inputs, asks these, and enacts."""
