"""`engram-local run`: chat and completion with the user's memory, on llama.cpp or torch.

stdout carries only generated text (or, with --prompts-jsonl, one JSON object per prompt);
everything else (notices, errors, --timings) goes to stderr. Heavy imports stay inside the
command so `engram-local --help` stays instant.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from engram_local.commands.common import MODEL_HELP

REPL_HELP = """Commands:
  /remember <statement>   store a fact in your memory (the last --overrides file), in the background
  /facts                  list the facts in your memory (after any write still running)
  /forget <id>            remove a fact (after any write still running)
  /reset                  start a new conversation
  /exit                   quit (also Ctrl-D; waits for a write still running, Ctrl-C to skip it)
When you state a fact about yourself ("btw I'm allergic to penicillin"), the chat offers to
remember it after the reply: y writes it, any other key does not (--auto-remember: written
without asking). Writes run in the background while the chat goes on; a fact applies from the
first turn after its write has landed, and the chat then says its id ("/forget f7" undoes it).
Ctrl-C stops a reply and returns to the prompt."""


def _err(msg: str) -> None:
    click.echo(msg, err=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-m", "--model", default=None, help=MODEL_HELP)
@click.option("--overrides", "overrides", multiple=True, metavar="FILE.eov",
              help="User memory layered over the Engram table; repeat to stack (later files win on "
                   "shared rows). Chat writes (/remember) go to the last one.")
@click.option("-p", "--prompt", default=None, help="Complete this text (no chat template) and exit.")
@click.option("-f", "--file", "prompt_file", default=None, metavar="PROMPT_FILE",
              help="Complete the UTF-8 text of this file and exit.")
@click.option("--prompts-jsonl", default=None, metavar="FILE",
              help='One {"prompt": "...", "chat": false} per line; prints one '
                   '{"prompt": ..., "completion": ...} line per valid input. Invalid lines are '
                   "reported on stderr with their line numbers (exit status 1 at the end).")
@click.option("--chat", is_flag=True, help="Wrap -p / -f text as one user turn of the chat template (with "
              "--prompts-jsonl: the default of lines without \"chat\").")
@click.option("-n", "--n-predict", "n_predict", default=256, show_default=True, type=click.IntRange(min=0),
              help="Most tokens to generate (generation also stops at end-of-turn).")
@click.option("--temp", default=0.8, show_default=True, type=float, help="Temperature; 0 = greedy, deterministic.")
@click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True),
              help="Nucleus sampling threshold.")
@click.option("--seed", default=None, type=click.IntRange(min=0), help="Sampling seed (default: random).")
@click.option("-c", "--ctx-size", "n_ctx", default=2048, show_default=True, type=click.IntRange(min=16),
              help="Context size in tokens.")
@click.option("-t", "--threads", default=None, type=click.IntRange(min=1),
              help="CPU threads (llama.cpp: generation and batch; torch: intra-op).")
@click.option("--backend", type=click.Choice(["auto", "llama.cpp", "torch"]), default="auto", show_default=True,
              help="auto = llama.cpp when installed and the model has a backbone GGUF, else torch.")
@click.option("-ngl", "--n-gpu-layers", "n_gpu_layers", default=0, show_default=True, type=int,
              help="llama.cpp: layers to offload to the GPU (when llama.cpp was built with one).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="torch backend device (default cpu; --device cuda with --backend auto picks torch).")
@click.option("--no-skill", is_flag=True, help="Run without the skill adapter.")
@click.option("--no-route", is_flag=True,
              help="Chat replies about your facts open as the model likes, not with the words your memory "
                   "was written after (by default the best such opening, of the facts the question is "
                   "closest to, is said first when it passes the gate; docs/chat-memory.md).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-turn tokens (benchmarks).")
@click.option("--timings", is_flag=True,
              help="Print speed figures as one JSON object, the last line of stderr.")
@click.option("--auto-remember", is_flag=True,
              help="Chat: write the facts you state about yourself (\"my sister is called Anjali\") to the "
                   "last --overrides file without asking (default: offer each, one keypress). Questions, "
                   "hypotheticals, quotes, passing states, plans and facts about other people are not taken.")
def run(model, overrides, prompt, prompt_file, prompts_jsonl, chat, n_predict, temp, top_p, seed, n_ctx,
        threads, backend, n_gpu_layers, device, no_skill, ignore_eos, timings, auto_remember, no_route):
    """Chat with the model, or complete prompts, with your memory.

    \b
    engram-local run --overrides me.eov                      interactive chat
    engram-local run --overrides me.eov --auto-remember      chat that remembers what you say about yourself
    engram-local run --overrides me.eov -p "My doctor is" -n 16 --temp 0
    engram-local run --prompts-jsonl prompts.jsonl --temp 0  batch completion

    In the chat, a fact you state about yourself is offered for memory after the reply (y/N);
    writes run in the background and apply from the next turn after they land. /help lists the
    chat commands.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    sources = [x for x in (prompt, prompt_file, prompts_jsonl) if x is not None]
    if len(sources) > 1:
        raise click.UsageError("give at most one of -p, -f and --prompts-jsonl")
    interactive = not sources

    # Read the inputs before loading anything: bad input fails fast.
    if prompt_file is not None:
        prompt = _read_text(prompt_file, "prompt file")
        if not prompt:
            raise click.ClickException(f"{prompt_file}: the prompt file is empty")
    if prompt is not None and prompt == "":
        raise click.ClickException("the prompt is empty (-p \"\")")
    jsonl_lines = None
    if prompts_jsonl is not None:
        jsonl_lines = _read_text(prompts_jsonl, "prompts file").splitlines()
    if n_gpu_layers and backend == "torch":
        _err("engram-local: -ngl applies to the llama.cpp backend; ignored with --backend torch")

    from engram_local.runtime.session import PromptTooLong, RunError, Session, Timings
    from engram_local.runtime.sampling import Sampler

    try:
        sampler = Sampler(temp=temp, top_p=top_p, seed=seed)
    except ValueError as exc:
        raise click.ClickException(str(exc))
    try:
        session = Session(model, overrides=overrides, backend=backend, n_ctx=n_ctx, n_threads=threads,
                          n_gpu_layers=n_gpu_layers, device=device, skill=not no_skill, route=not no_route,
                          allow_missing_last_override=interactive, log=_err)
    except RunError as exc:
        raise click.ClickException(str(exc))
    except (ValueError, OSError, RuntimeError) as exc:
        raise click.ClickException(f"cannot load the model: {exc}")

    total = Timings()
    status = 0
    try:
        if interactive:
            _repl(session, sampler, n_predict, total, ignore_eos, auto_remember)
        elif jsonl_lines is not None:
            status = _jsonl(session, sampler, n_predict, jsonl_lines, prompts_jsonl, total, ignore_eos, chat)
        else:
            try:
                ids = session.tokenize(prompt, chat=chat)
                out = sys.stdout
                gen = session.generate(ids, n_predict, sampler, on_text=lambda s: (out.write(s), out.flush()),
                                       ignore_eos=ignore_eos, opening=_opening(session, ids, prompt, chat))
                total.add(gen.timings)
                if out.isatty():
                    out.write("\n")
                out.flush()
            except PromptTooLong as exc:
                raise click.ClickException(str(exc))
            except RunError as exc:
                raise click.ClickException(str(exc))
            except KeyboardInterrupt:
                sys.stdout.flush()
                _err("\nengram-local: interrupted")
                status = 130
    finally:
        session.close()
    if timings:                     # after everything else: the last line of stderr
        sys.stdout.flush()
        _err(json.dumps(total.as_dict()))
    if status:
        sys.exit(status)


