"""Constrained decoding cost: llguidance (dsml.grammar) vs xgrammar (its built-in
`deepseek_v4` structural tag), on a coding agent's tools section, with the V4 tokenizer.

    python bench/grammar_mask.py [--repeat 3] [--batch 1 32]

Measures, per library: the tokenizer setup (once per process), compiling the turn grammar
(once per tools section: cached), and the time to compute one next-token mask, walking a
realistic completion (reasoning, an answer line, a block with two calls) token by token.
xgrammar's tag is what vLLM sends for V4; it does not keep DSML out of reasoning or content
(its free text is unconstrained), so it does less than dsml.grammar.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# Run as a script, bench/ comes first on sys.path, and bench/proxy.py would shadow the
# proxy package: the repository root instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from dsml import markers  # noqa: E402
from dsml.grammar import turn_lark, turn_spec  # noqa: E402
from dsml.tokenizer import load_tokenizer, tokenizer_json_path  # noqa: E402

S = {"type": "string"}
TOOLS = [
    {"type": "function", "function": {"name": name, "description": desc, "parameters": params}}
    for name, desc, params in [
        ("bash", "Run a shell command.", {"type": "object", "properties": {
            "command": S, "timeout": {"type": "integer", "minimum": 1, "maximum": 600},
            "run_in_background": {"type": "boolean"}}, "required": ["command"]}),
        ("read_file", "Read a file.", {"type": "object", "properties": {
            "path": S, "offset": {"type": "integer"}, "limit": {"type": "integer"}},
            "required": ["path"]}),
        ("write_file", "Write a file.", {"type": "object", "properties": {
            "path": S, "content": S}, "required": ["path", "content"]}),
        ("edit_file", "Edit a file.", {"type": "object", "properties": {
            "path": S, "edits": {"type": "array", "items": {"type": "object", "properties": {
                "old": S, "new": S, "replace_all": {"type": "boolean"}},
                "required": ["old", "new"]}}}, "required": ["path", "edits"]}),
        ("grep", "Search files.", {"type": "object", "properties": {
            "pattern": S, "path": S, "mode": {"type": "string", "enum": ["content", "files", "count"]},
            "context": {"type": "integer", "minimum": 0}}, "required": ["pattern"]}),
        ("glob", "Find files.", {"type": "object", "properties": {"pattern": S, "path": S},
                                 "required": ["pattern"]}),
        ("web_fetch", "Fetch a URL.", {"type": "object", "properties": {
            "url": {"type": "string"}, "prompt": S}, "required": ["url", "prompt"]}),
        ("todo_write", "Update the todo list.", {"type": "object", "properties": {
            "todos": {"type": "array", "items": {"type": "object", "properties": {
                "content": S, "status": {"type": "string",
                                         "enum": ["pending", "in_progress", "completed"]},
                "priority": {"type": "string", "enum": ["high", "medium", "low"]}},
                "required": ["content", "status"]}}}, "required": ["todos"]}),
        ("task", "Start a sub-agent.", {"type": "object", "properties": {
            "description": S, "prompt": S, "options": {"type": "object", "properties": {
                "model": S, "max_turns": {"type": "integer"}}}}, "required": ["prompt"]}),
        ("notebook_edit", "Edit a notebook cell.", {"type": "object", "properties": {
            "path": S, "cell": {"type": "integer"}, "source": S,
            "kind": {"type": "string", "enum": ["code", "markdown"]}}, "required": ["path", "source"]}),
    ]
]


def p(key: str, value: str, is_string: bool) -> str:
    return markers.parameter_open(key, is_string) + value + markers.PARAMETER_CLOSE


COMPLETION = (
    "The test fails in the parser; I should read the file first and then search for the "
    "other callers of this function before changing anything." + markers.THINK_CLOSE
    + "Let me look at the parser and its callers."
    + f"\n\n{markers.TOOL_CALLS_OPEN}\n"
    + markers.invoke_open("read_file") + "\n" + p("path", "dsml/parser.py", True) + "\n"
    + p("limit", "200", False) + "\n" + markers.INVOKE_CLOSE + "\n"
    + markers.invoke_open("grep") + "\n" + p("pattern", "def feed\\(", True) + "\n"
    + p("mode", "files", True) + "\n" + markers.INVOKE_CLOSE
    + "\n" + markers.TOOL_CALLS_CLOSE + markers.EOS
)


def bench_llguidance(ids: list[int], repeat: int) -> dict:
    import llguidance
    import llguidance.torch as llt

    from dsml.grammar_match import ll_tokenizer

    t = time.perf_counter()
    lt = ll_tokenizer()
    setup = time.perf_counter() - t
    spec = turn_spec(TOOLS, thinking=True)
    lark = turn_lark(spec)
    compiles, masks = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        m = llguidance.LLMatcher(lt, llguidance.grammar_from("lark", lark), log_level=0)
        compiles.append(time.perf_counter() - t)
        bitmask = llt.allocate_token_bitmask(1, lt.vocab_size)
        for token in ids:
            t = time.perf_counter()
            llt.fill_next_token_bitmask(m, bitmask, 0)
            masks.append(time.perf_counter() - t)
            assert m.consume_token(token), m.get_error()
        assert m.is_stopped()
    return {"setup_s": setup, "compiles": compiles, "masks": masks}


def bench_xgrammar(ids: list[int], repeat: int) -> dict:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    t = time.perf_counter()
    hf = PreTrainedTokenizerFast(tokenizer_file=tokenizer_json_path())
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=129280, stop_token_ids=[1])
    setup = time.perf_counter() - t
    tag = xgr.get_model_structural_tag("deepseek_v4", tools=TOOLS, reasoning="enabled")
    compiles, masks = [], []
    for _ in range(repeat):
        compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        t = time.perf_counter()
        compiled = compiler.compile_structural_tag(tag)
        compiles.append(time.perf_counter() - t)
        m = xgr.GrammarMatcher(compiled)
        bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
        for token in ids:
            t = time.perf_counter()
            m.fill_next_token_bitmask(bitmask)
            masks.append(time.perf_counter() - t)
            if not m.accept_token(token):
                return {"setup_s": setup, "compiles": compiles, "masks": masks,
                        "rejected": token}
    return {"setup_s": setup, "compiles": compiles, "masks": masks}


def bench_batch(ids: list[int], batch: int) -> dict:
    """One decode step's masks for `batch` sequences (each at its own place in the
    completion), as the embedded engine computes them: one GrammarMask per row, in turn
    (the reference sampler path); and with llguidance's thread-parallel executor."""
    import llguidance
    import llguidance.torch as llt

    from dsml.grammar_match import ll_tokenizer
    from proxy.backends.grammar_mask import GrammarMask

    lark = turn_lark(turn_spec(TOOLS, thinking=True))
    executor = llguidance.LLExecutor()
    bitmask = llt.allocate_token_bitmask(batch, ll_tokenizer().vocab_size)
    seq, par = [], []
    for step in range(0, len(ids) - 1, max(1, len(ids) // 20)):  # 20 steps over the turn
        # Row b sits at token (step + 7b) of the completion: rows spread over its phases.
        prefixes = [ids[: (step + 7 * b) % (len(ids) - 1)] for b in range(batch)]
        # Two fresh sets (a matcher keeps the mask of its current state: timing both ways
        # on one set would time a cache hit the second time).
        masks, other = ([GrammarMask(lark, 0) for _ in range(batch)] for _ in range(2))
        for m, prefix in zip(masks + other, prefixes + prefixes, strict=True):
            m._advance(prefix)  # untimed: the tokens of earlier steps
        t = time.perf_counter()
        for m, prefix in zip(other, prefixes, strict=True):
            m.bitmask(prefix)
        seq.append(time.perf_counter() - t)
        t = time.perf_counter()
        llt.fill_next_token_bitmask_par(executor, [(m.matcher, b) for b, m in enumerate(masks)],
                                        bitmask)
        par.append(time.perf_counter() - t)
    return {"seq": seq, "par": par}


def bench_batch_steady(ids: list[int], batch: int) -> dict:
    """A batch decoding as the engine does: each row's matcher lives through its turn and
    computes a mask after every token (rows start 7 tokens apart; a row that reaches the end
    of the completion starts a new turn with a fresh matcher). Every step computes all rows'
    masks; every (len // 20)-th step is timed, one row after another on one set of matchers
    and with GrammarMask.prepare_batch (llguidance's executor) on a twin set in the same states (a matcher keeps the mask
    of its state, so one set timed twice would time a cache hit the second time)."""
    from proxy.backends.grammar_mask import GrammarMask

    lark = turn_lark(turn_spec(TOOLS, thinking=True))
    end = len(ids) - 1
    pos = [(7 * b) % end for b in range(batch)]
    seq_set, par_set = ([GrammarMask(lark, 0) for _ in range(batch)] for _ in range(2))
    for m, twin, p in zip(seq_set, par_set, pos, strict=True):
        for n in range(p + 1):  # untimed: the row's earlier tokens, a mask after each
            m.bitmask(ids[:n])
            twin.bitmask(ids[:n])
    seq, par = [], []
    for step in range(end):
        for b in range(batch):
            pos[b] += 1
            if pos[b] > end:  # a new turn on this row
                pos[b] = 0
                seq_set[b], par_set[b] = GrammarMask(lark, 0), GrammarMask(lark, 0)
        prefixes = [ids[:p] for p in pos]
        for m, prefix in zip(par_set, prefixes, strict=True):
            m._advance(prefix)
        timed = step % max(1, end // 20) == 0
        t = time.perf_counter()
        for m, prefix in zip(seq_set, prefixes, strict=True):
            m.bitmask(prefix)
        if timed:
            seq.append(time.perf_counter() - t)
        t = time.perf_counter()
        GrammarMask.prepare_batch(list(zip(par_set, prefixes, strict=True)))
        if timed:
            par.append(time.perf_counter() - t)
    return {"seq": seq, "par": par}


def summary(name: str, r: dict, n_tokens: int) -> str:
    masks_us = sorted(x * 1e6 for x in r["masks"])
    pct = lambda q: masks_us[min(len(masks_us) - 1, int(q * len(masks_us)))]  # noqa: E731
    extra = f" (rejected token {r['rejected']} of the completion)" if "rejected" in r else ""
    return (f"{name}: tokenizer setup {r['setup_s']:.2f} s; compile median "
            f"{statistics.median(r['compiles']) * 1e3:.1f} ms; mask per token over {n_tokens} "
            f"tokens: median {pct(0.5):.0f} us, p90 {pct(0.9):.0f} us, p99 {pct(0.99):.0f} us, "
            f"max {masks_us[-1]:.0f} us{extra}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 32])
    args = ap.parse_args()
    ids = load_tokenizer().encode_generated(COMPLETION)
    print(f"tools: {len(TOOLS)}, completion: {len(ids)} tokens")
    print(summary("llguidance", bench_llguidance(ids, args.repeat), len(ids)))
    try:
        print(summary("xgrammar", bench_xgrammar(ids, args.repeat), len(ids)))
    except ImportError:
        print("xgrammar: not installed (pip install xgrammar to compare)")
    for batch in args.batch:
        for label, fn in (("fresh matchers", bench_batch), ("steady state", bench_batch_steady)):
            r = fn(ids, batch)
            print(f"embedded engine, batch {batch}, {label}: masks per decode step, one row "
                  f"after another median {statistics.median(r['seq']) * 1e3:.2f} ms; "
                  f"llguidance's parallel executor median {statistics.median(r['par']) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
