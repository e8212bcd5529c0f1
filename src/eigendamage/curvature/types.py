"""The words of the curvature API, declared once: which Fisher, which conv factor, which
factor kind, which eigenvalues.

Why ``Literal`` and not enums: the values arrive as plain strings from the CLI, config files
and users' calls (``fisher="empirical"``) and are written back into results as strings; a
``Literal`` lets a type checker hold every signature to the same spellings while the values
stay the strings everyone already passes.
"""

from __future__ import annotations

from typing import Literal, get_args

FisherType = Literal["true", "empirical"]
"""``"true"``: labels sampled from the model (the Fisher proper); ``"empirical"``: the
dataset's labels."""

ConvMode = Literal["patch", "channel"]
"""A conv's ``A`` factor: over the ``c_in*kh*kw`` patch, or over ``c_in`` with kernel offsets
as extra samples (EigenDamage's 1x1 ``Q_A``)."""

FactorKind = Literal["linear", "conv_patch", "conv_channel"]
"""What a :class:`~eigendamage.curvature.factors.KFactors`' ``A`` ranges over."""

EigenvalueSource = Literal["kfac", "ekfac"]
"""The Fisher diagonal in the eigenbasis: K-FAC's ``lam_S * lam_A``, or EKFAC's re-estimate
from per-example gradients."""

FISHER_TYPES: tuple[FisherType, ...] = get_args(FisherType)
CONV_MODES: tuple[ConvMode, ...] = get_args(ConvMode)
FACTOR_KINDS: tuple[FactorKind, ...] = get_args(FactorKind)
EIGENVALUE_SOURCES: tuple[EigenvalueSource, ...] = get_args(EigenvalueSource)


def factor_kind(is_linear: bool, conv_mode: ConvMode) -> FactorKind:
    """The factor kind of a layer: ``"linear"``, or the conv's mode."""
    return "linear" if is_linear else "conv_channel" if conv_mode == "channel" else "conv_patch"
