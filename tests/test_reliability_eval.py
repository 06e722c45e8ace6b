"""Issue 27: a failing judge fails the evaluation, no secret reaches the disk, a re-evaluation never replaces the
run's own results, and untrusted model files (pickles, remote code) are refused or announced."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from spard import api
from spard.args import EvalArgs, JudgeArgs, ModelArgs
from spard.cli import main
from spard.config import config_to_yaml, load_config
from spard.errors import ConfigError, ModelError
from spard.evaluate.judges import JudgeError, OpenAIArgs, OpenAIJudge
from spard.evaluate.metrics import judge_error_count, judge_error_problems, rate
from spard.io import append_jsonl, atomic_write_json, atomic_write_jsonl, atomic_write_text
from spard.redact import REDACTED, redact, redact_obj, register_secret
from spard.testing import TINY_RUN_OVERRIDES, save_tiny_chat_model

KEY = "sk-test-7f3a9c2e5b1d4f60a8e2"
KEY_ENV = "SPARD_TEST_JUDGE_KEY"


# ---------------------------------------------------------------------------------------------------------
# A loopback judge endpoint that echoes the Authorization header (bounded: it stops itself)
# ---------------------------------------------------------------------------------------------------------
class EchoServer:
    """``/chat/completions`` on 127.0.0.1: answers ``status`` with a body that echoes the request's
    Authorization header (as some proxies do). ``reply(i)`` may choose the i-th reply's content (status 200),
    ``error`` the error object of a non-200 reply.
    Serves at most ``max_requests`` requests or ``lifetime`` seconds, then shuts itself down."""

    def __init__(self, status: int = 401, reply=None, *, error=None, max_requests: int = 200,
                 lifetime: float = 120.0):
        self.status, self.reply, self.error, self.requests = status, reply, error, 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server API)
                self.rfile.read(int(self.headers["Content-Length"]))
                with server.lock:
                    i = server.requests
                    server.requests += 1
                auth = self.headers.get("Authorization")
                if server.status == 200:
                    content = server.reply(i) if server.reply else "#thescore: 1"
                    body = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                else:
                    body = {"error": server.error or {"message": "invalid api key"}, "echo": {"Authorization": auth}}
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps(body).encode())
                if server.requests >= max_requests:
                    threading.Thread(target=server.close, daemon=True).start()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.timer = threading.Timer(lifetime, self.close)
        self.timer.daemon = True
        self.timer.start()
        self._closed = False

    def close(self):
        if not self._closed:
            self._closed = True
            self.timer.cancel()
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY_ENV


def _files_holding(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def _judge_overrides(server: EchoServer, *extra: str) -> list[str]:
    return ["eval.judge=openai", f"eval.judge.base_url={server.url}", f"eval.judge.api_key_env={KEY_ENV}",
            "eval.judge.concurrency=1", "eval.judge.max_retries=0", *extra]


# ---------------------------------------------------------------------------------------------------------
# 5. Secrets never on disk
# ---------------------------------------------------------------------------------------------------------
def test_redact_removes_the_key_and_any_authorization_or_bearer_token():
    assert redact(f"key {KEY} here", [KEY]) == f"key {REDACTED} here"
    assert redact("Authorization: Bearer abc.def-123 tail", []) == f"Authorization: {REDACTED} tail"
    echoed = json.dumps({"echo": {"Authorization": "Basic dXNlcjpwYXNz"}})
    assert "dXNlcjpwYXNz" not in redact(echoed, []) and REDACTED in redact(echoed, [])
    assert "dXNlcjpwYXNz" not in redact(json.dumps({"detail": echoed}), [])  # escaped inside a JSON string
    assert redact("x Bearer eyJhbGciOiJIUzI1NiJ9.e30 y", []) == f"x Bearer {REDACTED} y"
    # prose and short values are left alone
    assert redact("the bearer of bonds; a key ab", ["ab"]) == "the bearer of bonds; a key ab"
    assert redact_obj({"a": [f"{KEY}!", 3], KEY: None}, [KEY]) == {"a": [f"{REDACTED}!", 3], REDACTED: None}


def test_every_write_helper_redacts_a_registered_key(tmp_path):
    register_secret(KEY)
    atomic_write_json(tmp_path / "r.json", {"error": f"HTTP 401: {KEY}"})
    atomic_write_jsonl(tmp_path / "s.jsonl", [{"reply": KEY}])
    atomic_write_text(tmp_path / "error.txt", f"Traceback ... Authorization: Bearer {KEY}\n")
    append_jsonl(tmp_path / "metrics.jsonl", {"note": KEY})
    assert _files_holding(tmp_path, KEY) == []
    assert REDACTED in (tmp_path / "r.json").read_text()


def test_a_401_that_echoes_the_key_stops_a_run_and_leaves_the_key_on_no_file(tmp_path, tiny_tok, key_env, capsys,
                                                                             monkeypatch):
    """The whole `spard run` path: trained, then the judge answers 401 to the probe. Exit 2 naming the status and
    the key's variable; the key is on no file of the run dir or the cache, nor in the error."""
    import spard.evaluate.generation as generation

    calls = []
    real_generate = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    server = EchoServer(401)
    try:
        model_dir = save_tiny_chat_model(tmp_path / "tiny", tiny_tok)
        code = main(["run", str(_config_file(tmp_path, model_dir)), *TINY_RUN_OVERRIDES, "align.enabled=false",
                     f"train.output_dir={tmp_path / 'run'}", *_judge_overrides(server)])
    finally:
        server.close()
    err = capsys.readouterr().err
    assert code == 2 and "HTTP 401" in err and KEY_ENV in err and KEY not in err
    assert server.requests == 1 and calls == []  # stopped at the probe: nothing generated for the evaluation
    assert _files_holding(tmp_path / "run", KEY) == [] and _files_holding(tmp_path / "spard-cache", KEY) == []


