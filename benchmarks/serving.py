"""The registered classifier behind ``mlflow models serve`` under bounded concurrent load, beside it in-process.

Builds a scratch MLflow registry with two forms of one classifier, registered by the register stage's
own code (``tasks.register.log_model``: the pyfunc of ``bertflow/serving.py``): ``@champion`` (the
fp32 classifier) and ``@fast`` (the variant the register gate would pick from reports/optimize.json,
or, without pipeline outputs, the ONNX int8 variant built here by the optimize stage's own code in
``bertflow/compress.py``). The classifier is ``artifacts/classifier``, or, on a fresh clone, the
default profile's architecture (``pretrain.model``, params.yaml's vocabulary size) with seeded random
weights and a WordPiece vocabulary trained here on the labeled training texts: speed does not depend
on the weights, and the result says which it was.

Each form is served by ``mlflow models serve -m models:/<name>@<alias> --env-manager local -h 127.0.0.1``
(child processes in their own process group, stopped at the end) with the settings README.md
recommends, and loaded with a fixed number of ``/invocations`` requests from 1, 8 and 32 client threads
(persistent HTTP/1.1 connections, stdlib ``http.client``), single texts and batches of 32 SST-2 test
sentences. Every answer is checked (HTTP 200, one prediction per text); anything else is a failed
request. Beside them in the same run, in this process: the pyfunc loaded by
``mlflow.pyfunc.load_model("models:/…@champion")`` (and ``@fast``) and transformers'
``text-classification`` pipeline on the champion's folder, one caller taking the three in turn call
by call, with the threads of one server worker. The sides take turns in rounds, each round starting
one further along, so a busy moment of the shared machine hits all of them. A second table compares server
settings (uvicorn workers × threads per worker) on the champion.

Reads: ``artifacts/classifier`` and ``artifacts/optimized/*`` + ``reports/optimize.json`` when the
pipeline made them, else ``artifacts/tokenizer`` or the labeled training file; the test split
(``data/labeled/test.parquet``, else params.yaml's ``ingest.labeled.test``). Writes
``benchmarks/results/serving.{json,md}``; everything else lives in a temporary folder.

    python benchmarks/serving.py [--quick] [--rounds 2] [--requests 240] [--batch-requests 24]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.classifier import random_classifier, register, scratch_registry  # noqa: E402
from benchmarks.common import machine, machine_line, write_results  # noqa: E402
from bertflow.io import read_json  # noqa: E402
from bertflow.labeled import label_order, read_rows  # noqa: E402
from bertflow.params import Params, load_params  # noqa: E402
from bertflow.paths import Paths  # noqa: E402
from bertflow.registry import Variant, fast_choice  # noqa: E402
from bertflow.serving import THREADS_VARIABLE  # noqa: E402
from bertflow.tokenization import load_tokenizer  # noqa: E402

# ---------------------------------------------------------------- the forms under test


def champion_folder(paths: Paths, params: Params, params_file: Path, scratch: Path) -> tuple[Path, str]:
    """``artifacts/classifier``, or the profile's architecture with random weights."""
    if (paths.classifier / "config.json").is_file():
        return paths.classifier, "artifacts/classifier"
    labeled = params.ingest.labeled
    if (paths.tokenizer / "tokenizer_config.json").is_file():
        tokenizer, vocabulary = load_tokenizer(paths.tokenizer), "artifacts/tokenizer"
    else:
        tokenizer, vocabulary = trained_tokenizer(params, scratch), f"trained here on {Path(labeled.train).name}"
    labels = (read_json(paths.labeled / "labels.json")["labels"] if (paths.labeled / "labels.json").is_file()
              else label_order({row.label for row in read_rows(Path(labeled.train), labeled)}))
    folder = random_classifier(tokenizer, labels, params_file, scratch / "classifier")
    return folder, (f"no artifacts/classifier: the default profile's architecture (pretrain.model) with random "
                    f"weights, vocabulary {len(tokenizer)} ({vocabulary})")


