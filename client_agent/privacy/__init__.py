"""A site's own privacy policy and its enforcement by the agent: clipping, Gaussian noise,
tensors that never leave, the budget spent per job and per project (see ``policy``)."""