def _config_file(tmp_path: Path, model_dir: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(config_to_yaml(load_config(None, [f"model.name_or_path={model_dir}"])))
    return path


# ---------------------------------------------------------------------------------------------------------
# 4. A judge that fails is a failed evaluation
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("status", "error"), [(401, None), (403, None), (404, None),
                                             (400, {"code": "model_not_found", "message": "no such model"})])
def test_fatal_judge_replies_stop_at_the_first_one_naming_the_status_and_variable(key_env, status, error):
    server = EchoServer(status, error=error)
    try:
        judge = OpenAIJudge(server.url, "no-such-model", api_key_env=KEY_ENV, max_retries=3, backoff=0.01,
                            concurrency=1)
        with pytest.raises(JudgeError) as err:
            judge(["p1", "p2", "p3"], ["r1", "r2", "r3"])
    finally:
        server.close()
    message = str(err.value)
    assert f"HTTP {status}" in message and KEY not in message
    assert (KEY_ENV in message) == (status in (401, 403))
    assert server.requests == 1  # no retry, no further prompt


def test_other_client_errors_stay_per_reply_errors():
    from spard.evaluate.judges.openai import is_fatal_reply

    assert not is_fatal_reply(400, '{"error": "context length exceeded"}') and not is_fatal_reply(429, "")
    assert not is_fatal_reply(500, "model not found")  # a server error is retried, not fatal
    assert is_fatal_reply(404, "") and is_fatal_reply(400, "The model `gpt-9` does not exist")


def test_fatal_reply_stops_concurrent_judging_early(key_env):
    server = EchoServer(401)
    try:
        judge = OpenAIJudge(server.url, "m", api_key_env=KEY_ENV, max_retries=0, concurrency=2)
        with pytest.raises(JudgeError, match="HTTP 401"):
            judge([f"p{i}" for i in range(40)], ["r"] * 40)
    finally:
        server.close()
    assert server.requests < 40


def test_max_error_rate_is_a_documented_judge_option():
    assert JudgeArgs().max_error_rate == 0.05 and OpenAIArgs(api_key_env="").max_error_rate == 0.05
    from spard.config import describe_config

    assert "max_error_rate" in describe_config(load_config(None, []))  # documented in show-config --doc
    cfg = load_config(None, ["eval.judge=openai", "eval.judge.api_key_env=", "eval.judge.max_error_rate=0.5"])
    assert cfg.eval.judge.max_error_rate == 0.5
    with pytest.raises(ConfigError, match="eval.judge.max_error_rate"):
        load_config(None, ["eval.judge.max_error_rate=1.5"])


