"""Training side: algorithms (advantages, policy losses, KL) and the optimisation loop."""
