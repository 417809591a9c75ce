"""The reverse proxy in front of several PocEnv portals: Debian's nginx, run as this user.

A deployment puts its portals behind a proxy (``docker/``); PocEnv with ``num_portals`` > 1
does the same on this machine, so that agents and people use one address while the proxy
spreads them over the portals, and a portal that dies is left out until it answers again.
Round events reach every agent whichever portal it is connected to, because the portals share
one channel layer in Redis.

The configuration is written into the PoC's workspace: nginx runs in the foreground with that
folder as its prefix, so it needs no root, and its temporary files stay there.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

NGINX_CANDIDATES = ("nginx", "/usr/sbin/nginx")
# The portal closes a kept-alive connection that sends no request for this long (its header
# timeout; fedportal.settings, 10 s by default).
PORTAL_IDLE_SECONDS_ENV = "FEDPORTAL_HTTP_HEADER_TIMEOUT_SECONDS"
PORTAL_IDLE_SECONDS_DEFAULT = 10


def upstream_keepalive_ms() -> int:
    """How long (ms) the proxy keeps an idle connection to a portal: half the portal's own
    idle limit, so that the proxy always closes first."""
    try:
        portal_idle = int(os.environ.get(PORTAL_IDLE_SECONDS_ENV, PORTAL_IDLE_SECONDS_DEFAULT))
    except ValueError:
        portal_idle = PORTAL_IDLE_SECONDS_DEFAULT
    return max(100, portal_idle * 1000 // 2)


def nginx_binary() -> str | None:
    """nginx's path, or None when it is not installed."""
    for candidate in NGINX_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def nginx_config(prefix: Path, listen_port: int, portal_ports: Sequence[int]) -> str:
    """An nginx configuration that serves ``127.0.0.1:listen_port`` from the portals.

    What it does, and why:

    - **WebSockets** pass through (``Upgrade``/``Connection``), and an agent's socket may stay
      quiet for an hour: its heartbeats are the portal's business, not the proxy's.
    - **Bodies stream** to the portal as they arrive (``proxy_request_buffering off``), not
      spooled to disk first: the portal bounds each body and checks an upload's sender before
      reading it, and a 25M-parameter update must not be held twice. The proxy sets no size
      limit of its own for the same reason.
    - **Sockets spread**: a new connection goes to the portal with the fewest open ones.
    - **A dead portal is skipped**: a refused connection goes to the next portal at once (a
      request that never reached a portal is safe to send elsewhere, POSTs included), and the
      dead one is left out for a few seconds.
    - **Connections to the portals are kept alive, but never past a portal's idle limit**
      (``keepalive_timeout``, :func:`upstream_keepalive_ms`). nginx's default (60 s)
      outlived the portal's 10 s: nginx sent a request on a connection the portal had just
      closed and, for a POST (never sent again, as it may have been received), answered 502.
      Seen now and then at 200 agents when a job was submitted after a quiet spell.
    - The portals learn the client's address from ``X-Forwarded-For`` (they run with
      ``--proxy-headers``), so per-address limits count agents, not the proxy. The proxy
      replaces the header rather than appending to it: Daphne trusts its first address, which
      a client could otherwise write.
    """
    servers = "\n".join(
        f"        server 127.0.0.1:{port} max_fails=1 fail_timeout=3s;" for port in portal_ports
    )
    temp = {name: prefix / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    return f"""\
# Written by PocEnv (jobs/envs/poc/proxy.py) for this PoC only.
worker_processes 1;
daemon off;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        "" "";
    }}

    upstream portals {{
        # An agent's WebSocket lasts the whole job: each new one goes to the portal holding
        # fewest connections, so the sockets spread over the portals whatever the order of
        # the short requests in between (round robin put all three of a test's on one).
        least_conn;
{servers}
        keepalive 32;
        keepalive_timeout {upstream_keepalive_ms()}ms;
    }}

    server {{
        listen 127.0.0.1:{listen_port} backlog=2048;
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;

        location / {{
            proxy_pass http://portals;
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_connect_timeout 2s;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_next_upstream error timeout;
        }}
    }}
}}
"""


def write_nginx_config(prefix: Path, listen_port: int, portal_ports: Sequence[int]) -> Path:
    """Write the configuration (and the temporary folders it names) under ``prefix``."""
    prefix.mkdir(parents=True, exist_ok=True)
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / name).mkdir(exist_ok=True)
    path = prefix / "nginx.conf"
    path.write_text(nginx_config(prefix, listen_port, portal_ports))
    return path
