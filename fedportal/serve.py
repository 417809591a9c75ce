"""``python -m fedportal.serve [daphne options] [application]``: the portal's server.

Daphne's command line (``-b``, ``-p``, ``--proxy-headers``, …; ``--help`` lists them) with the
guards of :mod:`fedportal.server`: bodies bounded before they are read, upload senders known
before their bodies are, header and body timeouts. The application defaults to the portal's
(``fedportal.asgi:application``). Everything that starts a portal starts it this way (the
Dockerfile, ``make portal``, PocEnv, the browser and end-to-end tests, the benchmarks).
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fedportal.settings.base")
    from fedportal.server import PortalCommandLine  # installs the reactor

    PortalCommandLine().run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
