"""The data scientist's side: loading a model, connecting to a network, and the executors that
send each MoE layer's expert work to volunteers (dispatch/). Runs in the client's process."""
