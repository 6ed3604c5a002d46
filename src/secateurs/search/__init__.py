"""The architecture search: per-layer block variants, their scores and costs, and the choice among them."""
