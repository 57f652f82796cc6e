"""`convert` and `inspect`: build a MODEL_DIR of GGUF files, and describe model files.

Heavy imports (torch, transformers, gguf) stay inside the commands so `--help` is instant.
"""

from __future__ import annotations

from pathlib import Path

import click

from engram_local import constants
from engram_local.commands.common import printable_json, printable_lines

# Errors the library raises for bad input or unusable files (GGUFFormatError is a ValueError):
# shown as one line, never a traceback.
USER_ERRORS = (ValueError, OSError)


@click.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="MODEL_DIR to write.")
@click.option("--table-type", type=click.Choice(list(constants.TABLE_QTYPES)),
              default=constants.DEFAULT_TABLE_TYPE, show_default=True,
              help="Storage of the Engram memory tables (q8_0 / q4_0 need a head dim divisible by 32).")
@click.option("--outtype", type=click.Choice(list(constants.BACKBONE_OUTTYPES)), default=None,
              help=f"Storage of the backbone's matrices: a Hugging Face backbone's [default: "
                   f"{constants.DEFAULT_OUTTYPE}]; a GGUF backbone is used as it is unless given "
                   "(then dequantized and re-stored).")
@click.option("--force", is_flag=True, help="Replace OUT if it already holds files.")
def convert(src, out_dir, table_type, outtype, force):
    """Convert the Engram checkpoint SRC into a MODEL_DIR of GGUF files.

    SRC is a directory written by `engram-local retrofit` (engram_config.json,
    engram.safetensors, checkpoint.json naming the backbone: a Hugging Face directory or a
    GGUF), optionally with a PEFT LoRA skill adapter in SRC/adapter/.

    \b
    MODEL_DIR receives:
      backbone.gguf  the backbone, runnable by stock llama.cpp
      engram.gguf    the Engram sidecar: memory tables, projections, hash constants
      adapter.gguf   the skill adapter as a llama.cpp LoRA (when SRC has one)
      backbone-skill.gguf  the backbone with the adapter folded in (what run decodes with)
    """
    from engram_local.convert import convert_checkpoint
    from engram_local.formats.describe import describe_sidecar
    from engram_local.formats.sidecar import open_sidecar
    from engram_local.runtime.loader import ModelDir

    try:
        out = convert_checkpoint(src, out_dir, table_type=table_type, outtype=outtype, force=force,
                                 log=lambda m: click.echo(m, err=True))
        md = ModelDir.at(out)
        info = describe_sidecar(open_sidecar(md.engram))
    except USER_ERRORS as e:
        raise click.ClickException(str(e))
    files = [md.backbone, md.engram] + ([md.adapter] if md.adapter else [])
    sizes = ", ".join(f"{p.name} {_size(p.stat().st_size)}" for p in files)
    click.echo(f"wrote {md.path}: {sizes}; fingerprint {info['fingerprint']}")


@click.command()
@click.argument("path", required=False, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--verify", is_flag=True,
              help="Also re-hash the Engram tables and check the stored fingerprint (reads them whole).")
def inspect(path, as_json, verify):
    """Describe a MODEL_DIR, a GGUF file or a user memory (.eov) file.

    Without PATH, describes the default model (creating it on first use). With --json, prints
    one object; for a MODEL_DIR it has `model_dir`, `backbone`, `engram` and `adapter`
    (absolute paths; adapter null when absent).
    """
    try:
        info = _inspect(path, verify)
    except USER_ERRORS as e:
        raise click.ClickException(str(e))
    if as_json:
        click.echo(printable_json(info))
    else:
        click.echo(printable_lines(_format(info)))


