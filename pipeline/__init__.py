"""sslpipe pipeline: data, shards, training loop, Ray launch, configuration and CLI."""
