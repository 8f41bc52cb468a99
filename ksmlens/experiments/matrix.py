"""The reviewer's matrix: every scenario on every kernel variant, verified.

For each variant (booted once, two NUMA nodes) and each scenario, the
scenario is run to its last step and :func:`ksmlens.experiments.verify.verify`
predicts from a paused snapshot and lets the kernel act: by migration
(``move_pages``) and, with the scenario run again from a clean state, by
reclaim (``memory.reclaim``) and, where asked, by memory failure
(``MADV_HWPOISON``, the ``mremap`` scenario only, last on each guest: a
poisoned page stays poisoned). One :class:`Cell` per (variant, scenario,
proof) keeps what the kernel did (how many KSM pages stayed, how many
mappings were swapped out or stayed mapped), whether the prediction under
the kernel's own rule agreed, and which walk rules the kernel behaved like
(``matches``). ``ksmlens matrix`` prints it as the table the README's "What
the kernels do" shows (rendered by :mod:`ksmlens.views.tables`), saves it
as JSON (:meth:`Matrix.save`, schema ``ksmlens-matrix/1``) and a picture
(:func:`ksmlens.views.plots.matrix_figure`).

    m = run_matrix(["stock", "v3"], ["mremap"])
    m.cell("v3", "mremap", "migration").outcome      # "pinned"
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ksmlens.errors import KsmlensError
from ksmlens.kernel.arch import X86_64, get_arch
from ksmlens.kernel.constants import BUS_MCEERR_AO, BUS_MCEERR_AR

__all__ = ["Cell", "Matrix", "run_matrix", "MATRIX_SCENARIOS", "MATRIX_BY", "DEFAULT_BY",
           "HWPOISON_SCENARIOS", "SCHEMA", "COMPARED_FIELDS"]

SCHEMA = "ksmlens-matrix/1"
# the scenarios whose KSM pages verify can move or reclaim (README "What the kernels do")
MATRIX_SCENARIOS = ("mremap", "fork", "file-cow")
# the proofs, in the order a guest runs them: hwpoison last (irreversible)
MATRIX_BY = ("migration", "reclaim", "hwpoison")
DEFAULT_BY = ("migration", "reclaim")
# verify_hwpoison() poisons a page of the mremap scenario's moved VMA only
HWPOISON_SCENARIOS = ("mremap",)
# what a cell says of the kernel (not when or how fast): two runs on the same
# kernels give the same values, and the vm test compares exactly these
COMPARED_FIELDS = ("arch", "variant", "scenario", "by", "rule", "candidates", "matches", "outcome",
                   "pages", "pages_stayed", "predicted_stay", "mappings", "mappings_unmapped",
                   "mappings_kept", "madvise", "signalled", "agree")


@dataclasses.dataclass
class Cell:
    """One verification of one scenario on one kernel.

    ``by``: ``migration`` or ``reclaim``. ``rule``: the kernel's own rule as
    ksmlens knows it (None for a kernel of unknown rule). ``candidates`` /
    ``matches``: the rules predicted under, and those the kernel behaved
    like (:class:`ksmlens.experiments.verify.VerifyResult`). ``outcome``:
    ``moves`` / ``pinned`` (migration), ``reclaimed`` / ``stays``
    (reclaim), ``unmapped`` / ``kept`` (hwpoison: every mapping became a
    hwpoison entry / some stayed mapped), ``mixed`` when some KSM pages went
    and some stayed.
    ``pages``: KSM pages compared (stable nodes, ``gone`` ones left out);
    ``pages_stayed``: those that did not move / were not freed;
    ``predicted_stay``: those the kernel's rule (else ``rows_rule``)
    predicted to stay. ``mappings``: mapped mappings of those pages;
    ``mappings_unmapped``: moved with their page (migration) or swap entries
    (reclaim) or hwpoison entries; ``mappings_kept``: still mapping the page
    that stayed. hwpoison only (else ""/[]): ``madvise``, what
    ``madvise(MADV_HWPOISON)`` returned (``ok`` / ``EBUSY``); ``signalled``,
    the SIGBUS each process got, by role: ``poisoner:AR`` (``BUS_MCEERR_AR``
    to the process that poisoned), ``other:AO``. hwpoison judges under the
    kernel's rule only: ``candidates`` / ``matches`` are empty. ``arch``:
    the guest's architecture (:mod:`ksmlens.kernel.arch` name; files from
    before ksmlens ran arm64 load as ``x86_64``).
    ``agree``: prediction and kernel agree on every compared page and
    mapping. ``release``, ``seconds``: the kernel's ``uname -r``, the
    verification's wall time in s."""
    variant: str
    scenario: str
    by: str
    release: str
    rule: str | None
    candidates: list[str]
    matches: list[str]
    outcome: str
    pages: int
    pages_stayed: int
    predicted_stay: int
    mappings: int
    mappings_unmapped: int
    mappings_kept: int
    agree: bool
    seconds: float = 0.0
    madvise: str = ""
    signalled: list[str] = dataclasses.field(default_factory=list)
    arch: str = X86_64.name

    @classmethod
    def of(cls, variant: str, scenario: str, res, arch: str = X86_64.name) -> "Cell":
        """The cell of a :class:`~ksmlens.experiments.verify.VerifyResult`
        on a guest of ``arch``."""
        return dataclasses.replace(cls._of(variant, scenario, res), arch=arch)

    @classmethod
    def _of(cls, variant: str, scenario: str, res) -> "Cell":
        if res.by == "hwpoison":
            return cls._of_hwpoison(variant, scenario, res)
        rows = [r for r in res.rows if r["agree"] is not None]
        gone_pages = {"gone", "absent"}
        pages = [p for p in res.pages if p["observed"] not in gone_pages]
        went = "moved" if res.by == "migration" else "reclaimed"
        stayed = sum(r["observed"] != went for r in rows)
        unmapped = sum(p["observed"] in ("moved", "swapped") for p in pages)
        kept = sum(p["observed"] in ("stayed", "mapped") for p in pages)
        if res.by == "migration":
            outcome = "moves" if not stayed else "pinned" if stayed == len(rows) else "mixed"
        else:
            outcome = "reclaimed" if not stayed else "stays" if stayed == len(rows) else "mixed"
        return cls(variant=variant, scenario=scenario, by=res.by, release=res.release,
                   rule=res.rule, candidates=list(res.candidates), matches=list(res.matches),
                   outcome=outcome, pages=len(rows), pages_stayed=stayed,
                   predicted_stay=sum(r["predicted"] == "stays" for r in rows),
                   mappings=len(pages), mappings_unmapped=unmapped, mappings_kept=kept,
                   agree=bool(res.agree), seconds=res.seconds.get("total", 0.0))

    @classmethod
    def _of_hwpoison(cls, variant: str, scenario: str, res) -> "Cell":
        (row,) = res.rows
        pages = [p for p in res.pages if p["observed"] != "gone"]
        kept = sum(p["observed"] == "mapped" for p in pages)
        code = {BUS_MCEERR_AR: "AR", BUS_MCEERR_AO: "AO"}
        signalled = sorted(f"{'poisoner' if pid == row['injector'] else 'other'}:"
                           f"{code.get(c, c)}" for pid, c in row["observed_signals"].items())
        return cls(variant=variant, scenario=scenario, by="hwpoison", release=res.release,
                   rule=res.rule, candidates=[], matches=[],
                   outcome="kept" if kept else "unmapped", pages=1, pages_stayed=int(bool(kept)),
                   predicted_stay=int(row["predicted"] == "stays"), mappings=len(pages),
                   mappings_unmapped=sum(p["observed"] == "unmapped" for p in pages),
                   mappings_kept=kept, agree=bool(res.agree),
                   seconds=res.seconds.get("total", 0.0), madvise=row["observed_madvise"],
                   signalled=signalled)

    def compared(self) -> dict:
        """The fields two runs on the same kernels must repeat (:data:`COMPARED_FIELDS`)."""
        d = dataclasses.asdict(self)
        return {k: d[k] for k in COMPARED_FIELDS}