def test_judge_error_problems_counts_per_set():
    def block(k, n):
        return {"judges": {"keyword": {"error_rate": rate(0, n)}, "openai": {"error_rate": rate(k, n)}}}

    harm = {"a": block(1, 10), "b": block(3, 10), "all": block(4, 20)}
    assert judge_error_count(harm) == 4  # the pooled "all" is not counted twice
    assert judge_error_problems(harm, 0.2) == [
        "judge 'openai' could not score 3 of 10 replies of harm set 'b' (30.0% > eval.judge.max_error_rate=0.2)"]
    assert judge_error_problems(harm, 0.3) == []


def _base_cfg(model_dir: Path, server: EchoServer, *extra: str):
    return load_config(None, [f"model.name_or_path={model_dir}", *TINY_RUN_OVERRIDES, "eval.tasks=[]",
                              *_judge_overrides(server, *extra)])


def test_an_evaluation_over_max_error_rate_is_invalid_and_never_cached(tmp_path, tiny_tok, key_env):
    # every judge reply echoes the key and has no score: 100 % judge errors
    server = EchoServer(200, reply=lambda i: f"cannot judge; Authorization: Bearer {KEY}")
    model_dir = save_tiny_chat_model(tmp_path / "tiny", tiny_tok)
    try:
        cfg = _base_cfg(model_dir, server)
        with pytest.raises(JudgeError, match=r"evaluation invalid: judge 'openai' could not score 3 of 3"):
            api.evaluate_base(cfg, str(model_dir))
    finally:
        server.close()
    root = tmp_path / "spard-cache" / "base_eval"
    assert [p.name for p in root.iterdir()] == ["uncached"]  # no cache entry to reuse once the key is fixed
    (results_file,) = (root / "uncached").glob("*/results.json")
    results = json.loads(results_file.read_text())
    assert results["valid"] is False and "max_error_rate=0.05" in results["invalid_reason"]
    assert _files_holding(tmp_path / "spard-cache", KEY) == []


def test_judge_errors_within_the_limit_are_reported_and_not_cached(tmp_path, tiny_tok, key_env):
    # request 0 is the probe; then one of the three replies has no score
    server = EchoServer(200, reply=lambda i: "garbage" if i % 4 == 2 else "#thescore: 1")
    model_dir = save_tiny_chat_model(tmp_path / "tiny", tiny_tok)
    try:
        cfg = _base_cfg(model_dir, server, "eval.judge.max_error_rate=0.5")
        first = api.evaluate_base(cfg, str(model_dir))
        assert first.results["valid"] is True and first.results["judge_errors"] == 1
        assert "1 judge errors left out" in first.table and "judge errors counted not harmful" in first.table
        n = server.requests
        api.evaluate_base(cfg, str(model_dir))
        assert server.requests > n  # not reused from a cache

        # a clean evaluation is cached; a cached one with judge errors (an older spard's) is not reused
        server.reply = lambda i: "#thescore: 1"
        clean = api.evaluate_base(cfg, str(model_dir))
        assert clean.out_dir.parent.name == "base_eval" and (clean.out_dir / "results.json").is_file()
        n = server.requests
        api.evaluate_base(cfg, str(model_dir))
        assert server.requests == n  # cached
        stored = json.loads((clean.out_dir / "results.json").read_text())
        next(iter(stored["harm"].values()))["judges"]["openai"]["error_rate"] = rate(3, 3)
        (clean.out_dir / "results.json").write_text(json.dumps(stored))
        api.evaluate_base(cfg, str(model_dir))
        assert server.requests > n
    finally:
        server.close()


def test_tables_say_when_an_asr_is_over_errors_or_invalid():
    from spard.evaluate.runner import format_results_table

    judges = {"keyword": {"asr": rate(1, 4), "error_rate": rate(0, 4)},
              "openai": {"asr": rate(0, 1), "asr_errors_as_safe": rate(0, 4), "error_rate": rate(3, 4)}}
    results = {"primary_judge": "openai", "harm": {"t": {"judges": judges}}, "tasks": {}, "valid": False,
               "invalid_reason": "judge 'openai' could not score 3 of 4 replies"}
    table = format_results_table(None, results)
    assert table.startswith("INVALID (after): judge 'openai' could not score 3 of 4")
    rows = [line for line in table.splitlines() if line.startswith("ASR t (openai")]
    assert all(("left out" in line) or ("counted not harmful" in line) for line in rows) and len(rows) == 2