def _read_text(path: str, what: str) -> str:
    p = Path(path)
    if not p.exists():
        raise click.ClickException(f"{path}: {what} not found")
    if p.is_dir():
        raise click.ClickException(f"{path}: is a directory, not a {what}")
    try:
        return p.read_text(encoding="utf-8")
    except PermissionError:
        raise click.ClickException(f"{path}: {what} is not readable (permission denied)")
    except UnicodeDecodeError as exc:
        raise click.ClickException(f"{path}: {what} is not UTF-8 text ({exc})")
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot read the {what}: {exc}")


def _opening(session, ids, text: str, chat: bool = True) -> list[int]:
    """The tokens a chat reply to `ids` (the user's turn `text`) opens with
    (Session.reply_opening), [] for a completion."""
    return session.reply_opening(ids, text) if chat else []


def _jsonl(session, sampler, n_predict, lines, path, total, ignore_eos=False, chat_default=False) -> int:
    from engram_local.runtime.session import RunError

    bad = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            _err(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno}); line skipped")
            bad += 1
            continue
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            _err(f'{path}:{lineno}: expected an object with a "prompt" string; line skipped')
            bad += 1
            continue
        chat = item.get("chat", chat_default)
        if not isinstance(chat, bool):
            _err(f'{path}:{lineno}: "chat" must be true or false; line skipped')
            bad += 1
            continue
        if not item["prompt"]:
            _err(f"{path}:{lineno}: empty prompt; line skipped")
            bad += 1
            continue
        try:
            ids = session.tokenize(item["prompt"], chat=chat)
            gen = session.generate(ids, n_predict, sampler, ignore_eos=ignore_eos,
                                   opening=_opening(session, ids, item["prompt"], chat))
        except RunError as exc:
            _err(f"{path}:{lineno}: {exc}; line skipped")
            bad += 1
            continue
        total.add(gen.timings)
        sys.stdout.write(json.dumps({"prompt": item["prompt"], "completion": gen.text}, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    if bad:
        _err(f"engram-local: {bad} invalid line{'s' if bad != 1 else ''} in {path} (the others were processed)")
    return 1 if bad else 0


# --------------------------------------------------------------------------- the chat REPL

def _take_ctrl_c():
    """Make Ctrl-C (SIGINT) raise KeyboardInterrupt while the chat runs, even when this process
    inherited SIGINT ignored; returns the handler to put back (None: nothing changed).

    Python installs its KeyboardInterrupt handler at start-up only when SIGINT has the default
    disposition. A process started with SIGINT ignored - a background job of a non-interactive
    shell (`sh -c 'cmd &'`) and everything started under it, e.g. a test suite run that way -
    keeps ignoring it, and Ctrl-C would then not stop a reply: generation ran on to -n. In the
    chat, Ctrl-C is part of the interface (it stops a reply; at the prompt it says how to quit),
    not a request to terminate, so the chat takes SIGINT for its duration. A handler someone
    installed on purpose (an embedding program's) is left alone; so are the one-shot modes (-p,
    -f, --prompts-jsonl), where an ignored SIGINT keeps a background batch run alive."""
    import signal

    try:
        current = signal.getsignal(signal.SIGINT)
        if current not in (signal.SIG_IGN, signal.SIG_DFL):
            return None                      # Python's own handler, or someone else's
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return current
    except ValueError:                       # not the main thread: signal handlers cannot change
        return None


def _give_back_ctrl_c(previous) -> None:
    if previous is not None:
        import signal

        signal.signal(signal.SIGINT, previous)


def _repl(session, sampler, n_predict, total, ignore_eos: bool = False, auto_remember: bool = False) -> None:
    previous = _take_ctrl_c()
    memory = _Memory(session, auto=auto_remember)
    try:
        _chat(session, sampler, n_predict, total, ignore_eos, memory)
    finally:
        try:
            memory.close()
        finally:
            _give_back_ctrl_c(previous)


def _chat(session, sampler, n_predict, total, ignore_eos: bool = False, memory=None) -> None:
    from engram_local.runtime.session import PromptTooLong, RunError

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    if memory is None:
        memory = _Memory(session)
    _err(f"engram-local: {session.backend_name} backend, context {session.n_ctx} tokens"
         + (f", memory {', '.join(map(str, session.override_paths))}" if session.override_paths else ", no memory file")
         + (" (facts you state are written without asking)" if memory.auto and memory.path is not None else "")
         + ". /help for commands.")
    messages: list[dict] = []
    out = sys.stdout
    while True:
        memory.settle()                     # writes that landed: applied between turns only
        try:
            line = input("> ")
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n(/exit or Ctrl-D to quit)\n")
            continue
        text = line.strip()
        if not text:
            continue
        memory.settle()
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            arg = arg.strip()
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/help":
                _err(REPL_HELP)
            elif cmd == "/reset":
                messages.clear()
                session.reset()
                _err("(new conversation)")
            elif cmd == "/remember":
                if not arg:
                    _err("usage: /remember <statement>")
                else:
                    memory.remember(arg)
            elif cmd == "/facts":
                memory.facts()
            elif cmd == "/forget":
                if not arg:
                    _err("usage: /forget <id>")
                else:
                    memory.forget(arg)
            else:
                _err(f"unknown command {cmd}; /help lists them")
            continue

        messages.append({"role": "user", "content": line})
        try:
            ids = _fit_conversation(session, messages, n_predict)
        except (PromptTooLong, RunError) as exc:
            _err(f"engram-local: {exc}")
            messages.pop()
            continue
        offers = memory.spot(line)          # facts stated in the turn (--auto-remember: queued now)
        reply = ""
        try:
            gen = session.generate(ids, n_predict, sampler, on_text=lambda s: (out.write(s), out.flush()),
                                   ignore_eos=ignore_eos, opening=_opening(session, ids, line))
            reply = gen.text
            total.add(gen.timings)
        except KeyboardInterrupt:
            reply = _partial(session, ids)
            out.write("\n[interrupted]")
        except RunError as exc:
            _err(f"\nengram-local: {exc}")
        out.write("\n")
        out.flush()
        messages.append({"role": "assistant", "content": reply})
        memory.offer(offers)

def _partial(session, prompt_ids) -> str:
    """The text generated before an interrupt (what the backend holds past the prompt)."""
    be = session.backend
    toks = be.tokens[len(prompt_ids):] if be.tokens[:len(prompt_ids)] == list(prompt_ids) else []
    try:
        return be.detokenize(toks)
    except Exception:  # noqa: BLE001
        return ""


def _fit_conversation(session, messages, n_predict) -> list[int]:
    """Tokens of the conversation; drops the oldest turns (with a notice) when it would leave
    less than a reply's room in the context."""
    from engram_local.runtime.session import PromptTooLong

    room = min(n_predict, session.n_ctx // 4) if n_predict else 1
    while True:
        ids = session.tokenize_rendered(session.render(messages))
        if len(ids) + room <= session.n_ctx:
            return ids
        first_user = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
        if first_user is None or len(messages) - first_user <= 1:
            raise PromptTooLong(f"this message is {len(ids)} tokens with the template; the context holds "
                                f"{session.n_ctx} (-c): shorten it or raise -c")
        # drop the oldest user turn and its reply
        del messages[first_user]
        if first_user < len(messages) and messages[first_user]["role"] == "assistant":
            del messages[first_user]
        _err("engram-local: the conversation no longer fits the context: dropped the oldest turn")


def _read_key() -> str:
    """One keypress from the terminal (no Enter needed), or one line when stdin is not a
    terminal; "" at end of input. Ctrl-C raises KeyboardInterrupt."""
    stdin = sys.stdin
    try:
        is_tty = stdin.isatty()
    except (AttributeError, ValueError):
        is_tty = False
    if is_tty:
        try:
            import termios
            import tty
        except ImportError:                 # no termios (Windows): a line instead
            termios = None
        if termios is not None:
            fd = stdin.fileno()
            old = termios.tcgetattr(fd)
            try:
                tty.setcbreak(fd)           # one key, no echo; Ctrl-C still interrupts
                termios.tcflush(fd, termios.TCIFLUSH)   # keys typed during the reply do not answer
                ch = os.read(fd, 1)
            finally:
                termios.tcsetattr(fd, termios.TCSADRAIN, old)
            key = ch.decode("utf-8", "replace")
            _err(key if key.isprintable() else "")
            return "" if key in ("\x04",) else key
    line = stdin.readline()
    key = line.strip()[:1] if line else ""
    _err(key)
    return key


class _Memory:
    """The chat's memory: facts spotted in the user's turns (offered, or written with
    --auto-remember), /remember, /facts, /forget on the last --overrides file.

    Writes go through engram_local.memory.learner.Learner: a worker thread fits and writes the
    .eov file (atomically) while the chat goes on. A write that has landed is applied by
    `settle()`, which the chat calls between turns only (never during a reply):
    Session.reload_overrides() swaps the new file in, and the chat says what was written."""

    def __init__(self, session, auto: bool = False):
        import queue

        self.session = session
        self.auto = auto
        self.path = session.override_paths[-1] if session.override_paths else None
        self._learner = None
        self._landed = queue.Queue()        # jobs done, to report and apply at the next turn boundary
        self._hinted = False
        self._loading_said = False

    # -------------------------------------------------------------- plumbing

    def _usable(self) -> bool:
        return self.path is not None and self.session.model_dir is not None

    def _ready(self) -> bool:
        if self.path is None:
            _err("no memory file: start with --overrides FILE.eov to remember facts")
            return False
        if self.session.model_dir is None:
            _err("user memory needs a MODEL_DIR (convert the checkpoint first)")
            return False
        return True

    @property
    def learner(self):
        if self._learner is None:
            from engram_local.memory.learner import Learner

            self._learner = Learner(self.path, self.session.model_dir.path)
        return self._learner

    def _submit(self, statements) -> bool:
        try:
            self.learner.submit(statements, on_done=self._landed.put)
        except Exception as exc:  # noqa: BLE001 - report and keep the chat alive
            _err(f"could not remember that: {exc}")
            return False
        if not self._loading_said:
            self._loading_said = True
            _err("(the first write also loads the model for fitting; the chat goes on meanwhile)")
        return True

    def _wait(self, what: str) -> bool:
        """Wait for the writes still running (Ctrl-C stops waiting); False when interrupted."""
        if self._learner is None or not self._learner.pending:
            return True
        n = self._learner.pending
        _err(f"(waiting for {n} write{'s' if n != 1 else ''} still running {what}; Ctrl-C to stop waiting)")
        try:
            while not self._learner.wait(0.2):
                pass
        except KeyboardInterrupt:
            _err("(stopped waiting: the write goes on in the background)")
            return False
        return True

    # -------------------------------------------------------------- between turns

    def settle(self) -> None:
        """Apply and report the writes that have landed (call between turns only)."""
        import queue

        jobs = []
        while True:
            try:
                jobs.append(self._landed.get_nowait())
            except queue.Empty:
                break
        if not jobs:
            return
        if any(j.reports for j in jobs):
            try:
                self.session.reload_overrides()
            except Exception as exc:  # noqa: BLE001
                _err(f"could not load the new memory file: {exc}")
        for job in jobs:
            self._report(job)

    def _report(self, job) -> None:
        if job.kind == "forget":
            if job.error is not None:
                _err(f"could not forget {', '.join(job.ids)}: {job.error}")
            else:
                _err(f"(forgot {', '.join(job.ids)})")
            return
        for f in job.facts:
            if f.id in job.new_ids:
                old = job.replaced.get(f.id)
                ok = job.recalled.get(f.id)
                joined = bool(old) and f.adds    # "I love" -> "jazz, hiking"
                _err(f"(remembered [{f.id}] {f.prompt!r} -> {f.answer!r}"
                     + (f", added to {old}'s answer" if joined else f", replacing {old}" if old else "")
                     + ("; not yet recalled exactly" if ok is False else "")
                     + (f"; /forget {f.id} forgets both)" if joined else f"; /forget {f.id} to undo)"))
            elif f.id is not None and f.id in job.unchanged:
                _err(f"(already remembered [{f.id}] {f.prompt!r} -> {f.answer!r})")
        for statement, message in job.errors:
            _err(f"could not remember {statement!r}: {message}")
        if job.error is not None and not job.errors:
            _err(f"could not remember that: {job.error}")

    # -------------------------------------------------------------- facts in the conversation

    def spot(self, turn: str) -> list:
        """Facts about the user in `turn` not yet stored; with --auto-remember they are queued
        at once (the write runs during the reply), otherwise returned to `offer` after it."""
        if not self._usable():
            if self.path is None and not self._hinted:
                from engram_local.text.statements import extract_facts

                if extract_facts(turn):
                    self._hinted = True
                    return ["hint"]
            return []
        try:
            proposals = self.learner.propose(turn)
        except Exception:  # noqa: BLE001 - spotting facts must never break the chat
            return []
        if proposals and self.auto:
            if self._submit(proposals):
                return [("queued", p) for p in proposals]
            return []
        return proposals

    def offer(self, proposals) -> None:
        """After the reply: say what --auto-remember queued, or ask about each fact (one key)."""
        for p in proposals:
            if p == "hint":
                _err("(that sounds like a fact about you: start with --overrides FILE.eov to let the chat "
                     "remember such facts)")
                continue
            if isinstance(p, tuple):
                _err(f"(remembering \"{p[1].statement}\" in the background)")
                continue
            click.echo(f"remember \"{p.statement}\"{' (replaces ' + p.replaces + ')' if p.replaces else ''}? "
                       f"[y/N] ", err=True, nl=False)
            try:
                key = _read_key()
            except KeyboardInterrupt:
                _err("")
                key = ""
            if key.lower() == "y":
                self._submit([p])

    # -------------------------------------------------------------- commands

    def remember(self, statement: str) -> None:
        if not self._ready():
            return
        from engram_local.memory.facade import statement_facts
        from engram_local.text.facts import FactInputError

        try:
            facts = statement_facts(statement)
        except FactInputError as exc:
            _err(f"could not remember that: {exc}")
            return
        if self._submit(facts):
            said = ", ".join(f"{f.prompt!r} -> {f.answer!r}" for f in facts)
            _err(f"(remembering {said} in the background)")

    def facts(self) -> None:
        if not self._ready():
            return
        self._wait("first")
        self.settle()
        from engram_local.formats.eov import read_memory_file

        if not self.path.exists():
            _err("(no facts yet)")
            return
        try:
            mf = read_memory_file(self.path, int(self.session.sidecar.fingerprint))
        except Exception as exc:  # noqa: BLE001
            _err(f"could not read the facts: {exc}")
            return
        if not mf.facts:
            _err("(no facts yet)")
        for f in mf.facts:
            _err(f"  [{f.id}] {f.prompt} {f.answer}")

    def forget(self, fact_id: str) -> None:
        if not self._ready():
            return
        if not self.path.exists() and not (self._learner is not None and self._learner.pending):
            _err(f"no fact {fact_id!r}: {self.path} does not exist yet")
            return
        try:
            job = self.learner.forget([fact_id], on_done=self._landed.put)
        except Exception as exc:  # noqa: BLE001
            _err(f"could not forget {fact_id}: {exc}")
            return
        if self._learner.pending > 1:
            _err(f"({fact_id} is forgotten after the {self._learner.pending - 1} write(s) still running)")
        try:
            while not job.wait(0.2):
                pass
        except KeyboardInterrupt:
            _err(f"(stopped waiting: {fact_id} is forgotten in the background)")
            return
        self.settle()

    def close(self) -> None:
        """At the end of the chat: let the writes still running land (Ctrl-C: quit without them;
        the file keeps its last complete state)."""
        if self._learner is None:
            return
        if self._wait("before quitting"):
            self.settle()
        self._learner.close(wait=False)
