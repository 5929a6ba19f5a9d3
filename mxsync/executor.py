"""Where passes run: in threads of this process today (a Slurm job on a data-mover node is the next executor).

An executor has three verbs: start a pass, wait for passes, cancel what has not started. The pass itself
(mxsync.pipeline) does not know where it runs.
"""

import concurrent.futures
import logging

logger = logging.getLogger("mxsync.executor")


class LocalExecutor:
    """Runs up to max-tasks passes at once in threads; a context manager that waits for them on exit."""

    def __init__(self, max_tasks):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_tasks, thread_name_prefix="rsync")

    def start(self, run, item):
        """Queue run(item); return its handle."""
        return self._pool.submit(run, item)

    def wait(self, handles):
        """Wait until every handle is done. A pass never raises; if one did, that bug is raised here."""
        for handle in concurrent.futures.as_completed(handles):
            handle.result()

    def cancel(self, handles):
        """Cancel the passes that have not started (running ones stop through the process supervisor)."""
        for handle in handles:
            handle.cancel()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._pool.shutdown(wait=True)