@dataclasses.dataclass
class Matrix:
    """Cells of scenarios x kernels (architecture, variant) x proofs, in run
    order, and how it ran (``meta``: ``seconds`` in total and
    ``seconds_per_kernel`` keyed ``"ARCH VARIANT"``, ``date``)."""
    cells: list[Cell]
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def archs(self) -> list[str]:
        return list(dict.fromkeys(c.arch for c in self.cells))

    @property
    def kernels(self) -> list[tuple[str, str]]:
        """(arch, variant) of each kernel, in run order."""
        return list(dict.fromkeys((c.arch, c.variant) for c in self.cells))

    @property
    def variants(self) -> list[str]:
        return list(dict.fromkeys(c.variant for c in self.cells))

    @property
    def scenarios(self) -> list[str]:
        return list(dict.fromkeys(c.scenario for c in self.cells))

    @property
    def bys(self) -> list[str]:
        return [b for b in MATRIX_BY if any(c.by == b for c in self.cells)]

    def cell(self, variant: str, scenario: str, by: str,
             arch: str = X86_64.name) -> Cell | None:
        for c in self.cells:
            if (c.arch, c.variant, c.scenario, c.by) == (arch, variant, scenario, by):
                return c
        return None

    def merged(self, other: "Matrix") -> "Matrix":
        """This matrix with ``other``'s cells added, each replacing this one's
        cell of the same (arch, variant, scenario, proof); kernels keep their
        order, ``other``'s new ones after. For adding one architecture's rows
        to a saved matrix (``ksmlens matrix --into FILE``)."""
        key = {(c.arch, c.variant, c.scenario, c.by): c for c in other.cells}
        cells = [key.pop((c.arch, c.variant, c.scenario, c.by), c) for c in self.cells]
        cells += list(key.values())
        per = {**self.meta.get("seconds_per_kernel", {}),
               **other.meta.get("seconds_per_kernel", {})}
        meta = {**self.meta, **other.meta, "seconds_per_kernel": per,
                "seconds": round(sum(per.values()), 1)}
        return Matrix(cells, meta)

    @property
    def agree(self) -> bool:
        return bool(self.cells) and all(c.agree for c in self.cells)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "meta": self.meta,
                "cells": [dataclasses.asdict(c) for c in self.cells]}

    def save(self, path: str | Path) -> Path:
        """Write the JSON (``schema`` ``ksmlens-matrix/1``) to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Matrix":
        """Read a saved matrix; another schema or a broken file is refused in one line."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise KsmlensError(f"no matrix file {path}", "run `ksmlens matrix -o DIR` first") \
                from None
        except (OSError, ValueError) as e:
            raise KsmlensError(f"{path} is not a matrix JSON file ({e})",
                               "give the matrix.json `ksmlens matrix -o DIR` wrote") from None
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise KsmlensError(f"{path}: schema {d.get('schema') if isinstance(d, dict) else None!r}"
                               f", not {SCHEMA}", "run `ksmlens matrix` again to write it")
        fields = {f.name for f in dataclasses.fields(Cell)}
        meta = dict(d.get("meta", {}))
        if "seconds_per_variant" in meta:       # written before ksmlens ran arm64
            meta["seconds_per_kernel"] = {f"{X86_64.name} {v}": t for v, t in
                                          meta.pop("seconds_per_variant").items()}
        return cls([Cell(**{k: v for k, v in c.items() if k in fields}) for c in d["cells"]],
                   meta)


