"""The registry's consumers, against a real registered tiny model: ``bertflow predict``, REST serving with
``mlflow models serve`` (good requests, bad requests, still serving after them), and transformers' own
pipeline on the classifier folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, copy_outputs, forget_mlflow_uris

BIN = Path(sys.executable).parent
NAME = "bertflow-tiny"  # params.tiny.yaml's register.model_name
LONG = " ".join(["a remarkably long and winding film"] * 600)  # 3,000 words: far past the model's 64 positions
pytestmark = pytest.mark.xdist_group("registered")


@pytest.fixture(scope="module")
def registered(tiny_optimized, tmp_path_factory):
    """A private copy of the tiny optimized project, registered in its embedded store (mlruns/)."""
    from tasks.cli import run_stage

    root = copy_outputs(tiny_optimized, tmp_path_factory.mktemp("consumers") / "project")
    with pytest.MonkeyPatch.context() as patch:
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                    "MLFLOW_HTTP_REQUEST_TIMEOUT"):
            patch.delenv(key, raising=False)
        try:
            result = run_stage("register", REPO / "params.tiny.yaml", root)
        finally:
            forget_mlflow_uris()
    return root, f"sqlite:///{root}/mlruns/mlflow.db", result


@pytest.fixture(scope="module")
def test_texts(registered):
    from bertflow.io import read_column

    return list(read_column(registered[0] / "data/labeled/test.parquet", "text"))


def environment(uri: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    return env


def predict(uri: str, *args: str, stdin: str | None = None, progress: bool = False) -> subprocess.CompletedProcess:
    """``bertflow predict`` as a user runs it (through ``python -m tasks.cli``, this checkout's code)."""
    quiet = [] if progress else ["--no-progress"]
    return subprocess.run([sys.executable, "-m", "tasks.cli", "predict", *quiet, *args], input=stdin,
                          capture_output=True, text=True, timeout=600, env=environment(uri), cwd=REPO)


def registry_frame(uri: str, model_uri: str, texts: list[str]):
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        return mlflow.pyfunc.load_model(model_uri).predict(texts)
    finally:
        forget_mlflow_uris()


def registry_labels(uri: str, model_uri: str, texts: list[str]) -> list[str]:
    return list(registry_frame(uri, model_uri, texts)["label"])


# ---------------------------------------------------------------- bertflow predict


def test_predict_takes_every_kind_of_model_and_input(registered, test_texts, tmp_path):
    root, uri, result = registered
    texts = test_texts[:5] + [LONG]
    expected = registry_labels(uri, f"models:/{NAME}@champion", texts)

    # arguments, by alias, as JSON lines: label, score_<label> per class, truncated
    out = predict(uri, "-m", f"models:/{NAME}@champion", "-f", "jsonl", *texts)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["label"] for r in rows] == expected and [r["text"] for r in rows] == texts
    labels = json.loads((root / "data/labeled/labels.json").read_text())["labels"]
    assert all(abs(sum(r[f"score_{label}"] for label in labels) - 1) < 1e-6 for r in rows)
    assert [r["truncated"] for r in rows] == [False] * 5 + [True]

    # files of every kind (a .txt skips blank lines), a version number, a run URI, a local folder, stdin
    (tmp_path / "in.txt").write_text("\n".join(texts[:3]) + "\n\n")
    (tmp_path / "in.csv").write_text("id,review\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(texts[:3])))
    (tmp_path / "in.tsv").write_text("review\n" + "".join(f"{t}\n" for t in texts[:3]))
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"review": t}) + "\n" for t in texts[:3]))
    version = f"models:/{NAME}/{result['version']}"
    run = f"runs:/{result['run_id']}/classifier"
    for model, source in [(version, ["-i", str(tmp_path / "in.txt")]),
                          (run, ["-i", str(tmp_path / "in.csv"), "--text-column", "review"]),
                          (str(root / "artifacts/classifier"), ["-i", str(tmp_path / "in.tsv"), "--text-column",
                                                                 "review"]),
                          (str(root / "artifacts/optimized/onnx"), ["-i", str(tmp_path / "in.jsonl"),
                                                                     "--text-column", "review"])]:
        written = tmp_path / "out.csv"
        out = predict(uri, "-m", model, "-f", "csv", "-o", str(written), *source)
        assert out.returncode == 0, (model, out.stderr[-2000:])
        assert written.read_text().splitlines()[0] == "text,label," + ",".join(f"score_{x}" for x in labels) + \
            ",truncated"
        assert [line.split(",")[1] for line in written.read_text().splitlines()[1:]] == expected[:3], model
    table = predict(uri, "-m", f"models:/{NAME}@champion", stdin="\n".join(texts[:2]) + "\n")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:2] == ["text", "label"]
    assert len(table.stdout.splitlines()) == 3


