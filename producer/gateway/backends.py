"""Where a request goes: one `Backend` per namespace (a tenant's, or the open one), chosen by API key.

A backend is the client library's `AsyncChatClient` (request building, admission, shard choice,
cancels, reply checks) plus a `ReplyMux` reading its replies, both connected as the namespace's Redis
user: with a keys file each tenant's backend connects as that tenant's ACL user
(docs/security.md), so Redis itself keeps tenants apart behind the gateway; without one, a single
backend serves the un-tenanted keys as `REDIS_URL`'s user.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from producer.client import AsyncChatClient
from producer.gateway.api_keys import KeyRing
from producer.gateway.errors import ApiError
from producer.gateway.reply_mux import ReplyMux
from producer.gateway.settings import GatewaySettings
from producer.settings import ProducerSettings
from producer.wire.redis_factory import connect_async

log = structlog.get_logger("producer.gateway")


@dataclass
class Backend:
    tenant: str | None
    client: AsyncChatClient
    mux: ReplyMux
    active: set[object] = field(default_factory=set)  # calls between start and the end of finish

    async def aclose(self) -> None:
        await self.mux.aclose()
        await self.client.aclose()


def open_backend(producer: ProducerSettings, settings: GatewaySettings, tenant: str | None) -> Backend:
    """A backend whose connections (opened on first use) authenticate as `producer.redis_url`'s user."""
    client = AsyncChatClient(settings=producer, tenant=tenant)
    reader = connect_async(
        producer.redis_url,
        producer.redis_cluster,
        socket_timeout=producer.reply_block_ms / 1000 + 10,
        socket_connect_timeout=5,
    )
    mux = ReplyMux(
        reader,
        client.check_event,
        block_ms=producer.reply_block_ms,
        max_reads=settings.max_reads_per_tenant,
        cluster=producer.redis_cluster,
        backoff_initial_ms=producer.reconnect_backoff_initial_ms,
        backoff_max_ms=producer.reconnect_backoff_max_ms,
        label=tenant,
    )
    return Backend(tenant, client, mux)


class Backends:
    """Every backend of the gateway, and which one an `Authorization` header gets."""

    def __init__(self, producer: ProducerSettings, settings: GatewaySettings, keys: KeyRing | None):
        self.keys = keys
        self.by_tenant: dict[str | None, Backend] = {}
        if keys is None:
            self.by_tenant[None] = open_backend(producer, settings, producer.tenant)
        else:
            for tenant, creds in keys.tenants.items():
                url = creds.url(producer.redis_url)
                tenant_settings = producer.model_copy(update={"redis_url": url, "tenant": tenant})
                self.by_tenant[tenant] = open_backend(tenant_settings, settings, tenant)

    @property
    def open_namespace(self) -> bool:
        return self.keys is None

    def authenticate(self, authorization: str | None) -> Backend:
        """The backend of the presented key (`Bearer <key>`); ApiError 401 when it is missing or unknown.

        Without a keys file every caller gets the open namespace, whatever it presents."""
        if self.keys is None:
            return self.by_tenant[None]
        scheme, _, presented = (authorization or "").partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            raise ApiError(
                401,
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
                code="invalid_api_key",
            )
        key = self.keys.lookup(presented)
        if key is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return self.by_tenant[key.tenant]

    def open_requests(self) -> int:
        """Requests sent or being sent whose call has not finished (its cancel included)."""
        return sum(len(b.active) for b in self.by_tenant.values())

    async def aclose(self) -> None:
        for backend in self.by_tenant.values():
            try:
                await backend.aclose()
            except Exception as exc:  # closing must not stop the other backends from closing
                log.warning(
                    "gateway_close_failed", tenant=backend.tenant, error=f"{type(exc).__name__}: {exc}"
                )
