"""Tied parameters: one ``nn.Parameter`` registered on several modules (tied embeddings and
heads, weight-shared layers).

Why it matters: every surgery here replaces a layer's parameters by new, smaller ones on
that one module.  Pruning a tied layer would leave its partners holding the old tensor --
the tie silently broken and the "pruned" model larger than the original.  Layers listed
by :func:`tied_layers` are therefore never pruned (channel groups touching them are
skipped, weight-level and EigenDamage leave them dense), so every tie survives.
"""

from __future__ import annotations

from collections import defaultdict

from torch import nn


def tied_layers(model: nn.Module) -> dict[str, str]:
    """``{module name: description of the tie}`` for every module that shares a parameter
    object with another module.

    One module reachable under two paths is *not* a tie (its parameters are replaced once,
    for every path); ``named_modules()`` names are used as keys.
    """
    canonical = {id(m): n for n, m in model.named_modules()}
    registrations: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for pname, param in model.named_parameters(remove_duplicate=False):
        owner = pname.rpartition(".")[0]
        registrations[id(param)].append((pname, id(model.get_submodule(owner))))
    tied: dict[str, str] = {}
    for regs in registrations.values():
        owners = {module_id for _, module_id in regs}
        if len(owners) < 2:
            continue
        names = sorted(dict.fromkeys(pname for pname, _ in regs))
        text = " = ".join(repr(n) for n in names)
        for module_id in owners:
            name = canonical[module_id]
            tied[name] = f"{tied[name]}; {text}" if name in tied else text
    return tied
