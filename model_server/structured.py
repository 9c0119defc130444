"""ChatRequest.structured_output → an llguidance grammar (checked before admission)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from glmserve.v1 import chat_pb2

from .engine.types import SamplingParams
from .validation import InvalidArgument

if TYPE_CHECKING:
    from .engine.grammar import Grammars


def check_constrainable(params: SamplingParams, field: str) -> None:
    """A grammar ends the reply itself (eos once it is complete): settings that forbid eos
    would leave no token to sample, so they are refused up front."""
    if params.ignore_eos:
        raise InvalidArgument("ignore_eos", f"cannot be combined with {field}")
    if params.min_tokens:
        raise InvalidArgument("min_tokens", f"cannot be combined with {field}")


def structured_grammar(grammars: Grammars, so: chat_pb2.StructuredOutput) -> str:
    from .engine.grammar import schema_text

    kind = so.WhichOneof("kind")
    if kind == "json_schema":
        field = "structured_output.json_schema"
        return grammars.json_schema(schema_text(so.json_schema, field), field)
    if kind == "json_object":
        if not so.json_object:
            raise InvalidArgument("structured_output.json_object", "must be true when set")
        return grammars.json_schema({"type": "object"}, "structured_output.json_object")
    if kind == "regex":
        return grammars.regex(so.regex, "structured_output.regex")
    if kind == "lark_grammar":
        return grammars.lark(so.lark_grammar, "structured_output.lark_grammar")
    raise InvalidArgument(
        "structured_output", "set one of json_schema, json_object, regex, lark_grammar"
    )
