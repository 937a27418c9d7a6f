"""Job queues behind one interface: embedded (DB table + in-process thread) and scale-out."""

from spectrawatch_server.queue.base import JobHandler, JobQueue

__all__ = ["JobHandler", "JobQueue"]
