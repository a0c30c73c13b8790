"""The prompt dialects DeepSeek models were trained on, and the fixed texts each one uses.

A dialect decides the spelling of the tool-call tags, the fixed tools-section text and the
reasoning-effort prefix (dsml.md section 2). Everything else about rendering is shared and
lives in `dsml.render`. The texts below are byte-exact copies of what DeepSeek's reference
encoders emit (checked against tests/data/dsml/ by the render tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from dsml.markers import DSML, INVOKE, PARAMETER, THINK_CLOSE, THINK_OPEN, TOOL_CALLS


class Dialect(StrEnum):
    V4 = "v4"  # DeepSeek-V4-Flash / V4-Pro, first release
    V4_0731 = "v4-0731"  # V4-Flash-0731, V4-Pro-0813: three effort tiers
    V4_1 = "v4.1"  # V4.1-Flash: spaced tags, <｜System｜>, numeric effort
    V3_2 = "v3.2"  # DeepSeek-V3.2: function_calls, <function_results>, no effort


class Effort(StrEnum):
    """Reasoning-effort tiers of DeepSeek's API after mapping (dsml.md section 3 item 7)."""

    LOW = "low"
    HIGH = "high"
    MAX = "max"


EFFORT_ABSOLUTE_MAXIMUM = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)

EFFORT_BEYOND_MAXIMUM = (
    "Reasoning Effort: Beyond maximum \u2014 exhaustive, relentless, and uncompromising.\n"
    "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: "
    "exhaustively decompose the problem into its most fundamental components, trace every causal "
    "chain to its root, and resolve the underlying cause rather than any surface symptom.\n"
    "Do not stop reasoning until you have independently verified the solution from multiple "
    "angles and are certain that no assumption remains unchecked and no error remains "
    "undiscovered.\n\n"
)

RESPONSE_FORMAT_SECTION = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
)
# DeepSeek's request layer writes this in place of the schema section for json_object.
JSON_OBJECT_SECTION = (
    "You are a helpful assistant designed to output JSON.\n"
    "## Response Format:\n\nReply with JSON object ONLY."
)


def _v4_tools_intro(block: str, invoke: str, parameter: str) -> str:
    """The fixed text before the tool schemas; the tag names are the dialect's."""
    return (
        "## Tools\n\n"
        "You have access to a set of tools to help answer the user's question. You can invoke "
        f'tools by writing a "<{DSML}{block}>" block like the following:\n\n'
        f"<{DSML}{block}>\n"
        f'<{DSML}{invoke} name="$TOOL_NAME">\n'
        f'<{DSML}{parameter} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE'
        f"</{DSML}{parameter}>\n"
        "...\n"
        f"</{DSML}{invoke}>\n"
        f'<{DSML}{invoke} name="$TOOL_NAME2">\n'
        "...\n"
        f"</{DSML}{invoke}>\n"
        f"</{DSML}{block}>\n\n"
        'String parameters should be specified as is and set `string="true"`. For all other '
        "types (numbers, booleans, arrays, objects), pass the value in JSON format and set "
        '`string="false"`.\n\n'
        f"If thinking_mode is enabled (triggered by {THINK_OPEN}), you MUST output your complete "
        f"reasoning inside {THINK_OPEN}...{THINK_CLOSE} BEFORE any tool calls or final response.\n\n"
        f"Otherwise, output directly after {THINK_CLOSE} with tool calls or final response.\n\n"
        "### Available Tool Schemas\n\n"
    )


def _v32_tools_intro() -> str:
    block = f"<{DSML}function_calls>"
    block_close = f"</{DSML}function_calls>"
    return (
        "## Tools\n\n"
        "You have access to a set of tools you can use to answer the user's question.\n"
        f'You can invoke functions by writing a "{block}" block like the following as part of '
        "your reply to the user:\n"
        f"{block}\n"
        f'<{DSML}invoke name="$FUNCTION_NAME">\n'
        f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE'
        f"</{DSML}parameter>\n"
        "...\n"
        f"</{DSML}invoke>\n"
        f'<{DSML}invoke name="$FUNCTION_NAME2">\n'
        "...\n"
        f"</{DSML}invoke>\n"
        f"{block_close}\n\n"
        "String and scalar parameters should be specified as is without any escaping or quotes, "
        'while lists and objects should use JSON format. The "string" attribute should be set '
        'to "true" for string type parameters and "false" for other types (numbers, booleans, '
        "arrays, objects).\n\n"
        "If the thinking_mode is enabled, then after function results you should strongly "
        "consider outputting a thinking block. Here is an example:\n\n"
        f"{block}\n...\n{block_close}\n\n"
        "<function_results>\n...\n</function_results>\n\n"
        f"{THINK_OPEN}...thinking about results{THINK_CLOSE}\n\n"
        "Here are the functions available in JSONSchema format:\n"
        "<functions>\n"
    )


