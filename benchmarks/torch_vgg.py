"""VGG-19 up to conv5_4 (after ReLU) in eager PyTorch, from the weights of a built ONNX model.

Used as the seed's feature extractor by bench_pipeline.py (eager fp32, as the seed ran it) and
as the GPU reference of device_check.sh (fp16, channels_last, cuDNN autotuning) where ONNX
Runtime has no CUDA execution provider. Benchmark-only: torch is never on the serving path.

    python benchmarks/torch_vgg.py --gpu-reference [--home DIR] [--batch-sizes 64,128,256]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from feature_server.models.build import VGG19_BLOCKS  # noqa: E402
from feature_server.models.registry import load_registry  # noqa: E402


def onnx_weights(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import onnx
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    return {f"conv{b}_{i}": (inits[f"conv{b}_{i}.weight"], inits[f"conv{b}_{i}.bias"])
            for b, n, _ in VGG19_BLOCKS for i in range(1, n + 1)}


def vgg19_conv54(weights: dict[str, tuple[np.ndarray, np.ndarray]]):
    """torch.nn.Sequential: the 16 convs with ReLU and the 4 inner max pools (caffe input)."""
    import torch

    layers: list[torch.nn.Module] = []
    for b, n, _ in VGG19_BLOCKS:
        for i in range(1, n + 1):
            w, bias = weights[f"conv{b}_{i}"]
            conv = torch.nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy(np.array(w, np.float32)))
                conv.bias.copy_(torch.from_numpy(np.array(bias, np.float32)))
            layers += [conv, torch.nn.ReLU(inplace=True)]
        if b != VGG19_BLOCKS[-1][0]:
            layers.append(torch.nn.MaxPool2d(2, 2))
    return torch.nn.Sequential(*layers).eval()


def gpu_reference(home: str | None, batch_sizes: list[int], seconds: float = 3.0) -> dict:
    """img/s of conv5_4 in fp16 on the GPU (network only, input already on the device)."""
    import torch

    torch.backends.cudnn.benchmark = True
    net = vgg19_conv54(onnx_weights(load_registry(home)["vgg19"].onnx_path))
    net = net.to("cuda", dtype=torch.float16, memory_format=torch.channels_last)
    out = {"device": torch.cuda.get_device_name(), "rows": []}
    with torch.inference_mode():
        for b in batch_sizes:
            x = torch.randn(b, 3, 224, 224, device="cuda", dtype=torch.float16)
            x = x.contiguous(memory_format=torch.channels_last)
            for _ in range(3):
                net(x)
            torch.cuda.synchronize()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                net(x)
                n += b
            torch.cuda.synchronize()
            out["rows"].append({"batch": b, "img_s": n / (time.perf_counter() - t0)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-reference", action="store_true", required=True)
    parser.add_argument("--home")
    parser.add_argument("--batch-sizes", default="64,128,256")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    result = gpu_reference(args.home, [int(b) for b in args.batch_sizes.split(",")])
    for row in result["rows"]:
        sys.stdout.write(f"torch fp16 {result['device']} batch {row['batch']}: "
                         f"{row['img_s']:.0f} img/s\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
