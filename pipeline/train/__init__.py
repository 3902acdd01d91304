"""Pretraining: the per-worker loop (loop: one process, or a Ray Train worker), its session (where
checkpoints and reports go), the Ray launch, checkpoints and run directories on object storage,
schedules, the metrics log and trackers, preemption notices, global batch norm, the online kNN
monitor and the examples figure. Imports pipeline.data, pretext, models and core."""
