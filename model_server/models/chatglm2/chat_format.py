"""ChatGLM2's ``[Round i]`` prompt format and its reply post-processing.

The model was trained on ``[Round i]\\n\\n问：…\\n\\n答：…\\n\\n`` rounds and has no system role.
OpenAI-style conversations are mapped onto that, as the original ``openai_api.py`` demo did
where it could, and refused with a message saying what is wrong where it could not guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from model_server.models.base import ChatMessage, ConversationError, ToolSpec
from model_server.models.chatglm2.tokenizer import ChatGLM2Tokenizer

PLACEHOLDER = "[[训练时间]]"
REPLACEMENT = "2023年"

SystemPlacement = Literal["last", "first"]


def build_prompt(query: str, history: Sequence[tuple[str, str]]) -> str:
    """The original ``build_prompt``: past rounds, then the open round ending in ``答：``."""
    parts = [f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history, start=1)]
    parts.append(f"[Round {len(history) + 1}]\n\n问：{query}\n\n答：")
    return "".join(parts)


def to_rounds(
    messages: Sequence[ChatMessage], system_into: SystemPlacement = "last"
) -> tuple[str, list[tuple[str, str]]]:
    """OpenAI-style messages → (query, history) for :func:`build_prompt`.

    Rules (documented in docs/chatglm2.md):
    - leading system messages (before any user/assistant message) are joined with "\\n"; their
      text goes directly in front of a user query, with no separator: the current (last) one
      by default, as the original demo did, or the first one;
    - a system message later in the conversation (ChatGLM2 has no system role) becomes part
      of the next user message, in front of it, joined with "\\n"; with no user message after
      it (NextChat sends its summary instruction last) it is a user message itself;
    - consecutive messages of the same role are merged, joined with "\\n";
    - after that, the conversation must start with a user message and end with one.
    """
    systems: list[str] = []
    turns: list[list[str]] = []  # [role, content] runs, same-role messages merged
    late: list[str] = []  # system text waiting for the next user message
    for idx, msg in enumerate(messages):
        role, content = msg.role, msg.content
        if role == "system":
            (late if turns else systems).append(content)
            continue
        if role not in ("user", "assistant"):
            raise ConversationError(
                f"messages[{idx}]: role {role!r} is not supported by ChatGLM2 (no tools)"
            )
        if role == "user" and late:
            content = "\n".join([*late, content])
            late = []
        if turns and turns[-1][0] == role:
            turns[-1][1] += "\n" + content
        else:
            turns.append([role, content])
    if late:
        if turns and turns[-1][0] == "user":
            turns[-1][1] += "\n" + "\n".join(late)
        else:
            turns.append(["user", "\n".join(late)])
    if not turns:
        raise ConversationError("the conversation needs at least one user message")
    if turns[0][0] != "user":
        raise ConversationError(
            "the first non-system message must come from the user (ChatGLM2 rounds start with "
            "a question)"
        )
    if turns[-1][0] != "user":
        raise ConversationError("the last message must come from the user")
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    query = turns[-1][1]
    if systems:
        system = "\n".join(systems)
        if system_into == "first" and history:
            history[0] = (system + history[0][0], history[0][1])
        else:
            query = system + query
    return query, history


class ReplyFilter:
    """Streaming form of the original ``process_response``: ``strip()``, then replace.

    Leading whitespace is dropped; trailing whitespace and any suffix that could still become
    ``[[训练时间]]`` are held back until the next piece decides them. The concatenated output of
    all ``feed`` calls plus ``flush`` equals ``full.strip().replace(PLACEHOLDER, REPLACEMENT)``.
    """

    def __init__(self) -> None:
        self._pending = ""
        self._started = False

    def feed(self, text: str) -> str:
        buf = self._pending + text
        if not self._started:
            buf = buf.lstrip()
            if not buf:
                self._pending = ""
                return ""
            self._started = True
        # Longest suffix that is a proper prefix of the placeholder: it may still complete.
        # The placeholder has no border, so it can never straddle this cut.
        keep = 0
        for k in range(min(len(PLACEHOLDER) - 1, len(buf)), 0, -1):
            if buf.endswith(PLACEHOLDER[:k]):
                keep = k
                break
        head, tail = buf[: len(buf) - keep], buf[len(buf) - keep :]
        if not tail:
            # Trailing whitespace is only emitted once something non-blank follows it.
            stripped = head.rstrip()
            tail = head[len(stripped) :]
            head = stripped
        self._pending = tail
        return head.replace(PLACEHOLDER, REPLACEMENT)

    def flush(self) -> str:
        out = self._pending.replace(PLACEHOLDER, REPLACEMENT).rstrip() if self._started else ""
        self._pending = ""
        return out


def process_response(text: str) -> str:
    """The non-streaming post-processing of the original, for reference and tests."""
    return text.strip().replace(PLACEHOLDER, REPLACEMENT)


class ChatGLM2ChatFormat:
    """Implements ``base.ChatFormat`` for ChatGLM2."""

    def __init__(self, tokenizer: ChatGLM2Tokenizer, system_into: SystemPlacement = "last") -> None:
        self.tokenizer = tokenizer
        self.system_into: SystemPlacement = system_into

    def prompt_text(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt as text (without the ``[gMASK], sop`` ids)."""
        query, history = to_rounds(messages, self.system_into)
        return build_prompt(query, history)

    def render(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] | None = None
    ) -> list[int]:
        """``[gMASK], sop`` + SentencePiece ids of the prompt. Raises ConversationError.

        ChatGLM2 has no tool format (``tool_call_parser`` is None), so ``tools`` is always
        None here: the server describes tools generically instead.
        """
        return self.tokenizer.prompt_prefix + self.tokenizer.encode(self.prompt_text(messages))

    def tool_call_parser(self) -> None:
        return None

    def reply_filter(self) -> ReplyFilter:
        return ReplyFilter()
