"""Model commands: `perplexity` and `retrofit`. Heavy imports stay inside the commands."""

from __future__ import annotations

import json
from pathlib import Path

import click

from engram_local.commands.common import MODEL_HELP


@click.command()
@click.option("-m", "--model", type=click.Path(exists=True, file_okay=False), default=None, help=MODEL_HELP)
@click.option("--overrides", "overrides", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="User memory file (.eov) layered over the table; repeat to stack, later wins.")
@click.option("-f", "--file", "text_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="UTF-8 text to score.")
@click.option("--no-engram", is_flag=True, help="Knock the Engram path out (the paper's knock-out).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a sentence.")
@click.option("--logprobs-out", type=click.Path(dir_okay=False), default=None,
              help="Save log p(actual next token) per token as a float32 .npy array.")
@click.option("--window", default=1024, show_default=True, type=click.IntRange(min=2), help="Tokens per scoring window.")
def perplexity(model, overrides, text_file, no_engram, as_json, logprobs_out, window):
    """Bits per byte of a text under the model.

    Lower is better. Compare with --no-engram to see what the memory contributes.
    """
    from engram_local.runtime.loader import load_model
    from engram_local.runtime.perplexity import bits_per_byte

    try:
        text = Path(text_file).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise click.ClickException(f"{text_file}: not UTF-8 text ({e})")
    if not text:
        raise click.ClickException(f"{text_file}: the file is empty")
    try:
        stacks = None
        if overrides:
            from engram_local.memory.facade import open_overrides_for_model
            stacks = open_overrides_for_model(overrides, model)
        em, tok, _ = load_model(model, stacks)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    em.enabled = not no_engram
    res = bits_per_byte(em, tok, text, window=window, show_progress=not as_json)
    if logprobs_out:
        import numpy as np
        np.save(logprobs_out, res.logprobs)
    if as_json:
        click.echo(json.dumps(dict(res.as_dict(), engram=not no_engram, file=str(text_file))))
    else:
        click.echo(f"{res.bpb:.4f} bits per byte over {res.bytes} bytes ({res.tokens} tokens)"
                   f"{' with the Engram knocked out' if no_engram else ''}")


@click.command()
@click.option("--corpus", type=click.Path(exists=True, file_okay=False), required=True,
              help="Corpus directory with train.txt (and valid.txt) from scripts/build_corpus.py.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Checkpoint directory to write (and resume from).")
@click.option("--backbone", default=None, help="Backbone: HF directory or GGUF (default: SmolLM2-135M-Instruct).")
@click.option("--layers", default="1,16", show_default=True, help="Decoder layers that get an Engram.")
@click.option("--write-layer", type=int, default=None, help="Layer user facts go into (default: the last of --layers).")
@click.option("--table-size", type=click.IntRange(min=1), default=10000, show_default=True,
              help="Rows per hash head (the next unused prime above it).")
@click.option("--head-dim", type=click.IntRange(min=1), default=32, show_default=True, help="Width of one table row.")
@click.option("--ngram", type=click.IntRange(min=2), default=3, show_default=True, help="Largest N-gram order N.")
@click.option("--heads", type=click.IntRange(min=1), default=8, show_default=True, help="Hash heads per order K.")
@click.option("--steps", type=click.IntRange(min=1), default=600, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Learning rate (tables get 5x).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --out.")
@click.option("--release", is_flag=True, help="At the end, store tables as f16 and drop optimizer state.")
@click.option("-t", "--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch.")
def retrofit(corpus, out_dir, backbone, layers, write_layer, table_size, head_dim, ngram, heads, steps,
             batch_size, seq_len, lr, seed, checkpoint_every, resume, release, threads):
    """Train Engram layers onto a frozen backbone (only Engram parameters learn).

    Shows a progress bar with loss and tokens/s, checkpoints every --checkpoint-every steps,
    resumes with --resume, and is deterministic for a --seed.
    """
    import torch

    from engram_local.model.backbone import load_hf_backbone
    from engram_local.text.canonical import build_canonical_map
    from engram_local.model.engram import EngramConfig, EngramModel
    from engram_local.train.retrofit import STATE_FILE, RetrofitSettings
    from engram_local.train.retrofit import retrofit as run_retrofit

    if threads:
        torch.set_num_threads(threads)
    train = Path(corpus) / "train.txt"
    if not train.is_file():
        raise click.ClickException(f"{corpus}: no train.txt (build it with scripts/build_corpus.py)")
    layer_ids = [int(x) for x in layers.split(",") if x.strip()]
    from engram_local.text.tokens import document_start_id

    bb, tok = load_hf_backbone(backbone)
    cmap, n_canon = build_canonical_map(tok)
    # the paper's pad choice: the canonical id of the document-start token (<|endoftext|> in SmolLM2)
    pad = int(cmap[document_start_id(tok)])
    cfg = EngramConfig(hidden_size=bb.config.hidden_size, compressed_vocab_size=n_canon, pad_id=pad,
                       layer_ids=layer_ids, write_layer=write_layer if write_layer is not None else max(layer_ids),
                       max_ngram_size=ngram, n_head_per_ngram=heads, head_dim=head_dim,
                       vocab_size_per_ngram=[table_size] * (ngram - 1), seed=seed)
    torch.manual_seed(seed)
    em = EngramModel(bb, cfg, cmap)
    s = RetrofitSettings(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed,
                         checkpoint_every=checkpoint_every)
    stats = run_retrofit(em, tok, train, Path(out_dir), s, backbone_ref=backbone, resume=resume,
                         log=lambda m: click.echo(m, err=True))
    if release:
        em.save_engram(out_dir, table_dtype=torch.float16)
        (Path(out_dir) / STATE_FILE).unlink(missing_ok=True)
    click.echo(json.dumps(stats))