def test_spard_judge_exits_non_zero_on_a_401_and_on_a_classifier_that_cannot_judge(tmp_path, tiny_tok, key_env,
                                                                                  capsys):
    src = tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"how to do harm {i}", "response": "sure, step one"}) + "\n"
                           for i in range(3)))
    server = EchoServer(401)
    try:
        code = main(["judge", str(src), "--judge", "openai", f"judge.base_url={server.url}",
                     f"judge.api_key_env={KEY_ENV}", "judge.concurrency=1"])
    finally:
        server.close()
    err = capsys.readouterr().err
    assert code == 2 and "HTTP 401" in err and KEY_ENV in err and KEY not in err

    # a tiny random model says neither "safe" nor "unsafe": every verdict is an error
    model_dir = save_tiny_chat_model(tmp_path / "guard", tiny_tok)
    code = main(["judge", str(src), "--judge", "classifier", f"judge.model={model_dir}", "judge.mode=chat",
                 "judge.max_new_tokens=2"])
    err = capsys.readouterr().err
    assert code == 2 and "could not score 3 of 3 rows" in err
    summary = json.loads((tmp_path / "out.verdicts.summary.json").read_text())
    assert summary["valid"] is False and "judge.max_error_rate=0.05" in summary["invalid_reason"]


# ---------------------------------------------------------------------------------------------------------
# 6. Re-evaluation adds, never replaces
# ---------------------------------------------------------------------------------------------------------
def test_eval_variant_names_and_changed_options():
    own = EvalArgs(harm_sets=["advbench"], tasks=["gsm8k"])
    other = EvalArgs(harm_sets=[], tasks=["openbookqa"], progress=False)
    changed = api.changed_eval_options(own, other)
    assert sorted(changed) == ["harm_sets", "tasks"]  # progress only shows; it is not another evaluation
    name = api.eval_variant_name(changed)
    assert name.startswith("harm_sets+tasks-") and name != api.eval_variant_name({**changed, "harm_sets": ["x"]})
    assert api.changed_eval_options(own, replace(own, progress=False)) == {}


