"""Background work for the widget: one job at a time, the newest request wins.

A :class:`LatestWins` runner keeps the Qt thread free: a job runs in a napari worker
thread (``napari.qt.threading.create_worker``, with a progress bar in napari's activity
dock when asked for); a job submitted while another runs waits, and a later submission
replaces the waiting one, so stale requests (a slice the user has already scrolled past,
prompts that have changed again) are dropped without ever running. A running job cannot
be interrupted (a torch forward pass has no cancel point); its result is handed to its
``done`` callback, which decides whether it is still wanted.

``threaded=False`` runs every job inline on the calling thread (debugging, and a switch
``NAPARI_SAM_NO_THREADS=1`` for the widget).

All torch work of a widget runs on **one** thread (``executor``, a single-thread
``ThreadPoolExecutor`` the napari worker hands the job to and waits for). torch's OpenMP
keeps a team of threads per calling thread, and an idle team spin-waits for a while after
each parallel region; with work hopping between napari's pool threads, those teams compete
for the cores and a decoder call measured 5-10x slower on a 2-core machine
(benchmarks/bench_interaction.py). One torch thread means one team.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Job:
    prepare: Callable[[], Callable | None]
    done: Callable
    error: Callable | None
    desc: str


class LatestWins:
    """Run ``prepare() -> work`` on the Qt thread, ``work()`` in a worker, ``done(result)``
    back on the Qt thread; at most one job runs and at most one waits."""

    def __init__(self, threaded: bool = True, progress: bool = False, executor=None):
        self.threaded = threaded
        self.progress = progress
        self.executor = executor
        self._running = False
        self._pending: _Job | None = None
        self._worker = None
        self.closed = False

    @property
    def busy(self) -> bool:
        """A job runs or waits."""
        return self._running or self._pending is not None

    def submit(self, prepare, done, error=None, desc: str = "", inline: bool = False) -> None:
        """Queue a job; it replaces any job still waiting.

        ``prepare()`` runs on the Qt thread when the job starts and returns the callable
        for the worker (or None to skip the job); ``done(result)`` and ``error(exc)`` run
        on the Qt thread. ``inline``: when no job runs, run this one at once on the calling
        thread (for work cheaper than a thread hop, see ``SamWidget.inline_decode_ms``).
        """
        if self.closed:
            return
        job = _Job(prepare, done, error, desc)
        if self._running:
            self._pending = job
            return
        self._start(job, inline=inline)

    def cancel_pending(self) -> None:
        """Drop the waiting job (the running one finishes; its ``done`` still runs)."""
        self._pending = None

    def close(self) -> None:
        """No more jobs or callbacks (the widget is going away)."""
        self.closed = True
        self._pending = None

    def _start(self, job: _Job, inline: bool = False) -> None:
        try:
            work = job.prepare()
        except Exception as e:  # noqa: BLE001 - reported through the job's error callback
            self._report(job, e)
            work = None
        if work is None:
            self._next()
            return
        self._running = True
        if inline or not self.threaded:
            try:
                result = work()
            except Exception as e:  # noqa: BLE001
                self._report(job, e)
            else:
                if not self.closed:
                    job.done(result)
            self._finished()
            return

        from napari.qt.threading import create_worker

        held = [work]  # taken when run: a finished worker object keeps no session alive

        def guarded():
            # napari relays worker exceptions to its notification manager as tracebacks;
            # bad input must end in the widget's message instead, so errors come back as
            # values.
            fn = held.pop()
            try:
                if self.executor is not None:
                    return True, self.executor.submit(fn).result()
                return True, fn()
            except Exception as e:  # noqa: BLE001
                return False, e
            finally:
                del fn

        def returned(outcome):
            ok, value = outcome
            if self.closed:
                return
            if ok:
                job.done(value)
            else:
                self._report(job, value)

        progress = {"desc": job.desc, "total": 0} if self.progress and job.desc else None
        worker = create_worker(guarded, _progress=progress)
        worker.returned.connect(returned)
        worker.finished.connect(self._finished)
        self._worker = worker
        worker.start()

    def _report(self, job: _Job, exc: BaseException) -> None:
        if self.closed:
            return
        if job.error is None:
            raise exc
        job.error(exc)

    def _finished(self) -> None:
        self._running = False
        if self._worker is not None:  # its slots hold the job (and so the session)
            _disconnect_all(self._worker)
        self._worker = None
        self._next()

    def _next(self) -> None:
        if self._pending is not None and not self.closed:
            job, self._pending = self._pending, None
            self._start(job)


def _disconnect_all(worker) -> None:
    """Drop a finished napari worker's signal connections, so that the callbacks (and the
    sessions they hold) can be freed even while Qt keeps the worker object."""
    import contextlib

    for name in ("returned", "finished", "yielded", "errored", "started", "aborted"):
        signal = getattr(worker, name, None)
        if signal is not None:
            with contextlib.suppress(TypeError, RuntimeError):
                signal.disconnect()
