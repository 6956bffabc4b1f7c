"""The TorchServe adapter: :class:`WeCLIPHandler` over :class:`~weclip_infer.serving.service.SegmentationService`.

The archive's files are a model directory that ``Segmenter.from_pretrained`` understands (our
checkpoint or an exported bundle) plus an optional ``serve_config.json``. Nothing is unpickled.
This module imports TorchServe's ``ts`` package; the rest of :mod:`weclip_infer.serving` does not.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List

import torch
from ts.torch_handler.base_handler import BaseHandler

from .responses import status_phrase
from .service import Response, SegmentationService

__all__ = ["WeCLIPHandler"]

logger = logging.getLogger(__name__)

_METRIC_NAMES = {"decode": "WeCLIPDecodeTime", "network": "WeCLIPNetworkTime", "fuse": "WeCLIPFuseTime",
                 "crf": "WeCLIPCRFTime", "encode": "WeCLIPEncodeTime", "request": "WeCLIPRequestTime"}


class WeCLIPHandler(BaseHandler):
    """TorchServe handler: one response per request of a batch, a bad request never fails the others."""

    def __init__(self) -> None:
        super().__init__()
        self.service: SegmentationService | None = None

    def initialize(self, context: Any) -> None:
        props = context.system_properties
        model_dir = Path(props["model_dir"])
        self.manifest = getattr(context, "manifest", None)
        gpu_id = props.get("gpu_id")
        device = f"cuda:{int(gpu_id)}" if torch.cuda.is_available() and gpu_id is not None else "cpu"
        self.map_location = "cuda" if device.startswith("cuda") else "cpu"
        self.device = torch.device(device)
        self.service = SegmentationService.from_model_dir(model_dir, device=device)
        self.model = getattr(self.service.segmenter, "model", None)
        self.initialized = True

    def _headers(self, idx: int) -> Dict[str, Any]:
        try:
            hdrs = self.context.get_all_request_header(idx) or {}
        except Exception:  # noqa: BLE001 - no request processor (e.g. unit tests)
            return {}
        return {str(k).lower(): v for k, v in hdrs.items() if isinstance(k, str)}

    def _set_response(self, idx: int, r: Response) -> None:
        ctx = self.context
        if ctx is None:
            return
        try:
            ctx.set_response_content_type(idx, r.content_type)
            if r.status != 200:
                ctx.set_response_status(r.status, status_phrase(r.status), idx)
        except Exception:  # noqa: BLE001 - no request processor (unit tests)
            logger.debug("could not set response headers", exc_info=True)

    def _emit_metrics(self, responses: List[Response]) -> None:
        metrics = getattr(self.context, "metrics", None)
        if metrics is None:
            return
        try:
            agg: Dict[str, float] = {}
            for r in responses:
                for k, v in r.timings.items():
                    stage = "network" if k.startswith("network@") else k
                    agg[stage] = agg.get(stage, 0.0) + v
            batch = self.service.last_batch if self.service is not None else {}
            if batch.get("network_calls"):  # the batch's requests share network passes: their time once
                agg["network"] = float(batch["network_s"])
            for stage, name in _METRIC_NAMES.items():
                if stage in agg:
                    metrics.add_time(name, round(agg[stage] * 1000.0, 3), None, "ms")
            errors = sum(1 for r in responses if r.status != 200)
            if errors:
                metrics.add_counter("WeCLIPRequestErrors", errors, None)
        except Exception:  # noqa: BLE001 - metrics must never fail a request
            logger.debug("metrics emission failed", exc_info=True)

    def handle(self, data: List[Any], context: Any) -> List[bytes]:
        """Entry point: one body per request, statuses and content types set on the context."""
        self.context = context
        assert self.service is not None, "handler used before initialize()"
        responses = self.service.handle([(req, self._headers(i)) for i, req in enumerate(data)])
        for i, r in enumerate(responses):
            self._set_response(i, r)
        self._emit_metrics(responses)
        return [r.body for r in responses]
