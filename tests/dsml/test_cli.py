"""`python -m dsml`, run as a subprocess on the vector files, as other tools call it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent.parent / "data" / "dsml"
REPO = Path(__file__).parent.parent.parent


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "dsml", *args],
        input=stdin.encode("utf-8"),
        capture_output=True,
        cwd=REPO,
        timeout=300,
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def output_lines(proc: subprocess.CompletedProcess[bytes]) -> list[dict]:
    assert proc.returncode == 0, proc.stderr.decode()
    return [json.loads(line) for line in proc.stdout.decode("utf-8").splitlines()]


@pytest.mark.parametrize(
    "path",
    [DATA / "render.jsonl", *sorted((DATA / "dialects").glob("*/render.jsonl"))],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_render_jsonl_matches_vectors(path: Path) -> None:
    vectors = read_jsonl(path)
    out = output_lines(run_cli("render", "--jsonl", str(path)))
    assert [o["id"] for o in out] == [v["id"] for v in vectors]
    for line, vector in zip(out, vectors, strict=True):
        assert set(line) == {"id", "prompt"}
        assert line["prompt"] == vector["prompt"], vector["id"]


def test_render_stdin_prints_exactly_the_prompt() -> None:
    vector = read_jsonl(DATA / "render.jsonl")[0]
    proc = run_cli("render", stdin=json.dumps(vector["request"]))
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == vector["prompt"].encode("utf-8")  # byte-exact, no newline added


def test_render_stdin_with_dialect() -> None:
    vector = read_jsonl(DATA / "dialects" / "v4-0731" / "render.jsonl")[0]
    assert vector["dialect"] == "v4-0731"
    proc = run_cli("render", "--dialect", "v4-0731", stdin=json.dumps(vector["request"]))
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode("utf-8") == vector["prompt"]


def test_tokenize_prints_safe_prompt_ids() -> None:
    from dsml import render_chat
    from dsml.tokenizer import load_tokenizer

    request = read_jsonl(DATA / "render.jsonl")[0]["request"]
    proc = run_cli("tokenize", stdin=json.dumps(request))
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout) == load_tokenizer().encode_prompt(render_chat(request))


PARSE_FILES = [
    DATA / "parse.jsonl",
    DATA / "wild.jsonl",
    *sorted((DATA / "dialects").glob("*/parse.jsonl")),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("path", PARSE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_parse_jsonl_matches_expected(path: Path, stream: bool) -> None:
    vectors = read_jsonl(path)
    args = ["parse", "--jsonl", str(path)] + (["--stream"] if stream else [])
    out = output_lines(run_cli(*args))
    assert [o["id"] for o in out] == [v["id"] for v in vectors]
    for line, vector in zip(out, vectors, strict=True):
        assert set(line) == {"id", "reasoning_content", "content", "tool_calls"}
        assert {k: line[k] for k in vector["expected"]} == vector["expected"], vector["id"]


DIALECT_PARSE_FILES = sorted((DATA / "dialects").glob("*/parse.jsonl"))


def _expected_fields_match(out: list[dict], vectors: list[dict]) -> None:
    assert [o["id"] for o in out] == [v["id"] for v in vectors]
    for line, vector in zip(out, vectors, strict=True):
        assert set(line) == {"id", "reasoning_content", "content", "tool_calls"}
        assert {k: line[k] for k in vector["expected"]} == vector["expected"], vector["id"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("path", DIALECT_PARSE_FILES, ids=lambda p: p.parent.name)
def test_parse_dialect_flag_matches_expected(tmp_path: Path, path: Path, stream: bool) -> None:
    """`--dialect` alone (no per-line field), native and foreign, gives the expected fields.

    Every dialect's tags are read whatever the dialect; a foreign one only changes call
    outcomes and notices (tests/dsml/test_parser_dialects.py), which the CLI does not print.
    """
    vectors = read_jsonl(path)
    native = vectors[0]["dialect"]
    assert native == path.parent.name
    stripped = tmp_path / "parse.jsonl"
    stripped.write_text(
        "".join(json.dumps({k: v for k, v in vec.items() if k != "dialect"}) + "\n"
                for vec in vectors),
        encoding="utf-8",
    )  # fmt: skip
    for dialect in (native, "v4"):
        args = ["parse", "--jsonl", str(stripped), "--dialect", dialect]
        _expected_fields_match(output_lines(run_cli(*args, *(["--stream"] if stream else []))),
                               vectors)  # fmt: skip


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_parse_dialect_reaches_the_parser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    stream: bool,
) -> None:  # fmt: skip
    """The flag is the default; a line's own `dialect` field wins over it."""
    import dsml.parser
    from dsml import cli

    seen: list[str] = []
    real_init = dsml.parser.StreamParser.__init__

    def recording_init(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        real_init(self, *args, **kwargs)
        seen.append(self.dialect.value)

    monkeypatch.setattr(dsml.parser.StreamParser, "__init__", recording_init)
    vector = read_jsonl(DATA / "dialects" / "v3.2" / "parse.jsonl")[0]
    bare = {k: v for k, v in vector.items() if k != "dialect"}
    path = tmp_path / "in.jsonl"
    path.write_text(f"{json.dumps(vector)}\n{json.dumps(bare)}\n", encoding="utf-8")
    for flag, want in ((None, ["v3.2", "v4"]), ("v4.1", ["v3.2", "v4.1"])):
        seen.clear()
        argv = ["parse", "--jsonl", str(path), *(["--dialect", flag] if flag else [])]
        assert cli.main(argv + (["--stream"] if stream else [])) == 0
        assert seen == want
        out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [o["content"] for o in out] == [vector["expected"]["content"]] * 2


def test_parse_reads_stdin_with_dash() -> None:
    vector = read_jsonl(DATA / "wild.jsonl")[0]
    out = output_lines(run_cli("parse", "--jsonl", "-", stdin=json.dumps(vector)))
    assert len(out) == 1 and out[0]["tool_calls"] == vector["expected"]["tool_calls"]


# -- bad input: a message on stderr naming the line, exit status 2 --------------------------


def test_render_error_names_the_line_id(tmp_path: Path) -> None:
    good = read_jsonl(DATA / "render.jsonl")[0]
    bad_request = {
        "model": "deepseek-v4-flash",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "tool", "tool_call_id": "call_nowhere", "content": "orphan result"},
        ],
    }
    path = tmp_path / "in.jsonl"
    lines = [good, {"id": "broken-7", "request": bad_request}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    proc = run_cli("render", "--jsonl", str(path))
    assert proc.returncode == 2
    stderr = proc.stderr.decode()
    assert "broken-7" in stderr and ":2" in stderr and "RenderError" in stderr
    # The good line before it was still printed.
    assert json.loads(proc.stdout.decode().splitlines()[0])["prompt"] == good["prompt"]


def test_render_stdin_with_non_object_arguments_fails_cleanly() -> None:
    request = {
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}
                ],
            },
        ]
    }
    proc = run_cli("render", stdin=json.dumps(request))
    assert proc.returncode == 2
    assert "stdin" in proc.stderr.decode() and "Traceback" not in proc.stderr.decode()


