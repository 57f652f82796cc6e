"""`eval`: evaluations. `eval head-to-head` runs the paper's conditions A-F and the prompt
baselines G, H on one model. Heavy imports stay inside the commands."""

from __future__ import annotations

import os
import shlex

import click

from engram_local.commands.common import MODEL_HELP


def _command_line(ctx: click.Context, command: str, files_option: str, files, repeat: bool) -> str:
    """The command as it ran: the files under `files_option` (once per file with `repeat`, else
    once before them all), then every other option that differs from its default."""
    parts = ["engram-local", "eval", command]
    for i, f in enumerate(files):
        parts += [f"--{files_option}", str(f)] if (repeat or i == 0) else [str(f)]
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if not isinstance(p, click.Option) or p.name == files_option or value in (None, False, ()) \
                or value == p.default:
            continue
        opt = max(p.opts, key=len)
        parts += [opt] if p.is_flag else [opt, str(value)]
    return " ".join(shlex.quote(x) for x in parts)


@click.group("eval", context_settings={"help_option_names": ["-h", "--help"]})
def eval_group():
    """Evaluate per-user memory against the alternatives."""


@eval_group.command("head-to-head")
@click.option("-m", "--model", type=click.Path(exists=True, file_okay=False), default=None, help=MODEL_HELP)
@click.option("--users", "users", multiple=True, type=click.Path(exists=True), metavar="FILE",
              help="A user file (the paper's users/*.json schema) or a directory of them; repeatable, "
                   "and more paths may follow one --users (--users a.json b.json).")
@click.argument("more_users", nargs=-1, type=click.Path(exists=True), metavar="[FILE]...")
@click.option("--conditions", default="A,B,C,D,E,F,G,H", show_default=True,
              help="Conditions to run: A base, B per-user LoRA, C per-user Engram rows, D LoRA + rows, "
                   "E shared adapter, F rows + shared adapter (layered), G all facts in the prompt, "
                   "H retrieval top-k in the prompt.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write the results (per user, per condition, per probe; means) as JSON.")
@click.option("--report", "report_out", type=click.Path(dir_okay=False), default=None,
              help="Write a markdown report (one table row per condition); the plot goes next to it.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default=None,
              help="Where the accuracy vs context tokens PNG goes (default: the report's or the "
                   "JSON's name with .png).")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Keep per-user rows and LoRAs here and reuse them on a rerun (default: a temporary "
                   "directory, removed at the end).")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Unrelated UTF-8 text for the bits-per-byte change (default: a public-domain Austen "
                   "excerpt shipped with engram-local).")
