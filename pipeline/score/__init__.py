"""Relevance scoring, composed like skglm: a datafit x a penalty, minimised by a solver over a FeatureMatrix."""
from .datafit import MultinomialLogistic
from .matrix import FeatureMatrix
from .penalty import GroupL2Rows
from .relevance import score_store, relevance_key
from .solvers import FISTA, SOLVERS

__all__ = ["FeatureMatrix", "MultinomialLogistic", "GroupL2Rows", "FISTA", "SOLVERS", "score_store",
           "relevance_key"]
