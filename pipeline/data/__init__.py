"""Data in and data out of shards: raw datasets to WebDataset shards plus a manifest (sources,
ingest, shards, video, av_synth), where shards live (storage: local, NFS, URLs), checking them
(verify), and streaming them into batches (shard_datasets, bad_samples, decode, audio, image_modes,
frames, streaming). Imports only `core` of sslpipe's packages: no task, model or runner code."""
