"""User-memory commands: `remember`, `facts`, `forget`. Heavy imports stay inside the commands."""

from __future__ import annotations

import sys

import click

from engram_local.commands.common import MODEL_HELP, printable, printable_json
from engram_local.text.facts import MAX_FACT_CHARS

STATEMENT_RULE = ("A STATEMENT is split after its last linking word (is, are, was, in, at, on, "
                  "named, a, ...; or after a colon): \"My doctor is Dr. Krause.\" -> prompt \"My doctor "
                  "is\", answer \"Dr. Krause\"; fillers such as \"btw,\" and a final \"now\" are dropped.")




def check_fact_lengths(facts) -> None:
    """Refuse facts whose prompt, answer or a paraphrase is empty or longer than MAX_FACT_CHARS:
    a fact is a sentence, and fitting cost grows with its tokens (a 10,000-character statement
    ran for over 10 minutes and took gigabytes)."""
    for i, f in enumerate(facts, 1):
        for what, text in [("prompt", f.prompt), ("answer", f.answer)] + [("paraphrase", p) for p in f.paraphrases]:
            if len(text) > MAX_FACT_CHARS:
                raise click.ClickException(f"fact {i} ({f.id or (f.prompt[:30] + '...')!r}): its {what} has "
                                           f"{len(text)} characters; a fact's text is at most {MAX_FACT_CHARS}")
            if what != "paraphrase" and not text.strip():
                raise click.ClickException(f"fact {i}: empty {what}")


def _load(model):
    from engram_local.memory import facade as memory

    try:
        return memory.load_model_for_memory(model)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e))


def _progress(quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm

    return lambda total: tqdm(total=total, desc="fitting", unit="step", leave=False, file=sys.stderr)


@click.command()
@click.option("-m", "--model", type=click.Path(exists=True, file_okay=False), default=None, help=MODEL_HELP)
@click.option("-o", "--out", "out_file", required=True, type=click.Path(dir_okay=False),
              help="The user's memory file (.eov); created if missing, facts are added otherwise.")
@click.argument("statements", nargs=-1)
@click.option("--prompt", "prompts", multiple=True, help="A fact's prompt (pair with --answer; repeatable).")
@click.option("--answer", "answers", multiple=True, help="The answer that follows the matching --prompt.")
@click.option("--from-jsonl", "jsonl", type=click.Path(exists=True, dir_okay=False),
              help='Facts as JSON lines {"prompt": ..., "answer": ..., "id"?: ..., "paraphrases"?: [...]}.')
@click.option("--from-user-json", "user_json", type=click.Path(exists=True, dir_okay=False),
              help="A user file of the paper (users/*.json), with the paper's prompt rule.")
@click.option("--paraphrases", is_flag=True,
              help="With --from-user-json: also write the other paraphrases ending with the answer.")
@click.option("--method", type=click.Choice(["joint", "opt", "unembed"]), default="joint", show_default=True,
              help="joint: all facts fitted together (Joint OPT); opt: each fact alone (OPT); "
                   "unembed: closed form (UNEMBED_P), no fitting.")
@click.option("--value-type", type=click.Choice(["f16", "f32"]), default=None,
              help="Type of the stored rows (default f16, or the existing file's).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Fitting steps at most (>= 1).")
@click.option("-t", "--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch; the fit runs its batches on this many threads at once (default: all cores).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def remember(model, out_file, statements, prompts, answers, jsonl, user_json, paraphrases, method,
             value_type, max_steps, threads, quiet):
    """Write facts into a user memory file and print each new fact's id.

    \b
    Examples:
      engram-local remember -o me.eov "My doctor is Dr. Krause."
      engram-local remember -o me.eov --prompt "My cat is called" --answer "Figaro"
      engram-local remember -o me.eov --from-jsonl facts.jsonl

    Each fact is stored as a few rows of the model's memory table, fitted so that the model
    continues the prompt with the answer; other text is unaffected. Adding facts to an existing
    file refits only the rows the new facts touch. A fact with the prompt of a fact already in
    the file is an update: it replaces that fact ("I drive a Toyota now" after "I drive a
    Subaru"; the change is kept in the file's history, see `facts --history`); the same fact said
    again writes nothing and prints the existing id. A statement without a linking word ("I love
    hiking", "I speak French and Spanish") is split after its verb or before a trailing name, and
    adds to a fact with the same prompt ("I love" -> "jazz, hiking") unless it says a change
    ("I drink tea now"). A statement of several facts is written as several ("My name is Sam and
    I'm a nurse." prints two ids). A fact's prompt, answer and each
    paraphrase are at most 400 characters. With ENGRAM_LOCAL_KEY or ENGRAM_LOCAL_KEY_FILE set,
    the file is written encrypted (docs/security.md).
    """
    from engram_local.memory import facade as memory

    if len(prompts) != len(answers):
        raise click.UsageError(f"--prompt given {len(prompts)} times but --answer {len(answers)} times; "
                               "give them in pairs")
    facts = []
    try:
        facts += [f for s in statements for f in memory.statement_facts(s)]
        facts += [memory.NewFact(prompt=p, answer=a) for p, a in zip(prompts, answers)]
        if jsonl:
            facts += memory.jsonl_facts(jsonl)
        if user_json:
            facts += memory.user_json_facts(user_json, paraphrases=paraphrases)
    except memory.FactInputError as e:
        raise click.ClickException(str(e) + ("" if statements == () else f" ({STATEMENT_RULE})"))
    except RecursionError:
        raise click.ClickException(f"{jsonl or user_json}: JSON nested too deeply")
    if not facts:
        raise click.UsageError("no facts: give STATEMENTs, --prompt/--answer, --from-jsonl or --from-user-json")
    check_fact_lengths(facts)
    from engram_local.formats.eov import check_write_target

    try:        # before the model loads: a FIFO, device, read-only file or directory is refused now
        check_write_target(out_file)
    except ValueError as e:
        raise click.ClickException(str(e))
    if threads:
        import torch
        torch.set_num_threads(threads)
    em, tok, fingerprint = _load(model)
    from engram_local.memory.writer import FitSettings

    settings = FitSettings()
    if max_steps is not None:
        settings.max_steps = max_steps
    try:
        report = memory.remember(out_file, facts, em, tok, fingerprint, method=method,
                                 value_type=value_type, settings=settings, progress=_progress(quiet))
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    for fid in report.new_ids:
        click.echo(printable(fid))
    by_id = {f.id: f for f in facts}
    for r in report.history:
        new = by_id.get(r.by)
        click.echo(printable(f"engram-local: {r.by} replaces {r.id}: {r.prompt!r} {r.answer} -> "
                             f"{new.answer if new else '?'}"), err=True)
    for fid in report.unchanged:
        f = by_id.get(fid)
        click.echo(printable(f"engram-local: {fid} already says {f.prompt!r} {f.answer}; nothing written for it"
                             if f else f"engram-local: {fid} unchanged"), err=True)
    missed = [f for f, ok in report.recalled.items() if not ok]
    written = len(report.new_ids) - len(report.unchanged)
    if written == 0:
        click.echo(f"engram-local: nothing new; {out_file} unchanged", err=True)
    else:
        click.echo(f"engram-local: {written} fact(s) written to {out_file}: {report.rows} rows, "
                   f"{report.file_bytes} bytes, {report.seconds:.1f} s", err=True)
    if missed:
        click.echo(f"engram-local: warning: not recalled in full after fitting: {', '.join(missed)}", err=True)


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help='Print {"facts": [...]} as JSON.')
@click.option("--history", "with_history", is_flag=True,
              help='Also list the facts later facts replaced (JSON: "history"), oldest first.')