def trained_tokenizer(params: Params, scratch: Path):
    """The tokenizer stage's WordPiece training (``tasks.tokenizer``) on the labeled training texts alone."""
    from tasks.tokenizer import to_transformers, train_vocab

    labeled = params.ingest.labeled
    texts = [row.text for row in read_rows(Path(labeled.train), labeled)]
    tokenizer = to_transformers(train_vocab(texts, params.tokenizer), params.tokenizer,
                                params.pretrain.model.max_position_embeddings)
    tokenizer.save_pretrained(str(scratch / "tokenizer"))
    return load_tokenizer(scratch / "tokenizer")


def fast_form(paths: Paths, params: Params, champion: Path, scratch: Path) -> tuple[Path, str, str]:
    """(folder, runtime, description) of the form ``@fast`` names: the register gate's choice among the
    optimize stage's variants, or the ONNX int8 variant built here."""
    report = paths.report("optimize")
    if paths.optimized.is_dir() and report.is_file() and champion == paths.classifier:
        measured = read_json(report)["variants"]
        candidates = [Variant(name, name, row["accuracy"], row["throughput_b1"]) for name, row in measured.items()
                      if name == "fp32" or (paths.optimized / name).is_dir()]
        chosen, reason = fast_choice(candidates, measured["fp32"]["accuracy"], params.register.max_accuracy_drop)
        folder = champion if chosen.name == "fp32" else paths.optimized / chosen.name
        return folder, measured[chosen.name]["runtime"], f"{chosen.name} (the register gate's choice: {reason})"
    return built_onnx_int8(champion, params, scratch), "onnxruntime", (
        "onnx_int8, built here from the champion by bertflow/compress.py (the optimize stage's code)")


def built_onnx_int8(champion: Path, params: Params, scratch: Path) -> Path:
    from bertflow import compress
    from bertflow.model import load_classifier

    export, folder = scratch / "onnx", scratch / "onnx_int8"
    export.mkdir()
    folder.mkdir()
    compress.onnx_variant(load_classifier(champion).eval(), champion, export, params.optimize.onnx_opset)
    compress.onnx_int8_variant(export, folder)
    return folder


def test_texts(paths: Paths, params: Params) -> list[str]:
    """SST-2 test sentences: the ingested test split, else the labeled test file params.yaml names."""
    from bertflow.classification import read_split

    if (paths.labeled / "test.parquet").is_file():
        return read_split(paths, "test")[0]
    labeled = params.ingest.labeled
    return [row.text for row in read_rows(Path(labeled.test), labeled)]


def build_registry(args, scratch: Path) -> dict:
    """The two forms registered in a scratch store; what the rest of the benchmark needs to know of them."""
    paths, params = Paths(REPO), load_params(args.params)
    champion, described = champion_folder(paths, params, Path(args.params), scratch)
    fast, runtime, fast_described = fast_form(paths, params, champion, scratch)
    run_id = scratch_registry(scratch)
    return {"champion_folder": champion, "model": described, "fast": fast_described,
            "uris": {"champion": register(run_id, champion, "champion"),
                     "fast": register(run_id, fast, "fast", runtime)},
            "texts": test_texts(paths, params)}


