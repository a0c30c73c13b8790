"""`python -m dsml`: render requests and parse completions from the shell.

For people debugging prompts, and for checking the library from the outside. Other tools
call these flags; keep them stable.

    python -m dsml render [--dialect v4] < request.json     # the prompt, byte-exact
    python -m dsml render --jsonl FILE [--dialect v4]       # {"id", "prompt"} per line
    python -m dsml tokenize [--dialect v4] < request.json   # JSON list of prompt token ids
    python -m dsml parse --jsonl FILE [--stream] [--dialect v4]
                                                            # {"id", "reasoning_content",
                                                            #  "content", "tool_calls"} per line

`render` without `--jsonl` writes exactly the prompt: no newline is added, so the output
can be compared byte for byte with a reference. `--jsonl` input lines are shaped like
`render.jsonl` (`id`, `request`, optional `dialect`, which wins over `--dialect`) or
`parse.jsonl` (`id`, `thinking`, `tools`, `completion`, optional `dialect`, which wins over
`--dialect`: the dialect that rendered the prompt, whose own tag spelling is not a repair);
`FILE` may be `-` for stdin.
`parse --stream` feeds each completion token by token through the V4 tokenizer and the
incremental detokenizer, as an engine would deliver it.

Bad input (unreadable JSON, a missing field, a request the renderer refuses) prints one
line naming the input line and its id on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any

from dsml.dialects import Dialect
from dsml.errors import DsmlError

EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """Input the CLI cannot use; the message names where it is."""


def _read_json(source: str, where: str) -> Any:
    try:
        return json.loads(source)
    except json.JSONDecodeError as exc:
        raise BadInput(f"{where}: not valid JSON ({exc})") from exc


def _jsonl_records(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, record) per non-blank line; location is 'FILE:LINE id=ID' for messages."""
    if path == "-":
        lines = sys.stdin.read().splitlines()
    else:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as exc:
            raise BadInput(f"{path}: {exc.strerror}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        record = _read_json(line, where)
        if not isinstance(record, dict):
            raise BadInput(f"{where}: expected a JSON object per line")
        yield f"{where} id={record.get('id')!r}", record


def _field(record: dict[str, Any], name: str, where: str) -> Any:
    if name not in record:
        raise BadInput(f"{where}: missing field {name!r}")
    return record[name]


def _dialect(value: Any, where: str) -> Dialect:
    try:
        return Dialect(value)
    except ValueError as exc:
        choices = ", ".join(d.value for d in Dialect)
        raise BadInput(f"{where}: unknown dialect {value!r} (one of {choices})") from exc


def _render(request: Any, dialect: Dialect, where: str):
    from dsml.request import render_chat

    try:
        return render_chat(request, dialect=dialect)
    except DsmlError as exc:
        raise BadInput(f"{where}: {type(exc).__name__}: {exc.message}") from exc


def _write_line(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")


def cmd_render(args: argparse.Namespace) -> None:
    if args.jsonl is None:
        prompt = _render(_read_json(sys.stdin.read(), "stdin"), args.dialect, "stdin")
        sys.stdout.write(prompt.text)
        return
    for where, record in _jsonl_records(args.jsonl):
        dialect = _dialect(record.get("dialect", args.dialect), where)
        prompt = _render(_field(record, "request", where), dialect, where)
        _write_line({"id": record.get("id"), "prompt": prompt.text})


def cmd_tokenize(args: argparse.Namespace) -> None:
    from dsml.tokenizer import load_tokenizer

    prompt = _render(_read_json(sys.stdin.read(), "stdin"), args.dialect, "stdin")
    sys.stdout.write(json.dumps(load_tokenizer().encode_prompt(prompt)) + "\n")


def _parse_streamed(completion: str, tools: list[dict[str, Any]], thinking: bool, dialect: Dialect):
    """Token by token, as an engine delivers it: model-output ids, detokenized one at a time."""
    from dsml.detokenizer import IncrementalDetokenizer
    from dsml.parser import StreamParser
    from dsml.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    detok = IncrementalDetokenizer(tokenizer)
    parser = StreamParser(tools=tools, thinking=thinking, dialect=dialect)
    for token_id in tokenizer.encode_generated(completion):
        delta = detok.push(token_id)
        if delta:
            parser.feed(delta)
    parser.feed(detok.flush())
    parser.finish()
    return parser.result


def cmd_parse(args: argparse.Namespace) -> None:
    from dsml.parser import parse_completion

    for where, record in _jsonl_records(args.jsonl):
        completion = _field(record, "completion", where)
        tools = record.get("tools") or []
        thinking = _field(record, "thinking", where)
        if not isinstance(completion, str) or not isinstance(tools, list):
            raise BadInput(f"{where}: 'completion' must be a string and 'tools' a list")
        dialect = _dialect(record.get("dialect", args.dialect), where)
        if args.stream:
            result = _parse_streamed(completion, tools, bool(thinking), dialect)
        else:
            result = parse_completion(
                completion, tools=tools, thinking=bool(thinking), dialect=dialect
            )
        calls = [{"name": c.name, "arguments": c.arguments} for c in result.tool_calls]
        _write_line(
            {
                "id": record.get("id"),
                "reasoning_content": result.reasoning_content,
                "content": result.content,
                "tool_calls": calls,
            }
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dsml", description="DeepSeek-V4 prompts and DSML tool calls."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    dialects = [d.value for d in Dialect]

    render = commands.add_parser("render", help="request JSON -> prompt text")
    render.add_argument("--dialect", choices=dialects, default=Dialect.V4.value)
    render.add_argument("--jsonl", metavar="FILE", help="lines of {id, request[, dialect]}")
    render.set_defaults(run=cmd_render)

    tokenize = commands.add_parser("tokenize", help="request JSON -> prompt token ids")
    tokenize.add_argument("--dialect", choices=dialects, default=Dialect.V4.value)
    tokenize.set_defaults(run=cmd_tokenize)

    parse = commands.add_parser("parse", help="completions -> reasoning, content, tool calls")
    parse.add_argument(
        "--jsonl",
        metavar="FILE",
        required=True,
        help="lines of {id, thinking, tools, completion[, dialect]}",
    )
    parse.add_argument("--dialect", choices=dialects, default=Dialect.V4.value)
    parse.add_argument(
        "--stream", action="store_true", help="feed token by token via tokenizer + detokenizer"
    )
    parse.set_defaults(run=cmd_parse)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.dialect = Dialect(getattr(args, "dialect", Dialect.V4.value))
    # Prompts and completions are UTF-8 whatever the locale says.
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8")
    try:
        args.run(args)
    except BadInput as exc:
        sys.stdout.flush()
        print(f"python -m dsml {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # `... | head` closed the pipe: not an error
        sys.stderr.close()
    return 0