def test_predict_shows_a_progress_bar_on_long_inputs_only(registered, test_texts):
    root, uri, _ = registered
    folder = str(root / "artifacts/classifier")
    texts = (test_texts * 600)[:600]  # past PROGRESS_FROM (512)
    long = predict(uri, "-m", folder, "-f", "csv", stdin="\n".join(texts) + "\n", progress=True)
    assert long.returncode == 0, long.stderr[-2000:]
    assert "600/600" in long.stderr and "text/s" in long.stderr, long.stderr[-2000:]
    assert len(long.stdout.splitlines()) == 601  # the header and every text, the bar on stderr only
    short = predict(uri, "-m", folder, stdin="\n".join(texts[:5]) + "\n", progress=True)
    assert short.returncode == 0 and "5/5" not in short.stderr


@pytest.mark.parametrize("args, expected", [
    (["-m", f"models:/{NAME}@nobody", "x"], "nobody"),
    (["-m", "models:/no-such-model/1", "x"], "no-such-model"),
    (["-m", "/no/such/folder", "x"], "/no/such/folder: no such folder"),
    (["-m", f"models:/{NAME}@champion", "-i", "{input}", "--text-column", "review"], "no column 'review'"),
    (["-m", f"models:/{NAME}@champion", "-i", "/no/file.csv"], "/no/file.csv: no such file"),
    (["-m", f"models:/{NAME}@champion", "good", "  "], "text 2 is whitespace only"),
])
def test_predict_names_what_is_wrong_and_exits_2(registered, tmp_path, args, expected):
    (tmp_path / "in.csv").write_text("text\ngood\n")
    output = tmp_path / "out.jsonl"
    out = predict(registered[1], *[a.replace("{input}", str(tmp_path / "in.csv")) for a in args],
                  "-o", str(output))
    assert out.returncode == 2, out.stderr[-2000:]
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith("bertflow predict: error: ") and expected in message, message
    assert not output.exists() and not list(tmp_path.glob("*.partial"))


def test_predict_names_a_registry_that_does_not_answer(registered):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once the probe closes
    out = predict(f"http://127.0.0.1:{port}", "-m", f"models:/{NAME}@champion", "good")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"bertflow predict: error: --model models:/{NAME}@champion: the registry at http://127.0.0.1:{port} did "
        "not answer")


# ---------------------------------------------------------------- REST


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(port: int, body: str) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


class Server:
    """``mlflow models serve`` on 127.0.0.1 for one model URI, stopped (its process group) on exit."""

    def __init__(self, uri: str, model_uri: str):
        self.port = free_port()
        self.process = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1",
             "-p", str(self.port)], env=environment(uri), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)

    def __enter__(self) -> int:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stdout.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=5):
                    return self.port
            except OSError:
                time.sleep(0.5)
        raise AssertionError("mlflow models serve did not answer /ping within 180 s")

    def __exit__(self, *exc) -> None:
        import signal

        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


