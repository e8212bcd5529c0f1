"""K-FAC curvature: factor collection, eigendecomposition and the KFE."""

from .eigen import batched_eigh, damped, eigendecompose
from .factors import KFE, Eigen, KFactors
from .kfac import collect_kfac

__all__ = ["KFE", "Eigen", "KFactors", "batched_eigh", "collect_kfac", "damped", "eigendecompose"]
