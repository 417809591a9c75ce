"""Apps the agent ships: folders a recipe can use as its script's app folder."""