BAD_REQUESTS = [  # body, words the 400's message must hold
    ('{"inputs": [1, null]}', "item 0 is int, not a text"),
    ('{"inputs": ["good", null]}', "item 1 is null, not a text"),
    ('{"inputs": [["a", "b"]]}', "nested lists"),
    ('{"inputs": ["good", ""]}', "item 1 is empty"),
    ('{"inputs": ["   "]}', "item 0 is whitespace only"),
    ('{"inputs": ["good"', "valid JSON"),
    ('{"dataframe_split": {"columns": ["review", "id"], "data": [["good", 1]]}}', "got columns ['review', 'id']"),
    ('{"dataframe_records": [{"text": 3}]}', "item 0 is int"),
    ('{"texts": ["good"]}', "exactly one of the input fields"),
]


def test_rest_serving_answers_good_requests_refuses_bad_ones_and_keeps_serving(registered, test_texts):
    _, uri, result = registered
    texts = test_texts[:4]
    with Server(uri, f"models:/{NAME}@champion") as port:
        expected = registry_labels(uri, f"models:/{NAME}@champion", texts + [LONG])
        for body in [{"inputs": texts}, {"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}},
                     {"dataframe_records": [{"text": t} for t in texts]}]:
            status, answer = post(port, json.dumps(body))
            assert status == 200, answer
            assert [row["label"] for row in answer["predictions"]] == expected[:4], body
            assert all(row["truncated"] is False for row in answer["predictions"])
        status, answer = post(port, json.dumps({"inputs": [LONG]}))
        assert status == 200 and answer["predictions"][0]["truncated"] is True
        assert answer["predictions"][0]["label"] == expected[4]
        for body, words in BAD_REQUESTS:
            status, answer = post(port, body)
            assert 400 <= status < 500, (body, status, answer)
            assert words in answer.get("message", ""), (body, answer)
        status, answer = post(port, json.dumps({"inputs": texts}))  # still serving, and the same answers
        assert status == 200 and [row["label"] for row in answer["predictions"]] == expected[:4]
    fast = result["fast"]["version"] or result["version"]
    with Server(uri, f"models:/{NAME}@fast") as port:
        status, answer = post(port, json.dumps({"inputs": texts}))
        assert status == 200 and len(answer["predictions"]) == 4, answer
        assert [row["label"] for row in answer["predictions"]] == registry_labels(uri, f"models:/{NAME}/{fast}", texts)
        assert post(port, '{"inputs": [null]}')[0] == 400


# ---------------------------------------------------------------- the folder as a transformers model


def test_transformers_pipeline_runs_the_classifier_folder_as_the_registry_does(registered, test_texts):
    from transformers import AutoConfig, AutoTokenizer, pipeline

    root, uri, _ = registered
    folder = root / "artifacts/classifier"
    assert AutoTokenizer.from_pretrained(folder).model_max_length == AutoConfig.from_pretrained(
        folder).max_position_embeddings
    for kept in (root / "artifacts/pretrained", root / "artifacts/ablation/random_init",
                 root / "artifacts/optimized/student"):
        if (kept / "tokenizer_config.json").is_file():
            assert json.loads((kept / "tokenizer_config.json").read_text())["model_max_length"] == 64, kept
    classify = pipeline("text-classification", model=str(folder), truncation=True, device="cpu", top_k=None)
    texts = test_texts + [LONG]
    got = [{row["label"]: row["score"] for row in answer} for answer in classify(texts, batch_size=1)]
    served = registry_frame(uri, f"models:/{NAME}@champion", texts)
    scores = served[[c for c in served.columns if c.startswith("score_")]]
    for i, label in enumerate(served["label"]):  # the same label and, within float error, the same scores
        assert max(got[i], key=got[i].get) == label or scores.iloc[i].max() - scores.iloc[i].min() < 1e-4, i
        assert all(abs(got[i][c.removeprefix("score_")] - scores.iloc[i][c]) < 1e-4 for c in scores.columns), i
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-classification\n")
    assert "truncation=True" in card and "ended by" in card
