"""The whole engine (``LLMEngine.step``) on a TP group, synchronous and with async scheduling.

    python bench/tp_engine.py --preset llama-3.1-8b --tp-size 2 --batch 64 --context 1024 --out tp_engine.json

Random bf16 weights of the preset's shape; one prefill step, then lock-step decode of the whole
batch (gpu_decode.measure_engine), first synchronous then async, on the same runner. The rank
0 process samples; with async scheduling it broadcasts the sampled tokens to the other ranks
on the device each step."""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import measure_engine  # noqa: E402
from tp_decode import BLOCK_SIZE, checkpoint, close, make_runner  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-3.1-8b")
    p.add_argument("--tp-size", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--checkpoint-dir", type=Path, default=Path("/dev/shm/tp"))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    model_dir, _ = checkpoint("llama", args.preset, args.checkpoint_dir, "cuda")
    runner = make_runner(model_dir, args.tp_size, "cuda", torch.bfloat16, num_blocks=args.batch * -(-args.context // BLOCK_SIZE) + 8)
    rows = []
    try:
        for overlap in (False, True):
            rows.append(measure_engine(runner, model_dir, args.batch, args.context, random.Random(0), async_scheduling=overlap))
    finally:
        close(runner)
    result = {"preset": args.preset, "tp_size": args.tp_size, "host": platform.node(),
              "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], "engine": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
