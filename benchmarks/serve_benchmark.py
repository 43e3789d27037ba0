"""`kopru serve` throughput: N requests one after another vs N sent at once (batched by the server).

Starts the server in this process on a free port, asks through the official `openai` client (greedy, a fixed
number of new tokens per request), and reports wall time, requests/s, generated tokens/s and the batch sizes
the server used (from GET /metrics).

    python benchmarks/serve_benchmark.py --threads 1           # a tiny model built here (CPU, seconds)
    python benchmarks/serve_benchmark.py --model DIR --device cuda --requests 32 --max-tokens 128
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import torch
import uvicorn
from PIL import Image

from kopru.lesson.tiny import save_tiny_served_model
from kopru.serve import ServerLimits, load_server


def image_url(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved Köprü model (default: build a tiny one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="both modes this many times, alternating; medians")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); on a CPU shared "
                        "with other work, 1 avoids threads spinning while they wait for a busy core")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_dir = Path(args.model) if args.model else save_tiny_served_model(Path(tempfile.mkdtemp(prefix="kopru-serve-bench-")))
    limits = ServerLimits(max_batch_size=args.max_batch_size, max_new_tokens=max(args.max_tokens, 1),
                          default_new_tokens=min(256, max(args.max_tokens, 1)), batch_window_ms=20)
    app = load_server(model_dir, model_name="bench", limits=limits, device=args.device)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def ask(index: int) -> int:
        reply = client.chat.completions.create(
            model="bench", max_tokens=args.max_tokens, temperature=0,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(index)}},
                                                   {"type": "text", "text": "What is in the picture?"}]}])
        return reply.usage.completion_tokens

    def batch_sizes() -> dict[str, int]:
        with urllib.request.urlopen(url + "/metrics") as response:
            return json.load(response)["batch_sizes"]

    ask(0)  # warm-up: first-call allocations
    runs: dict[str, list[tuple[float, int, dict[str, int]]]] = {"one at a time": [], "all at once": []}
    for _ in range(args.rounds):  # alternating, so that a burst of load elsewhere hits both modes alike
        for mode, results in runs.items():
            before = batch_sizes()
            start = time.perf_counter()
            if mode == "one at a time":
                tokens = [ask(i) for i in range(args.requests)]
            else:
                with ThreadPoolExecutor(args.requests) as pool:
                    tokens = list(pool.map(ask, range(args.requests)))
            seconds = time.perf_counter() - start
            after = batch_sizes()
            used = {size: count - before.get(size, 0) for size, count in after.items() if count - before.get(size, 0)}
            results.append((seconds, sum(tokens), used))
    server.should_exit = True
    thread.join(timeout=10)
    app.state.kopru.worker.close()

    print(f"{args.requests} requests x {args.max_tokens} new tokens, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, median of {args.rounds} rounds")
    print("| mode | wall s | requests/s | generated tokens/s | batches (size: count), each round |")
    print("| --- | --- | --- | --- | --- |")
    for mode, results in runs.items():
        seconds, tokens, _ = sorted(results)[len(results) // 2]
        print(f"| {mode} | {seconds:.2f} | {args.requests / seconds:.2f} | {tokens / seconds:.0f} | "
              f"{' / '.join(str(used) for _, _, used in results)} |")


if __name__ == "__main__":
    main()
