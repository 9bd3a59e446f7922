"""Client side of distributed experts: routes, transports and the executor that applies them."""
