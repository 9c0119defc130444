"""ChatGLM2 tokenizer: special ids, prompt prefix, decoding, incremental decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
from chatglm2_fixture import NOT_IN_VOCAB

from model_server.models.chatglm2 import ChatGLM2Tokenizer

FFFD = "\ufffd"


@pytest.fixture(scope="module")
def tok(tiny_chatglm2_dir: Path) -> ChatGLM2Tokenizer:
    return ChatGLM2Tokenizer(tiny_chatglm2_dir / "tokenizer.model")


def test_special_ids(tok):
    n = tok.sp_vocab_size
    assert n == tok._sp.get_piece_size()
    assert tok.special_tokens == {
        "[MASK]": n,
        "[gMASK]": n + 1,
        "[sMASK]": n + 2,
        "sop": n + 3,
        "eop": n + 4,
    }
    assert (tok.mask_token_id, tok.gmask_token_id, tok.smask_token_id) == (n, n + 1, n + 2)
    assert (tok.sop_token_id, tok.eop_token_id) == (n + 3, n + 4)
    assert tok.vocab_size == n + 5
    assert (tok.unk_token_id, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 0, 1, 2)
    assert tok.id_to_piece(2) == "</s>"
    assert tok.id_to_piece(n + 1) == "[gMASK]"
    assert tok.prompt_prefix == [n + 1, n + 3]


def test_encode_adds_nothing(tok):
    ids = tok.encode("hello world")
    assert ids and all(3 <= i < tok.sp_vocab_size for i in ids)
    assert tok.encode("") == []


def test_special_names_in_text_stay_text(tok):
    text = "[MASK] [gMASK] [sMASK] sop eop </s> <s>"
    ids = tok.encode(text)
    assert all(i < tok.sp_vocab_size for i in ids)
    assert not {0, 1, 2} & set(ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize(
    "text",
    [
        "hello world",
        "two  spaces,   three, tab\there",
        "line one\nline two\n\n\nend\n",
        "你好，世界。今天的时间？",
        "mixed 中文 and English 123 2023年",
        f"byte fallback {NOT_IN_VOCAB} and again{NOT_IN_VOCAB}",
        "[Round 1]\n\n问：你好\n\n答：",
        " leading space",
        "trailing space ",
    ],
)
def test_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_byte_fallback_is_used(tok):
    pieces = [tok.id_to_piece(i) for i in tok.encode(NOT_IN_VOCAB)]
    assert sum(p.startswith("<0x") for p in pieces) == len(NOT_IN_VOCAB.encode())


def test_decode_drops_specials_and_padding_rows(tok):
    ids = tok.encode("你好 world")
    n = tok.sp_vocab_size
    noisy = [*tok.prompt_prefix, 1, *ids[:2], n, n + 2, 0, *ids[2:], n + 4, 2, 0, n + 5, n + 60]
    assert tok.decode(noisy) == tok.decode(ids) == "你好 world"
    assert tok.decode([2]) == ""
    assert tok.decode([]) == ""


def test_partial_utf8_at_the_end_decodes_to_fffd(tok):
    ids = tok.encode("a" + NOT_IN_VOCAB[0])  # "a" + a 3-byte character as byte pieces
    for k in range(1, len(ids)):
        text = tok.decode(ids[:k])
        if k > len(ids) - 3:
            assert text.endswith(FFFD), (k, text)
    assert tok.decode(ids) == "a" + NOT_IN_VOCAB[0]


def incremental(tok: ChatGLM2Tokenizer, ids: list[int]) -> list[str]:
    """The original's loop: re-decode everything, emit only when not ending in U+FFFD."""
    emitted, chunks = "", []
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k])
        if text.endswith(FFFD):
            continue
        assert text.startswith(emitted)
        chunks.append(text[len(emitted) :])
        emitted = text
    return chunks


@pytest.mark.parametrize(
    "text",
    [
        f"训练{NOT_IN_VOCAB}时间 the model 答：\n\n你好{NOT_IN_VOCAB}!",
        "plain english only",
        f"{NOT_IN_VOCAB}{NOT_IN_VOCAB}",
    ],
)
def test_incremental_decoding_never_breaks_a_character(tok, text):
    ids = tok.encode(text)
    chunks = incremental(tok, ids)
    assert "".join(chunks) == text
    assert all(FFFD not in c for c in chunks)
    if NOT_IN_VOCAB in text:
        assert len(chunks) < len(ids)  # something was held back while a character was partial
