"""Small helpers for talking to a real model server over gRPC in tests."""

from __future__ import annotations

from glmserve.v1 import chat_pb2

ROLES = {
    "system": chat_pb2.ROLE_SYSTEM,
    "user": chat_pb2.ROLE_USER,
    "assistant": chat_pb2.ROLE_ASSISTANT,
}


def chat_request(
    content: str | None = "Hi", *, messages: list[tuple[str, str]] | None = None, **fields: object
) -> chat_pb2.ChatRequest:
    msgs = messages if messages is not None else [("user", content)]
    return chat_pb2.ChatRequest(
        messages=[chat_pb2.Message(role=ROLES[r], content=c) for r, c in msgs], **fields
    )


def collect(stream) -> tuple[str, list[chat_pb2.ChatResponse]]:  # noqa: ANN001
    msgs = list(stream)
    return "".join(m.text for m in msgs), msgs
