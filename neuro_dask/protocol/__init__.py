"""What crosses the network, shared by both ends: expert-call frames (wire.py) and the schemas
every op open to clients or workers is validated against (schemas.py)."""
