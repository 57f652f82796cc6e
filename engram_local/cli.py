"""`engram-local`: the command-line entry point.

This module only assembles the click group from engram_local.commands.*. Every command imports
torch, transformers or llama_cpp inside its body, so `engram-local --help` stays instant.

Every failure ends as one line on stderr and a non-zero exit, never a traceback (`CleanGroup`):
bad flags and usage errors ("Error: ... (see 'engram-local CMD --help')", exit 2), the
commands' own errors (exit 1), and anything unexpected ("Error: internal error: <type>: <what>",
exit 1; ENGRAM_LOCAL_DEBUG=1 shows the traceback instead). Ctrl-C exits 130, a closed pipe
quietly.
"""

from __future__ import annotations

import os
import sys

import click

DEBUG_ENV = "ENGRAM_LOCAL_DEBUG"


def one_line(text: str) -> str:
    """`text` on one line (line breaks become " / ")."""
    return " / ".join(part.strip() for part in str(text).splitlines() if part.strip())


class CleanGroup(click.Group):
    """A click group whose every error is one line on stderr (see the module docstring)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            ctx = exc.ctx
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            self._fail(f"Error: {one_line(exc.format_message())}{hint}", exc.exit_code)
        except click.ClickException as exc:
            self._fail(f"Error: {one_line(exc.format_message())}", exc.exit_code)
        except click.Abort:
            self._fail("Aborted.", 130)
        except BrokenPipeError:
            _quiet_pipe()
            sys.exit(141)
        except Exception as exc:   # noqa: BLE001 - the last line of defence, see the docstring
            if os.environ.get(DEBUG_ENV):
                raise
            what = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.filename else exc
            self._fail(f"Error: {one_line(what) or type(exc).__name__}"
                       if isinstance(exc, OSError) else
                       f"Error: internal error: {type(exc).__name__}: {one_line(exc)} "
                       f"(set {DEBUG_ENV}=1 for details)", 1)
        sys.exit(result if isinstance(result, int) else 0)

    @staticmethod
    def _fail(line: str, code: int):
        try:
            sys.stdout.flush()
        except (BrokenPipeError, ValueError, OSError):
            _quiet_pipe()
        click.echo(line, err=True)
        sys.exit(code)


def _quiet_pipe():
    """Point stdout at /dev/null so Python's exit flush cannot raise again on a closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass

from engram_local.commands import convert as convert_cmds
from engram_local.commands import eval as eval_cmds
from engram_local.commands import memory as memory_cmds
from engram_local.commands import model as model_cmds
from engram_local.commands import run as run_cmds
from engram_local.commands import serve as serve_cmds
from engram_local.commands import skill as skill_cmds


@click.group(cls=CleanGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
main.add_command(serve_cmds.serve)
main.add_command(eval_cmds.eval_group)
main.add_command(skill_cmds.train_skill)


def entry():
    """The `engram-local` console script: `main`, in a process whose malloc uses huge pages when
    the command decodes with llama.cpp (runtime.pages; re-executes itself once for that)."""
    from engram_local.runtime import pages

    pages.maybe_reexec(sys.argv[1:])
    return main()


if __name__ == "__main__":
    sys.exit(entry())
