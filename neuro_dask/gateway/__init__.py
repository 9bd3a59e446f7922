"""An OpenAI-compatible HTTP gateway in front of a loaded MoEModel (docs/gateway.md).

`protocol` is pure (request validation, response and chunk shapes, chat templates, stop strings);
`server` is the tornado application and the threads that run each request's generation.
"""

from neuro_dask.gateway.protocol import ProtocolError
from neuro_dask.gateway.server import Gateway, GatewayServer

__all__ = ["Gateway", "GatewayServer", "ProtocolError"]
