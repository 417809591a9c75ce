"""Projects, organisations, memberships, sites, enrolment and certificates.

No models yet: they come with issue 3 (portal foundation).
"""