@click.option("--adapter", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Shared skill adapter GGUF for E and F (default: the MODEL_DIR's adapter.gguf).")
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True,
              help="H: facts retrieved per query.")
@click.option("--lora-steps", type=click.IntRange(min=1), default=None,
              help="B/D: most full-batch training steps of the per-user LoRA (default 300; training "
                   "stops earlier once every answer token leads by 2 logits).")
@click.option("--no-bpb", is_flag=True, help="Skip the bits-per-byte change (faster).")
@click.option("-t", "--threads", type=click.IntRange(min=1), default=None, help="CPU threads.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def head_to_head(model, users, more_users, conditions, json_out, report_out, plot_out, work_dir, text_file,
                 adapter, top_k, lora_steps, no_bpb, threads, quiet):
    """Per-user memory against the alternatives, on one model, for each user file.

    Conditions (the paper's A-F plus two prompt baselines): A untouched base; B per-user LoRA
    (rank 64 on q/k/v); C per-user Engram rows; D B + C; E the shared skill adapter only; F the
    user's rows fitted through the shared adapter, with it (layered); G every fact in the
    prompt; H the top-k facts retrieved by all-MiniLM-L6-v2 in the prompt.

    Metrics: direct recall (first-token top-1, full answer), chat-form recall, indirect_any
    and indirect_top1 (first 20 indirect questions, "Q: <q>\\nA:", 16 greedy tokens), bits per
    byte change on unrelated text, users worse than A, context tokens and ms per query, bytes
    stored per user. Without --json/--report the markdown table goes to stdout.

    \b
    Examples:
      engram-local eval head-to-head --users users/u002.json --conditions A,C,G,H
      engram-local eval head-to-head --users users/ --json h2h.json --report h2h.md --work-dir h2h-work
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")    # shared cores: no busy-waiting threads
    from engram_local.eval import report
    from engram_local.eval.head_to_head import HeadToHeadError, Settings, head_to_head as run_h2h, parse_conditions
    from engram_local.runtime.retrieval import RetrievalUnavailable

    paths = list(users) + list(more_users)
    if not paths:
        raise click.UsageError("give at least one user file: --users FILE")
    try:
        s = Settings(conditions=parse_conditions(conditions), top_k=top_k, bpb=not no_bpb, threads=threads)
    except HeadToHeadError as e:
        raise click.BadParameter(str(e), param_hint="--conditions")
    if lora_steps is not None:
        s.lora.max_steps = lora_steps
    if plot_out or report_out or json_out:   # a plot goes next to them: check before an hour of work
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise click.ClickException("the plot needs matplotlib, an evaluation extra: "
                                       "pip install 'engram-local[eval]'")
    command = _command_line(click.get_current_context(), "head-to-head", "users", paths, repeat=True)
    try:
        results = run_h2h(paths, model=model, work_dir=work_dir, text=text_file, adapter=adapter, settings=s,
                          progress=not quiet, command=command)
    except (HeadToHeadError, RetrievalUnavailable, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    written = report.write(results, json_out, report_out, plot_out)
    if not (json_out or report_out):
        click.echo(report.markdown(results))
    for kind, path in written.items():
        click.echo(f"wrote {kind}: {path}", err=True)


@eval_group.command("chat-memory")
@click.option("--personas", "personas", multiple=True, metavar="FILE",
              help="A persona file (statements, facts with direct/paraphrased questions, indirect and "
                   "general questions); repeatable, and more may follow one --personas.")
@click.argument("more_personas", nargs=-1, metavar="[FILE]...")
@click.option("-m", "--model", type=click.Path(exists=True, file_okay=False), default=None, help=MODEL_HELP)
@click.option("--conditions", default="memory,none,memory-noskill,prompt,retrieval", show_default=True,
              help="Comma-separated: memory (rows + skill adapter), none (skill adapter only), "
                   "memory-noskill (rows fitted and run without the adapter), prompt (all statements in "
                   "the prompt), retrieval (top-3 statements by all-MiniLM-L6-v2 in the prompt).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write the results (totals, per persona, every reply) as JSON.")
@click.option("--report", "report_out", type=click.Path(dir_okay=False), default=None,
              help="Write a markdown report.")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Keep the personas' .eov files here and reuse them on a rerun (default: a temporary "
                   "directory, removed at the end).")
@click.option("-t", "--threads", type=click.IntRange(min=1), default=None, help="CPU threads.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def chat_memory(personas, more_personas, model, conditions, json_out, report_out, work_dir, threads, quiet):
    """Recall of facts told in plain sentences, asked as chat questions.

    For each persona: `remember` its statements into a fresh memory file (as `engram-local
    remember STATEMENT...`), then ask every question as one chat turn (as `engram-local run
    --chat -p Q`: greedy, 32 tokens, fresh KV cache). A reply counts when it contains any
    expected string (case-insensitive). Reports hits/total per condition and question kind
    (direct, paraphrased, indirect, general) and per persona. Without --json/--report the
    markdown goes to stdout.

    \b
    Example:
      engram-local eval chat-memory --personas p00.json p01.json --report chat.md
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    from engram_local.eval import chat_memory as cm

    paths = list(personas) + list(more_personas)
    if not paths:
        raise click.UsageError("give at least one persona file: --personas FILE")
    try:
        s = cm.Settings(conditions=cm.parse_conditions(conditions), threads=threads)
    except cm.ChatMemoryError as e:
        raise click.BadParameter(str(e), param_hint="--conditions")
    command = _command_line(click.get_current_context(), "chat-memory", "personas", paths, repeat=False)
    try:
        results = cm.chat_memory(paths, model=model, settings=s, work_dir=work_dir, progress=not quiet,
                                 command=command)
    except (cm.ChatMemoryError, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    written = cm.write(results, json_out, report_out)
    if not written:
        click.echo(cm.markdown(results))
    for kind, path in written.items():
        click.echo(f"wrote {kind}: {path}", err=True)
