"""dare-serve: the online ranker (FastAPI) and the `dare-serve` command line."""
