"""Client side of the service: the wire contract, sync and async clients, a CLI."""

from producer.client import AsyncChatClient, ChatClient, ChatError, ChatTimeout, Reply
from producer.wire.models import ErrorCode

__all__ = ["AsyncChatClient", "ChatClient", "ChatError", "ChatTimeout", "ErrorCode", "Reply"]
