"""Preemption notices: a checkpoint at the next step boundary, not a lost checkpoint interval.

Two notices reach a training loop, and `PreemptionMonitor.check` is asked after every step:
- **SIGTERM**, what a cloud, Kubernetes or SLURM sends a process before reclaiming its machine.
  The handler only sets a flag. At the next step boundary all ranks agree (one tiny all-reduce),
  rank 0 writes a checkpoint of that step, and the loop raises `Preempted`. Under Ray Train the
  group then restarts from that checkpoint (smaller, for an elastic run, if the node is gone),
  within `scaling.max_failures`; with `--local` the command stops and `--resume` continues.
- **A drained Ray node** (Ray Train's `ray.train.get_preemption_info()`, set when an autoscaler or
  cloud integration drains a node with a deadline): the loop keeps training, as Ray Train's guide
  recommends, but writes a checkpoint at every poll (`train.preemption_poll_every` steps) until
  the node is gone. One checkpoint at the notice alone would lose all the work of the notice
  window (two minutes on AWS spot). Ray Train then restarts the group without that node, counted
  against `FailureConfig.max_preemption_failures` (unlimited), not max_failures.

Python lets only a process's main thread install signal handlers, and Ray Train runs the training
function in a thread of its own. Ray loads (unpickles) that function on the worker actor's main
thread first, so `RayTrainLoop` installs the handler as it is unpickled. A process where that is
not so (a future Ray) keeps Ray's own SIGTERM behaviour, which is said once in the log: the run
then resumes from its last interval checkpoint, as it did before.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("sslpipe.preemption")

_stop = threading.Event()  # a SIGTERM arrived while a training loop ran
_training = threading.Event()  # a training loop runs in this process


class Preempted(RuntimeError):
    """The loop stopped on SIGTERM after writing the checkpoint of the step it had reached."""


def install_sigterm_handler() -> bool:
    """Routes SIGTERM to the training loop while one runs; otherwise, and on a second SIGTERM,
    the process's previous handler (Ray's exits the worker). Main thread only; returns whether
    the handler is in place."""
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)
    if getattr(previous, "sslpipe", False):
        return True

    def on_sigterm(signum, frame):
        if _training.is_set() and not _stop.is_set():
            _stop.set()  # checkpoint at the next step boundary, then stop
            return
        signal.signal(signal.SIGTERM, previous)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGTERM)

    on_sigterm.sslpipe = True
    signal.signal(signal.SIGTERM, on_sigterm)
    return True


class training:
    """Marks the span in which SIGTERM means "checkpoint, then stop" (a context manager)."""

    def __enter__(self):
        _stop.clear()
        _training.set()
        return self

    def __exit__(self, *exc):
        _training.clear()
        return False


class PreemptionMonitor:
    """Asked after every step; returns "sigterm" (checkpoint, then raise Preempted), "drain"
    (checkpoint, keep training) or None. Every rank calls it at every step: the agreement is a
    collective."""

    def __init__(self, session, poll_every: int):
        self.session = session
        self.poll_every = poll_every
        self.draining = False

    def check(self, step: int) -> str | None:
        if self.session.all_reduce_max({"sigterm": float(_stop.is_set())})["sigterm"]:
            return "sigterm"
        if self.poll_every and step % self.poll_every == 0:
            info = self.session.preemption_info()
            if info is not None:
                if not self.draining:
                    log.info("step %d: Ray is draining node(s) %s (ranks %s, deadline %s ms): a checkpoint every %d steps "
                             "until they go", step, getattr(info, "preempted_node_ids", "?"), getattr(info, "preempted_ranks", "?"),
                             getattr(info, "deadline_ms", None), self.poll_every)
                self.draining = True
                return "drain"
        return None


class RayTrainLoop:
    """Ray Train's per-worker entry point (`pipeline.train.loop.train_loop_per_worker`). Unpickling it
    installs the SIGTERM handler: Ray does that on the worker actor's main thread."""

    def __call__(self, config: dict) -> None:
        from pipeline.train.loop import train_loop_per_worker

        train_loop_per_worker(config)

    def __reduce__(self):
        return (_unpickle_ray_train_loop, ())


def _unpickle_ray_train_loop() -> RayTrainLoop:
    if not install_sigterm_handler():
        log.warning("SIGTERM handler not installed (Ray loaded the training function off the main thread): "
                    "a SIGTERM ends this worker as Ray does, and the run resumes from its last interval checkpoint")
    return RayTrainLoop()
