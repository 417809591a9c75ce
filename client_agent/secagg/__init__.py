"""Secure aggregation by masking (Bonawitz et al. 2017, with Bell et al. 2020's sparse
neighbour graph, "SecAgg+"): the pure parts, with no network and no portal in them.

- :mod:`.ring`: fixed-point numbers in the ring of integers modulo 2**64 (numpy ``uint64``,
  whose arithmetic wraps exactly there), and the bound on what quantization changes;
- :mod:`.prg`: a mask from a 32-byte seed (the AES-256-CTR key stream);
- :mod:`.shamir`: threshold sharing of 32-byte secrets over the prime field 2**521 − 1;
- :mod:`.keys`: X25519 key agreement and the seeds both ends of a pair derive;
- :mod:`.sealed`: shares sealed for one neighbour (AES-GCM), which the portal relays unread;
- :mod:`.masking`: the neighbour graph, one site's masked vector, and the server's removal of
  the masks from the sum, for the sites that answered and those that dropped out.

Homomorphic encryption (CKKS) is the other protection, in :mod:`client_agent.he`.
"""
