"""The learned drafter: an EAGLE-style model over the target's hidden states, trained in bubbles."""
