"""The master process for `workers: N > 1`: bind once, fork workers, relay signals, replace the dead.

Workers inherit the listening sockets and the kernel spreads new connections across them. Each
worker has its own pools, so `pool_size` and `max_clients` hold per worker. Signals sent to the
master reach every worker: SIGHUP reloads each, SIGTERM and SIGINT stop them, and the master exits
once they all have.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile

import gevent

from gpooler import listener
from gpooler.config import Config, ConfigError, load_config
from gpooler.daemon import Daemon, WorkerSlot

log = logging.getLogger(__name__)

_RELAYED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


class Supervisor:
    def __init__(self, config_path: str, config: Config) -> None:
        self.config_path = config_path
        self.config = config
        self.count = config.workers
        self.sockets = [(listener.bind(entry), entry) for entry in config.listen]
        self.peer_dir = tempfile.mkdtemp(prefix="gpooler-")
        self.children: dict[int, int] = {}  # pid -> worker index
        self.stopping = False
        self._handlers: list = []

    def run(self) -> int:
        for index in range(self.count):
            self._spawn(index)
        for signum in _RELAYED:
            self._handlers.append(gevent.signal_handler(signum, self._relay, signum))
        log.info("gpooler ready: %d workers", self.count)
        try:
            while self.children:
                pid, status = os.waitpid(-1, 0)
                index = self.children.pop(pid, None)
                if index is None:
                    continue
                if not self.stopping:
                    log.error("worker %d (pid %d) exited with status %d: starting a new one",
                              index + 1, pid, status)
                    self._spawn(index)
        finally:
            shutil.rmtree(self.peer_dir, ignore_errors=True)
        return 0

    def _spawn(self, index: int) -> None:
        pid = os.fork()
        if pid:
            self.children[pid] = index
            return
        for handler in self._handlers:
            handler.cancel()
        code = 1
        try:
            slot = WorkerSlot(index, self.count, self.peer_dir)
            code = Daemon(self.config_path, self.config, self.sockets, slot).run()
        except BaseException:
            log.exception("worker %d failed", index + 1)
        finally:
            os._exit(code)

    def _relay(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self._reread()
        else:
            self.stopping = True
        for pid in list(self.children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _reread(self) -> None:
        """Keep the master's copy current, so a replaced worker starts with the latest file."""
        try:
            self.config = load_config(self.config_path)
        except ConfigError:
            pass  # each worker logs the problem itself
