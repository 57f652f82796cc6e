"""Optimisation of the placed entries' values.

Joint OPT (the default): one trainable row per entry, cross-entropy of every answer token, all
facts in one padded batch (bucketed), Rprop or Adam. Facts interact only through shared entries,
so they fall into connected components; a component stops (its rows freeze) once every answer
token of its facts is the argmax with its margin, a component failing too long grows rows
(Placement.grow), and the fit ends when all components have stopped and pass a check with the
values rounded to the file's type. OPT (the paper's): each fact alone, written together.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from engram_local.memory.batching import index


# A component's least margin counts as improved when it rises by more than this (the plateau stop,
# FitSettings.plateau): smaller moves are the swing of items pulling apart, not progress.
PLATEAU_GAIN = 0.05


class Optimisation:
    """Fits the values of a Placement's entries over the items, through one Batches."""

    def __init__(self, batches, settings, scale, progress=None, trace: list | None = None):
        self.batches, self.model = batches, batches.model
        self.s, self.lr, self.row_scale = settings, scale.lr, scale.row_scale
        self.progress = progress
        self.trace = trace if trace is not None else []   # (step, loss, components left, entries)
        self.final_margins: dict = {}

    def run(self, items, facts, placement, extend=None) -> int:
        """Optimise placement.values in place; the number of optimizer steps. `extend()`, called
        after rows were added or unfrozen, may append items to `items` (those the change
        reaches) and returns whether it did."""
        if self.s.method == "unembed":
            return 0
        if self.s.method == "opt":
            return self.opt(items, facts, placement)
        return self.joint(items, placement, extend)

    # ------------------------------------------------------------ joint
    def joint(self, items, placement, extend=None) -> int:
        s, values, entries = self.s, placement.values, placement.entries
        param = torch.nn.Parameter(torch.from_numpy(np.stack(values)) if values else torch.zeros(0, self.model.d))
        opt = self._make_opt(param)
        fixed: set[int] = set()

        def restage():
            nonlocal param, opt, fixed
            fixed = set(placement.fixed.tolist())
            comp = self.batches.restage(items, entries, fixed=fixed)
            if len(values) > param.shape[0]:       # new entries: grow the parameter, keep Adam state
                new = torch.from_numpy(np.stack(values[param.shape[0]:]))
                old_state = opt.state.get(param, {})
                param = torch.nn.Parameter(torch.cat([param.detach(), new]))
                opt = self._make_opt(param)
                if old_state:
                    opt.state[param] = self._grow_state(old_state, len(new))
            return comp

        comp = restage()

        def untrainable():
            # components no trainable row reaches cannot change: never active
            has = {comp[i] for i, it in enumerate(items)
                   if any(int(e) not in fixed for e in it.idx[it.idx >= 0])}
            return {int(c) for c in comp} - has

        done: set[int] = untrainable()   # converged (or unchangeable) components
        failing_since: dict[int, int] = {}
        fair_since: dict[int, int] = {}            # component -> step it was first fair at
        started: dict[int, int] = {}               # component -> step it first ran at
        best_least: dict[int, tuple] = {}          # component -> (its best least margin, step)
        gave_up: set[int] = set()                  # items of components that stopped short
        step = 0
        checks = 0
        bar = self.progress(total=s.max_steps) if self.progress else None
        passed: dict[int, int] = {}     # item -> the step it last met its margin at
        verify: set[int] = set()        # components to evaluate whole at the next step
        first_ran: dict[int, int] = {}  # item -> the step it first ran at (kept across restages)
        while step < s.max_steps:
            active = [i for i, it in enumerate(items) if it.train and comp[i] not in done]
            if not active:
                # every component converged: check everything with the stored value type
                checks += 1
                failed = [i for i in self.check(items, self.rounded(param.detach())) if i not in gave_up]
                self.trace.append(("check", len(failed), sorted({items[i].fact for i in failed})))
                if not failed or checks > 8:
                    break
                for i in failed:
                    items[i].train = True
                    passed.pop(i, None)
                    done.discard(comp[i])
                    fair_since.pop(comp[i], None)
                    started.pop(comp[i], None)
                continue
            # items that met their margin rest (no forward, no backward) and are looked at again
            # every `recheck` steps; the rows only resting items read do not move meanwhile
            if s.recheck > 0:
                run = [i for i in active if i not in passed or step - passed[i] >= s.recheck
                       or comp[i] in verify]
            else:
                run = active
            opt.zero_grad(set_to_none=False)
            loss, item_margins = self.batches.run(items, run, param, backward=True,
                                                  scale=1.0 / len(run), fast=s.fast)
            item_min = {i: float(m.min()) for i, m in item_margins.items()}
            for i, ok in self.batches.guards_ok.items():
                if not ok:          # a broken guard: the item has not met its margin
                    item_min[i] = min(item_min[i], items[i].need - 1e-3)
            for i in run:
                if item_min[i] >= items[i].need:
                    passed[i] = step
                else:
                    passed.pop(i, None)
            ran = set(run)
            snapshot = param.detach().clone()
            comp_ok: dict[int, bool] = {}
            comp_whole: dict[int, bool] = {}
            comp_fair: dict[int, bool] = {}
            comp_least: dict[int, float] = {}
            comp_first: dict[int, int] = {}
            comp_prompts: dict[int, bool] = {}
            for i in active:
                c = comp[i]
                if i in ran:
                    first_ran.setdefault(i, step)
                comp_first[c] = min(comp_first.get(c, step), first_ran.get(i, step))
                comp_ok[c] = comp_ok.get(c, True) and i in passed
                comp_whole[c] = comp_whole.get(c, True) and i in ran
                comp_fair[c] = comp_fair.get(c, True) and (i in passed or (
                    i in ran and item_min[i] >= self._fair(items[i])))
                comp_prompts[c] = comp_prompts.get(c, True) and (
                    items[i].chat or i in passed or (i in ran and item_min[i] >= items[i].need))
                if i in ran:
                    comp_least[c] = min(comp_least.get(c, np.inf), item_min[i])
            # a component is done when all its items meet their margins at one evaluation
            newly = [c for c, ok in comp_ok.items() if ok and comp_whole[c]]
            verify = {c for c, ok in comp_ok.items() if ok and not comp_whole[c]}
            # a component whose prompts all give their answers with their full margin and whose
            # chat forms all give theirs with a fair one (`settings.fair`) stops there once it
            # was first so `patience` steps ago: the last steps to the chat forms' full margins
            # are the slowest (facts sharing rows pull them back and forth; facts whose chat
            # forms contradict each other never get there)
            for c, fair in comp_fair.items():
                if c in newly or c in verify:
                    continue
                started.setdefault(c, step)
                if fair:
                    fair_since.setdefault(c, step)
                least = comp_least.get(c, -1.0)
                if c not in best_least or least > best_least[c][0] + PLATEAU_GAIN:
                    best_least[c] = (least, step)
                late = step - started[c] >= s.late and (
                    least >= s.late_margin                               # good enough, or
                    or step - best_least[c][1] >= s.plateau)             # no better for long
                capped = s.give_up > 0 and step - comp_first[c] >= s.give_up or (
                    s.give_up_chat > 0 and comp_prompts[c] and step - comp_first[c] >= s.give_up_chat)
                if late or capped or (fair and step - fair_since[c] >= s.patience):
                    newly.append(c)
                    gave_up.update(i for i in active if comp[i] == c)
            # entries only converged components or resting items read keep the values that passed
            live = torch.zeros(param.shape[0], dtype=torch.bool)
            for i in active:
                if comp[i] not in newly and i not in passed:
                    used = items[i].idx[items[i].idx >= 0]
                    live[torch.from_numpy(np.unique(used))] = True
            if fixed:
                live[torch.from_numpy(np.fromiter(fixed, np.int64, len(fixed)))] = False
            opt.step()
            with torch.no_grad():
                param[~live] = snapshot[~live]
            done.update(newly)
            step += 1
            left = {comp[i] for i in active} - set(newly)
            self.trace.append((step, round(loss, 3), len(left), param.shape[0],
                               sorted({items[i].fact for i in active if comp[i] in left})[:8], len(run)))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", left=len(left))
            # growth: components failing too long get rows at their failing positions (or, when
            # they have none to get, the fixed rows they read are freed)
            grew = False
            for c in left:
                failing_since.setdefault(c, step)
                if step - failing_since[c] >= s.grow_after:
                    failing_since[c] = step
                    mine = [i for i in run if comp[i] == c]
                    g = any([placement.grow(i, item_margins[i]) for i in mine])
                    if not g:
                        g = placement.unfreeze([i for i in mine if item_min[i] < items[i].need])
                    grew |= g
            if grew:
                self._store(param, values)
                was_done = {i for i in range(len(items)) if comp[i] in done}
                if extend is not None:
                    extend()
                comp = restage()
                # components all of whose items had stopped stay stopped (growth elsewhere does
                # not reach them); the others start over
                still: dict[int, bool] = {}
                for i in range(len(items)):
                    still[comp[i]] = still.get(comp[i], True) and i in was_done
                done = untrainable() | {c for c, ok in still.items() if ok}
                failing_since, fair_since, started, verify, best_least = {}, {}, {}, set(), {}
        if bar is not None:
            bar.close()
        self._store(param, values)
        return step

    def _fair(self, it) -> float:
        """The margin an item must keep for its component to stop short of full margins: a
        prompt's own in full, a chat form's `settings.fair`."""
        return min(it.need, self.s.fair) if it.chat else it.need

    @staticmethod
    def _store(param, values):
        cur = param.detach().numpy()
        for ei in range(cur.shape[0]):
            values[ei] = cur[ei].copy()

    def _make_opt(self, param):
        if self.s.optimizer == "rprop":
            return torch.optim.Rprop([param], lr=self.lr, step_sizes=(1e-3 * self.lr, 50 * self.lr))
        return torch.optim.Adam([param], lr=self.lr)

    def _grow_state(self, state, n_new):
        out = dict(state)
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.dim() == 2:
                fill = self.lr if k == "step_size" else 0.0
                out[k] = torch.cat([v, torch.full((n_new, v.shape[1]), fill, dtype=v.dtype)])
        return out

    # ------------------------------------------------------------ OPT (independent facts)
    def opt(self, items, facts, placement) -> int:
        """The paper's OPT: each fact alone from its UNEMBED_P start, `opt_steps` Adam steps with
        loss CE + 0.001 * mean((row - init)^2); facts written together, a later fact winning a
        shared row."""
        values = placement.values
        final = [v.copy() for v in values]
        total = 0
        for fi in range(len(facts)):
            mine = [i for i, it in enumerate(items) if it.fact == fi and it.train]
            if not mine:
                continue
            if items[mine[0]].idx is None:
                index(items, placement.entries)
            own = sorted({int(e) for i in mine for e in items[i].idx[items[i].idx >= 0]})
            for i in mine:
                items[i].cs = self.model.conv_state(items[i])
            init = torch.from_numpy(np.stack(values))
            param = torch.nn.Parameter(init.clone())
            opt = torch.optim.Adam([param], lr=self.lr)
            bt = self.batches.batch(items, mine)
            for _ in range(self.s.opt_steps):
                logits = self.model.forward(bt, param)
                loss = F.cross_entropy(logits, bt["tgt"]) + 0.001 * (((param[own] - init[own]) / self.row_scale) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += 1
            for e in own:
                final[e] = param.detach()[e].numpy().copy()
        values[:] = final
        return total

    # ------------------------------------------------------------ checks
    def rounded(self, values: torch.Tensor) -> torch.Tensor:
        if self.s.value_dtype == "f16":
            return values.half().float()
        return values

    @torch.no_grad()
    def check(self, items, values):
        """Indices of items whose answer is not the argmax with half the margin (or their own
        smaller one), with the values as given."""
        _, margins = self.batches.run(items, list(range(len(items))), values, backward=False)
        self._checked = (len(items), values.detach().clone(), margins)
        return [i for i in range(len(items)) if margins[i].min() < min(items[i].need, self.s.margin / 2)]

    @torch.no_grad()
    def final_check(self, items, facts, entries, vals) -> dict[str, bool]:
        """{fact id: every prompt of the fact, and at least one of its chat forms if it has any,
        produces its whole answer greedily} with the values rounded to the file's type (facts
        without items here: True). The chat forms stand in for questions nobody has asked yet:
        one of them failing (`give_up_chat`) is no failure of the fact."""
        values = self.rounded(torch.from_numpy(vals)) if len(vals) else torch.zeros(0, self.model.d)
        recalled = {f.id: True for f in facts if not f.keep_out}
        last = getattr(self, "_checked", None)
        if last is not None and last[0] == len(items) and last[1].shape == values.shape \
                and torch.equal(last[1], values):
            margins = last[2]          # the loop's last check ran on exactly these values
        else:
            self.batches.restage(items, entries)
            _, margins = self.batches.run(items, list(range(len(items))), values, backward=False)
        chat_ok: dict[str, bool] = {}
        for i, it in enumerate(items):
            fid = facts[it.fact].id
            if fid not in recalled:
                continue
            ok = bool(margins[i].min() > 0)
            if it.chat:
                chat_ok[fid] = chat_ok.get(fid, False) or ok
            elif not ok:
                recalled[fid] = False
        for fid, ok in chat_ok.items():
            recalled[fid] = recalled[fid] and ok
        self.final_margins = {i: margins[i] for i in range(len(items))}
        return recalled
