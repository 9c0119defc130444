"""ChatGLM2 prompt builder ([Round N] format, system folding, bad histories) and reply filter."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from model_server.models.base import ChatMessage, ConversationError
from model_server.models.chatglm2 import ChatGLM2ChatFormat, ChatGLM2Tokenizer, ReplyFilter
from model_server.models.chatglm2.chat_format import (
    PLACEHOLDER,
    build_prompt,
    process_response,
    to_rounds,
)


def S(text: str) -> ChatMessage:
    return ChatMessage("system", text)


def U(text: str) -> ChatMessage:
    return ChatMessage("user", text)


def A(text: str) -> ChatMessage:
    return ChatMessage("assistant", text)


@pytest.fixture(scope="module")
def fmt(tiny_chatglm2_dir: Path) -> ChatGLM2ChatFormat:
    return ChatGLM2ChatFormat(ChatGLM2Tokenizer(tiny_chatglm2_dir / "tokenizer.model"))


# ---------------------------------------------------------------- prompt builder
def test_single_turn(fmt):
    text = fmt.prompt_text([U("你好")])
    assert text == "[Round 1]\n\n问：你好\n\n答："
    assert "\uff1a" in text and ":" not in text
    tok = fmt.tokenizer
    ids = fmt.render([U("你好")])
    assert ids == [tok.gmask_token_id, tok.sop_token_id, *tok.encode(text)]
    assert tok.decode(ids) == text


def test_multi_turn(fmt):
    msgs = [U("q1"), A("a1"), U("q2"), A("a2"), U("q3")]
    assert fmt.prompt_text(msgs) == (
        "[Round 1]\n\n问：q1\n\n答：a1\n\n"
        "[Round 2]\n\n问：q2\n\n答：a2\n\n"
        "[Round 3]\n\n问：q3\n\n答："
    )
    assert build_prompt("q3", [("q1", "a1"), ("q2", "a2")]) == fmt.prompt_text(msgs)


def test_system_goes_in_front_of_the_current_query_like_the_original_demo(fmt):
    assert (
        fmt.prompt_text([S("你是助手。"), U("你好")]) == "[Round 1]\n\n问：你是助手。你好\n\n答："
    )
    query, history = to_rounds([S("SYS"), U("q1"), A("a1"), U("q2")])
    assert (query, history) == ("SYSq2", [("q1", "a1")])


def test_system_into_first_query_option(fmt):
    query, history = to_rounds([S("SYS"), U("q1"), A("a1"), U("q2")], system_into="first")
    assert (query, history) == ("q2", [("SYSq1", "a1")])
    assert to_rounds([S("SYS"), U("q1")], system_into="first") == ("SYSq1", [])


def test_several_system_messages_are_joined(fmt):
    assert to_rounds([S("a"), S("b"), U("q")]) == ("a\nbq", [])


def test_system_messages_later_in_the_conversation_join_the_next_user_message():
    msgs = [U("q1"), A("a1"), S("from now on, be brief"), U("q2")]
    assert to_rounds(msgs) == ("from now on, be brief\nq2", [("q1", "a1")])
    # Last (NextChat's summary instruction): a user message of its own, or merged into one.
    assert to_rounds([U("q1"), A("a1"), S("summarize")]) == ("summarize", [("q1", "a1")])
    assert to_rounds([U("q1"), S("in one line")]) == ("q1\nin one line", [])
    # Leading system text still goes in front of the current query.
    assert to_rounds([S("SYS"), U("q1"), A("a1"), S("late"), U("q2")]) == (
        "SYSlate\nq2",
        [("q1", "a1")],
    )


def test_consecutive_same_role_messages_are_merged():
    query, history = to_rounds([U("x"), U("y"), A("1"), A("2"), U("z")])
    assert (query, history) == ("z", [("x\ny", "1\n2")])


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "at least one user message"),
        ([S("only system")], "at least one user message"),
        ([U("q"), A("a")], "last message must come from the user"),
        ([A("hello"), U("q")], "first non-system message must come from the user"),
    ],
)
def test_inexpressible_histories_raise(fmt, messages, message):
    with pytest.raises(ConversationError, match=message):
        fmt.render(messages)


def test_special_names_in_messages_are_text(fmt):
    ids = fmt.render([U("[gMASK] sop eop")])
    tok = fmt.tokenizer
    assert ids[:2] == tok.prompt_prefix
    assert all(i < tok.sp_vocab_size for i in ids[2:])


# ---------------------------------------------------------------- reply filter
SAMPLES = [
    "",
    "   ",
    "\n\n",
    "Hello",
    "  Hello world  \n",
    "我的训练数据截止到[[训练时间]]。",
    "[[训练时间]]",
    " [[训练时间]] ",
    "[[训练时间",
    "[[训练时间]",
    "a [[训 b",
    "[[[训练时间]]]",
    "[[训练时间]][[训练时间]]",
    "x [[ y [[训练 z",
    "ends with [[",
    "ends with [",
    "\u3000全角空格\u3000",
    "tabs\t\tin\tthe middle\t",
    "line\n\nbreaks\n  inside \n",
]


def run_filter(pieces: list[str]) -> str:
    f = ReplyFilter()
    return "".join(f.feed(p) for p in pieces) + f.flush()


@pytest.mark.parametrize("text", SAMPLES)
def test_filter_matches_original_for_every_split(fmt, text):
    want = process_response(text)
    assert want == text.strip().replace(PLACEHOLDER, "2023年")
    assert run_filter([text]) == want
    assert run_filter(list(text)) == want
    for i, j in itertools.combinations_with_replacement(range(len(text) + 1), 2):
        assert run_filter([text[:i], text[i:j], text[j:]]) == want, (i, j)
    assert isinstance(fmt.reply_filter(), ReplyFilter)
    assert fmt.reply_filter() is not fmt.reply_filter()


def test_filter_random_fuzz():
    rng = random.Random(1)
    alphabet = [" ", "\n", "[", "]", "训", "练", "时", "间", "a", "[[训练时间]]"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 5))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert run_filter(pieces) == process_response(text), (text, pieces)


def test_filter_streams_promptly():
    """Text is released as soon as it is decided, not only at flush."""
    f = ReplyFilter()
    assert f.feed("  Hello") == "Hello"
    assert f.feed(" ") == ""
    assert f.feed("world [[训") == " world "
    assert f.feed("练时间]] ok\n") == "2023年 ok"
    assert f.flush() == ""
