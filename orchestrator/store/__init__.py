"""The tracking store (MLflow): URIs, the client and its retries, runs and epochs, the run logger, claims, tags."""