def test_re_evaluation_with_other_options_keeps_the_runs_results(tmp_path, tiny_tok, capsys):
    model_dir = save_tiny_chat_model(tmp_path / "tiny", tiny_tok)
    run_dir = tmp_path / "run"
    cfg = load_config(None, [f"model.name_or_path={model_dir}", *TINY_RUN_OVERRIDES, "align.enabled=false",
                             f"train.output_dir={run_dir}", "eval.harm_limit=2"])
    api.run(cfg)
    own = {f: (run_dir / "eval" / f).read_bytes() for f in ("results.json", "before.json", "summary.txt")}

    assert main(["eval", str(run_dir), "eval.harm_sets=[]", "eval.task_limit=1"]) == 0
    out = capsys.readouterr().out
    assert {f: (run_dir / "eval" / f).read_bytes() for f in own} == own  # the run's own evaluation untouched
    (variant,) = (run_dir / "evals").iterdir()
    assert variant.name.startswith("harm_sets+task_limit-") and f"results: {variant}" in out
    assert json.loads((variant / "results.json").read_text())["harm"] == {}
    assert json.loads((variant / "eval_options.json").read_text())["overrides"] == ["eval.harm_sets=[]",
                                                                                    "eval.task_limit=1"]
    # --out DIR; then `spard eval RUN` lists the others
    assert main(["eval", str(run_dir), "eval.task_limit=1", "--out", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / "results.json").is_file() and (tmp_path / "mine" / "summary.txt").is_file()
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "other evaluations of this run:" in out and str(variant) in out
    # bench --collect reads the cell's own evaluation
    from spard.benchmark.results import harm_summary
    from spard.rundir import results_path

    assert harm_summary(json.loads(results_path(run_dir).read_text()))[1] is not None
    with pytest.raises(ConfigError, match="the run's own evaluation directory"):
        api.evaluate(run_dir, overrides=["eval.task_limit=1"], out_dir=run_dir / "eval")


# ---------------------------------------------------------------------------------------------------------
# 7. Safetensors everywhere, remote code loud
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def pickle_model_dir(tmp_path, tiny_tok):
    """A model directory with its weights as pytorch_model.bin only (what the main loader refuses)."""
    d = save_tiny_chat_model(tmp_path / "pickled", tiny_tok)
    from safetensors.torch import load_file

    state = load_file(str(d / "model.safetensors"))
    torch.save(state, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return d


def test_every_model_load_refuses_pickle_only_weights(pickle_model_dir, tmp_path):
    from spard.defenses.safelora import SafeLoRAArgs, _load_unaligned_weights
    from spard.evaluate.judges import ClassifierJudge
    from spard.models import load_model
    from spard.selection.embed import SentenceTransformerEmbedder

    loads = {
        "model.name_or_path": lambda: load_model(ModelArgs(name_or_path=str(pickle_model_dir))),
        "eval.judge.model": lambda: ClassifierJudge(str(pickle_model_dir), mode="chat"),
        "defense.unaligned_model": lambda: _load_unaligned_weights(
            SafeLoRAArgs(unaligned_model=str(pickle_model_dir)), [], torch.float32),
        "defense.embedder": lambda: SentenceTransformerEmbedder(str(pickle_model_dir)),
        "base_model": lambda: api.export(_finished_run_on(tmp_path, pickle_model_dir), tmp_path / "exported",
                                         merged=True),
    }
    for key, load in loads.items():
        with pytest.raises(ModelError, match="only pickle weights \\(pytorch_model.bin\\); spard loads safetensors"
                           ) as err:
            load()
        assert key in str(err.value)
    assert not (tmp_path / "exported").exists()


def _finished_run_on(tmp_path: Path, base: Path) -> Path:
    run_dir = tmp_path / "finished"
    atomic_write_text(run_dir / "config.yaml", config_to_yaml(load_config(None, [f"model.name_or_path={base}"])))
    atomic_write_json(run_dir / "train_result.json", {"base_model": str(base)})
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        atomic_write_text(run_dir / "final" / name, "{}")
    return run_dir


def _remote_code_model(tmp_path: Path, tiny_tok) -> Path:
    """A local model whose tokenizer is a class in its own remote_tok.py; importing it leaves a marker file."""
    d = save_tiny_chat_model(tmp_path / "remote", tiny_tok)
    (d / "remote_tok.py").write_text(
        "import os\nfrom pathlib import Path\nPath(os.environ['SPARD_TEST_MARKER']).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\nclass RemoteTok(PreTrainedTokenizerFast):\n"
        "    pass\n")
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "remote_tok.RemoteTok"]}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def test_dry_run_never_executes_model_code(tmp_path, tiny_tok, monkeypatch, capsys):
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("SPARD_TEST_MARKER", str(marker))
    model_dir = _remote_code_model(tmp_path, tiny_tok)
    code = main(["train", "--dry-run", str(_config_file(tmp_path, model_dir)), "model.trust_remote_code=true",
                 "align.enabled=false", "data.n_train=16", f"train.output_dir={tmp_path / 'run'}"])
    assert code == 0 and "dry run: nothing trained" in capsys.readouterr().out
    assert not marker.exists()


def test_trust_remote_code_logs_which_files_will_run(tmp_path, tiny_tok, monkeypatch, caplog):
    from spard.models import load_tokenizer

    monkeypatch.setenv("SPARD_TEST_MARKER", str(tmp_path / "code-ran"))
    model_dir = _remote_code_model(tmp_path, tiny_tok)
    with caplog.at_level(logging.WARNING, logger="spard"):
        load_tokenizer(str(model_dir), ModelArgs(name_or_path=str(model_dir), trust_remote_code=True))
    assert "model.trust_remote_code=true" in caplog.text and "remote_tok.py" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spard"):
        load_tokenizer(str(model_dir), ModelArgs(name_or_path=str(model_dir)))
    assert "trust_remote_code" not in caplog.text


def test_server_stops_itself():
    server = EchoServer(401, lifetime=0.2)
    time.sleep(0.5)
    assert server._closed
