"""FedPortal's site side: the Client API (``client_agent.api``), the wire format, the local
runtime that runs a client script, and (later) the site agent. Nothing here imports Django."""

__version__ = "0.1.0"
