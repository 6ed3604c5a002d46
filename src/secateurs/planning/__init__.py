"""Planning: budgets, allocation across layers and between attention and MLP, selection of kept
structures, the PruningPlan itself and its parameter/FLOP accounting."""
