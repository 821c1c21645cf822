"""The LitServe adapter of the routed GAG server (``serving.server.RoutedService`` does the work).

LitServe decodes every request of a batch before it predicts, and any exception in that loop fails the whole
batch. So a request this server refuses never raises: ``decode_request`` turns it into a ``Refusal``, ``predict``
answers the other requests of the batch, and ``encode_response`` returns the refusal as its own 4xx JSON response.

No ``from __future__ import annotations`` here: LitServe reads ``decode_request``'s annotation to build the
endpoint, and ``dict`` has to be the real type (FastAPI then parses the body as a JSON object and rejects
anything else with a validation error, which the server turns into a 400).
"""

import logging
from dataclasses import dataclass
from typing import Any

import litserve as ls
from fastapi.responses import JSONResponse
from omegaconf import OmegaConf

from gag_lightning.serving.protocol import ChatQuery, RequestError

__all__ = ["ChatAPI", "Refusal"]


@dataclass
class Refusal:
    """A request refused before batching: its HTTP status and OpenAI-style error body."""

    status: int
    body: dict


class ChatAPI(ls.LitAPI):
    """decode = validate (a ``Refusal`` for a bad request), predict = one routed batch, encode = the JSON body."""

    def __init__(self, cfg: dict, max_batch_size: int = 16, batch_timeout: float = 0.05,
                 api_path: str = "/v1/chat/completions") -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=api_path)
        self.cfg_dict = cfg
        self.service = None

    def setup(self, device: Any) -> None:
        from gag_lightning.serving.server import RoutedService

        # the worker is a fresh (spawned) process: Hydra's logging setup lives in the parent only
        package_log = logging.getLogger("gag_lightning")
        if not package_log.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
            package_log.addHandler(handler)
            package_log.setLevel(logging.INFO)
        self.service = RoutedService(OmegaConf.create(self.cfg_dict), device=device)

    def decode_request(self, request: dict) -> Any:
        try:
            return self.service.parse(request)
        except RequestError as exc:
            return Refusal(exc.status, exc.body())

    def batch(self, inputs: list) -> list:
        return list(inputs)

    def predict(self, batch: Any) -> Any:
        single = not isinstance(batch, list)  # max_batch_size=1: LitServe passes one request
        items = [batch] if single else batch
        valid = [i for i, x in enumerate(items) if isinstance(x, ChatQuery)]
        outputs: list = list(items)
        if valid:
            for i, out in zip(valid, self.service.predict([items[i] for i in valid]), strict=True):
                outputs[i] = out
        return outputs[0] if single else outputs

    def unbatch(self, output: list) -> list:
        return list(output)

    def encode_response(self, output: Any):
        if isinstance(output, Refusal):
            return JSONResponse(status_code=output.status, content=output.body)
        return output
