"""dare-serve offline side: datasets, models, training and bundle export."""
