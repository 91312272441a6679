"""``pdserve generate`` as a subprocess: JSON output on the default model, and one clean error line
(no traceback, non-zero exit) for unusable models, over-long prompts and bad sampling values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def pdserve(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pdserve", "--log-level=warning", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def test_generate_json_on_the_default_model() -> None:
    proc = pdserve(
        "generate", "--prompt-ids", "5,6,7,8", "--prompt-ids", "9, 10", "--max-tokens", "6",
        "--temperature", "0", "--ignore-eos", "--json", "--logprobs", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["index"] for r in lines] == [0, 1]
    assert lines[0]["prompt_ids"] == [5, 6, 7, 8] and lines[1]["prompt_ids"] == [9, 10]
    for r in lines:
        assert len(r["output_ids"]) == 6 and r["finish_reason"] == "length"
        assert isinstance(r["text"], str) and len(r["logprobs"]) == 6
        assert all(len(lp["top"]) == 1 and lp["logprob"] <= 0 for lp in r["logprobs"])
        # greedy: each chosen token is the top-1 alternative
        assert [lp["top"][0][0] for lp in r["logprobs"]] == r["output_ids"]


def _write_config(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "config.json").write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("case", ["missing", "garbled", "architecture", "too_long", "sampling"])
def test_bad_input_is_one_error_line(case: str, tmp_path: Path) -> None:
    args = ["generate", "--prompt-ids", "1,2,3", "--max-tokens", "2"]
    want = ""
    if case == "missing":
        args += ["--model", str(tmp_path / "nope")]
        want = "does not exist"
    elif case == "garbled":
        args += ["--model", str(_write_config(tmp_path / "m", "{not json"))]
        want = "not valid JSON"
    elif case == "architecture":
        args += ["--model", str(_write_config(tmp_path / "m", '{"model_type": "llama"}'))]
        want = "unsupported model_type"
    elif case == "too_long":
        args = ["generate", "--prompt-ids", ",".join(["5"] * 40), "--max-model-len", "32"]
        want = "maximum context length is 32"
    else:
        args += ["--temperature", "-1"]
        want = "temperature"
    proc = pdserve(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("pdserve: error: ") and want in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
