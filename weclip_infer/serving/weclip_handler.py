"""TorchServe handler file packed into WeCLIP ``.mar`` archives.

It only wires TorchServe's module-level entry point to
:class:`weclip_infer.serving.torchserve.WeCLIPHandler`; all logic lives in the installed
``weclip_infer`` package, which the TorchServe worker's Python must have.
"""
from weclip_infer.serving.torchserve import WeCLIPHandler

_service = WeCLIPHandler()


def handle(data, context):
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