# ---------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``mlflow models serve`` for one model URI on 127.0.0.1 with ``workers`` uvicorn workers and ``threads``
    threads per worker (``BERTFLOW_THREADS``), in its own process group, stopped on exit."""

    def __init__(self, model_uri: str, workers: int, threads: int | None, log: Path):
        self.port = free_port()
        bin_folder = Path(sys.executable).parent  # mlflow runs uvicorn from PATH
        environment = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri(),
                       "PATH": f"{bin_folder}{os.pathsep}{os.environ.get('PATH', '')}"}
        environment.pop(THREADS_VARIABLE, None)
        if threads:
            environment[THREADS_VARIABLE] = str(threads)
        self.log = log.open("wb")
        self.process = subprocess.Popen(
            [str(bin_folder / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager",
             "local", "-h", "127.0.0.1", "-p", str(self.port), "--workers", str(workers)],
            env=environment, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited ({self.process.returncode}); see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=5):
                    return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError("mlflow models serve did not answer /ping within 180 s")

    def __exit__(self, *exc) -> None:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        self.log.close()


def mlflow_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


# ---------------------------------------------------------------- the load


def request_bodies(texts: list[str], batch: int, count: int) -> list[bytes]:
    """``count`` request bodies of ``batch`` consecutive test texts each, wrapping around the texts."""
    return [json.dumps({"inputs": [texts[(i * batch + j) % len(texts)] for j in range(batch)]}).encode()
            for i in range(count)]


class Load:
    """A fixed number of requests sent by ``clients`` threads as fast as answers come (closed loop): each
    thread keeps one HTTP/1.1 connection and takes the next request when its answer is in."""

    def __init__(self, port: int, bodies: list[bytes], batch: int, clients: int, deadline_s: float):
        self.port, self.bodies, self.batch, self.clients = port, bodies, batch, clients
        self.deadline_s = deadline_s
        self.lock, self.next = threading.Lock(), 0
        self.latencies: list[float] = []
        self.failures: list[str] = []

    def take(self, started: float) -> int | None:
        with self.lock:
            if self.next >= len(self.bodies) or time.perf_counter() - started > self.deadline_s:
                return None
            self.next += 1
            return self.next - 1

    def client(self, started: float) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while (index := self.take(started)) is not None:
            sent = time.perf_counter()
            try:
                connection.request("POST", "/invocations", self.bodies[index], {"Content-Type": "application/json"})
                answer = connection.getresponse()
                problem = self.check(answer.status, answer.read())
            except (OSError, http.client.HTTPException) as error:
                problem = f"{type(error).__name__}: {error}"
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            with self.lock:
                self.latencies.append(time.perf_counter() - sent)
                if problem:
                    self.failures.append(problem)
        connection.close()

    def check(self, status: int, body: bytes) -> str | None:
        if status != 200:
            return f"HTTP {status}: {body[:200]!r}"
        if len(json.loads(body)["predictions"]) != self.batch:
            return "wrong number of predictions"
        return None

    def run(self) -> dict:
        started = time.perf_counter()
        threads = [threading.Thread(target=self.client, args=(started,)) for _ in range(self.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return {"seconds": time.perf_counter() - started, "latencies": self.latencies, "failures": self.failures,
                "unsent": len(self.bodies) - self.next}


# ---------------------------------------------------------------- in-process sides


class PipelineSide:
    """transformers' ``text-classification`` pipeline on the champion's folder, every class's probability."""

    def __init__(self, folder: Path):
        from transformers import pipeline

        self.pipeline = pipeline("text-classification", model=str(folder), tokenizer=str(folder), device="cpu",
                                 top_k=None)

    def predict(self, texts: list[str]):
        return self.pipeline(texts, truncation=True, batch_size=len(texts))


def in_process(sides: dict, texts: list[str], batch: int, count: int, first: int = 0) -> dict[str, dict]:
    """``count`` calls of ``batch`` texts per side, the sides taking turns call by call (starting at side
    ``first``), each call timed like a request."""
    names = list(sides)
    names = names[first % len(names):] + names[: first % len(names)]
    latencies: dict[str, list[float]] = {name: [] for name in names}
    for i in range(count):
        call = [texts[(i * batch + j) % len(texts)] for j in range(batch)]
        for name in names:
            sent = time.perf_counter()
            sides[name].predict(call)
            latencies[name].append(time.perf_counter() - sent)
    return {name: {"seconds": sum(values), "latencies": values, "failures": [], "unsent": 0}
            for name, values in latencies.items()}


# ---------------------------------------------------------------- the run


