"""`train-skill`: the shared skill adapter. Heavy imports stay inside the command."""

from __future__ import annotations

import json

import click

from engram_local.commands.common import MODEL_HELP


@click.command("train-skill")
@click.option("-m", "--model", type=click.Path(exists=True, file_okay=False), default=None, help=MODEL_HELP)
@click.option("-o", "--out", "out_file", required=True, type=click.Path(dir_okay=False),
              help="The adapter to write: a llama.cpp LoRA adapter GGUF (*.gguf).")
@click.option("--users", "users", multiple=True, type=click.Path(exists=True),
              help="Training users: a directory of user files (the paper's users/*.json) or one file; "
                   "repeatable. Default: the paper's held-out users u020-u029, shipped with engram-local.")
@click.option("--steps", type=int, default=None, help="Optimizer steps (default 400).")
@click.option("--batch", type=int, default=None, help="Samples per step, all from one user (default 8).")
@click.option("--lr", type=float, default=None, help="Adam learning rate (default 1e-3).")
@click.option("--rank", type=int, default=None, help="LoRA rank (default 16; alpha = 2 x rank).")
@click.option("--kinds", default=None,
              help="Sample kinds, comma-separated, from fact,reason,chat,qa,irecite,fchat,echo,prose,keep "
                   "(default: fact,reason,fchat,echo,prose,keep, the shipped echo recipe; prose needs "
                   "the corpus: scripts/build_corpus.py. The earlier recite recipe is "
                   "--kinds fact,reason,chat,qa --rows).")
@click.option("--rows/--no-rows", default=False, show_default=True,
              help="Train with each training user's facts written as Engram rows and attached "
                   "(the recite recipe; the echo recipe masks the values instead).")
@click.option("--chat-rows", is_flag=True,
              help="Fit the training users' rows in chat form too, as `remember` does with an adapter.")
@click.option("--seed", type=int, default=None, help="Seed of the sample order and the LoRA init (default 42).")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Where the training users' rows are kept between runs (default: OUT's name + .rows).")
@click.option("--peft-out", type=click.Path(file_okay=False), default=None,
              help="Also save the adapter as a PEFT LoRA directory (what `convert` reads in SRC/adapter/).")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads for torch.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the training report as one JSON object.")
def train_skill(model, out_file, users, steps, batch, lr, rank, kinds, rows, chat_rows, seed, work_dir,
                peft_out, threads, quiet, as_json):
    """Train the shared skill adapter: one LoRA for every user.

    The shipped (echo) recipe teaches the model to answer a question about the user by turning
    it into its statement ("Remind me what my pet is called?" -> "My pet is called ..."), the
    value left to the user's rows, while keeping the model's own prose and plain "Q:/A:"
    answers. The adapter records the replies it answers in, and `remember` fits every fact in
    those replies. The recite recipe (--kinds fact,reason,chat,qa --rows) answers by saying the
    fact in the words it was written instead; docs/skill.md has what each measured.

    \b
    Examples:
      python scripts/build_corpus.py --out data/corpus     # the prose samples' text, once
      engram-local train-skill -o skill.gguf -t 2
      engram-local train-skill -o skill.gguf --users my-users/ --steps 800
    Use it by placing it in a MODEL_DIR as adapter.gguf (run and remember pick it up; run
    --no-skill leaves it out).
    """
    from dataclasses import asdict

    from engram_local.train.skill import KINDS, SkillSettings, train_skill as train

    s = SkillSettings()
    for name, value in (("steps", steps), ("batch", batch), ("lr", lr), ("seed", seed)):
        if value is not None:
            if name != "lr" and value < 1 or name == "lr" and not value > 0:
                raise click.BadParameter(f"must be positive, got {value}", param_hint=f"--{name}")
            setattr(s, name, value)
    if rank is not None:
        if rank < 1:
            raise click.BadParameter(f"must be >= 1, got {rank}", param_hint="--rank")
        s.rank, s.alpha = rank, 2.0 * rank
    if kinds is not None:
        chosen = tuple(k.strip() for k in kinds.split(",") if k.strip())
        bad = [k for k in chosen if k not in KINDS]
        if bad or not chosen:
            raise click.BadParameter(f"{kinds!r}: choose from {','.join(KINDS)}", param_hint="--kinds")
        s.kinds = chosen
    s.rows, s.chat_rows = rows, chat_rows
    if not out_file.endswith(".gguf"):
        raise click.BadParameter(f"{out_file}: the adapter is a GGUF file; name it *.gguf", param_hint="-o")
    try:
        rep = train(out_file, model=model, users=users or None, settings=s, work_dir=work_dir,
                    peft_out=peft_out, threads=threads, progress=not quiet)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    if as_json:
        click.echo(json.dumps({"adapter": out_file, **asdict(rep)}))
    else:
        click.echo(f"wrote {out_file}: {rep.steps} steps over {rep.samples} samples of {len(rep.users)} users "
                   f"in {rep.seconds:.0f} s (loss {rep.first_loss:.3f} -> {rep.last_loss:.3f})")
