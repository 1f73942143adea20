"""The data side: canonical windows, synthetic data, ingest, features, splits, shards, loader."""
