"""glmserve.v1.ChatService: validates what only the model knows, then streams engine output."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import grpc

from glmserve.v1 import chat_pb2, chat_pb2_grpc

from .engine.types import FinishReason, GenerationRequest
from .models.base import LoadedModel, token_bytes
from .structured import check_constrainable, structured_grammar
from .tools import ToolPlan, grammar_for, new_call_id, plan, with_ids
from .validation import Defaults, InvalidArgument, messages_of, sampling_params

if TYPE_CHECKING:  # the engine imports torch; the servicer must not (health is up first)
    from .engine.engine import Engine
    from .engine.grammar import Grammars


_FINISH = {
    FinishReason.STOP: chat_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: chat_pb2.FINISH_REASON_LENGTH,
}


class ServingState:
    """What the servicer serves; filled in once the model is loaded."""

    def __init__(self, served_model_name: str | None) -> None:
        self.served_model_name = served_model_name
        self.loaded: LoadedModel | None = None
        self.engine: Engine | None = None
        self.created = int(time.time())
        self.draining = False

    @property
    def model_id(self) -> str:
        return self.served_model_name or ""


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, state: ServingState) -> None:
        self._state = state
        self._ids = 0
        self._grammars: Grammars | None = None
        self._grammars_of: LoadedModel | None = None

    async def _ready(self, context: grpc.aio.ServicerContext) -> tuple[LoadedModel, Engine]:
        st = self._state
        if st.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        if st.loaded is None or st.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model is still loading")
        return st.loaded, st.engine

    async def _check_model(self, name: str, context: grpc.aio.ServicerContext) -> None:
        if name and name != self._state.model_id:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model {name!r} is not served here (this server serves {self._state.model_id!r})",
            )

    async def _prompt(self, loaded: LoadedModel, request) -> tuple[list[int], ToolPlan]:  # noqa: ANN001
        """The chat prompt (Chat or Tokenize request), with the tools plan it was made for."""
        tools = plan(request, messages_of(request.messages), loaded.chat_format)

        def render() -> list[int]:
            if tools.tools is None:  # formats without tools keep their one-argument render
                return loaded.chat_format.render(tools.messages)
            return loaded.chat_format.render(tools.messages, tools.tools)

        # Tokenizing a long conversation takes milliseconds: keep it off the event loop.
        return await asyncio.to_thread(render), tools

    async def _raw_prompt(self, loaded: LoadedModel, request: chat_pb2.ChatRequest) -> list[int]:
        """The completion path: the prompt as given, no chat format."""
        if request.messages:
            raise InvalidArgument("messages", "must be empty with prompt or prompt_token_ids")
        if request.prompt and request.prompt_token_ids:
            raise InvalidArgument("prompt", "set prompt or prompt_token_ids, not both")
        if request.prompt_token_ids:
            vocab = loaded.tokenizer.vocab_size
            for i, t in enumerate(request.prompt_token_ids):
                if t >= vocab:
                    raise InvalidArgument(
                        f"prompt_token_ids[{i}]", f"{t} is not below the vocabulary size {vocab}"
                    )
            return list(request.prompt_token_ids)
        return await asyncio.to_thread(loaded.tokenizer.encode, request.prompt)

    async def Chat(self, request: chat_pb2.ChatRequest, context: grpc.aio.ServicerContext):
        # Domain errors (bad fields, a full queue, a dead engine...) are raised as exceptions;
        # the interceptor maps them to their status through errors.STATUS_OF.
        loaded, engine = await self._ready(context)
        await self._check_model(request.model, context)
        tools: ToolPlan | None = None
        if request.prompt or request.prompt_token_ids:
            if request.tools:
                raise InvalidArgument("tools", "not with a raw prompt")
            prompt = await self._raw_prompt(loaded, request)
        else:
            prompt, tools = await self._prompt(loaded, request)
        params = sampling_params(
            request,
            len(prompt),
            loaded.max_model_len,
            Defaults(loaded.default_temperature, loaded.default_top_p),
        )
        constraint = None
        if request.HasField("structured_output"):
            check_constrainable(params, "structured_output")
            grammars = self._grammars_for(loaded, engine)
            # Compiling takes milliseconds (the first one, the tokenizer: about a second).
            constraint = await asyncio.to_thread(
                lambda: grammars.matcher(structured_grammar(grammars, request.structured_output))
            )
        elif tools is not None and tools.schema is not None:
            check_constrainable(params, "tools")
            grammars = self._grammars_for(loaded, engine)
            plan_ = tools
            constraint = await asyncio.to_thread(
                lambda: grammars.matcher(grammar_for(grammars, plan_))
            )
        parser = tools.parser if tools is not None else None
        take_deltas = getattr(parser, "take_deltas", None)  # parsers that stream calls
        call_ids: dict[int, str] = {}  # ids of the calls already announced, by index
        stream = engine.submit(
            GenerationRequest(request.request_id or self._new_id(), prompt, params, constraint)
        )
        first = True
        try:
            async for out in stream:
                if out.finish_reason is FinishReason.ABORTED:
                    if out.error is not None:
                        raise out.error
                    return
                text = out.text if parser is None else parser.feed(out.text)
                msg = chat_pb2.ChatResponse(text=text, token_ids=out.token_ids)
                if take_deltas is not None:
                    for d in take_deltas():
                        delta = msg.tool_call_deltas.add(index=d.index, arguments=d.arguments)
                        if d.name is not None:
                            delta.id = call_ids[d.index] = new_call_id()
                            delta.name = d.name
                for token_id, lp in zip(out.token_ids, out.logprobs):  # noqa: B905 - empty when off
                    msg.logprobs.append(self._logprobs(loaded, lp, token_id))
                if first:
                    first = False
                    await self._prompt_extras(loaded, request, prompt, out.prompt_logprobs, msg)
                if out.finish_reason is not None:
                    msg.finish_reason = _FINISH[out.finish_reason]
                    if parser is not None:
                        rest, calls = parser.finish()
                        msg.text += rest
                        for call in with_ids(calls, call_ids):
                            msg.tool_calls.add(id=call.id, name=call.name, arguments=call.arguments)
                        # A call cut short by max_tokens keeps LENGTH, as OpenAI reports it.
                        if calls and out.finish_reason is FinishReason.STOP:
                            msg.finish_reason = chat_pb2.FINISH_REASON_TOOL_CALLS
                    msg.usage.prompt_tokens = out.usage.prompt_tokens
                    msg.usage.completion_tokens = out.usage.completion_tokens
                    msg.usage.cached_prompt_tokens = out.usage.cached_prompt_tokens
                yield msg
        finally:
            # Cancelled, deadline passed, or the client went away: free the slot at once.
            stream.abort()

    async def _prompt_extras(
        self,
        loaded: LoadedModel,
        request: chat_pb2.ChatRequest,
        prompt: list[int],
        scores: list | None,
        msg: chat_pb2.ChatResponse,
    ) -> None:
        """The first message's echo and prompt log-probabilities (the first prompt token has
        none: logprob 0, no alternatives, as the contract says)."""

        def build() -> None:
            if request.echo:
                msg.prompt_text = request.prompt or loaded.tokenizer.decode(prompt)
            if scores is None or not prompt:
                return
            tok = loaded.tokenizer
            head = chat_pb2.TokenLogprob(token_id=prompt[0], token=token_bytes(tok, prompt[0]))
            msg.prompt_logprobs.add(chosen=head)
            for token_id, lp in zip(prompt[1:], scores, strict=True):
                msg.prompt_logprobs.append(self._logprobs(loaded, lp, token_id))

        if request.echo or scores is not None:
            # Thousands of token lookups for a long prompt: off the event loop.
            await asyncio.to_thread(build)

    @staticmethod
    def _logprobs(loaded: LoadedModel, lp, token_id: int) -> chat_pb2.PositionLogprobs:  # noqa: ANN001
        tok = loaded.tokenizer

        def one(t: int, value: float) -> chat_pb2.TokenLogprob:
            return chat_pb2.TokenLogprob(token_id=t, token=token_bytes(tok, t), logprob=value)

        return chat_pb2.PositionLogprobs(
            chosen=one(token_id, lp.logprob), top=[one(t, v) for t, v in lp.top]
        )

    def _grammars_for(self, loaded: LoadedModel, engine: Engine) -> Grammars:
        if self._grammars is None or self._grammars_of is not loaded:
            from .engine.grammar import Grammars  # llguidance loads with the first use

            self._grammars = Grammars(loaded, engine.runner.vocab)
            self._grammars_of = loaded
        return self._grammars

    def _new_id(self) -> str:
        self._ids += 1
        return f"req-{self._state.created:x}-{self._ids}"

    async def ListModels(
        self, request: chat_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.ListModelsResponse:
        loaded, _ = await self._ready(context)
        st = self._state
        info = chat_pb2.ModelInfo(
            id=st.model_id,
            max_model_len=loaded.max_model_len,
            architecture=loaded.architecture,
            source=loaded.source,
            dtype=str(loaded.dtype).removeprefix("torch."),
            device=str(loaded.device),
            created=st.created,
            vocab_size=loaded.tokenizer.vocab_size,
            default_temperature=loaded.default_temperature,
            default_top_p=loaded.default_top_p,
        )
        return chat_pb2.ListModelsResponse(models=[info])

    async def Tokenize(
        self, request: chat_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.TokenizeResponse:
        loaded, _ = await self._ready(context)
        await self._check_model(request.model, context)
        prompt, _ = await self._prompt(loaded, request)
        return chat_pb2.TokenizeResponse(
            token_ids=prompt, count=len(prompt), max_model_len=loaded.max_model_len
        )
