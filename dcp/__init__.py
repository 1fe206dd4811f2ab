"""dcp: a stateless publish/subscribe data plane for sensing and AI pipelines.

Brokers route every data frame by an in-band topology number X (``X mod key`` names
the out ports); see :mod:`dcp.routing`, :mod:`dcp.wire`, :mod:`dcp.broker` and
:mod:`dcp.client`; pipelines: :mod:`dcp.orchestrator` and :class:`dcp.DataAgent`.
"""

from .agent import DataAgent
from .storage import StorageAgent
from .client import Backoff, Connection, Message, Status, connect
from .errors import (
    BadRequest,
    ConfigError,
    ConnectionClosed,
    DcpError,
    DcpTimeout,
    FrameTooLarge,
    LocalProtocolError,
    ProtocolError,
    RemoteError,
    RemoteProtocolError,
    RouteTooLarge,
    RoutingError,
    TruncatedFrame,
)

__version__ = "0.1.0"

__all__ = [
    "connect",
    "DataAgent",
    "StorageAgent",
    "Connection",
    "Message",
    "Status",
    "Backoff",
    "DcpError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "FrameTooLarge",
    "RouteTooLarge",
    "TruncatedFrame",
    "BadRequest",
    "RemoteError",
    "ConnectionClosed",
    "RoutingError",
    "ConfigError",
    "DcpTimeout",
    "__version__",
]
