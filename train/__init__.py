"""fastgen.train: the accelerate trainer, recipes, data, and the zoo teachers' own training."""
