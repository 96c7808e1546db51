"""A worker's registration with the server, kept alive in the background.

The worker registers its KV layers under a session: when the worker dies the server
drops them, and when the server dies or restarts the session stream ends. A daemon
thread notices both "never registered" (server absent at start) and "session gone"
(server stopped or restarted) and registers again every ``retry_interval_s`` until it
succeeds. Until then :attr:`ServerLink.registered` is False and the worker skips saves
and fails loads instead of waiting on a server that is not there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from pegaflow._native import EngineClient, KvLayer
from pegaflow.errors import (
    PegaflowAlreadyExists,
    PegaflowError,
    PegaflowTimeout,
    PegaflowUnavailable,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankIdentity:
    """Who registers: the instance, its namespace and this worker's rank."""

    instance_id: str
    namespace: str
    rank: int
    world_size: int
    replicated_kv: bool = False
    """Every rank holds the same KV bytes (MLA): the server stores one copy."""


class ServerLink:
    """Owns a worker's :class:`EngineClient` and keeps its registration current."""

    def __init__(
        self,
        client: EngineClient,
        identity: RankIdentity,
        layers: Sequence[KvLayer],
        retry_interval_s: float,
    ) -> None:
        self.client = client
        self.identity = identity
        self._layers = list(layers)
        self._retry_interval_s = retry_interval_s
        self._registered = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._warned = False
        self.registrations = 0
        """How many times this worker registered (more than 1 after a server restart)."""

    @property
    def registered(self) -> bool:
        """Whether the server holds this worker's registration (as far as we know)."""
        return self._registered.is_set() and self.client.session_alive(self.identity.instance_id)

    def start(self) -> None:
        """Registers once now (so the first requests can use the cache), then keeps the
        registration alive from a daemon thread."""
        self._try_register()
        self._thread = threading.Thread(target=self._keep_alive, name="pegaflow-link", daemon=True)
        self._thread.start()

    def mark_lost(self) -> None:
        """A call said the server forgot us (unknown instance): register again, under a
        new session (closing ours makes the server drop whatever it still holds of it)."""
        self._registered.clear()
        self.client.close_session(self.identity.instance_id)

    def _keep_alive(self) -> None:
        while not self._stop.wait(self._retry_interval_s):
            if self._registered.is_set() and not self.client.session_alive(
                self.identity.instance_id
            ):
                self._registered.clear()
                logger.warning(
                    "pegaflow-server at %s went away; serving without the cache until it is back",
                    self.client.endpoint,
                )
                self._warned = True
            if not self._registered.is_set():
                self._try_register()

    def _try_register(self) -> None:
        with self._lock:
            if self._stop.is_set() or self._registered.is_set():
                return
            ident = self.identity
            try:
                if not self.client.session_alive(ident.instance_id):
                    # The old session ended with the server (or was never opened): a new one.
                    self.client.close_session(ident.instance_id)
                    self.client.open_session(ident.instance_id)
                self.client.register_kv_layers(
                    ident.instance_id,
                    ident.namespace,
                    ident.rank,
                    ident.world_size,
                    self._layers,
                    replicated_kv=ident.replicated_kv,
                )
            except PegaflowAlreadyExists:
                # The server has not yet dropped our previous session's rank: next round.
                return
            except (PegaflowUnavailable, PegaflowTimeout) as e:
                if not self._warned:
                    self._warned = True
                    logger.warning(
                        "pegaflow-server at %s unreachable (%s): vLLM serves without the cache "
                        "and the connector keeps trying every %.1f s",
                        self.client.endpoint,
                        e,
                        self._retry_interval_s,
                    )
                return
            except PegaflowError as e:
                # The server refused the layout (a bug or an unsupported model): say so once
                # with the server's reason; vLLM keeps serving without the cache.
                if not self._warned:
                    self._warned = True
                    logger.error(
                        "pegaflow-server at %s refused the KV registration: %s",
                        self.client.endpoint,
                        e,
                    )
                return
            self._registered.set()
            self.registrations += 1
            logger.info(
                "registered rank %d/%d of instance %s (%d layers, namespace %s) with %s",
                ident.rank,
                ident.world_size,
                ident.instance_id,
                len(self._layers),
                ident.namespace,
                self.client.endpoint,
            )
            self._warned = False

    def close(self) -> None:
        """Stops retrying and closes the session (the server then drops this rank)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._retry_interval_s + 5.0)
        with self._lock:
            self._registered.clear()
            self.client.close()


__all__ = ["RankIdentity", "ServerLink"]