@pytest.mark.parametrize(
    ("command", "content", "message"),
    [
        ("parse", '{"id": "x1", "thinking": true, "tools": []}\n', "missing field 'completion'"),
        (
            "parse",
            '{"id": "x2", "thinking": true, "tools": [], "completion": "hi"\n',
            "not valid JSON",
        ),
        ("render", "[1, 2]\n", "expected a JSON object"),
        ("render", '{"id": "d", "dialect": "v9", "request": {}}\n', "unknown dialect 'v9'"),
        (
            "parse",
            '{"id": "d", "dialect": "v9", "thinking": false, "completion": "hi"}\n',
            "unknown dialect 'v9'",
        ),
    ],
)
def test_bad_jsonl_lines(tmp_path: Path, command: str, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    proc = run_cli(command, "--jsonl", str(path))
    assert proc.returncode == 2
    stderr = proc.stderr.decode()
    assert message in stderr and f"{path}:1" in stderr
    assert "Traceback" not in stderr


def test_bad_json_on_stdin_and_missing_file() -> None:
    proc = run_cli("render", stdin="{not json")
    assert proc.returncode == 2 and "stdin: not valid JSON" in proc.stderr.decode()
    proc = run_cli("parse", "--jsonl", "/nonexistent/file.jsonl")
    assert proc.returncode == 2 and "/nonexistent/file.jsonl" in proc.stderr.decode()


def test_usage_errors_exit_2() -> None:
    assert run_cli().returncode == 2
    assert run_cli("render", "--dialect", "v9").returncode == 2
    assert run_cli("parse").returncode == 2  # --jsonl is required
    assert run_cli("parse", "--jsonl", "-", "--dialect", "v9").returncode == 2
