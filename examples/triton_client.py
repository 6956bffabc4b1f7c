"""Segment one image with a WeCLIP model served by Triton Inference Server (gRPC).

    weclip-export CHECKPOINT --out bundle/ --triton model_repository/
    tritonserver --model-repository model_repository/          # on the Triton machine
    python examples/triton_client.py photo.jpg --manifest model_repository/weclip/manifest.json \
        --url 127.0.0.1:8001 --out photo_mask.png

The served graph takes normalised images and returns logits on the patch grid; this client does
the rest of a single-scale prediction: RGB → (pixel - mean) / std → logits →
bilinear upsampling to the image size → argmax → VOC-palette PNG. Needs ``tritonclient`` (with
grpcio), numpy, pillow and torch (for the upsampling only).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from PIL import Image


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image")
    ap.add_argument("--manifest", required=True, help="manifest.json beside config.pbtxt in the repository")
    ap.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    ap.add_argument("--model", default="weclip", help="model name in the repository")
    ap.add_argument("--out", default="mask.png")
    a = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    import tritonclient.grpc as grpcclient

    from weclip_infer.palette import voc_palette

    man = json.loads(open(a.manifest, encoding="utf-8").read())
    norm = man["normalization"]
    img = np.asarray(Image.open(a.image).convert("RGB"), dtype=np.float32)
    h, w = img.shape[:2]
    if min(h, w) < man["patch_size"]:
        print(f"error: image smaller than {man['patch_size']} pixels", file=sys.stderr)
        return 2
    x = ((img - np.asarray(norm["mean"], np.float32)) / np.asarray(norm["std"], np.float32))
    x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # 1×3×H×W

    client = grpcclient.InferenceServerClient(url=a.url)
    inp = grpcclient.InferInput(man["input"]["name"], list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer(a.model, [inp], outputs=[grpcclient.InferRequestedOutput(man["output"]["name"])])
    logits = torch.from_numpy(res.as_numpy(man["output"]["name"]))
    labels = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).argmax(1)[0].numpy()

    out = Image.fromarray(labels.astype(np.uint8), mode="P")
    out.putpalette(voc_palette().reshape(-1).tolist())
    out.save(a.out)
    present = sorted({man["class_names"][i] for i in np.unique(labels)})
    print(f"wrote {a.out}: {', '.join(present)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
