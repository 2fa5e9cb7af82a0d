"""`qwen_edge.client`: the wire protocol (docs/protocol.md) done once, for devices.

`EdgeClient` (threads) and `AsyncEdgeClient` (asyncio) share one connection (connection.py): a paho
client whose network thread only parses each reply message and hands it to the request it belongs
to. Everything a request needs to end well (ordering by seq, de-duplication, resending with the
same id, pinning a conversation to its node, the one retry after `node_lost`) lives in its
`Exchange` (exchange.py), which runs in the caller's thread or task; streams.py hands its texts out.
Imports neither llama.cpp nor systemd: a device needs neither.
"""

from ..protocol import RequestOptions, Status
from .edge import AsyncEdgeClient, EdgeClient
from .exchange import EdgeError, Reply, ToolCall
from .functions import tool_from_function
from .streams import AsyncStream, Stream

# Status: what node_status() returns (protocol.Status, a node's retained status).
__all__ = [
    "AsyncEdgeClient",
    "AsyncStream",
    "EdgeClient",
    "EdgeError",
    "Reply",
    "RequestOptions",
    "Status",
    "Stream",
    "ToolCall",
    "tool_from_function",
]
