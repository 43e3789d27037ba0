"""Soak test of `kopru serve`: a stream of good requests from the official `openai` client, hostile ones mixed in.

    python scripts/soak_server.py --duration 180 --threads 1                  # a tiny model built here
    python scripts/soak_server.py --model runs/my-vlm/final --duration 600 --plot soak.png --json soak.json

1. Starts `kopru serve` in a subprocess, as a user would: on a tiny model (`kopru.lesson.tiny.save_tiny_served_model`,
   whose random LLM answers run to max_tokens) or `--model`, with an API key (KOPRU_API_KEY), `--allow-local-dir`
   (holding a symlink loop) and a short `--read-timeout-s`.
2. Quiet phase: every good request once, alone, streamed and whole (the two must agree): the reference answers.
3. Soak phase, `--duration` seconds: `--good-clients` threads send the good requests in a random order, streamed or
   not, through the official client (no retries: any error is a lost request); `--hostile-clients` threads go
   round the hostile catalogue (lone surrogates, huge top_k and seed, NaNs, JSON 100,000 deep, bodies over the
   limit and just under it, text/plain, no or a wrong key, a foreign Host, image bombs, damaged images, hostile
   local paths, over-long text, clients that disconnect mid-answer); `--slow-clients` threads keep slow clients
   (half-sent headers or body, a byte at a time) coming.
4. Every `--sample-s` seconds: the server's resident memory (/proc), /health and /metrics.
5. Report: good requests sent / answered / lost / wrong (each answer compared with the quiet phase's), each
   hostile kind with its answers, the RSS over time (a table; `--plot` draws it). Exit status 1 when a good request
   was lost or answered wrongly, a hostile request got an answer it should not (a 5xx, a wrong status, a slow
   client kept open), /health failed once, or the server's own counters show a failure or a restart.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import io
import json
import os
import random
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

API_KEY = "soak-key"
MODEL_NAME = "soak"
QUESTIONS = ["What is in the picture?", "What colour is the shape?", "Where is the shape?", "How many shapes?"]
COLOURS = [(220, 30, 30), (30, 160, 40), (30, 60, 220), (240, 200, 20)]


# ------------------------------------------------------------------------------------------------ inputs
def drawn_png(seed: int, size: int = 64) -> bytes:
    """A coloured shape on a light background, different per seed, as PNG bytes."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    box = (8 + 4 * (seed % 6), 8, 40 + 4 * (seed % 6), 48)
    (draw.ellipse if seed % 2 else draw.rectangle)(box, fill=COLOURS[seed % len(COLOURS)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user_message(question: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


@dataclass
class GoodRequest:
    """One of the good requests: greedy, or sampled with a seed (both give one answer only)."""

    messages: list[dict]
    max_tokens: int
    sampling: dict = field(default_factory=lambda: {"temperature": 0})

    def create(self, client, stream: bool):
        extra = {"extra_body": {"top_k": self.sampling["top_k"]}} if "top_k" in self.sampling else {}
        return client.chat.completions.create(
            model=MODEL_NAME, messages=self.messages, max_tokens=self.max_tokens, stream=stream,
            temperature=self.sampling["temperature"], seed=self.sampling.get("seed"), **extra)


def good_requests() -> list[GoodRequest]:
    requests = []
    for index in range(8):
        sampling = {"temperature": 0} if index % 3 != 2 else {"temperature": 1.0, "seed": 100 + index, "top_k": 20}
        urls = [data_url(drawn_png(index))] if index % 4 != 3 else []  # some text-only requests too
        requests.append(GoodRequest(user_message(QUESTIONS[index % 4], *urls), (8, 16, 32)[index % 3], sampling))
    return requests


def answer_of(request: GoodRequest, client, stream: bool) -> tuple[str, str]:
    """(text, finish_reason) of one good request; raises on any error."""
    if not stream:
        reply = request.create(client, stream=False)
        return reply.choices[0].message.content, reply.choices[0].finish_reason
    pieces, finish_reason = [], None
    for chunk in request.create(client, stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish_reason = chunk.choices[0].finish_reason or finish_reason
    return "".join(pieces), finish_reason


# --------------------------------------------------------------------------------------------- the hostile
class Hostile:
    """The hostile catalogue, against one server. Each kind returns (as expected?, what happened)."""

    def __init__(self, port: int, local_dir: Path, read_timeout_s: float) -> None:
        self.port = port
        self.local_dir = local_dir
        self.read_timeout_s = read_timeout_s
        self.auth = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        base = {"model": MODEL_NAME, "max_tokens": 4, "messages": user_message("hi")}
        self.base = base
        bomb = io.BytesIO()
        from PIL import Image

        Image.new("1", (8000, 8000)).save(bomb, format="PNG")  # 8 KB that would decode to 64 M pixels
        png = drawn_png(1)
        head = f'{{"model": "{MODEL_NAME}", "max_tokens": 4, '
        surrogate = '"a \\ud800 b"'
        self.kinds: dict[str, Callable[[], tuple[bool, str]]] = {
            "lone surrogate in the text": self.expect(400, (head + f'"messages": [{{"role": "user", "content": '
                                                            f'{surrogate}}}]}}').encode()),
            "lone surrogate in a stop string": self.expect(400, (head + f'"stop": {surrogate}, "messages": '
                                                                 '[{"role": "user", "content": "hi"}]}').encode()),
            "top_k 10**20": self.expect(400, {**base, "top_k": 10**20}),
            "seed 2**64": self.expect(400, {**base, "seed": 2**64}),
            "temperature NaN": self.expect(400, (head + '"temperature": NaN, "messages": [{"role": "user", '
                                                 '"content": "hi"}]}').encode()),
            "repetition_penalty NaN": self.expect(400, (head + '"repetition_penalty": NaN, "messages": '
                                                        '[{"role": "user", "content": "hi"}]}').encode()),
            "repetition_penalty 0": self.expect(400, {**base, "repetition_penalty": 0}),
            "JSON 100,000 deep": self.expect(400, b"[" * 100_000 + b"]" * 100_000),
            "300,000 JSON values": self.expect(400, b"[" + b"0," * 300_000 + b"0]"),
            "24 MiB image in a valid body": self.expect(400, {**base, "messages": user_message(
                "hi", "data:image/png;base64," + "A" * (24 * 1024 * 1024))}),
            "33 MiB body, declared": self.oversized_declared,
            "33 MiB body, chunked": self.oversized_chunked,
            "text/plain body": self.expect(415, base, {**self.auth, "Content-Type": "text/plain"}),
            "no API key": self.expect(401, base, {"Content-Type": "application/json"}),
            "wrong API key": self.expect(401, base, {**self.auth, "Authorization": "Bearer nope"}),
            "foreign Host header": self.expect(400, base, {**self.auth, "Host": "rebound.example"}),
            "8000x8000 image bomb": self.expect(400, {**base, "messages": user_message(
                "hi", data_url(bomb.getvalue()))}),
            "truncated PNG": self.expect(400, {**base, "messages": user_message("hi", data_url(png[:len(png) // 2]))}),
            "damaged PPM header": self.expect(400, {**base, "messages": user_message(
                "hi", data_url(b"P6\n4M 4\n255\n" + bytes(48)))}),
            "text over the limit": self.expect(400, {**base, "messages": [{"role": "user", "content": "a" * 200_001}]}),
            "symlink loop path": self.expect(400, {**base, "messages": user_message("hi", str(local_dir / "loop-a"))}),
            "NUL byte in a path": self.expect(400, {**base, "messages": user_message("hi", str(local_dir / "a\x00b"))}),
            "300-character file name": self.expect(400, {**base, "messages": user_message(
                "hi", str(local_dir / ("n" * 300)))}),
            "'..' out of the allowed dir": self.expect(400, {**base, "messages": user_message(
                "hi", str(local_dir / ".." / "x.png"))}),
            "too many images": self.expect(400, {**base, "messages": user_message("hi", *[data_url(png)] * 5)}),
            "max_tokens beyond the limit": self.expect(400, {**base, "max_tokens": 100_000}),
            "unknown model": self.expect(404, {**base, "model": "gpt-4o"}),
            "disconnect mid-stream": self.disconnect_mid_stream,
            "disconnect while waiting": self.disconnect_while_waiting,
        }
        self.slow_kinds: dict[str, Callable[[], tuple[bool, str]]] = {
            "slow client: half the headers": self.slow([b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127"]),
            "slow client: half the body": self.slow([
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"model\": "]),
            "slow client: a byte every 0.5 s": self.slow([bytes([b]) for b in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1"],
                                                          pause=0.5),
        }

    # ------------------------------------------------------------------------------------------ the kinds
    def expect(self, status: int, body: dict | bytes, headers: dict[str, str] | None = None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()

        def send() -> tuple[bool, str]:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            try:
                connection.request("POST", "/v1/chat/completions", body=data, headers=headers or self.auth)
                response = connection.getresponse()
                text = response.read().decode("utf-8", "replace")
            finally:
                connection.close()
            try:
                error = json.loads(text).get("error") or {}
            except ValueError:
                error = {}
            return response.status == status and bool(error.get("message")), f"{response.status} {error.get('code')}"

        return send

    def oversized_declared(self) -> tuple[bool, str]:
        """Content-Length over the limit: answered 413 from the header, before the body is read."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                         b"\r\nAuthorization: Bearer " + API_KEY.encode() +
                         f"\r\nContent-Length: {33 * 1024 * 1024}\r\n\r\n".encode())
            sock.sendall(b"[" * 65536)
            status = _status_line(sock)
        return status == 413, str(status)

    def oversized_chunked(self) -> tuple[bool, str]:
        """No length declared: 413 once the limit is passed (the server stops reading there)."""
        chunk = b"0" * (1024 * 1024)
        with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                         b"\r\nAuthorization: Bearer " + API_KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            with contextlib.suppress(OSError):  # the server may answer and close while we still send
                for _ in range(40):
                    if select.select([sock], [], [], 0)[0]:  # answered: stop sending
                        break
                    sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            status = _status_line(sock)
        return status == 413, str(status)

    def disconnect_mid_stream(self) -> tuple[bool, str]:
        body = {**self.base, "messages": user_message(QUESTIONS[0], data_url(drawn_png(5))), "max_tokens": 200,
                "temperature": 0, "stream": True}
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(), headers=self.auth)
        response = connection.getresponse()
        events = sum(response.readline().startswith(b"data: ") for _ in range(6))
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        return response.status == 200 and events > 0, f"{response.status}, left after {events} events"

    def disconnect_while_waiting(self) -> tuple[bool, str]:
        body = {**self.base, "max_tokens": 200, "temperature": 0}
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(), headers=self.auth)
        time.sleep(0.1)
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        return True, "left"

    def slow(self, pieces: list[bytes], pause: float = 0.0):
        def send() -> tuple[bool, str]:
            start = time.monotonic()
            with socket.create_connection(("127.0.0.1", self.port), timeout=self.read_timeout_s + 30) as sock:
                try:
                    for piece in pieces:
                        sock.sendall(piece)
                        time.sleep(pause)
                    while sock.recv(4096):
                        pass
                except (ConnectionResetError, BrokenPipeError):
                    pass
                except TimeoutError:
                    return False, "kept open"
            waited = time.monotonic() - start
            return waited <= self.read_timeout_s + 5, f"closed after {waited:.1f} s"

        return send


def _status_line(sock: socket.socket) -> int | None:
    data = b""
    with contextlib.suppress(OSError):
        while b"\r\n" not in data:
            piece = sock.recv(4096)
            if not piece:
                break
            data += piece
    try:
        return int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    good_sent: int = 0
    good_answered: int = 0
    good_lost: list[str] = field(default_factory=list)
    good_wrong: list[str] = field(default_factory=list)
    hostile: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    hostile_unexpected: list[str] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    health_failures: list[str] = field(default_factory=list)

    def hostile_total(self) -> int:
        return sum(sum(outcomes.values()) for outcomes in self.hostile.values())


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid` in MiB (Linux: /proc/PID/statm; elsewhere psutil, if installed)."""
    statm = Path(f"/proc/{pid}/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(port: int, path: str, timeout: float = 30) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Authorization": f"Bearer {API_KEY}"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def start_server(model: Path, port: int, local_dir: Path, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "kopru.cli", "serve", "--model", str(model), "--port", str(port),
               "--served-model-name", MODEL_NAME, "--threads", str(args.threads), "--allow-local-dir", str(local_dir),
               "--read-timeout-s", str(args.read_timeout_s)]
    process = subprocess.Popen(command, env={**os.environ, "KOPRU_API_KEY": API_KEY}, stdout=log.open("w"),
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while True:
        with contextlib.suppress(OSError):
            if get(port, "/health", timeout=5)[0] == 200:
                return process
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"kopru serve did not come up; its log:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def run(args: argparse.Namespace) -> dict:
    import openai

    work = Path(tempfile.mkdtemp(prefix="kopru-soak-"))
    if args.model:
        model = Path(args.model)
    else:
        import torch

        from kopru.lesson.tiny import save_tiny_served_model

        torch.set_num_threads(args.threads)
        model = save_tiny_served_model(work)
    local_dir = work / "allowed"
    local_dir.mkdir()
    (local_dir / "loop-a").symlink_to(local_dir / "loop-b")
    (local_dir / "loop-b").symlink_to(local_dir / "loop-a")
    port = free_port()
    log = work / "server.log"
    process = start_server(model, port, local_dir, args, log)
    tally = Tally()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    try:
        requests = good_requests()
        references = []
        for request in requests:  # the quiet phase: one at a time, nothing else running
            whole, streamed = answer_of(request, client, False), answer_of(request, client, True)
            if whole != streamed:
                raise RuntimeError(f"on the quiet server the streamed answer {streamed!r} differs from the whole "
                                   f"answer {whole!r}")
            references.append(whole)
        print(f"quiet phase: {len(requests)} good requests answered (streamed = whole); soaking for "
              f"{args.duration:.0f} s with {args.good_clients} good and {args.hostile_clients} hostile clients",
              flush=True)
        hostile = Hostile(port, local_dir, args.read_timeout_s)
        stop = threading.Event()
        start = time.monotonic()

        def good_client(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                index, stream = rng.randrange(len(requests)), rng.random() < 0.5
                with tally.lock:
                    tally.good_sent += 1
                try:
                    got = answer_of(requests[index], client, stream)
                except Exception as error:  # noqa: BLE001 - any failure of a good request is a lost request
                    with tally.lock:
                        tally.good_lost.append(f"request {index} ({'streamed' if stream else 'whole'}): "
                                               f"{type(error).__name__}: {error}"[:300])
                    continue
                with tally.lock:
                    tally.good_answered += 1
                    if got != references[index]:
                        tally.good_wrong.append(f"request {index} ({'streamed' if stream else 'whole'}): "
                                                f"{got!r} instead of {references[index]!r}")

        def hostile_client(seed: int, kinds: dict[str, Callable[[], tuple[bool, str]]]) -> None:
            rng = random.Random(seed)
            names = list(kinds)
            while not stop.is_set():  # whole rounds: every kind is tried at least once, however short the run
                rng.shuffle(names)
                for name in names:
                    try:
                        ok, what = kinds[name]()
                    except Exception as error:  # noqa: BLE001 - counted as an unexpected outcome
                        ok, what = False, f"{type(error).__name__}: {error}"
                    with tally.lock:
                        tally.hostile[name][what] += 1
                        if not ok:
                            tally.hostile_unexpected.append(f"{name}: {what}"[:300])

        def sampler() -> None:
            while True:
                try:
                    health_status, _ = get(port, "/health", timeout=30)
                    metrics = get(port, "/metrics", timeout=30)[1]
                except Exception as error:  # noqa: BLE001 - a failed probe is reported, not fatal to the run
                    health_status, metrics = f"{type(error).__name__}: {error}", {}
                rss = rss_mib(process.pid)
                with tally.lock:
                    if health_status != 200:
                        tally.health_failures.append(str(health_status))
                    tally.samples.append({"t": round(time.monotonic() - start, 1), "rss_mib": round(rss, 1),
                                          "good_answered": tally.good_answered, "hostile": tally.hostile_total(),
                                          "health": health_status, "active": metrics.get("active_requests")})
                if stop.wait(args.sample_s):
                    return

        threads = [threading.Thread(target=good_client, args=(seed,)) for seed in range(args.good_clients)]
        threads += [threading.Thread(target=hostile_client, args=(100 + seed, hostile.kinds))
                    for seed in range(args.hostile_clients)]
        threads += [threading.Thread(target=hostile_client, args=(200 + seed, hostile.slow_kinds))
                    for seed in range(args.slow_clients)]
        probe = threading.Thread(target=sampler)
        for thread in [probe, *threads]:
            thread.start()
        time.sleep(args.duration)
        stop.set()
        for thread in threads:
            thread.join()
        deadline = time.monotonic() + 30  # the disconnected requests' slots are freed a moment later
        while get(port, "/metrics")[1]["active_requests"] and time.monotonic() < deadline:
            time.sleep(0.1)
        probe.join()
        metrics = get(port, "/metrics")[1]
        rss_end = rss_mib(process.pid)
        # and still right after it all
        after = [answer_of(request, client, False) == reference for request, reference in zip(requests, references,
                                                                                            strict=True)]
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    counters_ok = (metrics["worker_restarts"] == 0 and metrics["requests_failed"] == 0
                   and metrics["active_requests"] == 0 and metrics["image_pixels_held"] == 0)
    return {
        "duration_s": args.duration, "good_clients": args.good_clients, "hostile_clients": args.hostile_clients,
        "slow_clients": args.slow_clients,
        "good_sent": tally.good_sent, "good_answered": tally.good_answered, "good_lost": len(tally.good_lost),
        "good_wrong": len(tally.good_wrong), "lost_examples": tally.good_lost[:5], "wrong_examples": tally.good_wrong[:5],
        "answers_right_after": sum(after), "good_requests": len(requests),
        "hostile_sent": tally.hostile_total(), "hostile_unexpected": len(tally.hostile_unexpected),
        "unexpected_examples": tally.hostile_unexpected[:10],
        "hostile_kinds": {name: dict(outcomes) for name, outcomes in sorted(tally.hostile.items())},
        "health_failures": tally.health_failures, "server_metrics": metrics, "server_counters_ok": counters_ok,
        "rss_mib_start": tally.samples[0]["rss_mib"] if tally.samples else None,
        "rss_mib_end": round(rss_end, 1), "rss_mib_peak": max((s["rss_mib"] for s in tally.samples), default=None),
        "samples": tally.samples, "server_log": str(log),
    }


def report(summary: dict) -> bool:
    """Prints the report; True when the run passed."""
    print(f"\ngood requests: {summary['good_sent']} sent, {summary['good_answered']} answered, "
          f"{summary['good_lost']} lost, {summary['good_wrong']} wrong "
          f"(and {summary['answers_right_after']} of {summary['good_requests']} right once it was over)")
    for line in summary["lost_examples"] + summary["wrong_examples"]:
        print(f"  {line}")
    print(f"hostile requests: {summary['hostile_sent']} sent, {summary['hostile_unexpected']} answered unexpectedly")
    width = max(len(name) for name in summary["hostile_kinds"]) if summary["hostile_kinds"] else 10
    for name, outcomes in summary["hostile_kinds"].items():
        shown = ", ".join(f"{what} x{count}" for what, count in sorted(outcomes.items(), key=lambda kv: -kv[1])[:3])
        print(f"  {name:<{width}}  {sum(outcomes.values()):>5}  {shown}")
    for line in summary["unexpected_examples"]:
        print(f"  unexpected: {line}")
    print(f"/health failures: {len(summary['health_failures'])}; server counters: "
          f"{ {k: summary['server_metrics'].get(k) for k in ('worker_restarts', 'requests_failed', 'requests_done', 'requests_cancelled', 'active_requests', 'image_pixels_held')} }")
    print("\n| t (s) | server RSS (MiB) | good answered | hostile sent | /health |")
    print("|---|---|---|---|---|")
    samples = summary["samples"]
    step = max(1, -(-len(samples) // 20))  # at most about 20 rows
    for sample in samples[::step] + ([samples[-1]] if samples and (len(samples) - 1) % step else []):
        print(f"| {sample['t']:.0f} | {sample['rss_mib']:.0f} | {sample['good_answered']} | {sample['hostile']} | "
              f"{sample['health']} |")
    print(f"RSS: {summary['rss_mib_start']} MiB at the first sample, peak {summary['rss_mib_peak']} MiB, "
          f"{summary['rss_mib_end']} MiB at the end")
    passed = (summary["good_lost"] == 0 and summary["good_wrong"] == 0 and summary["hostile_unexpected"] == 0
              and not summary["health_failures"] and summary["server_counters_ok"]
              and summary["answers_right_after"] == summary["good_requests"] and summary["good_answered"] > 0)
    print("PASSED" if passed else f"FAILED (server log: {summary['server_log']})")
    return passed


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = summary["samples"]
    figure, axis = plt.subplots(figsize=(7, 3.2))
    axis.plot([s["t"] for s in samples], [s["rss_mib"] for s in samples], marker=".", color="#2456c9")
    axis.set_xlabel("seconds into the soak")
    axis.set_ylabel("server RSS (MiB)")
    axis.set_ylim(bottom=0)
    axis.set_title(f"kopru serve: {summary['good_answered']} good answers ({summary['good_lost']} lost, "
                   f"{summary['good_wrong']} wrong), {summary['hostile_sent']} hostile requests", fontsize=9)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved Köprü model (default: a tiny one built here)")
    parser.add_argument("--duration", type=float, default=180, help="seconds of soak after the quiet phase")
    parser.add_argument("--good-clients", type=int, default=4, help="threads sending good requests")
    parser.add_argument("--hostile-clients", type=int, default=2, help="threads going round the hostile catalogue")
    parser.add_argument("--slow-clients", type=int, default=4, help="threads keeping a slow client each")
    parser.add_argument("--read-timeout-s", type=float, default=5.0, help="the server's --read-timeout-s")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between RSS and /health samples")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (default 1)")
    parser.add_argument("--json", help="write the summary (with every sample) here")
    parser.add_argument("--plot", help="draw the RSS over time into this PNG")
    args = parser.parse_args(argv)
    summary = run(args)
    passed = report(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if args.plot:
        plot(summary, args.plot)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
