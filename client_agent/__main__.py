"""``python -m client_agent``: the site agent's command line (see client_agent.cli)."""

from client_agent.cli import main

raise SystemExit(main())
