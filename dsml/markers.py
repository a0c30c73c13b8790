"""Control strings of DeepSeek-V4's prompt format, shared by the renderer and the parser.

The bars are U+FF5C (FULLWIDTH VERTICAL LINE); the spaces inside sentence tokens are
U+2581. Only the renderer may turn these into control tokens (see `dsml.tokenizer`).
"""

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SYSTEM = "<｜System｜>"  # v4.1 only
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# `｜DSML｜` is one token; everything around it in a tag is ordinary BPE text.
DSML = "｜DSML｜"
TOOL_CALLS = "tool_calls"
INVOKE = "invoke"
PARAMETER = "parameter"

TOOL_CALLS_OPEN = f"<{DSML}{TOOL_CALLS}>"
TOOL_CALLS_CLOSE = f"</{DSML}{TOOL_CALLS}>"
INVOKE_CLOSE = f"</{DSML}{INVOKE}>"
PARAMETER_CLOSE = f"</{DSML}{PARAMETER}>"


def invoke_open(name: str) -> str:
    return f'<{DSML}{INVOKE} name="{name}">'


def parameter_open(key: str, is_string: bool) -> str:
    return f'<{DSML}{PARAMETER} name="{key}" string="{"true" if is_string else "false"}">'

# Tool results travel inside a user turn as plain text (not special tokens).
TOOL_RESULT_OPEN = "<tool_result>"
TOOL_RESULT_CLOSE = "</tool_result>"

# DeepSeek's internal quick-instruction tasks (a user message's `task` field); each is one token.
TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}
