"""CI: one chat completion with tools, through the openai SDK, against `dsml-proxy serve --demo`.

Run by a Python that has `openai` (the engine extra does not): `.ci/run` starts the server
from a fresh virtual environment with only that extra installed, then runs this. The demo
model is random, so only the wire is checked: a well-formed completion comes back.
"""

from __future__ import annotations

import sys

from openai import OpenAI


def main(base_url: str) -> int:
    client = OpenAI(base_url=base_url, api_key="ci", max_retries=0, timeout=300)
    resp = client.chat.completions.create(
        model="deepseek-reasoner",
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
        max_tokens=16,
    )
    choice = resp.choices[0]
    if resp.object != "chat.completion" or choice.finish_reason not in ("stop", "length", "tool_calls"):
        print(f"unexpected response: {resp}", file=sys.stderr)
        return 1
    if resp.usage is None or resp.usage.completion_tokens < 1:
        print(f"no tokens generated: {resp.usage}", file=sys.stderr)
        return 1
    print(f"first command: chat completion with tools OK (finish_reason={choice.finish_reason}, "
          f"{resp.usage.completion_tokens} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