def summarize(runs: list[dict], batch: int) -> dict:
    """One row's figures from the rounds' runs of one side at one load."""
    latencies = [value for run in runs for value in run["latencies"]]
    seconds = sum(run["seconds"] for run in runs)
    failures = [failure for run in runs for failure in run["failures"]]
    return {"requests": len(latencies), "failed": len(failures), "unsent": sum(run["unsent"] for run in runs),
            "first_failures": failures[:3],
            "p50_ms": round(1e3 * float(np.percentile(latencies, 50)), 1),
            "p99_ms": round(1e3 * float(np.percentile(latencies, 99)), 1),
            "requests_per_second": round(len(latencies) / seconds, 1),
            "texts_per_second": round(batch * len(latencies) / seconds, 1)}


def counts(args, batch: int) -> int:
    """Requests per side, load and round."""
    return max(1, (args.requests if batch == 1 else args.batch_requests) // args.rounds)


def measure(servers: dict, local: dict, texts: list[str], args) -> dict[tuple, dict]:
    """Every (side, clients, batch) in rounds; each round takes the sides in turn, starting one further along.
    ``servers``: side → (Server, client counts); ``local``: side → in-process model (one caller)."""
    runs: dict[tuple, list[dict]] = {}
    names = [*servers, "in-process"]
    warm_up(servers, local, texts)
    for round_ in range(args.rounds):
        for batch in (1, args.batch):
            count = counts(args, batch)
            bodies = request_bodies(texts, batch, count)
            for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                if name == "in-process":  # the in-process sides call by call, in turn
                    for side, run in in_process(local, texts, batch, count, round_).items():
                        runs.setdefault((side, 1, batch), []).append(run)
                    continue
                server, client_counts = servers[name]
                for clients in client_counts:
                    run = Load(server.port, bodies, batch, clients, args.deadline).run()
                    runs.setdefault((name, clients, batch), []).append(run)
    return {key: summarize(value, key[2]) for key, value in runs.items()}


def warm_up(servers: dict, local: dict, texts: list[str]) -> None:
    """First calls allocate, plan (ONNX Runtime) and import lazily; none of them is timed."""
    for server, _ in servers.values():
        for batch in (1, 32):
            Load(server.port, request_bodies(texts, batch, 8), batch, 2, 120).run()
    for batch in (1, 32):
        in_process(local, texts, batch, 4)


# ---------------------------------------------------------------- report


SETTINGS = ((1, None), (1, 1), (2, 1))  # (uvicorn workers, threads per worker; None: the runtime's default)
CHOSEN = (2, 1)  # what README.md recommends (see the settings table)


def setting_name(workers: int, threads: int | None) -> str:
    threads_text = "default threads (= cores)" if threads is None else f"BERTFLOW_THREADS={threads}"
    return f"--workers {workers}, {threads_text}"


SIDES = {"fast": "REST @fast", "pyfunc": "in-process pyfunc @champion", "pyfunc_fast": "in-process pyfunc @fast",
         "pipeline": "in-process transformers pipeline (champion)"}


def rows_markdown(rows: list[dict]) -> list[str]:
    lines = ["| side | clients | texts per request | requests | failed | p50 ms | p99 ms | requests/s | texts/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['side']} | {row['clients']} | {row['batch']} | {row['requests']} | {row['failed']} | "
                     f"{row['p50_ms']} | {row['p99_ms']} | {row['requests_per_second']} | {row['texts_per_second']} |")
    return lines


def markdown(result: dict) -> str:
    args = result["args"]
    workers, threads = result["chosen"]
    lines = [f"# Serving: the registry's model behind `mlflow models serve` ({machine_line(result['machine'])})", "",
             f"Champion: {result['model']}. `@fast`: {result['fast']}. Texts: SST-2 test sentences "
             f"({result['texts']}). Each REST side is `mlflow models serve -m models:/…@<alias> --env-manager local "
             f"-h 127.0.0.1` with {setting_name(workers, threads)} unless named; clients are threads of this process "
             f"on the same 2-core machine (they compete with the server), each with one keep-alive connection, "
             f"sending the next request when the answer is in. {args['rounds']} rounds taking the sides in turn; "
             f"per side and load {args['requests']} single-text requests or {args['batch_requests']} requests of "
             f"{args['batch']} texts in all. In-process sides: one caller taking them in turn call by call, with "
             f"the threads of one server worker. The machine is shared with other work: compare rows of this run, "
             f"not absolute times across runs.", "",
             *rows_markdown(result["rows"]), "",
             "Server settings, `@champion` (uvicorn workers × threads per worker):", "",
             *rows_markdown(result["settings"]), "",
             f"Failed requests in all: {result['failed']}.", ""]
    return "\n".join(lines)


def as_rows(figures: dict[tuple, dict], names: dict[str, str]) -> list[dict]:
    return [{"side": names[side], "clients": clients, "batch": batch, **row}
            for (side, clients, batch), row in sorted(figures.items(), key=lambda item: (item[0][2], item[0][1]))]


def run_all(built: dict, args, scratch: Path) -> dict:
    """Start the servers, load them and the in-process sides in rounds, stop the servers."""
    import contextlib

    import mlflow

    chosen = (args.workers, args.threads or None)
    settings = [chosen] + [s for s in SETTINGS if s != chosen]
    texts, clients = built["texts"], tuple(args.clients)
    with contextlib.ExitStack() as stack:
        servers = {}
        for workers, threads in settings:
            server = Server(built["uris"]["champion"], workers, threads, scratch / f"champion-{workers}x{threads}.log")
            servers[f"setting {workers}x{threads}"] = (stack.enter_context(server), clients)
        fast = Server(built["uris"]["fast"], *chosen, scratch / "fast.log")
        servers["fast"] = (stack.enter_context(fast), clients)
        local = {"pyfunc": mlflow.pyfunc.load_model(built["uris"]["champion"]),
                 "pyfunc_fast": mlflow.pyfunc.load_model(built["uris"]["fast"]),
                 "pipeline": PipelineSide(built["champion_folder"])}
        figures = measure(servers, local, texts, args)
    chosen_key = f"setting {chosen[0]}x{chosen[1]}"
    main = {key: row for key, row in figures.items() if key[0] in (chosen_key, *SIDES)}
    compared = {key: row for key, row in figures.items() if key[0].startswith("setting")}
    names = {**SIDES, chosen_key: "REST @champion"}
    setting_names = {f"setting {w}x{t}": setting_name(w, t) for w, t in settings}
    return {"chosen": list(chosen), "rows": as_rows(main, names), "settings": as_rows(compared, setting_names),
            "failed": sum(row["failed"] for row in figures.values())}


def use_threads(threads: int | None) -> None:
    """The in-process sides run with the threads of one server worker: ``BERTFLOW_THREADS`` for the pyfunc
    (torch or ONNX Runtime), torch's own setting for transformers' pipeline."""
    import torch

    if threads:
        os.environ[THREADS_VARIABLE] = str(threads)
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--quick", action="store_true", help="a short smoke run: few requests, one round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=300, help="single-text requests per side and load")
    parser.add_argument("--batch-requests", type=int, default=40, help="requests of --batch texts per side and load")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--workers", type=int, default=CHOSEN[0])
    parser.add_argument("--threads", type=int, default=CHOSEN[1],
                        help="BERTFLOW_THREADS of the servers and this process (0: the runtime's default)")
    parser.add_argument("--deadline", type=float, default=60.0, help="seconds one load may take; the rest unsent")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.requests, args.batch_requests = 1, 40, 6
    use_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        built = build_registry(args, Path(tmp))
        result = {"machine": machine(), "model": built["model"], "fast": built["fast"], "args": vars(args),
                  "texts": len(built["texts"]), **run_all(built, args, Path(tmp))}
    write_results("serving", result, markdown(result))
    if result["failed"]:
        raise SystemExit(f"{result['failed']} failed requests")


if __name__ == "__main__":
    main()
