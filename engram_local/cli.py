"""`engram-local`: the command-line entry point.

This module only assembles the click group from engram_local.commands.*. Every command imports
torch, transformers or llama_cpp inside its body, so `engram-local --help` stays instant.
"""

from __future__ import annotations

import sys

import click

from engram_local.commands import convert as convert_cmds
from engram_local.commands import eval as eval_cmds
from engram_local.commands import memory as memory_cmds
from engram_local.commands import model as model_cmds
from engram_local.commands import run as run_cmds
from engram_local.commands import skill as skill_cmds


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="engram-local")
def main():
    """engram-local: a local language model that remembers you.

    The model carries an Engram memory (a hashed N-gram table); your facts become a few dozen
    rows of that table in a small override file, layered over the shared table at run time.

    \b
    Start here:
      engram-local perplexity -f text.txt                  score a text (bits per byte)
      engram-local retrofit --corpus data/corpus -o ckpt   train an Engram onto a backbone
    """


main.add_command(model_cmds.perplexity)
main.add_command(model_cmds.retrofit)
main.add_command(convert_cmds.convert)
main.add_command(convert_cmds.inspect)
main.add_command(memory_cmds.remember)
main.add_command(memory_cmds.facts)
main.add_command(memory_cmds.forget)
main.add_command(run_cmds.run)
main.add_command(eval_cmds.eval_group)
main.add_command(skill_cmds.train_skill)

if __name__ == "__main__":
    sys.exit(main())
