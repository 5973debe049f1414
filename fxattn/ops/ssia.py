"""SSIA operators (placeholder, filled in below)."""
ssia_map = None
ssia_pair_loss = None
