"""GET /v1/models and /v1/models/{id}: the backend's ListModels in OpenAI's shape."""

from __future__ import annotations

import grpc
from fastapi import APIRouter, Request, Response

from http_bridge.backend import Backend
from http_bridge.errors import APIError, from_grpc, request_id_for
from http_bridge.protocol import ErrorResponse, ModelCard, ModelList

router = APIRouter(tags=["models"])
_ERRORS = {
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    503: {"model": ErrorResponse, "description": "No model server is available"},
}


async def _models(request: Request, request_id: str) -> list[ModelCard]:
    backend: Backend = request.app.state.backend
    try:
        infos = await backend.list_models(request_id)
    except grpc.aio.AioRpcError as err:
        error = from_grpc(
            err, generation_started=False, request_id=request_id, target=backend.target
        )
        error.extra_headers["x-request-id"] = request_id
        raise error from err
    return [ModelCard(id=m.id, created=m.created) for m in infos]


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS)
async def list_models(request: Request, response: Response) -> ModelList:
    """The served models (today one per backend fleet), ``owned_by: glmserve``."""
    request_id = request_id_for(request.headers)
    response.headers["x-request-id"] = request_id
    return ModelList(data=await _models(request, request_id))


@router.get(
    "/v1/models/{model_id:path}",
    response_model=ModelCard,
    responses={404: {"model": ErrorResponse, "description": "Unknown model"}, **_ERRORS},
)
async def retrieve_model(model_id: str, request: Request, response: Response) -> ModelCard:
    """One served model; ids may contain '/', like Hugging Face repo names."""
    request_id = request_id_for(request.headers)
    response.headers["x-request-id"] = request_id
    for card in await _models(request, request_id):
        if card.id == model_id:
            return card
    raise APIError(
        404,
        f"The model '{model_id}' does not exist.",
        param="model",
        code="model_not_found",
        headers={"x-request-id": request_id},
    )
