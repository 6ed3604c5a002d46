"""Surgery: applying a PruningPlan physically, the least-squares re-fit, and HARP's materialised
value attention."""
