"""GET /v1/models and /v1/models/{id}: the backend's ListModels in OpenAI's shape."""

from __future__ import annotations

import grpc
from fastapi import APIRouter, Request

from http_bridge.backend import Backend
from http_bridge.errors import APIError, from_grpc
from http_bridge.protocol import ErrorResponse, ModelCard, ModelList

router = APIRouter(tags=["models"])
_ERRORS = {
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    503: {"model": ErrorResponse, "description": "No model server is available"},
}


async def _models(request: Request) -> list[ModelCard]:
    backend: Backend = request.app.state.backend
    try:
        infos = await backend.list_models(request.headers.get("x-request-id", ""))
    except grpc.aio.AioRpcError as err:
        raise from_grpc(err, generation_started=False) from err
    return [ModelCard(id=m.id, created=m.created) for m in infos]


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS)
async def list_models(request: Request) -> ModelList:
    """The served models (today one per backend fleet), ``owned_by: glmserve``."""
    return ModelList(data=await _models(request))


@router.get(
    "/v1/models/{model_id:path}",
    response_model=ModelCard,
    responses={404: {"model": ErrorResponse, "description": "Unknown model"}, **_ERRORS},
)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    """One served model; ids may contain '/', like Hugging Face repo names."""
    for card in await _models(request):
        if card.id == model_id:
            return card
    raise APIError(
        404,
        f"The model '{model_id}' does not exist.",
        param="model",
        code="model_not_found",
    )
