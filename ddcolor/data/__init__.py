"""The data plane: ingestion into Lab Parquet shards, validation, and streaming to training."""
