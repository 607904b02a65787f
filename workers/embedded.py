"""The embedded broker: kombu's SQLAlchemy transport on a SQLite file under storage.root.

What ``dermpacs serve`` and a one-host setup use when ``broker.url`` is empty: no Redis, and a
publisher in one process (the listener) reaches a worker in another. Two changes to kombu's
transport: a message is deleted when a worker takes it (kombu keeps taken messages forever,
marked invisible), messages are served by priority as on kombu's Redis transport (a LOWER
``priority`` property first, then in the order sent; kombu's serves them in order sent only),
and the queue is polled every 0.1 s instead of every second. Like kombu's,
this broker does not redeliver a message whose worker died; the job store's reconciler
publishes such jobs again (``reconcile_stalled(queued_grace=...)``).
"""

from __future__ import annotations

from json import loads
from queue import Empty
from typing import Any

from kombu.transport import sqlalchemy as kombu_sqla
from kombu.utils.encoding import bytes_to_str
from sqlalchemy import create_engine, event, func, text

TRANSPORT = "workers.embedded:Transport"


def _priority(payload: Any) -> Any:
    # The message's priority property (kombu sets it on every message it puts; 0 when the
    # sender gave none, as on Redis). SQLite reads it from the stored JSON.
    return func.coalesce(func.json_extract(payload, "$.properties.priority"), 0)


class Channel(kombu_sqla.Channel):
    """kombu's SQLAlchemy channel, with SQLite tuned and taken messages deleted."""

    def _engine_from_config(self) -> Any:
        engine = create_engine(self.connection.client.hostname, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine

    def _get(self, queue: str, timeout: Any = None) -> Any:
        obj = self._get_or_create(queue)
        self.session.execute(text("BEGIN IMMEDIATE TRANSACTION"))
        try:
            msg = (
                self.session.query(self.message_cls)
                .filter(self.message_cls.queue_id == obj.id)
                .filter(self.message_cls.visible != False)  # noqa: E712 (SQL expression)
                .order_by(_priority(self.message_cls.payload))
                .order_by(self.message_cls.sent_at)
                .order_by(self.message_cls.id)
                .limit(1)
                .first()
            )
            if msg is None:
                raise Empty()
            payload = loads(bytes_to_str(msg.payload))
            self.session.delete(msg)
            return payload
        finally:
            self.session.commit()


class Transport(kombu_sqla.Transport):
    """The embedded broker transport (``broker_transport = "workers.embedded:Transport"``)."""

    Channel = Channel
    polling_interval = 0.1