def run_matrix(variants, scenarios=MATRIX_SCENARIOS, bys=DEFAULT_BY, *, name: str = "matrix",
               on_cell=None, memory: str = "2G", arch: str = X86_64.name) -> Matrix:
    """Run each of ``scenarios`` on each of ``variants`` (kernel variant names,
    built ones or ``vm build --source`` ones) of architecture ``arch``
    (:func:`ksmlens.kernel.arch.get_arch` names) and verify it by each of
    ``bys`` (``hwpoison``: on :data:`HWPOISON_SCENARIOS` only, after every
    other cell of the guest, vm.memory_failure_early_kill left at 0); one
    guest at a time, VM ``NAME-VARIANT`` (``NAME-arm64-VARIANT``; two NUMA nodes),
    always powered off. Each (scenario, proof) starts from the scenario's
    clean state (the workload quit, ``run=2`` first for non-core scenarios).
    ``on_cell(cell)`` is called as each cell is done. Raises
    :class:`KsmlensError` for an unknown variant, scenario or proof before
    anything boots."""
    from ksmlens.experiments.verify import verify
    from ksmlens.kernel.variants import get_variant
    from ksmlens.lab.scenarios import ScenarioRun, get_scenario
    from ksmlens.lab.vm import VM
    variants, scenarios, bys = list(variants), list(scenarios), list(bys)
    a = get_arch(arch)
    for v in variants:
        get_variant(v)
    for s in scenarios:
        get_scenario(s)
    for b in bys:
        if b not in MATRIX_BY:
            raise KsmlensError(f"verify by {b!r}: unknown proof", f"use one of {MATRIX_BY}")
    if not (variants and scenarios and bys):
        raise KsmlensError("an empty matrix", "name at least one variant, scenario and proof")
    if bys == ["hwpoison"] and not set(scenarios) & set(HWPOISON_SCENARIOS):
        raise KsmlensError(f"hwpoison runs on the {', '.join(HWPOISON_SCENARIOS)} scenario only",
                           "add --scenario mremap")
    bys = [b for b in MATRIX_BY if b in bys]       # hwpoison last on each guest
    plan = [(s, b) for b in bys for s in scenarios
            if b != "hwpoison" or s in HWPOISON_SCENARIOS]
    plan.sort(key=lambda sb: (sb[1] == "hwpoison", scenarios.index(sb[0]), bys.index(sb[1])))
    t0 = time.monotonic()
    cells, per_variant = [], {}
    for v in variants:
        tv = time.monotonic()
        vm_name = f"{name}-{v}" if a is X86_64 else f"{name}-{a.name}-{v}"
        vm = VM.up(vm_name, v, numa=2, memory=memory, quiet=True, arch=a.name)
        try:
            for s, b in plan:
                if b == "hwpoison":
                    res = verify(vm, by=b)      # runs its own mremap scenario
                else:
                    with ScenarioRun(vm, s) as run:
                        for st in run.scenario.steps:
                            run.step(st.name)
                        res = verify(vm, by=b)
                cell = Cell.of(v, s, res, arch=a.name)
                cells.append(cell)
                if on_cell:
                    on_cell(cell)
        finally:
            vm.down()
        per_variant[f"{a.name} {v}"] = round(time.monotonic() - tv, 1)
    return Matrix(cells, {"seconds": round(time.monotonic() - t0, 1),
                          "seconds_per_kernel": per_variant,
                          "date": time.strftime("%Y-%m-%d")})