_V4_TOOLS_OUTRO = (
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke "
    "tool calls.\n"
)


@dataclass(frozen=True, slots=True)
class DialectTexts:
    """Spellings and fixed texts of one dialect."""

    block_tag: str  # the name after `<｜DSML｜` that opens a tool-call block
    invoke_tag: str
    parameter_tag: str
    tools_intro: str  # fixed text before the tool schemas (one JSON object per line)
    tools_outro: str  # fixed text after them
    effort_prefixes: dict[Effort, str]  # prompt prefix per effort tier (thinking mode only)
    # V4.1 states a numeric budget instead, after a <｜System｜> token; None elsewhere.
    effort_budgets: dict[Effort, int] | None = None
    system_token: bool = False  # system messages open with <｜System｜> (V4.1)

    def effort_prefix(self, effort: Effort | int | None) -> str:
        """The thinking-mode prefix for an effort tier (or, in V4.1, a budget 1-100).

        Raises ValueError for an effort the dialect does not know.
        """
        if self.effort_budgets is None:
            if effort is None:
                return ""
            return self.effort_prefixes.get(Effort(effort), "")
        if effort is None:
            effort = Effort.HIGH  # V4.1's encoder default
        if type(effort) is int:  # bool is not a budget
            if not 1 <= effort <= 100:
                raise ValueError(f"a reasoning budget must be within 1-100, got {effort}")
            budget = effort
        else:
            budget = self.effort_budgets[Effort(effort)]
        return EFFORT_BUDGET_TEMPLATE.format(budget=budget)


EFFORT_BUDGET_TEMPLATE = "Reasoning Effort: {budget} (range 1-100, the higher the value, the more thorough the reasoning)\n\n"
_V4_INTRO = _v4_tools_intro(TOOL_CALLS, INVOKE, PARAMETER)
# V4.1 writes a space between `｜DSML｜` and each tag name, and calls the block `calls`.
V41_TAGS = (" calls", f" {INVOKE}", f" {PARAMETER}")

TEXTS: dict[Dialect, DialectTexts] = {
    # The first release knows one prefix: what its encoder calls "max".
    Dialect.V4: DialectTexts(
        block_tag=TOOL_CALLS,
        invoke_tag=INVOKE,
        parameter_tag=PARAMETER,
        tools_intro=_V4_INTRO,
        tools_outro=_V4_TOOLS_OUTRO,
        effort_prefixes={Effort.MAX: EFFORT_ABSOLUTE_MAXIMUM},
    ),
    # The 0731 refresh shifted the tiers down one: the old max text became `high`, and `max`
    # got a new, stronger text. `low` has no prefix.
    Dialect.V4_0731: DialectTexts(
        block_tag=TOOL_CALLS,
        invoke_tag=INVOKE,
        parameter_tag=PARAMETER,
        tools_intro=_V4_INTRO,
        tools_outro=_V4_TOOLS_OUTRO,
        effort_prefixes={
            Effort.HIGH: EFFORT_ABSOLUTE_MAXIMUM,
            Effort.MAX: EFFORT_BEYOND_MAXIMUM,
        },
    ),
    # DeepSeek's released V4.1 table (the pre-release one was 25/50/75/100).
    Dialect.V4_1: DialectTexts(
        block_tag=V41_TAGS[0],
        invoke_tag=V41_TAGS[1],
        parameter_tag=V41_TAGS[2],
        tools_intro=_v4_tools_intro(*V41_TAGS),
        tools_outro=_V4_TOOLS_OUTRO,
        effort_prefixes={},
        effort_budgets={Effort.LOW: 50, Effort.HIGH: 75, Effort.MAX: 100},
        system_token=True,
    ),
    Dialect.V3_2: DialectTexts(
        block_tag="function_calls",
        invoke_tag=INVOKE,
        parameter_tag=PARAMETER,
        tools_intro=_v32_tools_intro(),
        tools_outro="\n</functions>\n",
        effort_prefixes={},
    ),
}


def texts(dialect: Dialect | str) -> DialectTexts:
    return TEXTS[Dialect(dialect)]
