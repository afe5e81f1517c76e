"""dare-serve feature store: user behavior sequences and cached FM embeddings."""