def facts(file, as_json, with_history):
    """List the facts of a user memory file (id, prompt, answer, rows); with --history also
    the facts later facts replaced, with when and by which."""
    from engram_local.formats.eov import read_memory_file

    try:
        mf = read_memory_file(file)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    entries = mf.entries()
    out = []
    for f in mf.facts:
        out.append({"id": f.id, "prompt": f.prompt, "answer": f.answer, "paraphrases": f.paraphrases,
                    "rows": len(f.entries), "row_ids": [[entries[e][0], entries[e][1]] for e in f.entries],
                    "written": f.written, "method": f.method})
    history = [r.as_json() for r in mf.history] if with_history else []
    if as_json:
        doc = {"file": str(file), "fingerprint": f"{mf.fingerprint:#018x}", "rows": len(entries), "facts": out}
        if with_history:
            doc["history"] = history
        click.echo(printable_json(doc))
        return
    if not out and not history:
        click.echo(f"{printable(file)}: no facts")
        return
    p = printable
    for f in out:
        click.echo(f"{p(f['id'])}\t{p(repr(f['prompt']))} -> {p(repr(f['answer']))}\t{f['rows']} rows\t"
                   f"{p(f['written'])}")
    for r in history:
        click.echo(f"({p(r['id'])})\t{p(repr(r['prompt']))} -> {p(repr(r['answer']))}\twritten {p(r['written'])}\t"
                   f"replaced {p(r['replaced'])} by {p(r['by'])}")
    click.echo(f"{len(out)} facts, {len(entries)} rows" + (f", {len(history)} replaced" if with_history else ""),
               err=True)


@click.command()
@click.option("-m", "--model", type=click.Path(exists=True, file_okay=False), default=None, help=MODEL_HELP)
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.argument("fact_ids", nargs=-1, required=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def forget(model, file, fact_ids, quiet):
    """Remove facts from a user memory file.

    The facts' text and every row only they used leave the file (it is rewritten whole);
    rows they shared with other facts are refitted so those keep their recall.
    """
    from engram_local.memory import facade as memory
    from engram_local.formats.eov import read_memory_file

    try:
        mf = read_memory_file(file)
        known = {f.id for f in mf.facts}
        unknown = [i for i in fact_ids if i not in known]
        if unknown:
            raise click.ClickException(f"{file}: no fact with id {', '.join(map(repr, unknown))} "
                                       f"(ids: {', '.join(sorted(known)) or 'none'})")
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    em, tok, fingerprint = _load(model)
    try:
        report = memory.forget(file, list(fact_ids), em, tok, fingerprint, progress=_progress(quiet))
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    click.echo(f"engram-local: forgot {', '.join(fact_ids)}; {file} now holds {report.rows} rows, "
               f"{report.file_bytes} bytes", err=True)