def _inspect(path: str | None, verify: bool) -> dict:
    from engram_local.formats import describe
    from engram_local.formats.header import file_kind, scan_gguf
    from engram_local.formats.sealed import is_sealed_file
    from engram_local.formats.sidecar import open_sidecar
    from engram_local.model.checkpoint import is_checkpoint
    from engram_local.runtime.loader import ModelDir, ensure_default_model, is_model_dir

    def sidecar_info(file: Path) -> dict:
        sidecar = open_sidecar(file)
        if verify:
            sidecar.verify_fingerprint()
        return describe.describe_sidecar(sidecar)

    if path is None or Path(path).is_dir():
        if path is not None and not is_model_dir(path):
            hint = (" (an Engram checkpoint: `engram-local convert` turns it into one)"
                    if is_checkpoint(path) else "")
            raise FileNotFoundError(f"{path}: not a MODEL_DIR{hint}")
        md = ensure_default_model() if path is None else ModelDir.at(path)
        engram = sidecar_info(md.engram)
        backbone = describe.describe_backbone(scan_gguf(md.backbone))
        adapter = describe.describe_adapter(scan_gguf(md.adapter)) if md.adapter else None
        return {"kind": "model_dir", **md.as_dict(), "fingerprint": engram["fingerprint"],
                "backbone_info": backbone, "engram_info": engram, "adapter_info": adapter}

    file = Path(path).resolve()
    if is_sealed_file(file):
        return {"kind": "overrides", **describe.describe_overrides(file)}
    header = scan_gguf(file)
    kind = file_kind(header)
    if kind == "engram":
        return {"kind": kind, **sidecar_info(file)}
    if kind == "overrides":
        return {"kind": kind, **describe.describe_overrides(file)}
    if kind == "adapter":
        return {"kind": kind, **describe.describe_adapter(header)}
    return {"kind": kind, **describe.describe_backbone(header)}


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.{0 if n >= 100 * scale else 1}f}{suffix}"
    return str(n)


def _format_backbone(b: dict) -> list[str]:
    return [f"{b['architecture']}, {b['block_count']} layers, width {b['embedding_length']}, "
            f"vocab {b['vocab_size']:,}, {_count(b['n_params'])} parameters, {b['file_type']}, "
            f"{_size(b['size_bytes'])}" + (f" ({b['name']})" if b.get("name") else ""),
            f"tokenizer {b['tokenizer']}/{b['tokenizer_pre']}, "
            f"chat template {'yes' if b['chat_template'] else 'no'}"]


def _format_engram(e: dict) -> list[str]:
    lines = [f"format {e['format_version']}, fingerprint {e['fingerprint']}, {_size(e['size_bytes'])}",
             f"N={e['max_ngram_size']}, K={e['n_head_per_ngram']}, head dim {e['head_dim']}, "
             f"canonical vocab {e['compressed_vocab_size']:,} (of {e['raw_vocab_size']:,} ids), "
             f"pad id {e['pad_id']}, for a {e['backbone_arch']} of width {e['hidden_size']}"]
    for layer in e["layers"]:
        lines.append(f"layer {layer['layer']}: {layer['rows']:,} rows x {layer['dim']}, "
                     f"{layer['table_type']} ({_size(layer['table_bytes'])})"
                     + ("  <- facts are written here" if layer["write_layer"] else ""))
    return lines


def _format_adapter(a: dict) -> list[str]:
    return [f"LoRA for {a['architecture']}, alpha {a['alpha']:g}, rank {'/'.join(map(str, a['ranks']))}, "
            f"{a['n_weights']} weights ({', '.join(a['targets'])}), {_size(a['size_bytes'])}",
            f"memories are fitted in its {' + '.join(a.get('chat_forms') or ['recite'])} replies"
            + ("" if a.get("chat_forms") else " (not recorded: an adapter from before the key)")]


def _format(info: dict) -> str:
    kind = info["kind"]
    if kind == "model_dir":
        out = [f"MODEL_DIR {info['model_dir']}"]
        sections = [("backbone", info["backbone"], _format_backbone(info["backbone_info"])),
                    ("engram", info["engram"], _format_engram(info["engram_info"])),
                    ("adapter", info["adapter"],
                     _format_adapter(info["adapter_info"]) if info["adapter_info"] else [])]
        for label, file, lines in sections:
            out.append(f"  {label:<9}{Path(file).name if file else 'none'}")
            out += [f"             {line}" for line in lines]
        return "\n".join(out)
    if kind == "overrides":
        layers = ", ".join(f"layer {k}: {v}" for k, v in info["layers"].items()) or "none"
        return "\n".join([f"user memory {info['path']} (format {info['format_version']}"
                          f"{', encrypted' if info.get('encrypted') else ''})",
                          f"  bound to model fingerprint {info['fingerprint']}",
                          f"  {info['facts']} fact{'' if info['facts'] == 1 else 's'}, {info['rows']} rows "
                          f"({layers}), {_size(info['size_bytes'])}"])
    lines = {"engram": _format_engram, "adapter": _format_adapter, "backbone": _format_backbone}[kind](info)
    title = {"engram": "Engram sidecar", "adapter": "LoRA adapter", "backbone": "backbone"}[kind]
    return "\n".join([f"{title} {info['path']}"] + [f"  {line}" for line in lines])
